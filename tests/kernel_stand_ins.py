"""Kernel sets that stand in for a GPU's, injected with `rg_mlx.kernels.use_kernels`.

- ``ops``: computes with the portable ops path behind the kernels' call (a GPU that works).
- ``emulated``: the real Metal source, emulated on the CPU (tests/gpu_emulator.py).
- ``no-compile``: the real source with a syntax error, so the (g++) compiler rejects it.
- ``wrong-value``: the real source reading every row's initial state from row 0.
- ``raises``: kernels that raise when launched, as MLX does when it cannot load a kernel.

Also a driver: ``python kernel_stand_ins.py FAULT LOG rg-mlx-args...`` runs the `rg-mlx` CLI with
the Metal path replaced by kernel set FAULT and appends one line to LOG per kernel launch.
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from rg_mlx import kernels  # first: rg_mlx sets up the BLAS before mlx.core loads, as `rg-mlx` does

import mlx.core as mx  # noqa: E402

from rg_mlx.kernels.ops import rg_lru_ops  # noqa: E402

FAULTS = ("no-compile", "wrong-value", "raises")
KERNELS = ("rg_lru_sequential", "rg_lru_chunk_summary", "rg_lru_chunk_apply")

_EDITS = {
    "no-compile": ("const RgStep st = rg_step(", "const RgStep st = rg_step_undefined("),
    "wrong-value": ("float h = h0[b * L + c];", "float h = h0[c];"),
}


class OpsKernel:
    """One kernel's call, answered by the ops path: `rg_lru_sequential` and `rg_lru_chunk_apply` return
    the whole scan (the chunk summaries are not needed for that and come back as zeros)."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, *, inputs, output_shapes, output_dtypes, **launch) -> list[mx.array]:
        if self.name == "rg_lru_chunk_summary":
            return [mx.zeros(s, d) for s, d in zip(output_shapes, output_dtypes)]
        x, gate_x, gate_a, a_param, reset, h0 = inputs[:6]
        return list(rg_lru_ops(x, gate_x, gate_a, a_param, reset, h0))


def recording_kernels() -> tuple[dict[str, Callable], list[tuple[str, dict]]]:
    """Ops-backed kernels that also record every launch as (kernel, the call's keyword arguments)."""
    launches: list[tuple[str, dict]] = []

    class Recording(OpsKernel):
        def __call__(self, **call) -> list[mx.array]:
            launches.append((self.name, call))
            return super().__call__(**call)

    return {n: Recording(n) for n in KERNELS}, launches


class Raising:
    def __call__(self, **call) -> list[mx.array]:
        raise RuntimeError("[metal::Device] Unable to load kernel custom_kernel_rg_lru (stand-in)")


def kernel_set(kind: str, workdir: Path) -> dict[str, Callable]:
    """The kernel set `kind` (see the module docstring); emulated ones compile under `workdir`."""
    if kind == "ops":
        return {n: OpsKernel(n) for n in KERNELS}
    if kind == "raises":
        return {n: Raising() for n in KERNELS}
    from gpu_emulator import Compiler, emulated_kernels

    edit = None
    if kind in _EDITS:
        old, new = _EDITS[kind]
        edit = lambda source: source.replace(old, new)  # noqa: E731
    elif kind != "emulated":
        raise ValueError(kind)
    return emulated_kernels("metal", Compiler(workdir), edit)


@contextlib.contextmanager
def injected(path: str, build: Callable[[], dict[str, Callable]], source_id: str) -> Iterator[None]:
    """`path` runs on the kernels `build()` returns until the block ends."""
    kernels.use_kernels(path, build, source_id=source_id)
    try:
        yield
    finally:
        kernels.use_kernels(path, None)


class Counting:
    """Wraps a kernel; appends a line to `log` at each launch."""

    def __init__(self, kernel: Callable, log: Path):
        self.kernel, self.log = kernel, log

    def __call__(self, **call) -> list[mx.array]:
        with open(self.log, "a") as f:
            f.write("launch\n")
        return self.kernel(**call)


def main(argv: list[str]) -> int:
    kind, log, *args = argv
    from rg_mlx.cli import main as cli_main

    with tempfile.TemporaryDirectory(prefix="stand_in_") as workdir:
        build = lambda: {n: Counting(k, Path(log)) for n, k in kernel_set(kind, Path(workdir)).items()}  # noqa: E731
        kernels.use_kernels("metal", build, source_id=f"stand-in {kind}")
        return cli_main(args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
