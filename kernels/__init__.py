"""The RG-LRU scan behind one function, `rg_lru`, with one dispatch point.

Paths: ``"ops"`` (portable MLX ops, every backend). Custom kernels plug in at
`_select_path`. Force a path with the ``path`` argument or the ``RG_MLX_SCAN``
environment variable (``auto`` | ``ops``).
"""

from __future__ import annotations

import os

import mlx.core as mx

from .ops import linear_scan, rg_lru_ops, rg_lru_step

__all__ = ["rg_lru", "linear_scan", "rg_lru_ops", "rg_lru_step", "available_paths"]

PATHS = ("ops",)


def available_paths() -> list[str]:
    """The scan paths that can run in this process."""
    return ["ops"]


def _select_path(path: str | None, T: int) -> str:
    path = path or os.environ.get("RG_MLX_SCAN", "auto")
    if path == "auto":
        return "ops"
    if path not in PATHS:
        raise ValueError(f"unknown scan path {path!r}: use one of auto, {', '.join(PATHS)}")
    if path not in available_paths():
        raise RuntimeError(f"scan path {path!r} cannot run here: available are {', '.join(available_paths())}")
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
        path: force a path (``"ops"``); default from ``RG_MLX_SCAN`` or automatic.

    Returns:
        `y` `[B, T, L]` in `x.dtype` and the last state `[B, L]` in float32.
    """
    _select_path(path, x.shape[1])
    return rg_lru_ops(x, gate_x, gate_a, a_param, reset, h0)
