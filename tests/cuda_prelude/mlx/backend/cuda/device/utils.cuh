// Stands in for MLX's CUDA device header, which MLX's kernel source includes first and which the
// MLX wheels do not ship as a file (MLX's JIT embeds it). It gives what that header gives the
// plain per-thread code of rg_mlx's kernels: the CUDA half and bfloat16 types (from the CUDA
// toolkit) and the `mlx::core::cu` namespace. Used by tests/test_cuda_compile.py with nvcc.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace mlx::core::cu {}
