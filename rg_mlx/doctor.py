"""What `rg-mlx doctor` checks: this machine, and whether every RG-LRU scan path here computes right.

`run()` returns a `Report` (also as a JSON-ready dict, `Report.to_dict()`); nothing here prints.
It covers the system (platform, CPU and its SIMD features, memory, Python, MLX, mlx-lm, the
default device, the BLAS and malloc state of the Linux fast path, whether rg_mlx's native CPU products
are loaded), the native products on every instruction set this CPU has against a float64 reference,
the device's measured read bandwidth, and for every scan path that runs here: agreement with the float64 reference on a
battery of cases (each kernel variant forced in turn), its speed against that bandwidth, its
self-check (GPU paths), a tiny random model run end to end against the ops path, and a bfloat16
model whose recurrent state must stay float32. `Report.ok` is True when everything agrees.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from . import _blas, kernels
from .config import ModelArgs
from .kernels import selfcheck
from .kernels.reference import naive_rg_lru
from .kernels.source import fused_scan, num_chunks
from .model import Model, initial_weight

# SIMD features worth naming, as /proc/cpuinfo spells them (x86 "flags", Arm "Features").
SIMD_FEATURES = (
    "sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16",
    "asimd", "asimdhp", "bf16", "i8mm", "sve", "sve2",
)  # fmt: skip
# macOS: sysctl names of the same features -> our names.
MACOS_FEATURES = {
    "hw.optional.avx2_0": "avx2",
    "hw.optional.avx512f": "avx512f",
    "hw.optional.neon": "asimd",
    "hw.optional.arm.FEAT_FP16": "asimdhp",
    "hw.optional.arm.FEAT_BF16": "bf16",
    "hw.optional.arm.FEAT_I8MM": "i8mm",
}
# y in 16 bits is the float32 state rounded once: (relative, absolute) half-spacing.
_ROUNDING = {mx.float32: (0.0, 0.0), mx.float16: (2.0**-11, 2.0**-25), mx.bfloat16: (2.0**-8, 0.0)}
SPEED_SHAPE = (1, 2048, 2560)  # a 2k-token prompt through one layer of the 2B model
BANDWIDTH_BYTES = 256 << 20


class _WithinTolerance:
    """A check that passes when it ran (`failure` None) with `error` within `tolerance`."""

    error: float | None
    tolerance: float
    failure: str | None

    @property
    def ok(self) -> bool:
        return self.failure is None and self.error is not None and self.error <= self.tolerance


@dataclass
class Case(_WithinTolerance):
    """One scan case against the float64 reference."""

    name: str
    shape: tuple[int, int, int]
    dtype: str
    variant: str  # "sequential", "chunked" or "auto" (the ops path has one)
    error: float | None  # max over (row, channel) of max_t |error| / max_t |reference|; None if it raised
    tolerance: float
    failure: str | None = None


@dataclass
class Speed:
    shape: tuple[int, int, int]
    dtype: str
    seconds: float
    bytes_per_second: float  # the RG-LRU's unavoidable traffic over the time
    fraction_of_bandwidth: float


@dataclass
class SelfCheck:
    dtypes: str
    failure: str | None
    seconds: float

    @property
    def ok(self) -> bool:
        return self.failure is None


@dataclass
class ModelCheck(_WithinTolerance):
    """A tiny random model through one path against the ops path (float32), or a bfloat16 model."""

    path: str
    dtype: str
    error: float | None  # max |logits - reference| / max |reference|
    tolerance: float
    state_dtype: str | None  # the recurrent state's dtype after the run
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return _WithinTolerance.ok.fget(self) and self.state_dtype == "float32"


@dataclass
class ProductCheck(_WithinTolerance):
    """One of rg_mlx's native CPU products (`rg_mlx.cpu.native`) on one instruction set against float64."""

    isa: str
    product: str  # e.g. "4-bit, float32 x, 3 rows"
    error: float | None  # max |y - reference| / (|x| @ |w|.T): the sums' rounding, relative to their terms
    tolerance: float
    failure: str | None = None


@dataclass
class PathReport:
    path: str
    accuracy: list[Case]
    speed: Speed | None
    self_check: list[SelfCheck] | None  # GPU paths only

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.accuracy) and all(s.ok for s in self.self_check or [])


@dataclass
class Report:
    rg_mlx: str
    platform: str
    cpu: dict
    memory_bytes: int | None
    python: str
    mlx: str
    mlx_lm: str | None
    default_device: str
    device: dict
    blas: dict
    native: dict  # "status" (as `rg-mlx --version` says it) and "products" (`ProductCheck`s; none if not loaded)
    bandwidth_bytes_per_second: float
    paths: list[PathReport]
    model: list[ModelCheck]
    bfloat16_model: list[ModelCheck]
    self_check_cache: dict  # the file and what it remembers (failures make `auto` use the ops path)
    seconds: float = 0.0
    ok: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        self.ok = (
            all(p.ok for p in self.paths)
            and all(m.ok for m in self.model)
            and all(m.ok for m in self.bfloat16_model)
            and all(c.ok for c in self.native["products"])
        )

    def to_dict(self) -> dict:
        """Every field, JSON-ready; each check also carries its `ok`."""
        data = asdict(self)
        for p, pd in zip(self.paths, data["paths"]):
            pd["ok"] = p.ok
            for c, cd in zip(p.accuracy, pd["accuracy"]):
                cd["ok"] = c.ok
            for s, sd in zip(p.self_check or [], pd["self_check"] or []):
                sd["ok"] = s.ok
        for key in ("model", "bfloat16_model"):
            for m, md in zip(getattr(self, key), data[key]):
                md["ok"] = m.ok
        for c, cd in zip(self.native["products"], data["native"]["products"]):
            cd["ok"] = c.ok
        return data


# ---------------------------------------------------------------- the system


def cpu_info() -> dict:
    """The CPU's model name, logical cores and SIMD features (of `SIMD_FEATURES`)."""
    name, features = platform.processor() or platform.machine(), []
    if sys.platform.startswith("linux"):
        try:
            name, features = parse_cpuinfo(open("/proc/cpuinfo").read())
        except OSError:
            pass
    elif sys.platform == "darwin":
        name = _sysctl("machdep.cpu.brand_string") or name
        features = parse_macos_features({key: _sysctl(key) for key in MACOS_FEATURES})
    return {"model": name, "cores": os.cpu_count(), "simd": features}


def parse_cpuinfo(text: str) -> tuple[str, list[str]]:
    """(model name, SIMD features) from the text of Linux's /proc/cpuinfo (x86 or Arm)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or fields.get("Hardware") or fields.get("CPU part") or platform.machine()
    flags = set((fields.get("flags") or fields.get("Features") or "").split())
    return name, [f for f in SIMD_FEATURES if f in flags]


def parse_macos_features(values: dict[str, str | None]) -> list[str]:
    """SIMD features from `sysctl -n` values of `MACOS_FEATURES`' names ("1": present)."""
    found = {MACOS_FEATURES[k] for k, v in values.items() if k in MACOS_FEATURES and (v or "").strip() == "1"}
    return [f for f in SIMD_FEATURES if f in found]


def _sysctl(name: str) -> str | None:
    try:
        result = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def memory_bytes() -> int | None:
    """Physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        value = _sysctl("hw.memsize")
        return int(value) if value and value.isdigit() else None


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _device_info() -> dict:
    info = mx.device_info() if hasattr(mx, "device_info") else {}
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in info.items()}


# ---------------------------------------------------------------- timing


def _best_time(fn: Callable[[], object], repeat: int = 3) -> float:
    """The shortest of `repeat` evaluated runs of `fn`, after one warm-up run."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(repeat):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(fn())
        mx.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def read_bandwidth(nbytes: int = BANDWIDTH_BYTES) -> float:
    """Bytes per second of summing a float32 array of `nbytes` on the default device."""
    big = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(big)
    return nbytes / _best_time(lambda: mx.sum(big))


# ---------------------------------------------------------------- the scan against float64

Scan = Callable[..., tuple[mx.array, mx.array]]


def _case(seed: int, B: int, T: int, L: int, dtype: mx.Dtype, *, slow: bool = False) -> dict[str, mx.array]:
    """Random inputs with document starts and an initial state; `slow`: channels a = 1 - 1e-4 and 1e-3."""
    rng = np.random.default_rng(seed)

    def cast(v: np.ndarray) -> mx.array:
        return mx.array(v.astype(np.float32)).astype(dtype)

    a_param = rng.uniform(-9.0, 1.0, L)
    gate_a = rng.standard_normal((B, T, L))
    reset = rng.random((B, T)) < 0.05
    reset[0, 0] = reset[-1, -1] = True
    if slow:  # sigmoid(0) = 1/2: a = exp(-4 softplus(a_param))
        a = np.where(np.arange(L) % 2 == 0, 1 - 1e-4, 1e-3)
        a_param, gate_a, reset[:] = np.log(np.expm1(-np.log(a) / 4.0)), np.zeros((B, T, L)), False
    return dict(
        x=cast(rng.standard_normal((B, T, L))),
        gate_x=cast(rng.standard_normal((B, T, L))),
        gate_a=cast(gate_a),
        a_param=cast(a_param),
        reset=mx.array(reset),
        h0=mx.array(rng.standard_normal((B, L)).astype(np.float32)),
    )


# (name, B, T, L, dtypes, slow channels, tolerance): the float32 state keeps about 1e-6 of float64 over
# short runs; over 1000 steps at a = 1 - 1e-4 a float32 `a h + b` loses up to ~1.5e-5 (README).
BATTERY = [
    ("document starts, h0, ragged", 3, 37, 300, (mx.float32, mx.float16, mx.bfloat16), False, 1e-6),
    ("one long row (chunked)", 1, 2000, 40, (mx.float32,), False, 1e-5),
    ("slow and fast channels, 1000 steps", 2, 1000, 8, (mx.float32,), True, 3e-5),
]


def scan_error(scan: Scan, case: dict[str, mx.array]) -> float:
    """Max over (row, channel) of max_t |error| / max_t |reference| for y (beyond one rounding of its dtype)
    and the last state, against the float64 naive RG-LRU of exactly `case`'s values."""
    values = {k: np.array(v if v.dtype == mx.bool_ else v.astype(mx.float32)) for k, v in case.items()}
    y_ref, h_ref = naive_rg_lru(**values)
    y, h = scan(**case)
    relative, absolute = _ROUNDING[case["x"].dtype]
    scale = np.maximum(np.abs(y_ref).max(axis=1), 1e-30)  # [B, L]
    y = np.array(y.astype(mx.float32)).astype(np.float64)
    y_err = np.maximum(np.abs(y - y_ref) - relative * np.abs(y_ref) - absolute, 0.0).max(axis=1) / scale
    h_err = np.abs(np.array(h).astype(np.float64) - h_ref) / scale
    worst = max(float(y_err.max()), float(h_err.max()))
    return worst if np.isfinite(y).all() and np.isfinite(worst) else float("inf")


def _variants(path: str) -> dict[str, Scan]:
    if path == "ops":
        return {"auto": kernels.rg_lru_ops}
    ks = kernels.path_kernels(path)
    return {
        "sequential": lambda **c: fused_scan(ks, **c, chunks=1),
        "chunked": lambda **c: fused_scan(ks, **c, chunks=max(2, num_chunks(*c["x"].shape))),
    }


def accuracy(path: str) -> list[Case]:
    """`path` (each kernel variant forced) on every case of `BATTERY`."""
    cases = []
    for seed, (name, B, T, L, dtypes, slow, tolerance) in enumerate(BATTERY):
        for dtype in dtypes:
            case = _case(seed, B, T, L, dtype, slow=slow)
            label = str(dtype).removeprefix("mlx.core.")
            try:
                variants = _variants(path)
            except Exception as e:  # kernels that cannot even be built
                cases.append(Case(name, (B, T, L), label, "all", None, tolerance, _first_line(e)))
                continue
            for variant, scan in variants.items():
                try:
                    cases.append(Case(name, (B, T, L), label, variant, scan_error(scan, case), tolerance))
                except Exception as e:
                    cases.append(Case(name, (B, T, L), label, variant, None, tolerance, _first_line(e)))
    return cases


def speed(path: str, bandwidth: float) -> Speed | None:
    """`path` on `SPEED_SHAPE` in the device's usual dtype (bfloat16 on a GPU, float32 on the CPU)."""
    B, T, L = SPEED_SHAPE
    dtype = mx.bfloat16 if mx.default_device().type == mx.DeviceType.gpu else mx.float32
    case = _case(99, B, T, L, dtype)
    try:
        seconds = _best_time(lambda: kernels.rg_lru(**case, path=path))
    except Exception:  # reported by the accuracy checks
        return None
    traffic = B * T * (L * 4 * dtype.size + 1)  # x, both gates, y, and the flags
    rate = traffic / seconds
    return Speed((B, T, L), str(dtype).removeprefix("mlx.core."), seconds, rate, rate / bandwidth)


def self_checks(path: str) -> list[SelfCheck]:
    """The self-check of a GPU path, run now (whatever the cache holds) for each dtype."""
    results = []
    for dtype in (mx.float32, mx.float16, mx.bfloat16):
        r = selfcheck.run(path, lambda: kernels.path_kernels(path), (dtype,) * 4)
        results.append(SelfCheck(r.dtypes, r.failure, r.seconds))
    return results


# ---------------------------------------------------------------- a tiny model end to end

# Two recurrent layers and one attention layer; L = 64 channels.
TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=192, num_hidden_layers=3, num_attention_heads=4)
TINY.update(block_types=["recurrent", "recurrent", "attention"], attention_window_size=16)
MODEL_SHAPES = ((2, 40), (1, 600))  # [B, T]: both kernel variants (L = 64)


def tiny_model(dtype: mx.Dtype = mx.float32) -> Model:
    """A small Griffin with DeepMind's initialisation plus noise on every weight (norms and biases too)."""
    args = ModelArgs(**TINY)
    model = Model(args)
    mx.random.seed(0)
    weights = [
        (name, (initial_weight(name, p.shape, args.num_hidden_layers) + 0.05 * mx.random.normal(p.shape)).astype(dtype))
        for name, p in tree_flatten(model.parameters())
    ]
    model.update(tree_unflatten(weights))
    mx.eval(model.parameters())
    return model


@contextlib.contextmanager
def _scan_path(path: str) -> Iterator[None]:
    """Force the scan path the model takes (it reads RG_MLX_SCAN at every call)."""
    saved = os.environ.get("RG_MLX_SCAN")
    os.environ["RG_MLX_SCAN"] = path
    try:
        yield
    finally:
        if saved is None:
            del os.environ["RG_MLX_SCAN"]
        else:
            os.environ["RG_MLX_SCAN"] = saved


def _model_run(model: Model, path: str) -> tuple[mx.array, str | None]:
    """Logits of a full pass and of a chunked prefill plus decode steps, for every `MODEL_SHAPES`; and the
    recurrent state's dtype."""
    outputs, state_dtype = [], None
    with _scan_path(path):
        for seed, (B, T) in enumerate(MODEL_SHAPES):
            tokens = mx.array(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (B, T)), mx.int32)
            cache = model.make_cache()
            parts = [model(tokens[:, :5], cache=cache), model(tokens[:, 5 : T - 2], cache=cache)]
            parts += [model(tokens[:, t : t + 1], cache=cache) for t in (T - 2, T - 1)]
            outputs += [model(tokens).reshape(-1), mx.concatenate(parts, axis=1).reshape(-1)]
            state_dtype = _recurrent_state_dtype(model, cache, B)
    return mx.concatenate(outputs).astype(mx.float32), state_dtype


def _recurrent_state_dtype(model: Model, cache: list, B: int) -> str | None:
    """The dtype of the recurrent layers' state `h` ([B, lru_width]); None if a layer holds none."""
    L = model.args.lru_width
    dtypes = set()
    for kind, c in zip(model.args.block_types * model.args.num_hidden_layers, cache):
        if kind == "recurrent":
            found = [a.dtype for _, a in tree_flatten(c.state) if isinstance(a, mx.array) and a.shape == (B, L)]
            if len(found) != 1:
                return None
            dtypes.add(str(found[0]).removeprefix("mlx.core."))
    return dtypes.pop() if len(dtypes) == 1 else None


def model_checks(paths: list[str]) -> tuple[list[ModelCheck], list[ModelCheck]]:
    """The tiny model through every path against the ops path in float32 (tolerance 2e-5 of the largest
    logit), and in bfloat16 against the float32 ops path (5e-2: bfloat16 weights and activations)."""
    float32, bfloat16 = tiny_model(mx.float32), tiny_model(mx.bfloat16)
    reference, _ = _model_run(float32, "ops")
    scale = float(mx.abs(reference).max())
    results: dict[str, list[ModelCheck]] = {"float32": [], "bfloat16": []}
    for dtype, model, tolerance in (("float32", float32, 2e-5), ("bfloat16", bfloat16, 5e-2)):
        for path in paths:
            try:
                logits, state = _model_run(model, path)
                error = float(mx.abs(logits - reference).max()) / scale
                error = error if np.isfinite(error) else float("inf")
                results[dtype].append(ModelCheck(path, dtype, error, tolerance, state))
            except Exception as e:
                results[dtype].append(ModelCheck(path, dtype, None, tolerance, None, _first_line(e)))
    return results["float32"], results["bfloat16"]


# The native products checked on each instruction set: (weight: bits or a dtype name, activations, rows); K and
# N are odd multiples of the group size (64), so the kernels' tails run; 40 rows take the prompt path.
PRODUCTS = [(4, "float32", 1), (8, "float32", 3), (4, "float32", 40), ("bfloat16", "float32", 1),
            ("bfloat16", "bfloat16", 5), ("bfloat16", "bfloat16", 40), ("float16", "float32", 40)]
# Relative to the sum of the terms' magnitudes: float32 sums (K = 320 terms: at most 2e-5, typically 1e-6),
# and the rounding of a bfloat16 result (2^-8 of its largest possible magnitude).
_PRODUCT_TOLERANCE = {"float32": 2e-5, "bfloat16": 2.0**-8}


def native_checks() -> list[ProductCheck]:
    """rg_mlx's native CPU products on every instruction set this CPU has (`PRODUCTS`), against float64;
    none where they are not loaded."""
    from .cpu import native

    if not native.available():
        return []
    rng = np.random.default_rng(0)
    K, N, group = 5 * 64, 3 * 64 + 8, 64
    w32 = mx.array(rng.standard_normal((N, K)).astype(np.float32))
    checks = []
    previous = native.isa()
    try:
        for isa in native.supported_isas():
            native.set_isa(isa)
            for weight, x_dtype, rows in PRODUCTS:
                x = mx.array(rng.standard_normal((rows, K)).astype(np.float32)).astype(getattr(mx, x_dtype))
                name = f"{weight}-bit" if isinstance(weight, int) else weight
                name = f"{name}, {x_dtype} x, {rows} row{'s' if rows > 1 else ''}"
                tolerance = _PRODUCT_TOLERANCE[x_dtype]
                try:
                    if isinstance(weight, int):
                        packed = mx.quantize(w32.astype(mx.bfloat16), group_size=group, bits=weight)
                        wq, scales, biases = packed  # bfloat16 scales, as converted from a bfloat16 checkpoint
                        w = mx.dequantize(wq, scales.astype(mx.float32), biases.astype(mx.float32), group_size=group,
                                          bits=weight)
                        y = native.quantized_matmul(x, *packed, group, weight)
                    else:
                        w = w32.astype(getattr(mx, weight))
                        y = native.matmul(x, w)
                    x64, w64 = np.array(x.astype(mx.float32), np.float64), np.array(w.astype(mx.float32), np.float64)
                    y64 = np.array(y.astype(mx.float32), np.float64)
                    error = np.abs(y64 - x64 @ w64.T) / (np.abs(x64) @ np.abs(w64).T)
                    checks.append(ProductCheck(isa, name, float(np.nan_to_num(error.max(), nan=np.inf)), tolerance))
                except Exception as e:
                    checks.append(ProductCheck(isa, name, None, tolerance, _first_line(e)))
    finally:
        native.set_isa(previous)
    return checks


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def run() -> Report:
    """Check this machine (see the module docstring); takes seconds to a minute."""
    from . import __version__

    start = time.perf_counter()
    bandwidth = read_bandwidth()
    paths = kernels.available_paths()
    path_reports = [
        PathReport(path, accuracy(path), speed(path, bandwidth), None if path == "ops" else self_checks(path))
        for path in paths
    ]
    model, bfloat16_model = model_checks(paths)
    from .cpu import native

    report = Report(
        rg_mlx=__version__,
        platform=platform.platform(),
        cpu=cpu_info(),
        memory_bytes=memory_bytes(),
        python=platform.python_version(),
        mlx=mx.__version__,
        mlx_lm=_version("mlx-lm"),
        default_device=str(mx.default_device()),
        device=_device_info(),
        blas={"library": _blas.active(), "malloc_reuses_memory": _blas.malloc_reuses_memory()},
        native={"status": native.status(), "products": native_checks()},
        bandwidth_bytes_per_second=bandwidth,
        paths=path_reports,
        model=model,
        bfloat16_model=bfloat16_model,
        self_check_cache={"file": str(selfcheck.cache_file()), "entries": selfcheck.cached_entries()},
    )
    report.seconds = time.perf_counter() - start
    return report


__all__ = ["Report", "run", "cpu_info", "parse_cpuinfo", "parse_macos_features", "scan_error", "tiny_model"]
