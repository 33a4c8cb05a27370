"""Builds rg_mlx's compiled parts; the rest is in pyproject.toml.

- The BLAS router for the Linux fast path (rg_mlx/_blas_route.c, see rg_mlx/_blas.py).
- The CPU products (rg_mlx/cpu/csrc, see rg_mlx/cpu/native.py): an MLX C++ extension built against the
  headers and libmlx that the `mlx` wheel ships, with nanobind in MLX's nanobind domain so that
  `mlx.core.array` passes through. MLX has no stable C++ ABI: the MLX version it was built against is
  written beside it (`_native_build.json`), and native.py refuses to load it under another one.

Both are optional: without a compiler (or without nanobind and MLX's headers, as in a
`--no-build-isolation` install that lacks them) the install goes on and MLX's own kernels run.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import CompileError

NATIVE = "rg_mlx.cpu._native"
CSRC = os.path.join("rg_mlx", "cpu", "csrc")
BUILD_INFO = "_native_build.json"
X86 = platform.machine().lower() in ("x86_64", "amd64")
CXX_FLAGS = ["-std=c++20", "-O3", "-fvisibility=hidden", "-DNDEBUG"]
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"]
# Kernel sources and the instruction-set flags each is compiled with (native.py picks one at run time).
KERNELS = {"kernels_portable.cpp": []}
if X86:
    KERNELS |= {"kernels_avx2.cpp": ["-mavx2", "-mfma", "-mf16c"], "kernels_avx512.cpp": AVX512,
                "gemm_bf16.cpp": AVX512 + ["-mavx512bf16"]}


class BuildExt(build_ext):
    """build_ext that compiles the native products' sources with their own flags."""

    def build_extension(self, ext: Extension) -> None:
        if ext.name != NATIVE:
            super().build_extension(ext)
            return
        try:
            import mlx.core as mx
            import nanobind
        except ImportError as e:  # a --no-build-isolation install without them: skip (optional)
            raise CompileError(f"rg_mlx's native CPU products need MLX and nanobind to build: {e}") from e
        mlx_dir = os.path.dirname(mx.__file__)
        nb_dir = os.path.dirname(nanobind.__file__)
        includes = [os.path.join(mlx_dir, "include"), nanobind.include_dir(),
                    os.path.join(nb_dir, "ext", "robin_map", "include")]
        macros = []
        if ".abi3." in os.path.basename(mx.__file__):  # MLX's module uses the stable ABI: nanobind must too
            macros.append(("Py_LIMITED_API", "0x030C0000"))
        if sysconfig.get_config_var("Py_GIL_DISABLED"):
            macros.append(("NB_FREE_THREADED", None))
        groups = [([os.path.join(nanobind.source_dir(), "nb_combined.cpp")], ["-fno-strict-aliasing"], [])]
        groups += [([os.path.join(CSRC, name)], flags, []) for name, flags in KERNELS.items()]
        groups += [([os.path.join(CSRC, name)], [], [("NB_DOMAIN", "mlx")])
                   for name in ("bindings.cpp", "products.cpp", "pool.cpp")]

        def compile_group(group):
            sources, flags, extra_macros = group
            return self.compiler.compile(sources, output_dir=self.build_temp, macros=macros + extra_macros,
                                         include_dirs=includes + ext.include_dirs, debug=self.debug,
                                         extra_postargs=CXX_FLAGS + flags)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            objects = [obj for objs in pool.map(compile_group, groups) for obj in objs]
        ext.extra_objects = objects
        ext.library_dirs = [os.path.join(mlx_dir, "lib")]
        ext.libraries = ["mlx"]
        loader = "@loader_path" if sys.platform == "darwin" else "$ORIGIN"
        # The installed layout: site-packages/rg_mlx/cpu/_native*.so beside site-packages/mlx/lib.
        ext.extra_link_args = [f"-Wl,-rpath,{loader}/../../mlx/lib"]
        if sys.platform == "darwin":
            ext.extra_link_args += ["-framework", "Accelerate"]
        super().build_extension(ext)
        with open(self._build_info()[1], "w") as f:
            json.dump({"mlx": mx.__version__, "nanobind": nanobind.__version__}, f)

    def _build_info(self) -> tuple[str, str]:
        """Where the build record goes in the source tree (inplace builds) and in build_lib."""
        inplace, regular = self._get_inplace_equivalent(self.get_finalized_command("build_py"),
                                                        next(e for e in self.extensions if e.name == NATIVE))
        return os.path.join(os.path.dirname(inplace), BUILD_INFO), os.path.join(os.path.dirname(regular), BUILD_INFO)

    def copy_extensions_to_source(self) -> None:
        super().copy_extensions_to_source()
        inplace, regular = self._build_info()
        if os.path.exists(regular):
            self.copy_file(regular, inplace, level=self.verbose)

    def _get_output_mapping(self):
        yield from super()._get_output_mapping()
        if self.inplace:
            inplace, regular = self._build_info()
            yield regular, inplace

    def get_outputs(self) -> list[str]:
        outputs = super().get_outputs()
        regular = self._build_info()[1]
        return outputs if self.inplace or not os.path.exists(regular) else sorted(outputs + [regular])


extensions = [Extension(NATIVE, [], language="c++", optional=True)]
if sys.platform.startswith("linux"):
    extensions.append(Extension("rg_mlx._blas_route", ["rg_mlx/_blas_route.c"], extra_compile_args=["-O2", "-pthread"],
                                extra_link_args=["-pthread"],
                                optional=True))

setup(ext_modules=extensions, cmdclass={"build_ext": BuildExt})
