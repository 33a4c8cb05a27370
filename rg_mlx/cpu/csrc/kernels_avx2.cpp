// The kernels with AVX2, FMA and F16C (compiled with -mavx2 -mfma -mf16c; called only where CPUID has them).
#include <immintrin.h>

#include "kernels_impl.h"

namespace rg_native {
namespace {

struct Avx2 {
  static constexpr int ACCUMULATORS = 6;
  static constexpr int W = 8;
  using F = __m256;
  static F zero() { return _mm256_setzero_ps(); }
  static F load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static F set1(float s) { return _mm256_set1_ps(s); }
  static F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static float sum(F a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static __m256i bytes(const uint8_t* p) { return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p)); }
  static F u8(const uint8_t* p) { return _mm256_cvtepi32_ps(bytes(p)); }
  struct G4 {
    F s, b;
  };
  static G4 group4(float s, float b) { return G4{_mm256_set1_ps(s), _mm256_set1_ps(b)}; }
  static void deq4(const uint8_t* p, const G4& g, F& lo, F& hi) {
    const __m256i v = bytes(p);
    lo = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15))), g.s, g.b);
    hi = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4)), g.s, g.b);
  }
  static void raw4(const uint8_t* p, F& lo, F& hi) {
    const __m256i v = bytes(p);
    lo = _mm256_cvtepi32_ps(_mm256_and_si256(v, _mm256_set1_epi32(15)));
    hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(v, 4));
  }
  static void interleave(float* d, F lo, F hi) {
    // a = [values 0-3 | 8-11], b = [4-7 | 12-15] (unpack works within 128-bit lanes)
    const F a = _mm256_unpacklo_ps(lo, hi), b = _mm256_unpackhi_ps(lo, hi);
    _mm256_storeu_ps(d, _mm256_permute2f128_ps(a, b, 0x20));
    _mm256_storeu_ps(d + 8, _mm256_permute2f128_ps(a, b, 0x31));
  }
  static F bf16(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
  }
  static void bf16_pairs(const uint16_t* p, F& lo, F& hi) {
    const __m256i v = _mm256_loadu_si256((const __m256i*)p);
    lo = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    hi = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
  }
  static F f16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
  static void narrow_bf16(const float* s, uint16_t* d) {
    const __m256i u = _mm256_castps_si256(_mm256_loadu_ps(s));
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, lsb), _mm256_set1_epi32(0x7FFF)), 16);
    const __m256 x = _mm256_castsi256_ps(u);
    r = _mm256_blendv_epi8(_mm256_set1_epi32(0x7FC0), r, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_ORD_Q)));
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128((__m128i*)d, packed);
  }
  static void narrow_f16(const float* s, uint16_t* d) {
    _mm_storeu_si128((__m128i*)d, _mm256_cvtps_ph(_mm256_loadu_ps(s), _MM_FROUND_TO_NEAREST_INT));
  }
};

}  // namespace

const Kernels* kernels_avx2() {
  static const Kernels k = make_kernels<Avx2>("avx2");
  return &k;
}

}  // namespace rg_native
