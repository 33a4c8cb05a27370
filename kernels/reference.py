"""Naive float64 references for the RG-LRU, used by the tests and benchmarks."""

from __future__ import annotations

import numpy as np


def naive_scan(a: np.ndarray, b: np.ndarray, h0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`h_t = a_t h_{t-1} + b_t`, one step at a time in float64. Shapes `[B, T, L]`."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    B, T, L = a.shape
    h = np.zeros((B, L)) if h0 is None else np.asarray(h0, np.float64).copy()
    y = np.empty((B, T, L))
    for t in range(T):
        h = a[:, t] * h + b[:, t]
        y[:, t] = h
    return y, h


def naive_gates(
    x: np.ndarray,
    gate_x: np.ndarray,
    gate_a: np.ndarray,
    a_param: np.ndarray,
    reset: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The RG-LRU gate math in float64 NumPy: `(a, b)` with `h_t = a_t h_{t-1} + b_t`."""
    f = lambda v: np.asarray(v, np.float64)  # noqa: E731
    x, gate_x, gate_a, a_param = f(x), f(gate_x), f(gate_a), f(a_param)
    sigmoid = lambda v: 1.0 / (1.0 + np.exp(-v))  # noqa: E731
    softplus = np.logaddexp(0.0, a_param)
    log_a = -8.0 * sigmoid(gate_a) * softplus
    a = np.exp(log_a)
    multiplier = np.sqrt(-np.expm1(2.0 * log_a))
    if reset is not None:
        r = np.asarray(reset, bool)[..., None]
        multiplier = np.where(r, 1.0, multiplier)
        a = np.where(r, 0.0, a)
    return a, x * sigmoid(gate_x) * multiplier


def naive_rg_lru(
    x: np.ndarray,
    gate_x: np.ndarray,
    gate_a: np.ndarray,
    a_param: np.ndarray,
    reset: np.ndarray | None = None,
    h0: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The whole RG-LRU (gate math + scan) in float64 NumPy."""
    return naive_scan(*naive_gates(x, gate_x, gate_a, a_param, reset), h0)
