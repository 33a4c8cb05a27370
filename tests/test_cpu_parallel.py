"""Work split over CPU streams (decode-sized products, long prompts' elementwise passes): the same numbers as one pass."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import rg_mlx.cpu.parallel as parallel


@pytest.fixture
def calls(monkeypatch):
    """Force splitting of any weight over two streams, and count the split products."""
    streams = (mx.new_stream(mx.cpu), mx.new_stream(mx.cpu))
    count = []
    monkeypatch.setattr(parallel, "MIN_BYTES", 0)
    monkeypatch.setattr(parallel._blas, "threaded_row_products", lambda: False)
    monkeypatch.setattr(parallel, "_streams", lambda: count.append(1) or streams)
    return count


@pytest.mark.parametrize("rows, out_features", [(1, 7), (3, 64), (8, 33)])
@pytest.mark.parametrize("bias", [False, True])
def test_split_equals_one_product(calls, rows, out_features, bias):
    rng = np.random.default_rng(rows)
    x = rng.normal(size=(1, rows, 48)).astype(np.float32)
    w = rng.normal(size=(out_features, 48)).astype(np.float32)
    b = rng.normal(size=(out_features,)).astype(np.float32)
    got = parallel.linear(mx.array(x), mx.array(w), mx.array(b) if bias else None)
    expected = x @ w.T + (b if bias else 0)
    assert calls, "the product was not split"
    assert got.shape == expected.shape
    np.testing.assert_allclose(np.array(got), expected, rtol=1e-5, atol=1e-5)


def test_many_rows_and_small_weights_are_not_split(monkeypatch, calls):
    x, w = mx.ones((1, parallel.MAX_ROWS + 1, 16)), mx.ones((32, 16))
    assert np.array_equal(np.array(parallel.linear(x, w)), np.array(x @ w.T))
    assert not calls
    monkeypatch.setattr(parallel, "MIN_BYTES", w.nbytes + 1)
    parallel.linear(x[:, :1], w)
    assert not calls


def test_not_split_where_the_blas_threads_one_row_products_itself(monkeypatch, calls):
    monkeypatch.setattr(parallel._blas, "threaded_row_products", lambda: True)
    x, w = mx.ones((1, 1, 16)), mx.ones((32, 16))
    assert np.array_equal(np.array(parallel.linear(x, w)), np.array(x @ w.T))
    assert not calls


def test_linear_layer_keeps_nn_linear_parameters_and_quantizes():
    import mlx.nn as nn

    layer = parallel.SplitLinear(64, 8)
    assert isinstance(layer, nn.Linear) and set(dict(layer.parameters())) == {"weight", "bias"}
    x = mx.ones((1, 1, 64))
    assert np.allclose(np.array(layer(x)), np.array(x @ layer.weight.T + layer.bias), atol=1e-6)
    assert isinstance(layer.to_quantized(group_size=32, bits=8), nn.QuantizedLinear)


def test_elementwise_split_over_positions_equals_one_pass(monkeypatch):
    streams = (mx.new_stream(mx.cpu), mx.new_stream(mx.cpu))
    seen = []
    monkeypatch.setattr(parallel, "_streams", lambda: streams)

    def fn(x, y):
        seen.append(x.shape)
        return x * y + 1, x - y

    x, y = mx.random.normal((1, 131, 5)), mx.random.normal((1, 131, 5))
    got = parallel.elementwise(fn, x, y)
    assert seen == [(1, 66, 5), (1, 65, 5)]
    for g, e in zip(got, (x * y + 1, x - y)):
        assert np.array_equal(np.array(g), np.array(e))
    seen.clear()
    assert np.array_equal(np.array(parallel.elementwise(lambda x: x + 1, x)), np.array(x + 1))
    # short prompts, decode steps, batches and arrays without a positions axis run in one pass
    for shape in [(1, parallel.MIN_ELEMENTWISE_ROWS - 1, 5), (1, 1, 5), (2, 131, 5), (1, 131)]:
        parallel.elementwise(fn, mx.ones(shape), mx.ones(shape))
        assert seen.pop() == shape and not seen


def test_split_work_runs_in_any_thread(monkeypatch):
    # MLX streams belong to the thread that made them: a second thread (the app's workers) gets its own.
    import threading

    monkeypatch.setattr(parallel, "MIN_BYTES", 0)
    monkeypatch.setattr(parallel._blas, "threaded_row_products", lambda: False)
    x, w = mx.random.normal((1, 80, 8)), mx.random.normal((16, 8))
    expected = [np.array(mx.exp(x)), np.array(x[:, :1] @ w.T)]
    parallel.linear(x[:, :1], w)  # streams made in this thread first
    results = []

    def work():
        results.append([np.array(parallel.elementwise(mx.exp, x)), np.array(parallel.linear(x[:, :1], w))])

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert len(results) == 1
    np.testing.assert_allclose(results[0][0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(results[0][1], expected[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("heads, kv_heads", [(3, 1), (4, 2)])
def test_attention_split_over_heads_equals_one_pass(monkeypatch, heads, kv_heads):
    streams = (mx.new_stream(mx.cpu), mx.new_stream(mx.cpu))
    seen = []
    monkeypatch.setattr(parallel, "_streams", lambda: seen.append(1) or streams)
    T, S, D = parallel.MIN_ELEMENTWISE_ROWS, parallel.MIN_ELEMENTWISE_ROWS + 9, 8
    q = mx.random.normal((1, heads, T, D))
    k, v = mx.random.normal((1, kv_heads, S, D)), mx.random.normal((1, kv_heads, S, D))
    q_pos, k_pos = mx.arange(S - T, S), mx.arange(S)
    mask = ((k_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] - k_pos[None, :] <= 20))[None, None]
    got = parallel.attention(q, k, v, 0.3, mask)
    assert seen, "the attention was not split"
    expected = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.3, mask=mask)
    np.testing.assert_allclose(np.array(got), np.array(expected), rtol=1e-6, atol=1e-6)
    # a short prompt or a decode step: one pass
    seen.clear()
    parallel.attention(q[:, :, :1], k, v, 0.3, mask[:, :, :1])
    assert not seen
