// The AVX-512 vector type of kernels_impl.h (for kernels_avx512.cpp and gemm_bf16.cpp, both compiled with
// the AVX-512 flags; internal linkage, see kernels.h).
#pragma once

#include <immintrin.h>

#include "kernels_impl.h"

namespace rg_native {
namespace {

struct Avx512 {
  static constexpr int ACCUMULATORS = 16;
  static constexpr int W = 16;
  using F = __m512;
  static F zero() { return _mm512_setzero_ps(); }
  static F load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static F set1(float s) { return _mm512_set1_ps(s); }
  static F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static float sum(F a) { return _mm512_reduce_add_ps(a); }
  static __m512i bytes(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p)); }
  static F u8(const uint8_t* p) { return _mm512_cvtepi32_ps(bytes(p)); }
  // A 4-bit group's 16 possible values, scale * q + bias, looked up by vpermps (which reads only the
  // low 4 bits of each index: the high nibble needs a shift but no mask).
  struct G4 {
    F table;
  };
  static G4 group4(float s, float b) {
    const F q = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    return G4{_mm512_fmadd_ps(q, _mm512_set1_ps(s), _mm512_set1_ps(b))};
  }
  static void deq4(const uint8_t* p, const G4& g, F& lo, F& hi) {
    const __m512i v = bytes(p);
    lo = _mm512_permutexvar_ps(v, g.table);
    hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), g.table);
  }
  static void raw4(const uint8_t* p, F& lo, F& hi) {
    const __m512i v = bytes(p);
    lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
    hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
  }
  static void interleave(float* d, F lo, F hi) {
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    _mm512_storeu_ps(d, _mm512_permutex2var_ps(lo, first, hi));
    _mm512_storeu_ps(d + 16, _mm512_permutex2var_ps(lo, second, hi));
  }
  static F bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
  }
  static void bf16_pairs(const uint16_t* p, F& lo, F& hi) {
    const __m512i v = _mm512_loadu_si512(p);
    lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
    hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32((int)0xFFFF0000u)));
  }
  static F f16(const uint16_t* p) { return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p)); }
  static void narrow_bf16(const float* s, uint16_t* d) {
    const F x = _mm512_loadu_ps(s);
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, lsb), _mm512_set1_epi32(0x7FFF)), 16);
    r = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), r, _mm512_set1_epi32(0x7FC0));
    _mm256_storeu_si256((__m256i*)d, _mm512_cvtepi32_epi16(r));
  }
  static void narrow_f16(const float* s, uint16_t* d) {
    _mm256_storeu_si256((__m256i*)d, _mm512_cvtps_ph(_mm512_loadu_ps(s), _MM_FROUND_TO_NEAREST_INT));
  }
};


}  // namespace
}  // namespace rg_native
