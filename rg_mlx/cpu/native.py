"""rg_mlx's own CPU products for MLX: decode and prompt products on MLX's storage formats.

MLX's CPU products other than float32 are far slower than reading their weights (MLX 0.32.4: a 4-bit
product decodes slower than float32), so a CPU model gains nothing from fewer bytes. These products,
an MLX C++ extension (`rg_mlx/cpu/csrc`, compiled at install where a C++ compiler exists), take the
same arrays as MLX's own (`mx.quantized_matmul` with MLX's affine format, bits 4 or 8, group sizes 32,
64 or 128; `x @ w.T` with a bfloat16 or float16 weight) and return what MLX would: the same dtype
(the promotion of the activations' and the weight's or scales' dtypes), float32 accumulation.

- Decode (1 to 8 rows of activations): the weight is read once, decoded in registers with AVX-512,
  AVX2 or portable C++ (chosen by CPUID), split over the cores by a persistent thread pool.
- Prompts (more rows): bfloat16 weights with bfloat16 activations use AVX512_BF16's bfloat16 dot
  products; other products widen or dequantize the weight tile by tile into float32 and call the
  `cblas_sgemm` that MLX itself calls (OpenBLAS through rg_mlx's router on the Linux fast path).
- Gradients with respect to the activations (and a dense weight), so LoRA training works through
  them; quantized weights are frozen, as in MLX.

The extension is built against one MLX version (MLX has no stable C++ ABI): under another one it is not
loaded and MLX's own products run. ``RG_MLX_NATIVE=off`` turns it off; ``RG_MLX_NATIVE_ISA`` (avx512bf16,
avx512, avx2, portable) and ``RG_MLX_NATIVE_THREADS`` override the instruction set and the threads.
`status()` says in one line which of these holds.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import mlx.core as mx

ENV_VAR = "RG_MLX_NATIVE"
ISA_ENV_VAR = "RG_MLX_NATIVE_ISA"
REBUILD_HINT = "reinstall rg-mlx (pip install -e .) where a C++ compiler is available"
_MODULE = f"{__package__}._native"
_BUILD_INFO = Path(__file__).with_name("_native_build.json")

_native: ModuleType | None = None
_status: str | None = None


def _load() -> tuple[ModuleType | None, str]:
    """The extension and a one-line status, or None and why MLX's own products run instead."""
    if os.environ.get(ENV_VAR, "").strip().lower() in ("off", "0", "false", "no"):
        return None, f"off ({ENV_VAR}=off; MLX's own products run)"
    if importlib.util.find_spec(_MODULE) is None:
        return None, f"not built (MLX's own products run; {REBUILD_HINT})"
    try:
        built_for = json.loads(_BUILD_INFO.read_text())["mlx"]
    except (OSError, ValueError, KeyError):
        return None, f"not loaded: no record of the MLX version it was built against ({REBUILD_HINT})"
    if built_for != mx.__version__:
        return None, (f"not loaded: built for MLX {built_for}, this is MLX {mx.__version__} "
                      f"(MLX's own products run; {REBUILD_HINT})")
    try:
        module = importlib.import_module(_MODULE)
        _self_test(module)
    except (ImportError, TypeError, ValueError, RuntimeError) as e:
        return None, f"not loaded: {str(e).splitlines()[0]} ({REBUILD_HINT})"
    note = ""
    isa = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if isa and isa not in module.supported_isas():
        note = f"; {ISA_ENV_VAR}={isa} ignored: this CPU has {', '.join(module.supported_isas())}"
    elif isa:
        module.set_isa(isa)
    return module, f"{module.isa()}, {module.threads()} threads (built for MLX {built_for}){note}"


def _self_test(module: ModuleType) -> None:
    """One tiny product against MLX's: catches a build whose arrays do not pass to MLX (nanobind ABI)."""
    x = mx.arange(64, dtype=mx.float32).reshape(1, 64) / 64
    w = (mx.arange(2 * 64, dtype=mx.float32).reshape(2, 64) / 128).astype(mx.bfloat16)
    if not mx.allclose(module.matmul(x, w), x @ w.astype(mx.float32).T, rtol=1e-5, atol=1e-5).item():
        raise RuntimeError("self-test product differs from MLX's")


def _module() -> ModuleType | None:
    global _native, _status
    if _status is None:
        _native, _status = _load()
    return _native


def available() -> bool:
    """Whether the native products are built, loaded and on (else MLX's own products run)."""
    return _module() is not None


def status() -> str:
    """One line for `rg-mlx --version`: the instruction set and threads in use, or why MLX's products run."""
    _module()
    return _status or ""


def _require() -> ModuleType:
    module = _module()
    if module is None:
        raise RuntimeError(f"rg_mlx's native CPU products are unavailable: {_status}")
    return module


def quantized_matmul(x: mx.array, w: mx.array, scales: mx.array, biases: mx.array, group_size: int,
                     bits: int) -> mx.array:
    """`mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size, bits)` (affine mode).

    Args:
        x: activations `[..., K]`, float32, bfloat16 or float16.
        w: the packed weight `[N, K * bits / 32]` (uint32), as `mx.quantize` makes it.
        scales, biases: `[N, K / group_size]`, float32, bfloat16 or float16.
        group_size: 32, 64 or 128.
        bits: 4 or 8.

    Returns:
        `[..., N]` in the promotion of x's, scales' and biases' dtypes.
    """
    return _require().quantized_matmul(x, w, scales, biases, group_size, bits)


def matmul(x: mx.array, w: mx.array) -> mx.array:
    """`x @ w.T` for a bfloat16 or float16 weight `w` `[N, K]` and activations `x` `[..., K]` (float32,
    bfloat16 or float16); the result has the promotion of their dtypes."""
    return _require().matmul(x, w)


def supported_isas() -> list[str]:
    """The instruction sets this CPU can run the products with, best first (e.g. avx512bf16, ..., portable)."""
    return list(_require().supported_isas())


def isa() -> str:
    """The instruction set the products use now."""
    return _require().isa()


def set_isa(name: str) -> str:
    """Use the instruction set `name` (one of `supported_isas()`); returns the one used before."""
    module = _require()
    previous = module.isa()
    module.set_isa(name)
    return previous


def threads() -> int:
    """Threads a product is split over (the calling thread and the pool's workers)."""
    return _require().threads()


def set_threads(n: int) -> None:
    """Resize the thread pool (`0`: one thread per physical core); not while products run."""
    _require().set_threads(n)
