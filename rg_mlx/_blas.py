"""The Linux fast path: an optimized BLAS for MLX's CPU backend.

MLX's Linux CPU wheel links the reference (netlib) BLAS, about 6 GFLOP/s for a
float32 matmul. A BLAS library loaded with ``RTLD_GLOBAL`` *before* `mlx.core`
is first imported provides ``cblas_sgemm`` to MLX instead: Intel MKL from PyPI
(``pip install 'rg-mlx[mkl]'``) or the system OpenBLAS (Debian/Ubuntu:
``apt install libopenblas0-pthread``). `rg_mlx/__init__.py` imports this module
first, so ``import rg_mlx`` applies it. Loading it after `mlx.core` has no
effect.

The environment variable ``RG_MLX_BLAS`` chooses: ``auto`` (default: MKL, else
OpenBLAS, else the reference BLAS), ``mkl``, ``openblas``, or ``off``.
`active()` says which BLAS MLX uses in this process.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import sys
import warnings

ENV_VAR = "RG_MLX_BLAS"
CHOICES = ("auto", "mkl", "openblas", "off")
INSTALL_HINT = "pip install 'rg-mlx[mkl]' or apt install libopenblas0-pthread"

# What `load` found: a one-line description, see `active()`.
_status = "not loaded"


def _mkl_paths() -> list[str]:
    """`libmkl_rt.so.N` as installed by the `mkl` wheel (newest first)."""
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix, sys.exec_prefix])
    found = []
    for prefix in prefixes:
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so.*")), reverse=True)
    return found


def _openblas_paths() -> list[str]:
    """The system OpenBLAS (found by the dynamic linker's search path)."""
    return ["libopenblas.so.0"]


def _describe() -> str | None:
    """Name and version of an optimized BLAS present in the process's global symbol scope, if any."""
    scope = ctypes.CDLL(None)
    if hasattr(scope, "mkl_get_version_string"):
        buf = ctypes.create_string_buffer(256)
        scope.mkl_get_version_string(buf, len(buf))
        version = re.search(r"Version ([0-9.]+)", buf.value.decode(errors="replace"))
        return "mkl " + (version.group(1).rstrip(".") if version else "")
    if hasattr(scope, "openblas_get_config"):
        scope.openblas_get_config.restype = ctypes.c_char_p
        scope.openblas_get_corename.restype = ctypes.c_char_p
        version = re.search(r"OpenBLAS ([0-9.]+)", scope.openblas_get_config().decode(errors="replace"))
        core = scope.openblas_get_corename().decode(errors="replace")
        return f"openblas {version.group(1) if version else ''} ({core})"
    return None


def _try_load(paths: list[str]) -> bool:
    for path in paths:
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            return True
        except OSError:
            continue
    return False


def load(choice: str | None = None) -> str:
    """Load an optimized BLAS for MLX (Linux only; a no-op elsewhere or once `mlx.core` is imported).

    Args:
        choice: ``auto`` | ``mkl`` | ``openblas`` | ``off``; default from ``RG_MLX_BLAS`` (else ``auto``).

    Returns:
        The description also returned by `active()`.
    """
    global _status
    choice = (choice or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice not in CHOICES:
        warnings.warn(f"{ENV_VAR}={choice!r} is not one of {', '.join(CHOICES)}; using auto", stacklevel=2)
        choice = "auto"
    if not sys.platform.startswith("linux"):
        _status = "platform default (Accelerate)" if sys.platform == "darwin" else "platform default"
        return _status
    preloaded = _describe()  # e.g. LD_PRELOAD, or a second call
    if preloaded or "mlx.core" in sys.modules:
        if preloaded:
            _status = preloaded
        else:
            _status = f"reference (mlx.core was imported before rg_mlx; import rg_mlx first for the {ENV_VAR} fast path)"
        return _status
    if choice == "off":
        _status = f"reference ({ENV_VAR}=off)"
        return _status
    order = {"auto": ("mkl", "openblas"), "mkl": ("mkl",), "openblas": ("openblas",)}[choice]
    finders = {"mkl": _mkl_paths, "openblas": _openblas_paths}
    for name in order:
        if _try_load(finders[name]()):
            _status = _describe() or name
            return _status
    _status = f"reference (no optimized BLAS found: {INSTALL_HINT})"
    if choice != "auto":
        warnings.warn(f"{ENV_VAR}={choice}: {choice} is not installed; MLX uses the reference BLAS", stacklevel=2)
    return _status


def active() -> str:
    """Which BLAS MLX's CPU backend uses in this process, e.g. ``"mkl (Intel(R) oneAPI Math Kernel Library ...)"``."""
    return _status


load()
