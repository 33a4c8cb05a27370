// rg_mlx's CPU products as MLX operations: a primitive with a CPU implementation (run through the CPU
// stream's command encoder like MLX's own), a gradient with respect to the activations, and the
// choice of instruction set.
#pragma once

#include <string>
#include <vector>

#include "mlx/array.h"

namespace rg_native {

// x @ dequantize(w).T for a weight in MLX's affine format (bits 4 or 8, group_size 32, 64 or 128).
mlx::core::array quantized_matmul(const mlx::core::array& x, const mlx::core::array& w,
                                  const mlx::core::array& scales, const mlx::core::array& biases, int group_size,
                                  int bits);
// x @ w.T for a bfloat16 or float16 weight [N, K].
mlx::core::array matmul(const mlx::core::array& x, const mlx::core::array& w);

// Instruction sets: "avx512bf16", "avx512", "avx2", "portable" (best first); those this CPU has.
std::vector<std::string> supported_isas();
std::string isa();
void set_isa(const std::string& name);

}  // namespace rg_native
