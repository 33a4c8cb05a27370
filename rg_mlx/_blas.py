"""The Linux fast path: an optimized BLAS for MLX's CPU backend, and a malloc that reuses memory.

MLX's Linux CPU wheel links the reference (netlib) BLAS, about 6 GFLOP/s for a float32 matmul.
MLX calls ``cblas_sgemm`` by name, so a library that provides it, loaded with ``RTLD_GLOBAL``
*before* `mlx.core` is first imported, takes over. `rg_mlx/__init__.py` imports this module
first, so ``import rg_mlx`` applies it; loading it after `mlx.core` has no effect.

Two kinds of library:
- OpenBLAS: the copy NumPy's wheels carry (symbols renamed ``scipy_*64_``, 64-bit integers) or
  the system one (Debian/Ubuntu: ``apt install libopenblas0-pthread``). It goes through rg_mlx's
  router (``_blas_route.c``, built at install): MLX calls the router's ``cblas_sgemm``, which
  sends products of one to three rows (decode) to OpenBLAS's ``sgemv``, row by row, those of
  four to eight rows by a large weight (batched decode) to its own product that reads the weight
  once for all rows, split over the cores, and the rest to OpenBLAS's ``sgemm``.
  Without the router only the system OpenBLAS can be used, and its one-row products are slow.
- Intel MKL from PyPI (``pip install -e '.[mkl]'`` in the rg-mlx clone), loaded as it is.

OpenBLAS's idle threads spin for about 0.1 s after each product before they sleep. Between a decode
step's products MLX's own threads run the elementwise work, and a batch of four to eight rows runs
on the router's threads, so spinning OpenBLAS threads take their cores: a batch of 8 decode rows
took twice as long. OpenBLAS is loaded with its idle threads sleeping at once
(``OPENBLAS_THREAD_TIMEOUT``, `THREAD_TIMEOUT`, unless set already; OpenBLAS reads it when it is
loaded, so not where NumPy was imported before rg_mlx).

MLX's CPU allocator is plain malloc and free, without the buffer cache its Metal allocator keeps.
glibc hands out every block over 32 MB (a prompt chunk's attention scores) as a fresh mapping,
faulted in page by page each time: 12,800 faults and ~45 ms for 52 MB here, 5% of a prefill.
So glibc is told to serve every size from its heap and to keep up to `KEEP_FREED_BYTES` freed
for reuse (`malloc_reuses_memory()`).

``RG_MLX_BLAS`` chooses: ``auto`` (default: MKL first on Intel CPUs, OpenBLAS first elsewhere
-- MKL runs a slower code path on other CPUs -- then the other, else the reference BLAS),
``mkl``, ``openblas``, or ``off`` (MLX as installed: neither the BLAS nor the malloc settings).
`active()` says which BLAS MLX uses in this process and `threaded_row_products()` whether that
BLAS runs one-row products on several threads itself.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
import sys
import warnings
from dataclasses import dataclass

ENV_VAR = "RG_MLX_BLAS"
CHOICES = ("auto", "mkl", "openblas", "off")
INSTALL_HINT = (
    "pip install numpy (its wheel carries OpenBLAS), apt install libopenblas0-pthread, "
    "or pip install -e '.[mkl]' in the rg-mlx clone"
)

# What `load` found: a one-line description, see `active()`; and whether one-row products go to a threaded sgemv.
_status = "not loaded"
_threaded_rows = False
_malloc_reuses = False

# OpenBLAS's environment variable for how long its idle threads spin (2 ** value cycles; 4 is its least).
THREAD_TIMEOUT_VAR, THREAD_TIMEOUT = "OPENBLAS_THREAD_TIMEOUT", "4"

# glibc's mallopt parameters, and how much freed memory its heap keeps rather than returning it.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
KEEP_FREED_BYTES = 1 << 30


@dataclass(frozen=True)
class Library:
    """An optimized BLAS on disk, and how its symbols are named."""

    kind: str  # "mkl" or "openblas"
    path: str
    where: str  # for `active()`: "NumPy's copy", "system", ...
    prefix: str = ""
    suffix: str = ""  # "64_": 64-bit integers (ILP64)

    def function(self, handle: ctypes.CDLL, name: str):
        return getattr(handle, self.prefix + name + self.suffix)


def _mkl() -> list[Library]:
    """`libmkl_rt.so.N` as installed by the `mkl` wheel (newest first)."""
    prefixes = dict.fromkeys([sys.prefix, sys.base_prefix, sys.exec_prefix])
    found = []
    for prefix in prefixes:
        found += sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so.*")), reverse=True)
    return [Library("mkl", path, "PyPI") for path in found]


def _openblas(routed: bool) -> list[Library]:
    """NumPy's OpenBLAS (needs the router: its symbols are renamed), then the system one."""
    found = []
    spec = importlib.util.find_spec("numpy")
    if routed and spec and spec.origin:
        libs = os.path.join(os.path.dirname(os.path.dirname(spec.origin)), "numpy.libs")
        found += [Library("openblas", path, "NumPy's copy", "scipy_", "64_")
                  for path in sorted(glob.glob(os.path.join(libs, "libscipy_openblas64_*.so")))]
    return found + [Library("openblas", "libopenblas.so.0", "system")]


def _router() -> str | None:
    """The router's shared library (built from _blas_route.c at install), if it was built."""
    spec = importlib.util.find_spec(f"{__package__}._blas_route") if __package__ else None
    return spec.origin if spec and spec.origin else None


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


def _describe(handle: ctypes.CDLL, lib: Library | None = None) -> str | None:
    """Name and version of the MKL or OpenBLAS behind `handle` (`ctypes.CDLL(None)`: the global scope), if any."""
    lib = lib or Library("", "", "")
    try:
        version_string = lib.function(handle, "mkl_get_version_string")
    except AttributeError:
        pass
    else:
        buf = ctypes.create_string_buffer(256)
        version_string(buf, len(buf))
        version = re.search(r"Version ([0-9.]+)", buf.value.decode(errors="replace"))
        return "mkl " + (version.group(1).rstrip(".") if version else "")
    try:
        config, corename = lib.function(handle, "openblas_get_config"), lib.function(handle, "openblas_get_corename")
    except AttributeError:
        return None
    config.restype = corename.restype = ctypes.c_char_p
    version = re.search(r"OpenBLAS ([0-9.]+)", config().decode(errors="replace"))
    return f"openblas {version.group(1) if version else ''} ({corename().decode(errors='replace')})"


def _use(lib: Library, router: str | None) -> str | None:
    """Make `lib` the BLAS MLX calls; its description, or None where it cannot be loaded."""
    global _threaded_rows
    routed = lib.kind == "openblas" and router is not None
    if lib.kind == "openblas":
        os.environ.setdefault(THREAD_TIMEOUT_VAR, THREAD_TIMEOUT)
    try:
        handle = ctypes.CDLL(lib.path, mode=ctypes.RTLD_LOCAL if routed else ctypes.RTLD_GLOBAL)
        if routed:
            sgemm, sgemv = lib.function(handle, "cblas_sgemm"), lib.function(handle, "cblas_sgemv")
            route = ctypes.CDLL(router, mode=ctypes.RTLD_GLOBAL).rg_blas_route
            route.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
            route(ctypes.cast(sgemm, ctypes.c_void_p), ctypes.cast(sgemv, ctypes.c_void_p), int(lib.suffix == "64_"))
    except (OSError, AttributeError):
        return None
    _threaded_rows = routed
    description = _describe(handle, lib) or lib.kind
    if lib.kind == "mkl":
        return description
    return f"{description}, {lib.where}" + ("" if routed else "; one-row products unrouted (slow): reinstall "
                                             "rg-mlx where a C compiler is available")


def _reuse_freed_memory() -> bool:
    """Have glibc's malloc serve blocks of every size from its heap and keep freed ones for reuse."""
    libc = ctypes.CDLL(None)
    if not hasattr(libc, "gnu_get_libc_version"):  # another C library (musl): left as it is
        return False
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, KEEP_FREED_BYTES))


def load(choice: str | None = None) -> str:
    """Load an optimized BLAS for MLX (Linux only; a no-op elsewhere, once loaded, or once `mlx.core` is imported).

    Args:
        choice: ``auto`` | ``mkl`` | ``openblas`` | ``off``; default from ``RG_MLX_BLAS`` (else ``auto``).

    Returns:
        The description also returned by `active()`.
    """
    global _status, _malloc_reuses
    if _status != "not loaded":
        return _status
    choice = (choice or os.environ.get(ENV_VAR) or "auto").strip().lower()
    if choice not in CHOICES:
        warnings.warn(f"{ENV_VAR}={choice!r} is not one of {', '.join(CHOICES)}; using auto", stacklevel=2)
        choice = "auto"
    if not sys.platform.startswith("linux"):
        _status = "platform default (Accelerate)" if sys.platform == "darwin" else "platform default"
        return _status
    _malloc_reuses = choice != "off" and _reuse_freed_memory()
    preloaded = _describe(ctypes.CDLL(None))  # e.g. LD_PRELOAD
    if preloaded:
        _status = f"{preloaded}, preloaded"
        return _status
    if "mlx.core" in sys.modules:
        _status = f"reference (mlx.core was imported before rg_mlx; import rg_mlx first for the {ENV_VAR} fast path)"
        return _status
    if choice == "off":
        _status = f"reference ({ENV_VAR}=off)"
        return _status
    router = _router()
    # MKL takes a slower code path on CPUs not made by Intel, and an unrouted OpenBLAS decodes slowly.
    mkl_first = _cpu_vendor() == "GenuineIntel" or router is None
    order = {"auto": ("mkl", "openblas") if mkl_first else ("openblas", "mkl"), "mkl": ("mkl",),
             "openblas": ("openblas",)}[choice]
    for kind in order:
        for lib in _mkl() if kind == "mkl" else _openblas(router is not None):
            description = _use(lib, router)
            if description:
                _status = description
                return _status
    _status = f"reference (no optimized BLAS found: {INSTALL_HINT})"
    if choice != "auto":
        warnings.warn(f"{ENV_VAR}={choice}: {choice} is not installed; MLX uses the reference BLAS", stacklevel=2)
    return _status


def active() -> str:
    """Which BLAS MLX's CPU backend uses in this process, e.g. ``"openblas 0.3.30 (Haswell), NumPy's copy"``."""
    return _status


def malloc_reuses_memory() -> bool:
    """Whether `load` set glibc's malloc to reuse freed memory of every size (see the module docstring)."""
    return _malloc_reuses


def threaded_row_products() -> bool:
    """Whether the active BLAS runs one-row products (decode) on several threads by itself."""
    return _threaded_rows


load()
