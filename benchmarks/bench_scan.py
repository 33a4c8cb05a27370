"""RG-LRU scan benchmark: every scan path that runs on this backend, against memory bandwidth.

    python benchmarks/bench_scan.py [--T 1024 4096 32768] [--B 1 8] [--L 2560] [--dtype float32]

Paths: ``loop`` (the gate math in MLX ops, then one MLX multiply-add per token from Python),
``ops`` (the portable chunked scan, `rg_lru_ops`) and, where the GPU has them, the fused kernels
(``metal`` / ``cuda``, auto variant, plus each variant forced). The RG-LRU must at least read
`x`, both gates and the document-start flags and write `y`: (4 x itemsize + 1 / L) bytes per
element. That traffic over the run time is reported against the bandwidth of a large
`mx.sum` (a plain read) measured first. Sizes whose working set would not fit in half the
machine's memory are skipped and said so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import mlx.core as mx

from rg_mlx.kernels import available_paths, rg_lru_ops
from rg_mlx.kernels.ops import gate_math
from rg_mlx.kernels.source import backend_kernels, fused_scan, num_chunks


def loop_scan(x, gate_x, gate_a, a_param, reset, h0):
    """The gate math in ops, then one multiply-add per token: the naive baseline."""
    a, b = gate_math(x, gate_x, gate_a, a_param, reset)
    h, ys = h0, []
    for t in range(x.shape[1]):
        h = a[:, t] * h + b[:, t]
        ys.append(h)
    return mx.stack(ys, axis=1).astype(x.dtype), h


def scan_paths(B: int, T: int, L: int) -> dict:
    paths = {"loop": loop_scan, "ops": rg_lru_ops}
    for backend in available_paths()[1:]:
        kernels = backend_kernels(backend)
        paths[backend] = lambda *a, k=kernels: fused_scan(k, *a)
        if num_chunks(B, T, L) > 1:  # show both variants where auto picks the chunked one
            paths[f"{backend}-sequential"] = lambda *a, k=kernels: fused_scan(k, *a, chunks=1)
    return paths


def timed(fn, *args, repeat: int) -> float:
    """Median wall time of `fn(*args)` evaluated, after one warm-up run."""
    mx.eval(fn(*args))
    times = []
    for _ in range(repeat):
        mx.synchronize()
        start = time.perf_counter()
        mx.eval(fn(*args))
        mx.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def read_bandwidth(nbytes: int, repeat: int) -> float:
    """Bytes per second of `mx.sum` over a float32 array of `nbytes`."""
    big = mx.random.uniform(shape=(nbytes // 4,))
    mx.eval(big)
    seconds = timed(mx.sum, big, repeat=repeat)
    del big
    return nbytes / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--T", type=int, nargs="+", default=[1024, 4096, 32768], help="sequence lengths")
    parser.add_argument("--B", type=int, nargs="+", default=[1, 8], help="batch sizes")
    parser.add_argument("--L", type=int, default=2560, help="channels (lru_width; 2560 for the 2B)")
    gpu = mx.default_device().type == mx.DeviceType.gpu
    parser.add_argument("--dtype", default="bfloat16" if gpu else "float32", help="input/output dtype")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--paths", nargs="+", help="only these paths (loop, ops, metal, cuda, ...)")
    parser.add_argument("--bandwidth-mib", type=int, default=1024, help="size of the bandwidth probe")
    args = parser.parse_args()

    dtype = getattr(mx, args.dtype)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    bandwidth = read_bandwidth(args.bandwidth_mib << 20, args.repeat)
    print(f"device: {mx.default_device()}, dtype {args.dtype}, L {args.L}, paths available: {available_paths()}")
    print(f"measured read bandwidth (mx.sum over {args.bandwidth_mib} MiB): {bandwidth / 1e9:.1f} GB/s")
    print(f"{'B':>3} {'T':>6} {'path':<18} {'ms':>10} {'tok/s':>12} {'GB/s':>8} {'% bw':>6}")
    for B in args.B:
        for T in args.T:
            L = args.L
            # Inputs, output and the ops path's float32 temporaries (about 8 arrays of B x T x L).
            working_set = B * T * L * (4 * dtype.size + 8 * 4)
            if working_set > memory // 2:
                print(f"{B:>3} {T:>6} skipped: needs about {working_set / 2**30:.0f} GiB")
                continue
            x, gate_x, gate_a = (mx.random.normal((B, T, L)).astype(dtype) for _ in range(3))
            a_param = mx.random.uniform(-9.0, 1.0, (L,)).astype(dtype)
            reset = mx.tile((mx.arange(T) == 0)[None], (B, 1))  # one document per row
            h0 = mx.zeros((B, L), mx.float32)
            mx.eval(x, gate_x, gate_a, a_param, reset)
            traffic = B * T * (L * 4 * dtype.size + 1)
            for name, fn in scan_paths(B, T, L).items():
                if args.paths and name not in args.paths:
                    continue
                seconds = timed(fn, x, gate_x, gate_a, a_param, reset, h0, repeat=args.repeat)
                rate = traffic / seconds
                print(
                    f"{B:>3} {T:>6} {name:<18} {seconds * 1e3:>10.1f} {B * T / seconds:>12,.0f} "
                    f"{rate / 1e9:>8.2f} {100 * rate / bandwidth:>5.1f}%",
                    flush=True,
                )
            del x, gate_x, gate_a


if __name__ == "__main__":
    main()
