"""Decode-sized matrix products split over CPU streams: the same numbers as one product."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

import rg_mlx.parallel as parallel


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

    layer = parallel.Linear(64, 8)
    assert isinstance(layer, nn.Linear) and set(dict(layer.parameters())) == {"weight", "bias"}
    x = mx.ones((1, 1, 64))
    assert np.allclose(np.array(layer(x)), np.array(x @ layer.weight.T + layer.bias), atol=1e-6)
    assert isinstance(layer.to_quantized(group_size=32, bits=8), nn.QuantizedLinear)
