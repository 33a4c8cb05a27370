"""The CUDA kernels compile with the real CUDA compiler (`nvcc --ptx`), without an NVIDIA GPU.

Every kernel, for every input dtype, is rendered exactly as MLX's `cuda_kernel` builds it for the
launch `fused_scan` makes (`gpu_emulator.cuda_source`: MLX's default header include, our header,
the `mlx::core::cu` namespace, the signature and template constants) and compiled against
tests/cuda_prelude, a small stand-in for MLX's device header (not shipped in MLX's wheels), so a
CUDA syntax or type error fails here. MLX compiles with NVRTC for the GPU it runs on; nvcc checks
the same language. One architecture in the default run; all of them in the `slow` test.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlx.core as mx
import pytest
from gpu_emulator import cuda_source
from kernel_stand_ins import KERNELS, recording_kernels

from rg_mlx.kernels.source import DTYPES, fused_scan, kernel_specs

NVCC = shutil.which("nvcc")
PRELUDE = Path(__file__).parent / "cuda_prelude"
# Turing, Ampere, Hopper (MLX asks NVRTC for sm_XYa from compute capability 9 on).
ARCHITECTURES = ("sm_75", "sm_80", "sm_90a")
DEFAULT_ARCHITECTURE = "sm_80"

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc (the CUDA toolkit) is not on PATH")


def rendered() -> dict[str, tuple[str, str]]:
    """`"kernel dtype"` -> (the CUDA source MLX would compile for that launch, the kernel's name), for every
    kernel and dtype."""
    specs = kernel_specs("cuda")
    ks, launches = recording_kernels()
    sources = {}
    for dtype in DTYPES:
        x = mx.zeros((1, 10, 4), dtype)
        launches.clear()
        for chunks in (1, 2):
            fused_scan(ks, x, x, x, mx.zeros((4,), dtype), chunks=chunks)
        for kernel, call in launches:
            sources[f"{kernel} {str(dtype).removeprefix('mlx.core.')}"] = cuda_source(specs[kernel], call)
    assert len(sources) == len(KERNELS) * len(DTYPES)
    return sources


@functools.cache
def nvcc(source: str, arch: str) -> tuple[int, str, str, float]:
    """`nvcc --ptx` of `source` for `arch`: (return code, messages, PTX, seconds); each pair compiled once."""
    with tempfile.TemporaryDirectory(prefix="nvcc_") as folder:
        cu, ptx = Path(folder) / "kernel.cu", Path(folder) / "kernel.ptx"
        cu.write_text(source)
        command = [NVCC, "--ptx", f"-arch={arch}", "-std=c++17", f"-I{PRELUDE}", str(cu), "-o", str(ptx)]
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        return result.returncode, result.stderr, ptx.read_text() if ptx.exists() else "", seconds


def compile_all(sources: dict[str, tuple[str, str]], architectures: tuple[str, ...]) -> None:
    """Compile every source for every architecture in parallel; assert each compiles cleanly to its kernel."""
    jobs = [(label, arch) for label in sources for arch in architectures]
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        results = list(pool.map(lambda job: nvcc(sources[job[0]][0], job[1]), jobs))
    failures = []
    for (label, arch), (code, messages, ptx, _) in zip(jobs, results):
        name = sources[label][1]
        entry = f".entry _ZN3mlx4core2cu{len(name)}{name}E"  # mlx::core::cu::NAME(...), mangled
        if code or "warning" in messages or entry not in ptx:
            failures.append(f"{label} ({arch}):\n{messages or 'no kernel entry in the PTX'}")
    assert not failures, "\n".join(failures)
    each = sorted(r[3] for r in results)
    print(
        f"nvcc --ptx: {len(jobs)} kernels for {', '.join(architectures)} in {time.perf_counter() - start:.1f} s "
        f"({os.cpu_count()} in parallel; each {each[0]:.1f}-{each[-1]:.1f} s)"
    )


def test_every_kernel_and_dtype_compiles():
    compile_all(rendered(), (DEFAULT_ARCHITECTURE,))


@pytest.mark.slow
def test_every_kernel_and_dtype_compiles_for_every_architecture():
    compile_all(rendered(), ARCHITECTURES)


def test_nvcc_catches_a_type_error():
    """Negative control: a source with a CUDA type error (a member of a float) does not pass."""
    source = rendered()["rg_lru_sequential bfloat16"][0]
    broken = source.replace("h = rg_update(st, h);", "h = rg_update(st, h.value);")
    assert broken != source
    code, messages, _, _ = nvcc(broken, DEFAULT_ARCHITECTURE)
    assert code != 0 and "error" in messages
