// Lets g++ compile the Metal kernel source that MLX generates, to run it thread by thread on the CPU.
//
// It stands in for MLX's `metal::utils()` prelude and the Metal standard library, for what plain
// per-thread code uses: address-space qualifiers (dropped: one flat memory), `uint`/`uint3`,
// `float16_t` (`_Float16`), `bfloat16_t` (a 16-bit struct, float <-> bfloat16 round to nearest
// even) and `metal::` / `metal::precise::` math (mapped to the C library's float functions).
// Threadgroup memory, barriers and SIMD-group functions are deliberately absent: a kernel that
// uses them fails to compile here rather than run with wrong semantics.
#pragma once

#include "bfloat16_shim.h"

// Standard types from the compiler's builtins: no system headers, so a compile takes a fraction of a second.
typedef __SIZE_TYPE__ size_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT64_TYPE__ uint64_t;

#define device
#define constant
#define thread

typedef unsigned int uint;

struct uint3 {
  uint x, y, z;
};

typedef _Float16 float16_t;
typedef _Float16 half;

typedef bfloat16_shim bfloat16_t;

namespace metal {
inline float exp(float x) { return __builtin_expf(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
inline float abs(float x) { return __builtin_fabsf(x); }
inline float fma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
namespace precise {
inline float exp(float x) { return __builtin_expf(x); }
inline float log(float x) { return __builtin_logf(x); }
inline float sqrt(float x) { return __builtin_sqrtf(x); }
}  // namespace precise
}  // namespace metal
