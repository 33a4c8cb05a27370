"""Work split over CPU streams: decode's matrix-vector products, long prompts' elementwise passes and attention.

A BLAS matrix product with one row (a decode step) reads its whole weight once and runs on a
single core, which reaches about two thirds of the machine's read bandwidth (MKL on a 2-core
AMD EPYC: 13 GB/s). MLX runs every stream on its own thread, so splitting the weight's output
rows over one CPU stream per core reads it in parallel: the 2.6 GB logits product of the
bench model goes from 194 ms to 123 ms there. Products with many rows (prefill) are left to
the BLAS's own threads, which do better for them (splitting a 512-row product costs 10%), and
so are one-row products where the BLAS threads them itself (OpenBLAS behind rg_mlx's router, see
`rg_mlx._blas`).

MLX's CPU backend runs each elementwise kernel on one thread, so a prefill's fused elementwise
passes (the RG-LRU gates, GELU gating) are split the same way, by rows (`elementwise`): the
RG-LRU gates of a 512-token chunk of the 2B widths go from 140 to 80 ms there. So is a long
prompt's attention, by heads (`attention`): on the CPU, MLX's scaled dot-product attention is
its unfused reference (masking and softmax on one thread); a 512-token chunk's attention over
2560 keys with the 2B widths goes from 326-362 to 255-299 ms there. A bfloat16 or float16 model's
attention is computed in float32 on the CPU.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Callable

import mlx.core as mx
import mlx.nn as nn

from .. import _blas

# Split only products of at most this many rows by weights of at least this many bytes.
MAX_ROWS = 8
MIN_BYTES = 4 << 20
MAX_STREAMS = 8
# Split elementwise passes over at least this many positions (axis 1), each stream taking a contiguous part.
MIN_ELEMENTWISE_ROWS = 64


_local = threading.local()


def _streams() -> tuple[mx.Stream, ...]:
    """One CPU stream per core this process may run on, made per thread (MLX streams belong to the thread
    that made them)."""
    if not hasattr(_local, "streams"):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        _local.streams = tuple(mx.new_stream(mx.cpu) for _ in range(min(cores, MAX_STREAMS)))
    return _local.streams


def _cpu_split() -> bool:
    """Whether work can be split here: the default device is the CPU and there is more than one core."""
    return mx.default_device().type == mx.DeviceType.cpu and len(_streams()) > 1


def _on_streams(n: int, part: Callable[[slice], Any]) -> list[Any]:
    """`part(s)` for `range(n)` cut into one contiguous slice `s` per CPU stream, each run on its stream."""
    streams = _streams()
    step = -(-n // len(streams))
    results = []
    for stream, lo in zip(streams, range(0, n, step)):
        with mx.stream(stream):
            results.append(part(slice(lo, lo + step)))
    return results


def _split(x: mx.array, weight: mx.array) -> bool:
    return (
        x.size <= MAX_ROWS * x.shape[-1]
        and weight.nbytes >= MIN_BYTES
        and not _blas.threaded_row_products()
        and _cpu_split()
    )


def _product(x: mx.array, weight: mx.array, bias: mx.array | None) -> mx.array:
    return x @ weight.T if bias is None else mx.addmm(bias, x, weight.T)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None = None) -> mx.array:
    """`x @ weight.T + bias` (weight `[out, in]`), split over CPU streams for a few rows of `x`."""
    if not _split(x, weight):
        return _product(x, weight, bias)
    parts = _on_streams(weight.shape[0], lambda rows: _product(x, weight[rows], None if bias is None else bias[rows]))
    return mx.concatenate(parts, axis=-1)


class SplitLinear(nn.Linear):
    """`nn.Linear` whose decode-sized products are split over CPU streams (see `linear`)."""

    def __call__(self, x: mx.array) -> mx.array:
        return linear(x, self.weight, self["bias"] if "bias" in self else None)


class SplitEmbedding(nn.Embedding):
    """`nn.Embedding` whose use as the tied output layer (`as_linear`) is split like `linear`."""

    def as_linear(self, x: mx.array) -> mx.array:
        return linear(x, self.weight)


def elementwise(fn: Callable[..., Any], *arrays: mx.array) -> Any:
    """`fn(*arrays)` for an elementwise `fn` of same-shape `[B, T, ...]` arrays returning an array or a
    tuple of them, with the positions (axis 1) of a long prompt split over CPU streams."""
    shape = arrays[0].shape
    if len(shape) < 3 or shape[0] != 1 or shape[1] < MIN_ELEMENTWISE_ROWS or not _cpu_split():
        return fn(*arrays)
    parts = _on_streams(shape[1], lambda positions: fn(*(a[:, positions] for a in arrays)))
    if isinstance(parts[0], tuple):
        return tuple(mx.concatenate(p, axis=1) for p in zip(*parts))
    return mx.concatenate(parts, axis=1)


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask: mx.array) -> mx.array:
    """`mx.fast.scaled_dot_product_attention` of `q` `[B, H, T, D]` over `k`, `v` `[B, H_kv, S, D]` with a
    boolean `mask` `[B, 1, T, S]`; for a long prompt on the CPU, the heads (or key/value heads
    with their query heads) split over CPU streams."""
    heads, kv_heads = q.shape[1], k.shape[1]

    def sdpa(queries: mx.array, keys: mx.array, values: mx.array) -> mx.array:
        return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale, mask=mask)

    if q.shape[2] < MIN_ELEMENTWISE_ROWS or heads == 1 or not _cpu_split():
        return sdpa(q, k, v)
    if kv_heads == 1:
        parts = _on_streams(heads, lambda h: sdpa(q[:, h], k, v))
    else:
        group = heads // kv_heads
        parts = _on_streams(kv_heads, lambda g: sdpa(q[:, g.start * group : g.stop * group], k[:, g], v[:, g]))
    return mx.concatenate(parts, axis=1)
