"""The RG-LRU scan behind one function, `rg_lru`, with one dispatch point.

Paths: ``"metal"`` (fused Metal kernel, Apple GPU), ``"cuda"`` (the same kernel through MLX's
CUDA backend), ``"ops"`` (portable MLX ops, every backend). ``auto`` picks the kernel of the
GPU when the default device is a GPU that has one, otherwise ``ops``. A single step (T = 1,
decode) always runs the compiled elementwise `rg_lru_step`, never a kernel launch. Force a path
with the ``path`` argument or the ``RG_MLX_SCAN`` environment variable
(``auto`` | ``ops`` | ``metal`` | ``cuda``). Kernels are only built when their path is chosen.
"""

from __future__ import annotations

import os

import mlx.core as mx

from rg_mlx.errors import RGError
from .ops import linear_scan, rg_lru_ops, rg_lru_step, with_defaults
from .source import DTYPES, backend_kernels, fused_scan

__all__ = ["rg_lru", "linear_scan", "rg_lru_ops", "rg_lru_step", "available_paths", "select_path", "with_defaults"]

PATHS = ("ops", "metal", "cuda")


def _on_gpu() -> bool:
    return mx.default_device().type == mx.DeviceType.gpu


def available_paths() -> list[str]:
    """The scan paths that can run in this process (``ops`` always; a kernel when its GPU is the default device)."""
    paths = ["ops"]
    if mx.metal.is_available() and _on_gpu():
        paths.append("metal")
    if hasattr(mx, "cuda") and mx.cuda.is_available() and _on_gpu():
        paths.append("cuda")
    return paths


def select_path(path: str | None, x: mx.array) -> str:
    """The scan path `rg_lru` takes for `x`: `path`, else ``RG_MLX_SCAN``, else automatic (see above)."""
    path = path or os.environ.get("RG_MLX_SCAN") or "auto"
    if path not in ("auto",) + PATHS:
        raise RGError(f"unknown RG-LRU scan path {path!r}: set RG_MLX_SCAN to one of auto, {', '.join(PATHS)}")
    available = available_paths()
    if path == "auto":
        return available[-1] if x.dtype in DTYPES else "ops"  # the GPU's kernel, if any
    if path not in available:
        raise RGError(
            f"RG-LRU scan path {path!r} cannot run here (it needs its GPU as the default device): "
            f"set RG_MLX_SCAN to auto or one of {', '.join(available)}"
        )
    return path


def rg_lru(
    x: mx.array,
    gate_x: mx.array,
    gate_a: mx.array,
    a_param: mx.array,
    *,
    reset: mx.array | None = None,
    h0: mx.array | None = None,
    path: str | None = None,
) -> tuple[mx.array, mx.array]:
    """The RG-LRU of one layer: gate math and the linear recurrence, fused.

    Args:
        x: conv output `[B, T, L]` (model dtype).
        gate_x, gate_a: pre-activations of the input and recurrence gates `[B, T, L]`.
        a_param: the recurrence parameter `[L]` (before softplus).
        reset: `[B, T]` bool, True at a document start (state restarts, multiplier 1).
        h0: initial state `[B, L]` float32, or None for zeros.
        path: force a path (``"ops"``, ``"metal"``, ``"cuda"``); default from ``RG_MLX_SCAN`` or automatic.

    Returns:
        `y` `[B, T, L]` in `x.dtype` and the last state `[B, L]` in float32.
    """
    path = select_path(path, x)
    if x.shape[1] == 1:
        return rg_lru_step(x, gate_x, gate_a, a_param, reset, h0)
    if path == "ops":
        return rg_lru_ops(x, gate_x, gate_a, a_param, reset, h0)
    return fused_scan(backend_kernels(path), x, gate_x, gate_a, a_param, reset, h0)
