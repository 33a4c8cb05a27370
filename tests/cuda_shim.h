// Lets g++ compile the CUDA kernel source of an `mx.fast.cuda_kernel`, to run it thread by thread on the CPU.
//
// It stands in for what MLX's CUDA prelude (`mlx/backend/cuda/device/utils.cuh`,
// <cooperative_groups.h>) and the CUDA headers give plain per-thread code: the function
// qualifiers, `dim3` with blockIdx / blockDim / threadIdx / gridDim (set by the launcher before
// each thread), `__half` (`_Float16`), `__nv_bfloat16` (a 16-bit struct, round to nearest even)
// and the C library's float math functions. Shared memory, __syncthreads, warp functions and
// atomics are deliberately absent: a kernel that uses them fails to compile here.
#pragma once

#include "bfloat16_shim.h"

// Standard types from the compiler's builtins: no system headers, so a compile takes a fraction of a second.
typedef __SIZE_TYPE__ size_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT64_TYPE__ uint64_t;

extern "C" float expf(float);
extern "C" float logf(float);
extern "C" float sqrtf(float);
extern "C" float fabsf(float);
extern "C" float fmaxf(float, float);
extern "C" float fminf(float, float);

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __grid_constant__

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
static dim3 blockIdx, blockDim, threadIdx, gridDim;

namespace cooperative_groups {}

typedef _Float16 __half;

typedef bfloat16_shim __nv_bfloat16;
