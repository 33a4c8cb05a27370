"""rg_mlx.fast_math against MLX's built-ins, over the whole float32 range that matters."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from rg_mlx.cpu import fast_math

X = mx.concatenate([mx.linspace(-60, 60, 48001), mx.array([0.0, 1e-30, -1e-30, 1e-6, -3e-4, 7.9, -8.0, 30.0])])


def max_abs(a: mx.array, b: mx.array) -> float:
    return float(mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max())


def test_tanh_and_sigmoid_match_builtins():
    assert max_abs(fast_math.tanh(X), mx.tanh(X)) < 5e-7
    assert max_abs(fast_math.sigmoid(X), mx.sigmoid(X)) < 5e-7
    # relative accuracy near zero (the odd rational keeps it), exact saturation far out
    small = mx.array([1e-30, -1e-20, 3e-8, -2e-4])
    assert np.allclose(np.array(fast_math.tanh(small)), np.tanh(np.array(small)), rtol=1e-6, atol=0)
    assert fast_math.tanh(mx.array([50.0, -50.0])).tolist() == [1.0, -1.0]


def test_gelu_and_gated_gelu_match_tanh_gelu():
    assert max_abs(fast_math.gelu(X), nn.gelu_approx(X)) < 2e-6
    y = mx.random.normal(X.shape, key=mx.random.key(0))
    assert max_abs(fast_math.gelu_mul(X, y), nn.gelu_approx(X) * y) < 1e-5


def test_soft_cap_matches_tanh_formula():
    logits = mx.random.normal((3, 1000), key=mx.random.key(1)) * 80
    assert max_abs(fast_math.soft_cap(logits, 30.0), mx.tanh(logits / 30.0) * 30.0) < 3e-5
    assert float(mx.abs(fast_math.soft_cap(logits, 30.0)).max()) <= 30.0


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_low_precision_in_and_out(dtype):
    x = (X[::37] / 4).astype(dtype)
    out = fast_math.gelu_mul(x, x)
    assert out.dtype == dtype
    # computed in float32 and rounded once: within one rounding of the float32 result
    ref = nn.gelu_approx(x.astype(mx.float32)) * x.astype(mx.float32)
    assert np.allclose(np.array(out.astype(mx.float32)), np.array(ref), rtol=1e-2, atol=1e-2)


def test_new_shapes_and_non_contiguous_inputs():
    a = mx.random.normal((4, 6), key=mx.random.key(2))
    for x in (a, a.T, a[:, ::2], a[None, 1:3]):
        assert max_abs(fast_math.gelu(x), nn.gelu_approx(x)) < 2e-6


def test_exp_and_sigmoid_have_relative_accuracy_over_float32():
    x = np.concatenate([np.linspace(-87, 88, 70001), [0.0, 1e-30, -1e-7, 5e-4, -0.3466, 0.3466]]).astype(np.float32)
    ref = np.exp(x.astype(np.float64))
    assert np.max(np.abs(np.array(fast_math.exp(mx.array(x))) - ref) / ref) < 2e-7
    s = np.linspace(-80, 80, 64001).astype(np.float32)
    ref = 1 / (1 + np.exp(-s.astype(np.float64)))
    # both tails relative: sigmoid(-16) = 1e-7 is not rounded to 0 or 1e-7 +- 3e-8
    assert np.max(np.abs(np.array(fast_math.sigmoid(mx.array(s))) - ref) / ref) < 5e-7
    assert fast_math.exp(mx.array([-200.0, 0.0])).tolist()[1] == 1.0


def test_rg_lru_gates_match_float64_formula():
    from rg_mlx.kernels.reference import naive_gates

    rng = np.random.default_rng(3)
    x, gate_x, gate_a = (rng.normal(scale=6, size=(1, 300, 64)).astype(np.float32) for _ in range(3))
    a_param = np.concatenate([rng.normal(scale=3, size=60), [-12.0, -9.0, 4.0, 9.0]]).astype(np.float32)
    reset = rng.random((1, 300)) < 0.05
    log_a_max = np.broadcast_to(-8.0 * np.logaddexp(0.0, a_param), x.shape).astype(np.float32)
    a, b = fast_math.rg_lru_gates(*(mx.array(v) for v in (x, gate_x, gate_a, log_a_max)),
                                  mx.array(np.broadcast_to(reset[..., None], x.shape)))
    a_ref, b_ref = naive_gates(x, gate_x, gate_a, a_param, reset)
    assert a.dtype == b.dtype == mx.float32
    # a: relative to float32's own rounding of log_a (|log_a| up to 72 here); b: relative, even for a near 1
    log_a = np.log(np.maximum(a_ref, 1e-300))
    assert np.all(np.abs(np.array(a) - a_ref) <= a_ref * (3e-7 + 2e-7 * np.abs(log_a)) + 1e-37)
    assert np.max(np.abs(np.array(b) - b_ref) / (np.abs(b_ref) + 1e-30)) < 1e-6


def test_exp_and_sigmoid_gradients():
    x = mx.linspace(-20, 20, 401)
    np.testing.assert_allclose(np.array(mx.grad(lambda v: fast_math.exp(v).sum())(x)), np.exp(np.array(x)), rtol=1e-6)
    s = 1 / (1 + np.exp(-np.array(x, np.float64)))
    np.testing.assert_allclose(np.array(mx.grad(lambda v: fast_math.sigmoid(v).sum())(x)), s * (1 - s), rtol=2e-6,
                               atol=1e-12)
