// bfloat16 for the CPU shims of the GPU kernels: 16-bit storage, float <-> bfloat16 rounding to
// nearest even (as Metal and CUDA convert), arithmetic through float.
#pragma once

typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;

struct bfloat16_shim {
  uint16_t bits;
  bfloat16_shim() = default;
  bfloat16_shim(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
      bits = 0x7fc0;  // NaN
    } else {
      u += 0x7fffu + ((u >> 16) & 1u);
      bits = static_cast<uint16_t>(u >> 16);
    }
  }
  operator float() const {
    uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
  }
};
