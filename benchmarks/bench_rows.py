"""The BLAS router's few-row product against OpenBLAS, on one float32 weight, side by side.

For 1, 4 and 8 rows of `x @ W.T` (W `[out, in]`, as a decode step's Linear calls it): OpenBLAS's sgemv once per
row (what the router does for 1-3 rows), OpenBLAS's sgemm (what MLX would call), and the router's
`rg_rows_sgemm` (reads W once for all rows, split over the cores). Each number is the median of interleaved
rounds. Linux, with the router built and NumPy's OpenBLAS (the fast path's default).

    python benchmarks/bench_rows.py [--out 15360] [--in 2560] [--rounds 15]
"""

from __future__ import annotations

import argparse
import ctypes
import platform
import statistics
import time

import rg_mlx  # noqa: F401  (loads the fast path: the router and OpenBLAS)
import numpy as np
from rg_mlx import _blas

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
P = ctypes.POINTER(ctypes.c_float)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=int, default=15360, help="output features (rows of W)")
    parser.add_argument("--in", dest="inp", type=int, default=2560, help="input features (columns of W)")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()

    router_path = _blas._router()
    libs = [lib for lib in _blas._openblas(routed=True) if lib.prefix]
    if router_path is None or not libs:
        raise SystemExit("needs the router (a C compiler at install) and NumPy's OpenBLAS")
    lib = libs[0]
    openblas = ctypes.CDLL(lib.path, mode=ctypes.RTLD_LOCAL)
    i64 = ctypes.c_int64
    sgemm, sgemv = lib.function(openblas, "cblas_sgemm"), lib.function(openblas, "cblas_sgemv")
    sgemm.argtypes = [ctypes.c_int] * 3 + [i64] * 3 + [ctypes.c_float, P, i64, P, i64, ctypes.c_float, P, i64]
    sgemv.argtypes = [ctypes.c_int] * 2 + [i64] * 2 + [ctypes.c_float, P, i64, P, i64, ctypes.c_float, P, i64]
    router = ctypes.CDLL(router_path)
    rows = router.rg_rows_sgemm
    rows.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, P, ctypes.c_int, P, ctypes.c_int, ctypes.c_float, P,
                                          ctypes.c_int]
    router.rg_rows_kernel.restype = ctypes.c_char_p

    n, k = args.out, args.inp
    w = np.random.default_rng(0).standard_normal((n, k), np.float32)
    wp = w.ctypes.data_as(P)

    def variants(m: int, x: np.ndarray, c: np.ndarray) -> dict:
        xp, cp = x.ctypes.data_as(P), c.ctypes.data_as(P)

        def per_row():
            for r in range(m):
                sgemv(ROW_MAJOR, NO_TRANS, n, k, 1.0, wp, k, x[r].ctypes.data_as(P), 1, 0.0, c[r].ctypes.data_as(P), 1)

        return {
            "sgemv per row": per_row,
            "sgemm": lambda: sgemm(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, 1.0, xp, k, wp, k, 0.0, cp, n),
            "rg_rows_sgemm": lambda: rows(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, 1.0, xp, k, wp, k, 0.0, cp, n),
        }

    print(f"{cpu_name()}, {_blas.active()}, router kernel {router.rg_rows_kernel().decode()}")
    print(f"W {n} x {k} float32 ({w.nbytes / 1e6:.0f} MB), median of {args.rounds} interleaved rounds, ms")
    for m in (1, 4, 8):
        x = np.random.default_rng(m).standard_normal((m, k), np.float32)
        outs = {name: np.zeros((m, n), np.float32) for name in ("sgemv per row", "sgemm", "rg_rows_sgemm")}
        runs = {name: variants(m, x, outs[name])[name] for name in outs}
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(args.rounds + 1):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                times[name].append(time.perf_counter() - start)
        expected = x.astype(np.float64) @ w.T.astype(np.float64)
        errors = {name: float(np.abs(out - expected).max()) for name, out in outs.items()}
        cells = ", ".join(f"{name} {1e3 * statistics.median(t[1:]):.2f}" for name, t in times.items())
        print(f"{m} row{'s' if m > 1 else ''}: {cells} (max abs error vs float64: "
              + ", ".join(f"{e:.1e}" for e in errors.values()) + ")")


if __name__ == "__main__":
    main()
