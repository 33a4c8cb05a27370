"""The RG-LRU in plain MLX ops: runs on every backend and is differentiable.

`rg_lru_ops` is the fused computation (gate math + scan) written once; the
custom kernels are checked against it. The scan processes chunks of `C` steps
vectorised across all chunks, carries the state between chunk ends, then fixes
up each chunk with a within-chunk cumulative product of `a`. Nothing here takes
a log or divides by a product of `a`, so fast-decaying channels cannot overflow.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from rg_mlx.errors import RGError

# Below this length a plain per-step loop is cheapest.
_SEQUENTIAL_MAX_T = 16


@mx.compile
def gate_math(
    x: mx.array,
    gate_x: mx.array,
    gate_a: mx.array,
    a_param: mx.array,
    reset: mx.array,
) -> tuple[mx.array, mx.array]:
    """The RG-LRU's elementwise part, in float32: returns `(a, b)` with `h_t = a_t h_{t-1} + b_t`.

    `a = exp(-8 * sigmoid(gate_a) * softplus(a_param))`, `b = sqrt(1 - a^2) * sigmoid(gate_x) * x`
    (`1 - a^2` as `-expm1(2 log a)`, accurate for `a` near 1); where `reset` (`[B, T]` bool) marks
    a document start, the multiplier is 1 and `a` is 0 (the state restarts from zero).
    """
    f32 = mx.float32
    log_a = -8.0 * mx.sigmoid(gate_a.astype(f32)) * nn.softplus(a_param.astype(f32))
    start = reset[..., None]
    multiplier = mx.where(start, 1.0, mx.sqrt(-mx.expm1(2.0 * log_a)))
    return mx.where(start, 0.0, mx.exp(log_a)), x.astype(f32) * mx.sigmoid(gate_x.astype(f32)) * multiplier


def _sequential_scan(a: mx.array, b: mx.array, h: mx.array) -> tuple[mx.array, mx.array]:
    ys = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        ys.append(h)
    return mx.stack(ys, axis=1), h


def linear_scan(a: mx.array, b: mx.array, h0: mx.array | None = None) -> tuple[mx.array, mx.array]:
    """`h_t = a_t * h_{t-1} + b_t` over axis 1 of `[B, T, L]` float32 arrays.

    Returns all states `[B, T, L]` and the last one `[B, L]`.
    """
    B, T, L = a.shape
    h = mx.zeros((B, L), mx.float32) if h0 is None else h0.astype(mx.float32)
    if T <= _SEQUENTIAL_MAX_T:
        return _sequential_scan(a, b, h)

    C = max(4, int(math.isqrt(T)))
    n = -(-T // C)
    pad = n * C - T
    if pad:
        # Padding with a = 1, b = 0 leaves the carried state unchanged.
        a = mx.concatenate([a, mx.ones((B, pad, L), a.dtype)], axis=1)
        b = mx.concatenate([b, mx.zeros((B, pad, L), b.dtype)], axis=1)
    a = a.reshape(B, n, C, L)
    b = b.reshape(B, n, C, L)

    # 1. Scan inside every chunk at once, each chunk starting from zero.
    local, _ = _sequential_scan(
        a.swapaxes(1, 2).reshape(B, C, n * L),
        b.swapaxes(1, 2).reshape(B, C, n * L),
        mx.zeros((B, n * L), mx.float32),
    )
    local = local.reshape(B, C, n, L).swapaxes(1, 2)  # [B, n, C, L]
    decay = mx.cumprod(a, axis=2)  # product of a within the chunk up to t

    # 2. Carry the state across chunk ends.
    carries = []
    for j in range(n):
        carries.append(h)
        h = decay[:, j, -1] * h + local[:, j, -1]
    carry = mx.stack(carries, axis=1)  # state entering each chunk, [B, n, L]

    # 3. Fix up every chunk with the state it starts from.
    y = local + decay * carry[:, :, None, :]
    y = y.reshape(B, n * C, L)[:, :T]
    return y, h


def rg_lru_ops(
    x: mx.array,
    gate_x: mx.array,
    gate_a: mx.array,
    a_param: mx.array,
    reset: mx.array | None = None,
    h0: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """The fused RG-LRU (gate math + scan) in MLX ops. See `rg_mlx.kernels.rg_lru`."""
    x, gate_x, gate_a, a_param, reset, h0 = check_inputs(x, gate_x, gate_a, a_param, reset, h0)
    if x.size == 0:
        return empty_result(x, h0)
    if x.shape[1] == 1:
        return _step(x, gate_x, gate_a, a_param, reset, h0)
    a, b = gate_math(x, gate_x, gate_a, a_param, reset)
    y, h = linear_scan(a, b, h0)
    return y.astype(x.dtype), h


@mx.compile
def _step(x, gate_x, gate_a, a_param, reset, h0):
    a, b = gate_math(x[:, 0], gate_x[:, 0], gate_a[:, 0], a_param, reset[:, 0])
    h = a * h0 + b
    return h[:, None].astype(x.dtype), h


def rg_lru_step(
    x: mx.array,
    gate_x: mx.array,
    gate_a: mx.array,
    a_param: mx.array,
    reset: mx.array | None = None,
    h0: mx.array | None = None,
) -> tuple[mx.array, mx.array]:
    """One decode step (T = 1) as a single compiled elementwise function."""
    x, gate_x, gate_a, a_param, reset, h0 = check_inputs(x, gate_x, gate_a, a_param, reset, h0)
    if x.size == 0:
        return empty_result(x, h0)
    return _step(x, gate_x, gate_a, a_param, reset, h0)


def check_inputs(
    x: mx.array,
    gate_x: mx.array,
    gate_a: mx.array,
    a_param: mx.array,
    reset: mx.array | None,
    h0: mx.array | None,
) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array, mx.array]:
    """The RG-LRU inputs at their full shapes, or an `RGError` naming the one that does not fit.

    `x` must be `[B, T, L]`; the gates broadcast to it, `a_param` to `[L]`, `reset` to `[B, T]`
    (as bool, all False when None) and `h0` to `[B, L]` (as float32, zeros when None). The kernels
    index every input at its full shape, so nothing may reach them smaller.
    """
    if x.ndim != 3:
        raise RGError(f"the RG-LRU takes x of shape [B, T, L], not {tuple(x.shape)}")
    B, T, L = x.shape
    reset = mx.zeros((B, T), mx.bool_) if reset is None else reset.astype(mx.bool_)
    h0 = mx.zeros((B, L), mx.float32) if h0 is None else h0.astype(mx.float32)
    wanted = {"gate_x": (gate_x, x.shape), "gate_a": (gate_a, x.shape), "a_param": (a_param, (L,))}
    wanted.update(reset=(reset, (B, T)), h0=(h0, (B, L)))
    full = []
    for name, (a, shape) in wanted.items():
        if a.shape != shape:
            try:
                a = mx.broadcast_to(a, shape)
            except ValueError:
                raise RGError(
                    f"the RG-LRU's {name} has shape {tuple(a.shape)}, which does not broadcast to {shape} "
                    f"(x is [B, T, L] = {tuple(x.shape)})"
                ) from None
        full.append(a)
    return (x, *full)


def empty_result(x: mx.array, h0: mx.array) -> tuple[mx.array, mx.array]:
    """`(y, h)` of a scan with nothing to do (T = 0 or B L = 0): `y` empty, the state unchanged."""
    return mx.zeros(x.shape, x.dtype), h0
