"""The CPU's versions of the model's replaceable operations (`rg_mlx.model.Ops`).

Each computes the same function as the model's plain default, faster on MLX's CPU backend:
compiled polynomial math instead of one libm call per element (`fast_math`), and long prompts'
elementwise passes and attention split over one CPU stream per core (`parallel`).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..kernels import check_inputs, linear_scan, rg_lru as portable_rg_lru, select_path
from ..state import AttentionState
from . import fast_math
from .parallel import attention, elementwise

__all__ = ["attention", "filled_ring", "gelu_gate", "rg_lru", "soft_cap"]


def gelu_gate(y: mx.array, x: mx.array) -> mx.array:
    """`gelu(y) * x` in one compiled pass, split over CPU streams for a long prompt."""
    return elementwise(fast_math.gelu_mul, y, x)


def soft_cap(logits: mx.array, cap: float) -> mx.array:
    """`tanh(logits / cap) * cap` with the compiled polynomial tanh."""
    return fast_math.soft_cap(logits, cap)


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
    """`rg_mlx.kernels.rg_lru` with, on the portable path over more than one step, the gate math as
    one compiled polynomial pass over inputs of one contiguous shape, split over CPU streams.

    A decode step and the GPU kernels are the kernels' own.
    """
    if x.shape[1] <= 1 or x.size == 0 or select_path(path, x) != "ops":
        return portable_rg_lru(x, gate_x, gate_a, a_param, reset=reset, h0=h0, path=path)
    x, gate_x, gate_a, a_param, reset, h0 = check_inputs(x, gate_x, gate_a, a_param, reset, h0)
    # The compiled kernel runs ~5x faster on same-shape contiguous inputs than when it broadcasts.
    log_a_max = mx.contiguous(mx.broadcast_to(-8.0 * nn.softplus(a_param.astype(mx.float32)), x.shape))
    reset = mx.contiguous(mx.broadcast_to(reset[..., None], x.shape))
    a, b = elementwise(fast_math.rg_lru_gates, x, gate_x, gate_a, log_a_max, reset)
    y, h = linear_scan(a, b, h0)
    return y.astype(x.dtype), h


def filled_ring(state: AttentionState, positions: mx.array, window: int) -> tuple[mx.array, mx.array, mx.array]:
    """The ring's keys, values and key positions; while it is still filling, only its filled slots.

    Position p >= 0 sits in slot p % window, so until a row's next position reaches `window`, the
    slots from the largest next position on hold only left padding or nothing, which no query of a
    document sees: a prompt's early chunks and an early decode attend over fewer keys. Reading that
    bound waits for the state; a GPU decode step (queued ahead of the previous one) skips it.
    """
    keys, values, key_positions = state.keys, state.values, state.key_positions
    if positions.shape[1] > 1 or mx.default_device().type == mx.DeviceType.cpu:
        filled = max(0, positions[:, 0].max().item())
        if filled < window:
            return keys[:, :, :filled], values[:, :, :filled], key_positions[:, :filled]
    return keys, values, key_positions
