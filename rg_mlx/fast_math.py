"""tanh-based elementwise math from multiply, add and divide, fused with `mx.compile`.

On x86, MLX's CPU backend evaluates `tanh` and `sigmoid` one element at a time through the C
library (tens of ns an element): in a prefill, GELU alone costs about as much as the MLP's
matmuls. These versions use a rational approximation of tanh, which the compiled kernel
evaluates in one fused, vectorised pass (3-7x faster here); on a GPU they cost about what the
built-ins do. Inputs of any float dtype are computed in float32 and returned in their dtype.
Absolute error of `tanh` < 5e-7 (Eigen's float32 approximation).

Compiled per shape, not `shapeless`, and called on same-shape contiguous inputs only: on the
CPU a shapeless or broadcasting kernel indexes every element generically and runs about 5x
slower. A new shape costs a retrace of a few milliseconds.
"""

from __future__ import annotations

import mlx.core as mx

_SQRT_2_OVER_PI = 0.7978845608028654


def _tanh(x: mx.array) -> mx.array:
    """Eigen's float32 rational tanh (degree 13/6); saturates at +-1 beyond |x| > 7.9."""
    x = mx.clip(x, -7.90531110763549805, 7.90531110763549805)
    x2 = x * x
    p = x2 * -2.76076847742355e-16 + 2.00018790482477e-13
    p = x2 * p + -8.60467152213735e-11
    p = x2 * p + 5.12229709037114e-08
    p = x2 * p + 1.48572235717979e-05
    p = x2 * p + 6.37261928875436e-04
    p = x2 * p + 4.89352455891786e-03
    q = x2 * 1.19825839466702e-06 + 1.18534705686654e-04
    q = x2 * q + 2.26843463243900e-03
    q = x2 * q + 4.89352518554385e-03
    return x * p / q


def _gelu(x: mx.array) -> mx.array:
    return 0.5 * x * (1.0 + _tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x)))


def _f32(x: mx.array) -> mx.array:
    return x.astype(mx.float32)


@mx.compile
def tanh(x: mx.array) -> mx.array:
    """`tanh(x)`."""
    return _tanh(_f32(x)).astype(x.dtype)


@mx.compile
def sigmoid(x: mx.array) -> mx.array:
    """`1 / (1 + exp(-x))`, as `(1 + tanh(x / 2)) / 2` (absolute error < 3e-7)."""
    return (0.5 + 0.5 * _tanh(0.5 * _f32(x))).astype(x.dtype)


@mx.compile
def gelu(x: mx.array) -> mx.array:
    """GELU, tanh approximation (PyTorch's `gelu(approximate="tanh")`)."""
    return _gelu(_f32(x)).astype(x.dtype)


@mx.compile
def gelu_mul(x: mx.array, y: mx.array) -> mx.array:
    """`gelu(x) * y` in one pass (the gated MLP and the recurrent block's output gate); same shapes."""
    return (_gelu(_f32(x)) * _f32(y)).astype(y.dtype)


@mx.compile
def soft_cap(x: mx.array, cap: float) -> mx.array:
    """`tanh(x / cap) * cap`."""
    return (_tanh(_f32(x) * (1.0 / cap)) * cap).astype(x.dtype)
