"""Decode's matrix-vector products, split over CPU streams.

A BLAS matrix product with one row (a decode step) reads its whole weight once and runs on a
single core, which reaches about two thirds of the machine's read bandwidth (MKL on a 2-core
AMD EPYC: 13 GB/s). MLX runs every stream on its own thread, so splitting the weight's output
rows over one CPU stream per core reads it in parallel: the 2.6 GB logits product of the
bench model goes from 194 ms to 123 ms there. Products with many rows (prefill) are left to
the BLAS's own threads, which do better for them (splitting a 512-row product costs 10%), and
so are one-row products where the BLAS threads them itself (OpenBLAS behind rg_mlx's router, see
`rg_mlx._blas`).
"""

from __future__ import annotations

import functools
import os

import mlx.core as mx
import mlx.nn as nn

from . import _blas

# Split only products of at most this many rows by weights of at least this many bytes.
MAX_ROWS = 8
MIN_BYTES = 4 << 20
MAX_STREAMS = 8


@functools.cache
def _streams() -> tuple[mx.Stream, ...]:
    return tuple(mx.new_stream(mx.cpu) for _ in range(min(os.cpu_count() or 1, MAX_STREAMS)))


def _split(x: mx.array, weight: mx.array) -> bool:
    return (
        x.size <= MAX_ROWS * x.shape[-1]
        and weight.nbytes >= MIN_BYTES
        and mx.default_device().type == mx.DeviceType.cpu
        and not _blas.threaded_row_products()
        and len(_streams()) > 1
    )


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """`x @ weight.T + bias` (weight `[out, in]`), split over CPU streams for a few rows of `x`."""
    if not _split(x, weight):
        return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)
    streams = _streams()
    step = -(-weight.shape[0] // len(streams))
    parts = []
    for stream, lo in zip(streams, range(0, weight.shape[0], step)):
        with mx.stream(stream):
            w = weight[lo : lo + step]
            parts.append(x @ w.T if bias is None else mx.addmm(bias[lo : lo + step], x, w.T))
    return mx.concatenate(parts, axis=-1)


class Linear(nn.Linear):
    """`nn.Linear` whose decode-sized products are split over CPU streams (see `linear`)."""

    def __call__(self, x: mx.array) -> mx.array:
        return linear(x, self.weight, self["bias"] if "bias" in self else None)
