// The kernels in plain C++ (any CPU; the compiler vectorizes what it can for the baseline ISA).
#include "kernels_impl.h"

namespace rg_native {
namespace {

struct Portable {
  static constexpr int ACCUMULATORS = 4;
  static constexpr int W = 8;
  struct F {
    float v[W];
  };
  static F zero() { return F{}; }
  static F load(const float* p) {
    F r;
    for (int i = 0; i < W; ++i) r.v[i] = p[i];
    return r;
  }
  static void store(float* p, const F& a) {
    for (int i = 0; i < W; ++i) p[i] = a.v[i];
  }
  static F set1(float s) {
    F r;
    for (int i = 0; i < W; ++i) r.v[i] = s;
    return r;
  }
  static F fma(const F& a, const F& b, const F& c) {
    F r;
    // Not fmaf: without FMA instructions that is a library call; the compiler contracts this where it can.
    for (int i = 0; i < W; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i];
    return r;
  }
  static float sum(const F& a) {
    float s = 0.0f;
    for (int i = 0; i < W; ++i) s += a.v[i];
    return s;
  }
  static F u8(const uint8_t* p) {
    F r;
    for (int i = 0; i < W; ++i) r.v[i] = (float)p[i];
    return r;
  }
  struct G4 {
    float s, b;
  };
  static G4 group4(float s, float b) { return G4{s, b}; }
  static void deq4(const uint8_t* p, const G4& g, F& lo, F& hi) {
    for (int i = 0; i < W; ++i) {
      lo.v[i] = (float)(p[i] & 15) * g.s + g.b;
      hi.v[i] = (float)(p[i] >> 4) * g.s + g.b;
    }
  }
  static void raw4(const uint8_t* p, F& lo, F& hi) {
    for (int i = 0; i < W; ++i) lo.v[i] = (float)(p[i] & 15), hi.v[i] = (float)(p[i] >> 4);
  }
  static void interleave(float* d, const F& lo, const F& hi) {
    for (int i = 0; i < W; ++i) d[2 * i] = lo.v[i], d[2 * i + 1] = hi.v[i];
  }
  static F bf16(const uint16_t* p) {
    F r;
    for (int i = 0; i < W; ++i) r.v[i] = bf16_to_f32(p[i]);
    return r;
  }
  static void bf16_pairs(const uint16_t* p, F& lo, F& hi) {
    for (int i = 0; i < W; ++i) lo.v[i] = bf16_to_f32(p[2 * i]), hi.v[i] = bf16_to_f32(p[2 * i + 1]);
  }
  static F f16(const uint16_t* p) {
    F r;
    for (int i = 0; i < W; ++i) r.v[i] = f16_to_f32(p[i]);
    return r;
  }
  static void narrow_bf16(const float* s, uint16_t* d) {
    for (int i = 0; i < W; ++i) d[i] = f32_to_bf16(s[i]);
  }
  static void narrow_f16(const float* s, uint16_t* d) {
    for (int i = 0; i < W; ++i) d[i] = f32_to_f16(s[i]);
  }
};

const Kernels portable_kernels = make_kernels<Portable>("portable");

}  // namespace

const Kernels* kernels_portable() { return &portable_kernels; }

}  // namespace rg_native
