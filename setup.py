"""Builds rg_mlx's BLAS router for the Linux fast path (rg_mlx/_blas_route.c); the rest is in pyproject.toml.

The router is optional: without a C compiler the install goes on, and the fast path uses MKL or an
OpenBLAS that MLX can call directly (see rg_mlx/_blas.py).
"""

import sys

from setuptools import Extension, setup

extensions = []
if sys.platform.startswith("linux"):
    extensions.append(Extension("rg_mlx._blas_route", ["rg_mlx/_blas_route.c"], extra_compile_args=["-O2", "-pthread"],
                                extra_link_args=["-pthread"],
                                optional=True))

setup(ext_modules=extensions)
