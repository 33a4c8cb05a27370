"""The Linux BLAS fast path (rg_mlx/_blas.py). BLAS loading is process-wide, so each case runs in a subprocess."""

from __future__ import annotations

import ctypes
import glob
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the fast path is Linux-only")

# A matmul checked against NumPy, the active BLAS, and the library the dynamic linker bound
# MLX's cblas_sgemm to (from LD_DEBUG=bindings on stderr).
PROBE = """
import json, numpy as np
import rg_mlx
import mlx.core as mx
rng = np.random.default_rng(0)
a, b = rng.standard_normal((67, 130), np.float32), rng.standard_normal((130, 45), np.float32)
err = float(np.abs(np.array(mx.array(a) @ mx.array(b)) - a @ b).max())
print(json.dumps({"active": rg_mlx._blas.active(), "err": err}))
"""


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


def have_openblas() -> bool:
    try:
        ctypes.CDLL("libopenblas.so.0")
        return True
    except OSError:
        return False


def test_off_uses_mlx_reference_blas():
    result, debug = run_probe("off")
    assert result["active"] == "reference (RG_MLX_BLAS=off)"
    assert result["err"] < 1e-3
    provider = sgemm_provider(debug)
    assert "mkl" not in provider and "openblas" not in provider


@pytest.mark.skipif(not have_mkl(), reason="MKL not installed (pip install 'rg-mlx[mkl]')")
def test_mkl_is_what_mlx_calls():
    result, debug = run_probe("mkl")
    assert result["active"].startswith("mkl ")
    assert "libmkl_rt" in sgemm_provider(debug)
    assert result["err"] < 1e-3


@pytest.mark.skipif(not have_openblas(), reason="system OpenBLAS not installed (apt install libopenblas0-pthread)")
def test_openblas_is_what_mlx_calls():
    result, debug = run_probe("openblas")
    assert result["active"].startswith("openblas ")
    assert "libopenblas" in sgemm_provider(debug)
    assert result["err"] < 1e-3


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
    assert result["active"].startswith("reference (no optimized BLAS found: pip install 'rg-mlx[mkl]'")
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
    return "mkl " if have_mkl() else "openblas " if have_openblas() else "reference (no optimized BLAS found"


def test_version_names_the_active_blas():
    import rg_mlx

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
