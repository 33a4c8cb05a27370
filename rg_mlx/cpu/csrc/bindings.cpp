// Python bindings (nanobind, in MLX's nanobind domain so that mlx.core.array passes through as is).
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "mlx/version.h"
#include "pool.h"
#include "products.h"

namespace nb = nanobind;
using namespace nb::literals;

#define RG_STR2(x) #x
#define RG_STR(x) RG_STR2(x)

NB_MODULE(_native, m) {
  m.doc() = "rg_mlx's CPU products for MLX (see rg_mlx/cpu/native.py).";
  m.attr("MLX_VERSION") = RG_STR(MLX_VERSION_MAJOR) "." RG_STR(MLX_VERSION_MINOR) "." RG_STR(MLX_VERSION_PATCH);
  m.def("quantized_matmul", &rg_native::quantized_matmul, "x"_a, "w"_a, "scales"_a, "biases"_a, "group_size"_a,
        "bits"_a, "x @ dequantize(w).T for MLX's affine format.");
  m.def("matmul", &rg_native::matmul, "x"_a, "w"_a, "x @ w.T for a bfloat16 or float16 weight [N, K].");
  m.def("supported_isas", &rg_native::supported_isas, "Instruction sets this CPU has, best first.");
  m.def("isa", &rg_native::isa, "The instruction set the products use.");
  m.def("set_isa", &rg_native::set_isa, "name"_a, "Use another instruction set (one of supported_isas()).");
  m.def("threads", &rg_native::pool_threads, "Threads a product uses (the caller and the pool's workers).");
  m.def("set_threads", &rg_native::set_pool_threads, "n"_a,
        "Resize the thread pool (0: one per physical core); not while products run.");
}
