"""Micro-benchmark of rg_mlx's native CPU products against MLX's own, on the bench model's shapes.

    python -m benchmarks.bench_native [--rounds 3] [--decode-rows 1 4 8] [--prompt-rows 512 2048]
                                      [--mlx-prompt-rows 512] [--no-output-layer] [--shapes NxK ...] [--json FILE]

Shapes: 2560->2560, 2560->7680, 7680->2560 and the 256000 x 2560 tied output layer (decode only), or
--shapes. For each shape and row count: float32 (MLX's product on the BLAS rg_mlx's fast path loads),
MLX's own bfloat16 / float16 / 8-bit / 4-bit products, and ours for the same arrays: half-precision
weights with activations of their own dtype (a bfloat16 model) and with float32 activations (rg_mlx's
CPU default), quantized weights (group 64, bfloat16 scales, as converted from a bfloat16 checkpoint)
with float32 and with bfloat16 activations. MLX's own prompt products are 10-50 times slower than
float32, so they run only at --mlx-prompt-rows and in the first round.

Every variant runs once per round, rounds interleaved, each round after a bandwidth probe; the table
gives medians: milliseconds, GB/s of weights read and GFLOP/s, and for decode the fraction of the
memory-bandwidth bound (weight bytes / probed bandwidth). A decode measurement cycles through enough
copies of the weight to exceed the last-level cache, with all products of a pass in one evaluation
(back to back, as a model's layers run).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):  # run as a script: the checkout's root on the path for `benchmarks.bench`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rg_mlx  # noqa: E402,F401  (first: the BLAS fast path)
import mlx.core as mx  # noqa: E402

from rg_mlx.bench.speed import BandwidthProbe, available_bytes, machine  # noqa: E402
from rg_mlx import _blas  # noqa: E402
from rg_mlx.cpu import native  # noqa: E402

SHAPES = [("2560->2560", 2560, 2560), ("2560->7680", 7680, 2560), ("7680->2560", 2560, 7680)]
OUTPUT_LAYER = ("output 256000x2560", 256000, 2560)
GROUP = 64
# Bytes of weights a decode pass cycles through, at least: several times a large last-level cache.
CYCLE_BYTES = 192 << 20

Product = Callable[[mx.array, int], mx.array]


class Variant:
    """One way to compute x @ W.T: `product(x, copy)`, the bytes of one weight copy, the activations' dtype."""

    def __init__(self, name: str, product: Product, nbytes: int, x_dtype: mx.Dtype, ours: bool):
        self.name, self.product, self.nbytes, self.x_dtype, self.ours = name, product, nbytes, x_dtype, ours


def variants(N: int, K: int, copies: int) -> list[Variant]:
    """The weights (`copies` of each, so a decode pass reads past the cache) and the products on them."""
    w32 = [mx.random.normal((N, K)) * 0.02 for _ in range(copies)]
    wb = [w.astype(mx.bfloat16) for w in w32]
    wh = [w.astype(mx.float16) for w in w32]
    q = {bits: [mx.quantize(w, group_size=GROUP, bits=bits) for w in wb] for bits in (8, 4)}
    mx.eval(w32, wb, wh, q)
    scale_bytes = 2 * N * (K // GROUP) * 2

    def qbytes(bits: int) -> int:
        return N * K * bits // 8 + scale_bytes

    out = [Variant("float32 (MLX + BLAS)", lambda x, i: x @ w32[i].T, N * K * 4, mx.float32, False),
           Variant("bfloat16, MLX", lambda x, i: x @ wb[i].T, N * K * 2, mx.bfloat16, False),
           Variant("float16, MLX", lambda x, i: x @ wh[i].T, N * K * 2, mx.float16, False)]
    for bits in (8, 4):
        for x_dtype in (mx.float32, mx.bfloat16):
            out.append(Variant(f"{bits}-bit, {_name(x_dtype)} x, MLX", lambda x, i, b=bits: mx.quantized_matmul(
                x, *q[b][i], transpose=True, group_size=GROUP, bits=b), qbytes(bits), x_dtype, False))
    if native.available():
        for x_dtype in (mx.bfloat16, mx.float32):
            out.append(Variant(f"bfloat16, {_name(x_dtype)} x, ours", lambda x, i: native.matmul(x, wb[i]), N * K * 2,
                               x_dtype, True))
        out.append(Variant("float16, float32 x, ours", lambda x, i: native.matmul(x, wh[i]), N * K * 2, mx.float32,
                           True))
        for bits in (8, 4):
            for x_dtype in (mx.float32, mx.bfloat16):
                product = lambda x, i, b=bits: native.quantized_matmul(x, *q[b][i], GROUP, b)  # noqa: E731
                out.append(Variant(f"{bits}-bit, {_name(x_dtype)} x, ours", product, qbytes(bits), x_dtype, True))
    return out


def _name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def time_pass(v: Variant, x: mx.array, copies: int) -> float:
    """Seconds per product: one pass over every copy (decode) or one product (prompt)."""
    n = copies if x.shape[0] <= 8 else 1
    t = time.perf_counter()
    mx.eval([v.product(x, i % copies) for i in range(n)])
    return (time.perf_counter() - t) / n


def measure(shape: tuple[str, int, int], rows: list[int], mlx_prompt_rows: set[int], rounds: int,
            probe: BandwidthProbe, probes: list[float]) -> list[dict]:
    name, N, K = shape
    biggest = N * K * 4
    copies = max(1, math.ceil(CYCLE_BYTES / (N * K // 2)))  # the 4-bit weight is the smallest
    if available_bytes() and biggest * 1.9 * copies > 0.7 * available_bytes():
        copies = max(1, int(0.7 * available_bytes() / (biggest * 1.9)))
    vs = variants(N, K, copies)
    xs = {(r, dt): mx.random.normal((r, K)).astype(dt) for r in rows for dt in (mx.float32, mx.bfloat16, mx.float16)}
    mx.eval(list(xs.values()))
    def slow(v: Variant, r: int) -> bool:  # MLX's own non-float32 prompt products
        return r > 8 and not v.ours and "float32" not in v.name

    todo = [(v, r) for r in rows for v in vs if not slow(v, r) or r in mlx_prompt_rows]
    for v, r in todo:  # warm-up: first calls allocate, page in and start the pools
        if not slow(v, r):
            time_pass(v, xs[r, v.x_dtype], 1)
    times: dict[tuple[str, int], list[float]] = {}
    for i in range(rounds):
        probes.append(probe())
        for v, r in todo:
            if i == 0 or not slow(v, r):
                times.setdefault((v.name, r), []).append(time_pass(v, xs[r, v.x_dtype], copies))
    results = []
    for v, r in todo:
        t = statistics.median(times[v.name, r])
        results.append({"shape": name, "N": N, "K": K, "rows": r, "variant": v.name, "ours": v.ours, "seconds": t,
                        "bytes": v.nbytes, "gbps": v.nbytes / t / 1e9, "gflops": 2 * r * N * K / t / 1e9})
    del vs, xs
    return results


def table(results: list[dict], bandwidth: float) -> str:
    lines = []
    for shape in dict.fromkeys(r["shape"] for r in results):
        for rows in dict.fromkeys(r["rows"] for r in results if r["shape"] == shape):
            rs = [r for r in results if r["shape"] == shape and r["rows"] == rows]
            base = next(r["seconds"] for r in rs if r["variant"].startswith("float32"))
            decode = rows <= 8
            lines += [f"\n{shape}, {rows} row{'s' if rows > 1 else ''}", "",
                      "| product | ms | GB/s | GFLOP/s | " + ("of bound | " if decode else "") + "vs float32 |",
                      "|---|---|---|---|" + ("---|" if decode else "") + "---|"]
            for r in rs:
                bound = f" {r['bytes'] / bandwidth / r['seconds']:.0%} |" if decode else ""
                lines.append(f"| {r['variant']} | {r['seconds'] * 1e3:.2f} | {r['gbps']:.1f} | {r['gflops']:.1f} |"
                             f"{bound} {base / r['seconds']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--decode-rows", type=int, nargs="*", default=[1, 4, 8])
    parser.add_argument("--prompt-rows", type=int, nargs="*", default=[512, 2048])
    parser.add_argument("--mlx-prompt-rows", type=int, nargs="*", default=[512],
                        help="prompt row counts at which MLX's own (slow) non-float32 products run too")
    parser.add_argument("--no-output-layer", action="store_true", help="skip the 256000 x 2560 output layer")
    parser.add_argument("--shapes", nargs="*", default=None, metavar="NxK",
                        help="weights of N rows and K columns instead of the bench model's (e.g. 15360x2560: the 2B "
                        "model's MLP projection pair)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    print(f"# Native CPU products: {machine()}")
    print(f"BLAS: {_blas.active()}; native: {native.status()}")
    probe = BandwidthProbe()
    probes: list[float] = []
    results = []
    rows = args.decode_rows + args.prompt_rows
    shapes = SHAPES if args.shapes is None else [(s, *map(int, s.split("x"))) for s in args.shapes]
    for shape in shapes:
        results += measure(shape, rows, set(args.mlx_prompt_rows), args.rounds, probe, probes)
    if not args.no_output_layer:
        results += measure(OUTPUT_LAYER, args.decode_rows, set(), args.rounds, probe, probes)
    bandwidth = statistics.median(probes)
    print(f"Read bandwidth (median of {len(probes)} probes, one per round): {bandwidth / 1e9:.1f} GB/s")
    print(table(results, bandwidth))
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "blas": _blas.active(), "native": native.status(),
                                         "bandwidth": bandwidth, "probes": probes, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
