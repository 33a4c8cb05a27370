"""The fused RG-LRU scan kernels: one source for Metal and CUDA, and the launch logic both share.

Each thread owns one channel of one batch row (and, in the chunked variant, one chunk of time
steps). It reads `x`, the two gate pre-activations and the document-start flag once per step,
computes the gate math in float32 registers and runs `h_t = a_t h_{t-1} + b_t`, writing `y` once.

Variants, picked by size (`num_chunks`):
- ``sequential``: threads over batch x channels, a loop over all `T` steps; the loads of step
  `t + 1` are issued before the dependent multiply-add of step `t`.
- ``chunked`` (long prompts, few rows): pass 1 scans every chunk from a zero state and keeps only
  its end state and the product of its `a`; pass 2 combines the summaries of the chunks before
  its own into the state entering its chunk, rescans the chunk and writes `y`. Two launches, no
  threadgroup memory or barriers; it reads the inputs twice to gain `N` times the threads.

Slow channels (a near 1) are updated as h + ((a - 1) h + b) with a - 1 formed to full float32
precision, so the scan keeps about 1e-6 of float64 even at a = 1 - 1e-4 over 1000 steps, where
a plain `a h + b` in float32 is off by 1.5e-5 (the rounding of `a` compounds).

Sizes travel in a small uint32 input array (`dims`), never as template arguments, so one
compiled kernel serves every prompt length; all index arithmetic is in `size_t`. The grid is
one-dimensional (rows x chunks x channels folded into x): CUDA caps `gridDim.y` at 65,535, x at
2^31 - 1 blocks. Every input dtype is a template argument, so each dtype combination gets its own
kernel name: MLX 0.29-0.32.0 cache a compiled CUDA kernel by its name alone.
The backends differ only in a few lines of header (`_PRELUDE`) and the thread index.

`fused_scan` is differentiable: the kernels have no VJP of their own, so its backward pass is
the portable ops path's (`rg_lru_ops`), recomputed from the inputs.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Callable

import mlx.core as mx

from rg_mlx.errors import RGError

from .ops import check_inputs, empty_result, rg_lru_ops

DTYPES = (mx.float32, mx.float16, mx.bfloat16)
THREADGROUP = 256
# The chunked variant runs when batch x channels gives fewer threads than this over 4,
# splitting time into enough chunks of at least _MIN_CHUNK steps to approach it.
_TARGET_THREADS = 1 << 15
_MIN_CHUNK = 256

_PRELUDE = {
    "metal": """
#define RG_FN inline
#define RG_EXP metal::precise::exp
#define RG_LOG metal::precise::log
#define RG_SQRT metal::precise::sqrt
""",
    "cuda": """
#define RG_FN __device__ __forceinline__
#define RG_EXP expf
#define RG_LOG logf
#define RG_SQRT sqrtf
""",
}
_THREAD = {
    "metal": "static_cast<size_t>(thread_position_in_grid.x)",
    "cuda": "(static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x)",
}
# MLX takes the grid as C ints.
MAX_THREADS = 2**31 - 1

_HEADER = """
// RG-LRU gate math in float32 (rg_mlx). Near a = 1 the rounding of `a` itself would dominate
// (ulp 6e-8 against 1 - a = 1e-4, compounded over the steps the state remembers), so the
// kernel also forms a - 1 = expm1(log a) to full precision (Kahan) and updates slow channels as
// h + ((a - 1) h + b); 1 - a^2 = -(a - 1)(a + 1) then needs no cancelling subtraction either.
RG_FN float rg_log1p(float u) {
  const float w = 1.0f + u;
  return w == 1.0f ? u : RG_LOG(w) * (u / (w - 1.0f));
}
// exp(v) - 1, given u = exp(v).
RG_FN float rg_expm1(float u, float v) {
  if (u == 1.0f) {
    return v;
  }
  const float um1 = u - 1.0f;
  return um1 == -1.0f ? -1.0f : um1 * v / RG_LOG(u);
}
RG_FN float rg_softplus(float v) {
  return (v > 0.0f ? v : 0.0f) + rg_log1p(RG_EXP(v > 0.0f ? -v : v));
}
RG_FN float rg_sigmoid(float v) {
  return 1.0f / (1.0f + RG_EXP(-v));
}
struct RgStep {
  float a;
  float a_m1;  // a - 1
  float log_a;
  float b;
};
// One step's coefficients; log_a_scale = -8 * softplus(a_param) of the channel.
RG_FN RgStep rg_step(float x, float gate_x, float gate_a, bool reset, float log_a_scale) {
  const float log_a = rg_sigmoid(gate_a) * log_a_scale;
  const float a = RG_EXP(log_a);
  const float a_m1 = rg_expm1(a, log_a);
  const float mult = reset ? 1.0f : RG_SQRT(-a_m1 * (a + 1.0f));
  RgStep s;
  s.a = reset ? 0.0f : a;
  s.a_m1 = a_m1;
  s.log_a = log_a;
  s.b = x * rg_sigmoid(gate_x) * mult;
  return s;
}
// h_t = a h_{t-1} + b (a document start has a = 0: the state restarts at b).
RG_FN float rg_update(RgStep s, float h) {
  return s.a > 0.5f ? h + (s.a_m1 * h + s.b) : s.a * h + s.b;
}
"""

# Runs `n` steps from element `i` = (b, t, c) and flag `r` = (b, t), carrying `h`; {each_step}
# follows every update. The next step's loads are issued ahead (re-reading the last at the end).
_SCAN_LOOP = """
  float xv = static_cast<float>(x[i]);
  float gxv = static_cast<float>(gate_x[i]);
  float gav = static_cast<float>(gate_a[i]);
  bool rv = reset[r];
  for (size_t s = 0; s < n; ++s) {
    const size_t ahead = s + 1 < n ? 1 : 0;
    const float xn = static_cast<float>(x[i + ahead * L]);
    const float gxn = static_cast<float>(gate_x[i + ahead * L]);
    const float gan = static_cast<float>(gate_a[i + ahead * L]);
    const bool rn = reset[r + ahead];
    const RgStep st = rg_step(xv, gxv, gav, rv, log_a_scale);
    h = rg_update(st, h);
    {each_step}
    xv = xn;
    gxv = gxn;
    gav = gan;
    rv = rn;
    i += L;
    r += 1;
  }
"""
_STORE_Y = "y[i] = static_cast<OutT>(h);"

_SEQUENTIAL = (
    """
  const size_t B = dims[0], T = dims[1], L = dims[2];
  const size_t bc = RG_THREAD;  // b L + c
  if (bc >= B * L) {
    return;
  }
  const size_t b = bc / L, c = bc % L;
  const float log_a_scale = -8.0f * rg_softplus(static_cast<float>(a_param[c]));
  float h = h0[b * L + c];
  size_t i = b * T * L + c;
  size_t r = b * T;
  const size_t n = T;
"""
    + _SCAN_LOOP.replace("{each_step}", _STORE_Y)
    + """
  h_last[b * L + c] = h;
"""
)

# Chunk j of row b covers steps [j C, min((j + 1) C, T)); rows of the summaries are b N + j.
_CHUNK_PROLOGUE = """
  const size_t B = dims[0], T = dims[1], L = dims[2], C = dims[3], N = dims[4];
  const size_t q = RG_THREAD;  // (b N + j) L + c
  if (q >= B * N * L) {
    return;
  }
  const size_t bj = q / L, c = q % L;
  const size_t b = bj / N, j = bj % N;
  const size_t t0 = j * C;
  const size_t n = (T - t0 < C) ? T - t0 : C;
  const float log_a_scale = -8.0f * rg_softplus(static_cast<float>(a_param[c]));
  size_t i = (b * T + t0) * L + c;
  size_t r = b * T + t0;
"""

_CHUNK_SUMMARY = (
    _CHUNK_PROLOGUE
    + """
  if (j + 1 == N) {
    return;  // the last chunk's summary is never needed
  }
  float h = 0.0f;
  // The chunk's product of a as a sum of logs, whose rounding stays relative to 1 - a, not to a;
  // 0 once a document starts inside the chunk.
  float log_decay = 0.0f;
  bool restarted = false;
"""
    + _SCAN_LOOP.replace("{each_step}", "log_decay += st.log_a;\n    restarted = restarted || rv;")
    + """
  chunk_a[bj * L + c] = restarted ? 0.0f : RG_EXP(log_decay);
  chunk_h[bj * L + c] = h;
"""
)

_CHUNK_APPLY = (
    _CHUNK_PROLOGUE
    + """
  float h = h0[b * L + c];
  for (size_t q = b * N; q < bj; ++q) {
    h = chunk_a[q * L + c] * h + chunk_h[q * L + c];
  }
"""
    + _SCAN_LOOP.replace("{each_step}", _STORE_Y)
    + """
  if (j + 1 == N) {
    h_last[b * L + c] = h;
  }
"""
)

_GATES = ["x", "gate_x", "gate_a", "a_param", "reset"]
_SPECS = {
    "rg_lru_sequential": (_GATES + ["h0", "dims"], ["y", "h_last"], _SEQUENTIAL),
    "rg_lru_chunk_summary": (_GATES + ["dims"], ["chunk_a", "chunk_h"], _CHUNK_SUMMARY),
    "rg_lru_chunk_apply": (_GATES + ["h0", "chunk_a", "chunk_h", "dims"], ["y", "h_last"], _CHUNK_APPLY),
}


def kernel_specs(backend: str) -> dict[str, dict]:
    """Keyword arguments of `mx.fast.metal_kernel` / `mx.fast.cuda_kernel` for every kernel."""
    specs = {}
    for name, (inputs, outputs, body) in _SPECS.items():
        specs[name] = dict(
            name=name,
            input_names=inputs,
            output_names=outputs,
            source=body.replace("RG_THREAD", _THREAD[backend]),
            header=_PRELUDE[backend] + _HEADER,
        )
    return specs


def num_chunks(B: int, T: int, L: int) -> int:
    """How many time chunks the scan uses: 1 means the sequential variant."""
    if B * L == 0 or 4 * B * L > _TARGET_THREADS:
        return 1
    return max(1, min(-(-_TARGET_THREADS // (B * L)), T // _MIN_CHUNK))


@functools.cache
def source_hash(backend: str) -> str:
    """A digest of every kernel's text for `backend`: it changes whenever a compiled kernel would."""
    text = repr(sorted((name, sorted(spec.items())) for name, spec in kernel_specs(backend).items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@functools.cache
def backend_kernels(backend: str) -> dict[str, Callable]:
    """The kernels of `backend` (``"metal"`` or ``"cuda"``), built on first use.

    Building the CUDA ones raises where MLX has no CUDA backend; the Metal ones build anywhere
    but raise when run without Metal.
    """
    factory = {"metal": mx.fast.metal_kernel, "cuda": mx.fast.cuda_kernel}[backend]
    return {name: factory(**spec) for name, spec in kernel_specs(backend).items()}


def takes_dtypes(*arrays: mx.array) -> bool:
    """Whether the kernels take these inputs' dtypes."""
    return all(a.dtype in DTYPES for a in arrays)


def launch_template(x: mx.array, gate_x: mx.array, gate_a: mx.array, a_param: mx.array) -> list[tuple[str, mx.Dtype]]:
    """The template arguments of every launch: all input dtypes (MLX names a kernel after them)."""
    return [("OutT", x.dtype), ("GateXT", gate_x.dtype), ("GateAT", gate_a.dtype), ("ParamT", a_param.dtype)]


def fused_scan(
    kernels: dict[str, Callable],
    x: mx.array,
    gate_x: mx.array,
    gate_a: mx.array,
    a_param: mx.array,
    reset: mx.array | None = None,
    h0: mx.array | None = None,
    *,
    chunks: int | None = None,
) -> tuple[mx.array, mx.array]:
    """The fused RG-LRU through `kernels` (as `backend_kernels` returns). See `rg_mlx.kernels.rg_lru`.

    `chunks` forces the number of time chunks (1: the sequential variant); default `num_chunks`.
    Differentiable: the gradient is the ops path's.
    """
    x, gate_x, gate_a, a_param, reset, h0 = check_inputs(x, gate_x, gate_a, a_param, reset, h0)
    if not takes_dtypes(x, gate_x, gate_a, a_param):
        raise RGError(
            f"the RG-LRU kernels take float32, float16 or bfloat16 inputs, not "
            f"{', '.join(sorted({str(a.dtype) for a in (x, gate_x, gate_a, a_param)}))}: use RG_MLX_SCAN=ops"
        )
    if x.size == 0:
        return empty_result(x, h0)

    @mx.custom_function
    def scan(x, gate_x, gate_a, a_param, reset, h0):
        return _launch(kernels, x, gate_x, gate_a, a_param, reset, h0, chunks)

    @scan.vjp
    def scan_vjp(primals, cotangents, outputs):
        x, gate_x, gate_a, a_param, reset, h0 = primals

        def ops(x, gate_x, gate_a, a_param, h0):
            return rg_lru_ops(x, gate_x, gate_a, a_param, reset, h0)

        _, grads = mx.vjp(ops, [x, gate_x, gate_a, a_param, h0], list(cotangents))
        return (*grads[:4], mx.zeros_like(reset), grads[4])

    y, h = scan(x, gate_x, gate_a, a_param, reset, h0)
    return y, h


def _launch(
    kernels: dict[str, Callable],
    x: mx.array,
    gate_x: mx.array,
    gate_a: mx.array,
    a_param: mx.array,
    reset: mx.array,
    h0: mx.array,
    chunks: int | None,
) -> tuple[mx.array, mx.array]:
    """One or two kernel launches on checked, non-empty inputs."""
    B, T, L = x.shape
    gates = [x, gate_x, gate_a, a_param, reset]
    launch = dict(threadgroup=(THREADGROUP, 1, 1), template=launch_template(x, gate_x, gate_a, a_param))
    outputs = dict(output_shapes=[x.shape, (B, L)], output_dtypes=[x.dtype, mx.float32])

    chunk = -(-T // (chunks or num_chunks(B, T, L)))
    N = -(-T // chunk)
    if B * N * L > MAX_THREADS:
        raise RGError(
            f"the RG-LRU kernels run one thread per row, chunk and channel, at most {MAX_THREADS:,}; "
            f"{B} x {N} x {L} is more: split the batch, or use RG_MLX_SCAN=ops"
        )
    grid = (B * N * L, 1, 1)
    if N == 1:
        dims = mx.array([B, T, L], mx.uint32)
        y, h = kernels["rg_lru_sequential"](inputs=gates + [h0, dims], grid=grid, **launch, **outputs)
        return y, h
    dims = mx.array([B, T, L, chunk, N], mx.uint32)
    chunk_a, chunk_h = kernels["rg_lru_chunk_summary"](
        inputs=gates + [dims],
        grid=grid,
        **launch,
        output_shapes=[(B, N, L)] * 2,
        output_dtypes=[mx.float32] * 2,
    )
    y, h = kernels["rg_lru_chunk_apply"](inputs=gates + [h0, chunk_a, chunk_h, dims], grid=grid, **launch, **outputs)
    return y, h
