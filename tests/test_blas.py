"""The Linux BLAS fast path (rg_mlx/_blas.py). BLAS loading is process-wide, so each case runs in a subprocess."""

from __future__ import annotations

import ctypes
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import rg_mlx
from rg_mlx import _blas

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fast path is Linux-only")

# Matrix products checked against float64 NumPy -- one and three rows (the router sends those to sgemv,
# row by row, for every layout MLX passes) and many rows -- with the active BLAS and the library the dynamic
# linker bound MLX's cblas_sgemm to (from LD_DEBUG=bindings on stderr).
PROBE = """
import json, numpy as np
import rg_mlx
import mlx.core as mx
rng = np.random.default_rng(0)
err = 0.0
for m in (1, 3, 67):
    a, b = rng.standard_normal((m, 130), np.float32), rng.standard_normal((130, 45), np.float32)
    c = rng.standard_normal((45,), np.float32)
    expected = a.astype(np.float64) @ b
    got = [mx.array(a) @ mx.array(b), mx.array(a) @ mx.array(b.T.copy()).T, mx.array(a.T.copy()).T @ mx.array(b),
           mx.addmm(mx.array(c), mx.array(a), mx.array(b)) - mx.array(c), (mx.array(a[None]) @ mx.array(b))[0]]
    err = max([err] + [float(np.abs(np.array(g) - expected).max()) for g in got])
print(json.dumps({"active": rg_mlx._blas.active(), "threaded_rows": rg_mlx._blas.threaded_row_products(), "err": err}))
"""
# Makes the router look absent (as after an install without a C compiler).
NO_ROUTER = "import sys; sys.modules['rg_mlx._blas_route'] = None\n"


def run_probe(env_value: str | None, code: str = PROBE, debug_bindings: bool = True) -> tuple[dict, str]:
    env = {k: v for k, v in os.environ.items() if k != "RG_MLX_BLAS"}
    if env_value is not None:
        env["RG_MLX_BLAS"] = env_value
    if debug_bindings:
        env["LD_DEBUG"] = "bindings"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def sgemm_provider(ld_debug: str) -> str:
    """The library MLX's `cblas_sgemm` was bound to."""
    lines = [line for line in ld_debug.splitlines() if "libmlx" in line and "`cblas_sgemm'" in line]
    assert lines, "MLX never bound cblas_sgemm"
    return lines[-1].split(" to ", 1)[1]


def have_mkl() -> bool:
    # The same places rg_mlx._blas looks (a venv sees its base interpreter's lib/ too).
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    return any(glob.glob(os.path.join(p, "lib", "libmkl_rt.so.*")) for p in prefixes)


def have_router() -> bool:
    return _blas._router() is not None


def have_system_openblas() -> bool:
    try:
        ctypes.CDLL("libopenblas.so.0")
        return True
    except OSError:
        return False


def have_openblas() -> bool:
    """An OpenBLAS the fast path can use: NumPy's copy (with the router) or the system one."""
    return have_system_openblas() or (have_router() and any(lib.prefix for lib in _blas._openblas(routed=True)))


def test_off_uses_mlx_reference_blas():
    result, debug = run_probe("off")
    assert result["active"] == "reference (RG_MLX_BLAS=off)"
    assert result["err"] < 1e-3
    provider = sgemm_provider(debug)
    assert "mkl" not in provider and "openblas" not in provider


@pytest.mark.skipif(not have_mkl(), reason="MKL not installed (pip install -e '.[mkl]' in the rg-mlx clone)")
def test_mkl_is_what_mlx_calls():
    result, debug = run_probe("mkl")
    assert result["active"].startswith("mkl ")
    assert "libmkl_rt" in sgemm_provider(debug)
    assert not result["threaded_rows"]  # so decode splits its one-row products over CPU streams
    assert result["err"] < 1e-3


@pytest.mark.skipif(not (have_router() and have_openblas()), reason="needs the router and an OpenBLAS")
def test_openblas_goes_through_the_router():
    result, debug = run_probe("openblas")
    assert result["active"].startswith("openblas ") and "unrouted" not in result["active"]
    assert "_blas_route" in sgemm_provider(debug)
    assert result["threaded_rows"]
    assert result["err"] < 1e-3


@pytest.mark.skipif(not have_system_openblas(), reason="no system OpenBLAS (apt install libopenblas0-pthread)")
def test_without_the_router_the_system_openblas_is_called_directly():
    result, debug = run_probe("openblas", NO_ROUTER + PROBE)
    assert result["active"].startswith("openblas ") and result["active"].endswith(
        "system; one-row products unrouted (slow): reinstall rg-mlx where a C compiler is available")
    assert "libopenblas" in sgemm_provider(debug)
    assert not result["threaded_rows"]
    assert result["err"] < 1e-3
    # `--version` says so in one line, however narrow the terminal
    code = NO_ROUTER + "from rg_mlx.cli import main; main(['--version'])"
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, RG_MLX_BLAS="openblas", COLUMNS="40"),
                          capture_output=True, text=True, timeout=120)
    assert proc.stdout == f"rg-mlx {rg_mlx.__version__} (BLAS: {result['active']}; malloc reuses freed memory)\n"


# Page faults of making and freeing a 64 MiB MLX array four times (16,384 pages each, unless malloc reuses them).
FAULTS = """
import json, resource
import rg_mlx
import mlx.core as mx
x = mx.zeros((16 << 20,))
mx.eval(x + 1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    mx.eval(x + 1)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"faults": faults, "reuses": rg_mlx._blas.malloc_reuses_memory()}))
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "gnu_get_libc_version"), reason="malloc settings are glibc's")
def test_malloc_reuses_large_blocks_unless_off():
    on, _ = run_probe(None, FAULTS, debug_bindings=False)
    off, _ = run_probe("off", FAULTS, debug_bindings=False)
    assert on["reuses"] and on["faults"] < 1000
    assert not off["reuses"] and off["faults"] > 4 * 16384 * 0.9


# CPU time the process spends in 0.3 s of sleep right after a threaded product: OpenBLAS's idle threads spinning.
IDLE_SPIN = """
import json, os, time
import rg_mlx
import mlx.core as mx
a = mx.random.normal((768, 768))
mx.eval(a @ a)
before = time.process_time()
time.sleep(0.3)
print(json.dumps({"spun": time.process_time() - before, "timeout": os.environ.get("OPENBLAS_THREAD_TIMEOUT")}))
"""


@pytest.mark.skipif(not (have_router() and have_openblas()) or (os.cpu_count() or 1) < 2,
                    reason="needs the router, an OpenBLAS and two cores")
def test_idle_openblas_threads_sleep_unless_told_to_spin(monkeypatch):
    monkeypatch.delenv(_blas.THREAD_TIMEOUT_VAR, raising=False)
    ours, _ = run_probe("openblas", IDLE_SPIN, debug_bindings=False)
    assert ours["timeout"] == _blas.THREAD_TIMEOUT
    assert ours["spun"] < 0.05, ours
    # A user's own setting is kept (OpenBLAS's default, 2**28 cycles: its threads spin for ~0.1 s).
    monkeypatch.setenv(_blas.THREAD_TIMEOUT_VAR, "28")
    theirs, _ = run_probe("openblas", IDLE_SPIN, debug_bindings=False)
    assert theirs["timeout"] == "28"
    assert theirs["spun"] > 0.05, theirs


def test_forced_but_missing_falls_back_with_a_warning():
    code = (
        "import sys, warnings; sys.prefix = sys.base_prefix = sys.exec_prefix = '/nonexistent'\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import rg_mlx\n"
        "print([str(w.message) for w in caught])\n" + PROBE
    )
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, RG_MLX_BLAS="mkl"),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    caught, result = proc.stdout.strip().splitlines()[-2:]
    assert "RG_MLX_BLAS=mkl: mkl is not installed; MLX uses the reference BLAS" in caught
    result = json.loads(result)
    assert result["active"] == f"reference (no optimized BLAS found: {_blas.INSTALL_HINT})"
    assert result["err"] < 1e-3


def test_unknown_value_warns_and_uses_auto():
    code = "import warnings; warnings.simplefilter('always')\n" + PROBE
    env = dict(os.environ, RG_MLX_BLAS="fastest")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "RG_MLX_BLAS='fastest' is not one of auto, mkl, openblas, off" in proc.stderr
    active = json.loads(proc.stdout.strip().splitlines()[-1])["active"]
    assert active.startswith(expected_auto())


def test_mlx_imported_first_is_reported():
    result, _ = run_probe(None, "import mlx.core\n" + PROBE, debug_bindings=False)
    assert result["active"].startswith("reference (mlx.core was imported before rg_mlx")


def expected_auto() -> str:
    """What `auto` picks here: MKL first on Intel CPUs or without the router, else OpenBLAS first."""
    mkl_first = _blas._cpu_vendor() == "GenuineIntel" or not have_router()
    order = ["mkl ", "openblas "] if mkl_first else ["openblas ", "mkl "]
    present = {"mkl ": have_mkl(), "openblas ": have_openblas()}
    return next((kind for kind in order if present[kind]), "reference (no optimized BLAS found")


def test_version_names_the_active_blas():
    env = {k: v for k, v in os.environ.items() if k != "RG_MLX_BLAS"}
    proc = subprocess.run([sys.executable, "-m", "rg_mlx", "--version"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"rg-mlx {rg_mlx.__version__} (BLAS: {expected_auto()}")
    assert proc.stdout.strip().endswith(")") and "\n" not in proc.stdout.strip()


def test_the_test_suite_runs_with_the_configured_blas():
    """conftest imports rg_mlx before any test imports mlx, so the suite runs with the fast path unless it is off."""
    from rg_mlx import _blas

    value = os.environ.get("RG_MLX_BLAS", "auto")
    expected = {"off": "reference (RG_MLX_BLAS=off)", "mkl": "mkl ", "openblas": "openblas "}.get(value)
    assert _blas.active().startswith(expected or expected_auto())


# -- The router's product for 4 to 8 rows (rg_rows_sgemm: reads the weight once, split over the cores) ------------

ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
F32 = ctypes.POINTER(ctypes.c_float)


def router_library() -> ctypes.CDLL:
    lib = ctypes.CDLL(_blas._router())
    lib.rg_rows_sgemm.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, F32, ctypes.c_int, F32, ctypes.c_int,
                                                       ctypes.c_float, F32, ctypes.c_int]
    lib.rg_rows_kernel.restype = ctypes.c_char_p
    lib.rg_rows_calls.restype = ctypes.c_long
    return lib


def relative_error(got: np.ndarray, expected: np.ndarray, bound: np.ndarray) -> float:
    """Max |got - expected| over the sum of the magnitudes of the terms (float32 rounding: ~1e-7 to 1e-6)."""
    return float((np.abs(got - expected) / bound).max())


# (rows of W = outputs, columns = inputs): odd widths, shorter and longer than the vector width, one with the
# outputs split over the threads (at least 16K floats of W each), padded leading dimensions.
ROW_SHAPES = [(1, 1), (2, 15), (33, 17), (45, 130), (1001, 131), (7, 4099)]


@pytest.mark.skipif(not have_router(), reason="the router was not built")
@pytest.mark.parametrize("kernel", ["portable", "avx2", "avx512"])
def test_rows_product_matches_float64(kernel, monkeypatch):
    lib = router_library()
    monkeypatch.setenv("RG_MLX_ROWS_KERNEL", kernel)
    if lib.rg_rows_kernel().decode() != kernel:
        pytest.skip(f"this CPU has no {kernel}")
    rng = np.random.default_rng(0)
    worst = 0.0
    for m in range(1, 9):
        for n, k in ROW_SHAPES:
            x, w = rng.standard_normal((m, k), np.float32), rng.standard_normal((n, k), np.float32)
            for transa in (NO_TRANS, TRANS):
                for transb in (TRANS, NO_TRANS):  # W as x @ W.T passes it, and stored transposed
                    # Stored with padded leading dimensions, as views of larger arrays are.
                    a = np.zeros((m, k + 3) if transa == NO_TRANS else (k, m + 3), np.float32)
                    a[:m, :k] = x if transa == NO_TRANS else 0
                    if transa == TRANS:
                        a[:k, :m] = x.T
                    b = np.zeros((n, k + 5) if transb == TRANS else (k, n + 5), np.float32)
                    if transb == TRANS:
                        b[:n, :k] = w
                    else:
                        b[:k, :n] = w.T
                    for alpha, beta in [(1.0, 0.0), (0.5, 2.0)]:
                        c0 = rng.standard_normal((m, n + 2)).astype(np.float32)
                        c = c0.copy()
                        if beta == 0.0:
                            c[:, :n] = np.nan  # BLAS: with beta 0, C is not read
                        assert lib.rg_rows_sgemm(ROW_MAJOR, transa, transb, m, n, k, alpha, a.ctypes.data_as(F32),
                                                 a.shape[1], b.ctypes.data_as(F32), b.shape[1], beta,
                                                 c.ctypes.data_as(F32), c.shape[1]) == 0
                        product = x.astype(np.float64) @ w.T.astype(np.float64)
                        expected = alpha * product + beta * c0[:, :n]
                        bound = np.abs(alpha) * np.abs(x).astype(np.float64) @ np.abs(w).T + abs(beta) * np.abs(c0[:, :n])
                        worst = max(worst, relative_error(c[:, :n], expected, bound))
                        assert np.array_equal(c[:, n:], c0[:, n:])  # beyond n: untouched
    assert worst <= 1e-5, worst
    # What it does not take (the router then calls sgemm).
    none = ctypes.cast(None, F32)
    assert lib.rg_rows_sgemm(102, NO_TRANS, TRANS, 4, 8, 8, 1.0, none, 8, none, 8, 0.0, none, 8) == -1  # column-major
    assert lib.rg_rows_sgemm(ROW_MAJOR, NO_TRANS, TRANS, 9, 8, 8, 1.0, none, 8, none, 8, 0.0, none, 8) == -1


# MLX's products of 3 to 9 rows by a weight of over 1M floats, in the layouts MLX passes: the router sends those
# of 4 to 8 rows (and only those) to rg_rows_sgemm.
ROWS_PROBE = """
import ctypes, json, numpy as np
import rg_mlx
import mlx.core as mx
lib = ctypes.CDLL(rg_mlx._blas._router())
lib.rg_rows_calls.restype = ctypes.c_long
rng = np.random.default_rng(0)
n, k = 1029, 1031
w, bias = rng.standard_normal((n, k), np.float32), rng.standard_normal((n,), np.float32)
W, B = mx.array(w), mx.array(bias)
calls, err = {}, 0.0
for m in range(3, 10):
    x = rng.standard_normal((m, k), np.float32)
    X = mx.array(x)
    before = lib.rg_rows_calls()
    got = [X @ W.T, mx.addmm(B, X, W.T), mx.array(x.T.copy()).T @ W.T, X @ mx.array(w.T.copy())]
    mx.eval(got)
    calls[m] = lib.rg_rows_calls() - before
    product = x.astype(np.float64) @ w.T.astype(np.float64)
    bound = np.abs(x).astype(np.float64) @ np.abs(w).T + np.abs(bias)
    for g, e in zip(got, [product, product + bias, product, product]):
        err = max(err, float((np.abs(np.array(g) - e) / bound).max()))
print(json.dumps({"calls": calls, "err": err}))
"""


@pytest.mark.skipif(not (have_router() and have_openblas()), reason="needs the router and an OpenBLAS")
def test_mlx_products_of_four_to_eight_rows_go_to_the_rows_kernel():
    result, _ = run_probe("openblas", ROWS_PROBE, debug_bindings=False)
    assert result["calls"] == {"3": 0, "4": 4, "5": 4, "6": 4, "7": 4, "8": 4, "9": 0}
    assert result["err"] <= 1e-5


FORK_PROBE = """
import ctypes, os, numpy as np
import rg_mlx
lib = ctypes.CDLL(rg_mlx._blas._router())
F32 = ctypes.POINTER(ctypes.c_float)
n, k = 4001, 257
w, x, c = np.ones((n, k), np.float32), np.ones((4, k), np.float32), np.zeros((4, n), np.float32)
def product():
    p = lambda a: a.ctypes.data_as(F32)
    assert lib.rg_rows_sgemm(101, 111, 112, 4, n, k, ctypes.c_float(1.0), p(x), k, p(w), k, ctypes.c_float(0.0), p(c), n) == 0
    assert (c == k).all()
product()  # the parent's workers start
pid = os.fork()
if pid == 0:
    product()  # the child has none: it must start its own, not wait for the parent's
    os._exit(0)
_, status = os.waitpid(pid, 0)
print("child", os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not have_router(), reason="the router was not built")
def test_rows_product_works_in_a_forked_child():
    proc = subprocess.run([sys.executable, "-c", FORK_PROBE], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "child 0", proc.stderr[-2000:]
