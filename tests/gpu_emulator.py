"""Run MLX custom GPU kernels on the CPU, thread by thread, without a Mac or an NVIDIA GPU.

`emulated_kernels(backend, ...)` returns stand-ins for the objects `mx.fast.metal_kernel` /
`mx.fast.cuda_kernel` make, taking the same call. For each call a stand-in

1. gets the kernel's full source:
   - Metal: rendered by MLX itself. The real kernel object is called under
     `mx.export_function` tracing with ``verbose=True`` (possible without a Metal device) and MLX
     prints the header plus the generated kernel, signature and template instantiation included:
     exactly the text MLX compiles after its `metal::utils()` prelude, for which `metal_shim.h`
     stands in;
   - CUDA: MLX builds CUDA sources only inside its CUDA backend, absent here, so `cuda_source`
     re-does MLX's `build_kernel` (mlx/backend/cuda/custom_kernel.cpp, MLX 0.32) in Python:
     a reconstruction, faithful in what the kernel body sees (parameter names and types, the
     template constants, the namespace, the kernel name); `cuda_shim.h` stands in for MLX's
     default header (`CUDA_DEFAULT_HEADER`, dropped for g++; tests/test_cuda_compile.py
     compiles the same text with nvcc);
2. compiles the source unchanged with g++ (``-include <shim>``), appending a launcher that calls
   the kernel once per thread with the backend's dispatch: Metal's `dispatchThreads(grid,
   min(threadgroup, grid))` (partial edge threadgroups, no thread outside the grid); CUDA's
   grid rounded up to whole blocks (threads past the grid run and must bounds-check), refused
   as a CUDA launch would be beyond CUDA's grid and block limits;
3. runs it on the call's inputs (outputs start as NaN bytes, so an unwritten element shows)
   and returns the outputs as MLX arrays.

Threads run one after another, in reverse order, so threads of one launch that depended on each
other would be caught. Threadgroup/shared memory, barriers, SIMD-group/warp functions and
atomics are not emulated: such a source fails to compile here. The GPU compilers, their math
precision and the GPU memory model are not exercised.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx.core as mx
import numpy as np

HERE = Path(__file__).parent
# `metal_source` traces a Metal kernel under `mx.export_function` without a Metal device, which MLX
# allows from 0.32.0 (pyproject.toml's floor must be at least this).
MLX_FOR_EMULATION = (0, 32, 0)

# Metal thread attributes the launcher provides, as C++ expressions.
_METAL_ATTRIBUTES = {
    "thread_position_in_grid": "uint3{x, y, z}",
    "threads_per_grid": "uint3{gx, gy, gz}",
    "grid_size": "uint3{gx, gy, gz}",
    "threadgroup_position_in_grid": "uint3{x / tx, y / ty, z / tz}",
    "thread_position_in_threadgroup": "uint3{x % tx, y % ty, z % tz}",
    "threads_per_threadgroup": "uint3{edge(x, gx, tx), edge(y, gy, ty), edge(z, gz, tz)}",
    "threadgroups_per_grid": "uint3{(gx + tx - 1) / tx, (gy + ty - 1) / ty, (gz + tz - 1) / tz}",
    "thread_index_in_threadgroup": "(x % tx) + tx * ((y % ty) + ty * (z % tz))",
}

_METAL_LAUNCHER = """
static inline uint edge(uint p, uint g, uint t) {{ return (p / t + 1) * t <= g ? t : g % t; }}
extern "C" void emulated_launch(void** buffers, uint gx, uint gy, uint gz, uint tx, uint ty, uint tz) {{
  tx = tx < gx ? tx : gx;
  ty = ty < gy ? ty : gy;
  tz = tz < gz ? tz : gz;
  for (long long zi = gz - 1; zi >= 0; --zi)
    for (long long yi = gy - 1; yi >= 0; --yi)
      for (long long xi = gx - 1; xi >= 0; --xi) {{
        const uint x = uint(xi), y = uint(yi), z = uint(zi);
        {call}(
          {arguments});
      }}
}}
"""

# MLX's CUDA `CustomKernel::eval_gpu`: block = min(threadgroup, grid), blocks = ceil(grid / threadgroup).
_CUDA_LAUNCHER = """
extern "C" void emulated_launch(void** buffers, unsigned gx, unsigned gy, unsigned gz, unsigned tx, unsigned ty, unsigned tz) {{
  blockDim = dim3{{tx < gx ? tx : gx, ty < gy ? ty : gy, tz < gz ? tz : gz}};
  gridDim = dim3{{(gx + tx - 1) / tx, (gy + ty - 1) / ty, (gz + tz - 1) / tz}};
  for (long long bz = gridDim.z - 1; bz >= 0; --bz)
    for (long long by = gridDim.y - 1; by >= 0; --by)
      for (long long bx = gridDim.x - 1; bx >= 0; --bx)
        for (long long z = blockDim.z - 1; z >= 0; --z)
          for (long long y = blockDim.y - 1; y >= 0; --y)
            for (long long x = blockDim.x - 1; x >= 0; --x) {{
              blockIdx = dim3{{unsigned(bx), unsigned(by), unsigned(bz)}};
              threadIdx = dim3{{unsigned(x), unsigned(y), unsigned(z)}};
              mlx::core::cu::{name}(
                {arguments});
            }}
}}
"""
# What a CUDA launch accepts (blocks per grid dimension, threads per block); beyond it the launch fails.
CUDA_MAX_BLOCKS = (2**31 - 1, 65535, 65535)
CUDA_MAX_BLOCK_THREADS = 1024
# MLX's CUDA kernel source starts with this include of its device header (`default_header`).
CUDA_DEFAULT_HEADER = """
#include "mlx/backend/cuda/device/utils.cuh"

#include <cooperative_groups.h>

"""

# MLX's type names, as `get_type_string` (Metal) and `dtype_to_cuda_type` (CUDA) write them.
_CUDA_TYPES = {
    mx.float32: "float",
    mx.float16: "__half",
    mx.bfloat16: "__nv_bfloat16",
    mx.bool_: "bool",
    mx.uint32: "uint32_t",
    mx.int32: "int32_t",
}
_METAL_TYPES = {mx.float32: "float", mx.float16: "float16_t", mx.bfloat16: "bfloat16_t", mx.bool_: "bool"}

_NP_DTYPES = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # raw bits
    mx.bool_: np.bool_,
    mx.uint32: np.uint32,
    mx.int32: np.int32,
}


@contextlib.contextmanager
def _stdout_to(path: Path):
    """Send file descriptor 1 (where MLX's C++ `std::cout` writes) to `path`."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(path, "wb") as f:
        os.dup2(f.fileno(), 1)
        try:
            yield
        finally:
            os.dup2(saved, 1)
            os.close(saved)


def metal_source(kernel, call: dict, workdir: Path) -> str:
    """The Metal source MLX generates for `kernel(**call)`, printed under `mx.export_function`."""

    def traced(*inputs):
        return kernel(**{**call, "inputs": list(inputs), "verbose": True})

    log = workdir / "render.log"
    with _stdout_to(log):
        mx.export_function(str(workdir / "render.mlxfn"), traced, *call["inputs"])
    text = log.read_text()
    match = re.search(r"Generated source code for `\w+`:\n```\n(.*)\n```", text, re.S)
    assert match, f"MLX printed no kernel source:\n{text}"
    return match.group(1)


def kernel_name(name: str, template: list) -> str:
    """The name MLX gives a custom kernel launched with `template` (`template_arguments_hash`, Metal and CUDA)."""
    suffix = ""
    for _, v in template:
        if isinstance(v, mx.Dtype):
            suffix += "_" + _METAL_TYPES[v]
        elif isinstance(v, bool):
            suffix += "_t" if v else "_f"
        else:
            suffix += f"_{v}"
    return f"custom_kernel_{name}{suffix}"


def cuda_source(spec: dict, call: dict) -> tuple[str, str]:
    """MLX 0.32's CUDA `build_kernel` for `spec` (as `mx.fast.cuda_kernel` takes) and `call`: (source, name).

    The text starts with MLX's `CUDA_DEFAULT_HEADER`, as MLX compiles it."""
    for n in spec["input_names"]:
        assert not re.search(rf"{n}_(shape|strides|ndim)", spec["source"]), "shape inputs are not reconstructed"
    template = call.get("template", [])
    name = kernel_name(spec["name"], template)
    params = [f"    const {_CUDA_TYPES[a.dtype]}* {n}" for n, a in zip(spec["input_names"], call["inputs"])]
    params += [f"    {_CUDA_TYPES[d]}* {n}" for n, d in zip(spec["output_names"], call["output_dtypes"])]
    constants = ""
    for k, v in template:
        if isinstance(v, mx.Dtype):
            constants += f"  using {k} = {_CUDA_TYPES[v]};\n"
        elif isinstance(v, bool):
            constants += f"  constexpr bool {k} = {str(v).lower()};\n"
        else:
            constants += f"  constexpr int {k} = {v};\n"
    source = (
        CUDA_DEFAULT_HEADER
        + spec["header"]
        + "namespace mlx::core::cu {\n\nnamespace cg = cooperative_groups;\n\n"
        + f"__global__ void {name}(\n"
        + ",\n".join(params)
        + ") {\n"
        + (constants + "\n" if constants else "")
        + spec["source"]
        + "\n}\n\n} // namespace mlx::core::cu\n"
    )
    return source, name


def _metal_launcher(source: str) -> tuple[str, int]:
    """A C++ launcher for the Metal kernel in `source` and its number of buffer arguments."""
    match = re.search(r"\[\[kernel\]\] void (\w+)\((.*?)\) \{", source, re.S)
    name, params = match.group(1), match.group(2)
    instance = re.search(rf"decltype\(({name}<.*?>)\)", source)
    arguments, buffers = [], 0
    for param in params.split(",\n"):
        declaration, attribute = re.fullmatch(r"\s*(.+?)\s*\[\[(\w+)(?:\(\d+\))?\]\]", param).groups()
        ctype, _ = declaration.rsplit(None, 1)
        if attribute == "buffer":
            arguments.append(f"({ctype})buffers[{buffers}]")
            buffers += 1
        elif attribute in _METAL_ATTRIBUTES:
            arguments.append(_METAL_ATTRIBUTES[attribute])
        else:
            raise NotImplementedError(f"the emulator cannot provide the Metal attribute {attribute}")
    call = instance.group(1) if instance else name
    return _METAL_LAUNCHER.format(call=call, arguments=",\n          ".join(arguments)), buffers


def _cuda_launcher(source: str, name: str) -> tuple[str, int]:
    """A C++ launcher for the CUDA kernel `name` in `source` and its number of pointer arguments."""
    params = re.search(rf"__global__ void {name}\((.*?)\) \{{", source, re.S).group(1).split(",\n")
    arguments = [f"({p.strip().rsplit(None, 1)[0]})buffers[{i}]" for i, p in enumerate(params)]
    return _CUDA_LAUNCHER.format(name=name, arguments=",\n          ".join(arguments)), len(params)


class Compiler:
    """Compiles sources with g++ once each (keyed by their text) into loadable libraries."""

    def __init__(self, workdir: Path | None = None):
        self.workdir = workdir or Path(tempfile.mkdtemp(prefix="gpu_emulator_"))
        self.libraries: dict[str, ctypes.CDLL] = {}
        self.named: dict[tuple[str, str], str] = {}  # (backend, kernel name) -> source launched under it

    def __call__(self, source: str, launcher: str, shim: str) -> ctypes.CDLL:
        if source not in self.libraries:
            key = hashlib.sha256(source.encode()).hexdigest()[:16]
            cpp, lib = self.workdir / f"{key}.cpp", self.workdir / f"{key}.so"
            cpp.write_text(source + "\n" + launcher)
            command = ["g++", "-std=c++17", "-O1", "-shared", "-fPIC", "-Wno-attributes"]
            command += ["-include", str(HERE / shim), str(cpp), "-o", str(lib), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode:
                raise RuntimeError(f"g++ failed on the kernel source:\n{result.stderr}")
            self.libraries[source] = ctypes.CDLL(str(lib))
        return self.libraries[source]


def _to_numpy(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.array(a))


def _to_mlx(a: np.ndarray, dtype: mx.Dtype) -> mx.array:
    out = mx.array(a)
    return out.view(dtype) if dtype == mx.bfloat16 else out


def _check_cuda_launch(grid: tuple, threadgroup: tuple) -> None:
    """Raise as a CUDA launch of MLX's `grid` and `threadgroup` would fail."""
    blocks = [-(-g // t) for g, t in zip(grid, threadgroup)]
    threads = [min(g, t) for g, t in zip(grid, threadgroup)]
    too_many_threads = threads[0] * threads[1] * threads[2] > CUDA_MAX_BLOCK_THREADS
    if any(b > m for b, m in zip(blocks, CUDA_MAX_BLOCKS)) or too_many_threads:
        raise RuntimeError(f"CUDA launch failed: invalid argument (grid {blocks} blocks of {threads} threads)")


class EmulatedKernel:
    """Stands in for one MLX custom kernel object; see the module docstring."""

    def __init__(self, backend: str, kernel, spec: dict, compiler: Compiler, edit=None):
        self.backend, self.kernel, self.spec = backend, kernel, spec
        self.compiler = compiler
        self.edit = edit  # optional source -> source function (negative controls)
        self.sources: list[str] = []

    def __call__(self, *, inputs, grid, threadgroup, output_shapes, output_dtypes, **call) -> list[mx.array]:
        assert not call.get("init_value"), "init_value is not emulated"
        call.update(inputs=inputs, grid=grid, threadgroup=threadgroup)
        call.update(output_shapes=output_shapes, output_dtypes=output_dtypes)
        if self.backend == "metal":
            source = metal_source(self.kernel, call, self.compiler.workdir)
        else:
            source, name = cuda_source(self.spec, call)
            _check_cuda_launch(grid, threadgroup)
        # MLX caches a compiled kernel by its name (CUDA: by the name alone before 0.32.1), so one name
        # must mean one source. MLX's Metal names also carry every input's dtype and address space.
        if self.backend == "metal":
            key = ("metal", re.search(r"\[\[kernel\]\] void (\w+)\(", source).group(1))
        else:
            key = ("cuda", name)
        if self.compiler.named.setdefault(key, source) != source:
            raise AssertionError(f"two different sources launched as {key[1]}: MLX < 0.32.1 would run the first")
        if self.edit is not None:
            source = self.edit(source)
        self.sources.append(source)
        if self.backend == "metal":
            launcher, buffers = _metal_launcher(source)
        else:
            launcher, buffers = _cuda_launcher(source, name)
        # The shim stands in for MLX's CUDA device header.
        library = self.compiler(source.replace(CUDA_DEFAULT_HEADER, ""), launcher, f"{self.backend}_shim.h")

        arrays = [_to_numpy(a) for a in inputs]
        outputs = []
        for shape, dtype in zip(output_shapes, output_dtypes):
            out = np.empty(tuple(shape), _NP_DTYPES[dtype])
            out.view(np.uint8)[...] = 0xFF  # NaN in every float type
            outputs.append(out)
        assert len(arrays) + len(outputs) == buffers
        pointers = (ctypes.c_void_p * buffers)(*(a.ctypes.data for a in arrays + outputs))
        library.emulated_launch(pointers, *(ctypes.c_uint(v) for v in (*grid, *threadgroup)))
        return [_to_mlx(o, d) for o, d in zip(outputs, output_dtypes)]


def emulated_kernels(backend: str, compiler: Compiler, edit=None) -> dict[str, EmulatedKernel]:
    """Stand-ins for `rg_mlx.kernels.source.backend_kernels(backend)`, run on the CPU."""
    from rg_mlx.kernels.source import kernel_specs

    specs = kernel_specs(backend)
    # The Metal stand-ins render through the real kernel objects (these build anywhere).
    real = {name: mx.fast.metal_kernel(**spec) for name, spec in specs.items()} if backend == "metal" else {}
    return {name: EmulatedKernel(backend, real.get(name), spec, compiler, edit) for name, spec in specs.items()}
