// Scalar conversions between float32 and bfloat16 / float16 bits, rounding to nearest even as MLX does
// (bfloat16: NaN becomes 0x7FC0). Header-only with internal linkage, so each per-ISA file has its own copy.
#pragma once

#include <stdint.h>
#include <string.h>

#include "kernels.h"

namespace rg_native {
namespace {

inline float bits_to_f32(uint32_t u) {
  float f;
  memcpy(&f, &u, 4);
  return f;
}

inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
}

inline float bf16_to_f32(uint16_t h) { return bits_to_f32((uint32_t)h << 16); }

inline uint16_t f32_to_bf16(float f) {
  uint32_t u = f32_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  u += ((u >> 16) & 1u) + 0x7FFFu;
  return (uint16_t)(u >> 16);
}

// float16 <-> float32 without F16C (the method of Maratyszcza's FP16 library: exact, round to nearest even).
inline float f16_to_f32(uint16_t h) {
  const uint32_t w = (uint32_t)h << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_f32((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_f32((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized);
  return bits_to_f32(sign | result);
}

inline uint16_t f32_to_f16(float f) {
  float base = (__builtin_fabsf(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = f32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_f32((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = f32_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return (uint16_t)((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float load_scalar(const void* p, DType dt, size_t i) {
  switch (dt) {
    case DType::bf16: return bf16_to_f32(((const uint16_t*)p)[i]);
    case DType::f16: return f16_to_f32(((const uint16_t*)p)[i]);
    default: return ((const float*)p)[i];
  }
}

inline void store_scalar(void* p, DType dt, size_t i, float v) {
  switch (dt) {
    case DType::bf16: ((uint16_t*)p)[i] = f32_to_bf16(v); break;
    case DType::f16: ((uint16_t*)p)[i] = f32_to_f16(v); break;
    default: ((float*)p)[i] = v;
  }
}

}  // namespace
}  // namespace rg_native
