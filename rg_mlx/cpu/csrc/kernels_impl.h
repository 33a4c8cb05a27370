// The decode products, dequantization and conversions, written once over a vector type V and compiled
// per instruction set: kernels_portable.cpp, kernels_avx2.cpp and kernels_avx512.cpp each define V and
// include this file. Everything here has internal linkage (see kernels.h for why).
//
// V provides: W (lanes), ACCUMULATORS (how many F to keep in registers), F (W floats), zero, load, store,
// set1, fma, sum; u8 (W bytes as floats 0..255); G4 and
// group4(scale, bias) (what a 4-bit group needs to dequantize); deq4 (W bytes = 2W values of a group
// to floats: lo = values 2i, hi = values 2i+1); interleave (lo, hi back to value order); bf16 and f16
// (W half values as floats); bf16_pairs (2W bfloat16 values to floats: lo = values 2i, hi = values
// 2i+1, each by one shift or mask of the words as loaded); narrow_bf16 / narrow_f16 (W floats to half
// values).
//
// The decode products read the weight's values in those pairs where that saves work (4-bit and
// bfloat16 weights): x is laid out to match (`Kernels::pairs`), each row in chunks of 2W, the values of
// even k first, then those of odd k; a row's last K % 2W values stay in order.
#pragma once

#include "convert.h"
#include "kernels.h"

namespace rg_native {
namespace {

// Weight rows per pass for M activation rows: the rows share each load of x (with several rows of x,
// reading x from cache rather than the weight from memory is what limits a pass), while the M * NR
// accumulators (at most V::ACCUMULATORS) and NR dequantizers stay in registers.
template <class V, int M>
constexpr int rows_per_pass() {
  constexpr int nr = V::ACCUMULATORS / M < 1 ? 1 : V::ACCUMULATORS / M;
  return nr > 8 ? 8 : nr;
}

// Weight rows per block, and floats of x per k block: a pass over a block of rows reads x [M, k block]
// from the L1 cache (with all of x it would come from L2 for every few rows, slower than the weight
// streams from memory when M is large), adding each row's partial sums to a small buffer.
constexpr int ROW_BLOCK = 64;
constexpr int X_BLOCK_FLOATS = 4096;

// The groups one pass of q_pass covers, at most (X_BLOCK_FLOATS / group size 32).
constexpr int MAX_PASS_GROUPS = X_BLOCK_FLOATS / 32;

template <class V>
void widen(const void* src, DType dt, size_t n, float* dst);

// A pass reads NR rows side by side, a few bytes of each in turn, which the hardware prefetcher follows
// poorly: each core then waits on memory for much of the pass (the same kernels run much faster on rows
// already in cache; the README gives the figures). So each pass asks, once per cache line it reads, for the line at the same place
// in the next pass's rows (NR rows on), into L2: by the time the pass gets there the lines have arrived.
// Into L2 rather than L1, whose few lines the current pass needs; past the weight's end it does nothing.
inline void prefetch_next(const void* p, long row_stride) {
  __builtin_prefetch((const char*)p + row_stride, 0, 2);
}

// sums[r * M + m] += x[m, groups g0 .. g1) . w[n + r, same] for a quantized weight. The pass's scales and
// biases are widened to float32 once, up front. For one or two rows of x, where decoding the weight rather
// than multiplying it by x is the work, each group's integers times x are summed and scaled once,
// s * sum(q x) + b * sum(x), with the groups' sums of x given (`xs`, [M, K / group size]); for more rows, the
// weight is dequantized first (4 bits: from a table of the group's 16 values), its products shared by them.
template <class V, int BITS, int M, int NR>
void q_pass(const float* x, const float* xs, int K, const Quantized& q, int n, int g0, int g1, float* sums) {
  using F = typename V::F;
  constexpr int W = V::W;
  constexpr int STEP = BITS == 4 ? 2 * W : W;  // values per vector of packed bytes
  constexpr bool FACTOR = M <= 2;
  const int gs = q.group_size, groups = K / gs, ng = g1 - g0;
  const long row_bytes = (long)K * BITS / 8;
  const size_t sbytes = q.sdt == DType::f32 ? 4 : 2, bbytes = q.bdt == DType::f32 ? 4 : 2;
  float sc[NR][MAX_PASS_GROUPS], bi[NR][MAX_PASS_GROUPS];
  for (int r = 0; r < NR; ++r) {
    const size_t at = (size_t)(n + r) * groups + g0;
    widen<V>((const char*)q.scales + at * sbytes, q.sdt, ng, sc[r]);
    widen<V>((const char*)q.biases + at * bbytes, q.bdt, ng, bi[r]);
  }
  F acc[M][NR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = V::zero();
  for (int g = g0; g < g1; ++g) {
    const int i = g - g0;
    if constexpr (FACTOR) {
      F part[M][NR];
      for (int m = 0; m < M; ++m)
        for (int r = 0; r < NR; ++r) part[m][r] = V::zero();
      for (int k = g * gs; k < (g + 1) * gs; k += STEP) {
        for (int r = 0; r < NR; ++r) {
          const uint8_t* w = q.w + (n + r) * row_bytes + k * BITS / 8;
          if ((k * BITS / 8) % 64 == 0) prefetch_next(w, NR * row_bytes);
          if constexpr (BITS == 4) {
            F lo, hi;
            V::raw4(w, lo, hi);
            for (int m = 0; m < M; ++m) {
              part[m][r] = V::fma(V::load(x + (long)m * K + k), lo, part[m][r]);
              part[m][r] = V::fma(V::load(x + (long)m * K + k + W), hi, part[m][r]);
            }
          } else {
            const F wv = V::u8(w);
            for (int m = 0; m < M; ++m) part[m][r] = V::fma(V::load(x + (long)m * K + k), wv, part[m][r]);
          }
        }
      }
      for (int r = 0; r < NR; ++r) {
        const F s = V::set1(sc[r][i]);
        for (int m = 0; m < M; ++m) acc[m][r] = V::fma(part[m][r], s, acc[m][r]);
      }
    } else if constexpr (BITS == 4) {
      typename V::G4 deq[NR];
      for (int r = 0; r < NR; ++r) deq[r] = V::group4(sc[r][i], bi[r][i]);
      for (int k = g * gs; k < (g + 1) * gs; k += STEP) {
        for (int r = 0; r < NR; ++r) {
          const uint8_t* w = q.w + (n + r) * row_bytes + k / 2;
          if ((k / 2) % 64 == 0) prefetch_next(w, NR * row_bytes);
          F lo, hi;
          V::deq4(w, deq[r], lo, hi);
          for (int m = 0; m < M; ++m) {
            acc[m][r] = V::fma(V::load(x + (long)m * K + k), lo, acc[m][r]);
            acc[m][r] = V::fma(V::load(x + (long)m * K + k + W), hi, acc[m][r]);
          }
        }
      }
    } else {
      for (int k = g * gs; k < (g + 1) * gs; k += STEP) {
        for (int r = 0; r < NR; ++r) {
          const uint8_t* p = q.w + (n + r) * row_bytes + k;
          if (k % 64 == 0) prefetch_next(p, NR * row_bytes);
          const F w = V::fma(V::u8(p), V::set1(sc[r][i]), V::set1(bi[r][i]));
          for (int m = 0; m < M; ++m) acc[m][r] = V::fma(V::load(x + (long)m * K + k), w, acc[m][r]);
        }
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) {
      float total = V::sum(acc[m][r]);
      if constexpr (FACTOR) {  // + sum over groups of b * sum(x)
        const float* xg = xs + (long)m * groups + g0;
        F b = V::zero();
        int i = 0;
        for (; i + W <= ng; i += W) b = V::fma(V::load(bi[r] + i), V::load(xg + i), b);
        total += V::sum(b);
        for (; i < ng; ++i) total += bi[r][i] * xg[i];
      }
      sums[r * M + m] += total;
    }
}

template <int M>
void store_sums(const float* sums, int nb, int ne, void* out, DType odt, long ldo) {
  for (int n = nb; n < ne; ++n)
    for (int m = 0; m < M; ++m) store_scalar(out, odt, m * ldo + n, sums[(n - nb) * M + m]);
}

// Weight rows per pass of q_pass: passes that sum per group keep twice the accumulators (for one row of x,
// twice as many registers as rows_per_pass allows are still few enough).
template <class V, int M>
constexpr int q_rows_per_pass() {
  constexpr int nr = rows_per_pass<V, M>();
  return M == 2 && nr > 1 ? nr / 2 : nr;
}

template <class V, int BITS, int M>
void q_rows_m(const float* x, const float* xs, int K, const Quantized& q, int n0, int n1, void* out, DType odt,
              long ldo) {
  constexpr int NR = q_rows_per_pass<V, M>();
  const int groups = K / q.group_size;
  int block = X_BLOCK_FLOATS / M / q.group_size;
  block = block < 1 ? 1 : block;
  for (int nb = n0; nb < n1; nb += ROW_BLOCK) {
    const int ne = nb + ROW_BLOCK < n1 ? nb + ROW_BLOCK : n1;
    float sums[ROW_BLOCK * M] = {};
    for (int g0 = 0; g0 < groups; g0 += block) {
      const int g1 = g0 + block < groups ? g0 + block : groups;
      int n = nb;
      for (; n + NR <= ne; n += NR) q_pass<V, BITS, M, NR>(x, xs, K, q, n, g0, g1, sums + (n - nb) * M);
      for (; n < ne; ++n) q_pass<V, BITS, M, 1>(x, xs, K, q, n, g0, g1, sums + (n - nb) * M);
    }
    store_sums<M>(sums, nb, ne, out, odt, ldo);
  }
}

template <class V, int BITS>
void q_rows_bits(const float* x, const float* xs, int M, int K, const Quantized& q, int n0, int n1, void* out,
                 DType odt, long ldo) {
  switch (M) {
    case 1: return q_rows_m<V, BITS, 1>(x, xs, K, q, n0, n1, out, odt, ldo);
    case 2: return q_rows_m<V, BITS, 2>(x, xs, K, q, n0, n1, out, odt, ldo);
    case 3: return q_rows_m<V, BITS, 3>(x, xs, K, q, n0, n1, out, odt, ldo);
    case 4: return q_rows_m<V, BITS, 4>(x, xs, K, q, n0, n1, out, odt, ldo);
    case 5: return q_rows_m<V, BITS, 5>(x, xs, K, q, n0, n1, out, odt, ldo);
    case 6: return q_rows_m<V, BITS, 6>(x, xs, K, q, n0, n1, out, odt, ldo);
    case 7: return q_rows_m<V, BITS, 7>(x, xs, K, q, n0, n1, out, odt, ldo);
    default: return q_rows_m<V, BITS, 8>(x, xs, K, q, n0, n1, out, odt, ldo);
  }
}

template <class V>
void q_rows(const float* x, const float* xs, int M, int K, const Quantized& q, int n0, int n1, void* out, DType odt,
            long ldo) {
  if (q.bits == 4)
    q_rows_bits<V, 4>(x, xs, M, K, q, n0, n1, out, odt, ldo);
  else
    q_rows_bits<V, 8>(x, xs, M, K, q, n0, n1, out, odt, ldo);
}

// sums[r * M + m] += x[m, k0 .. k1) . w[n + r, same] for a dense half-precision weight; k0 is a multiple of
// the step (2W values for bfloat16, read in pairs; W for float16), and so is k1 - k0 except in the last block
// (k1 == K), whose tail, in order in x, is summed one value at a time.
template <class V, bool BF16, int M, int NR>
void h_pass(const float* x, int K, const uint16_t* w, int n, int k0, int k1, float* sums) {
  using F = typename V::F;
  constexpr int W = V::W;
  constexpr int STEP = BF16 ? 2 * W : W;
  F acc[M][NR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = V::zero();
  const int kv = k1 - (k1 - k0) % STEP;
  for (int k = k0; k < kv; k += STEP) {
    for (int r = 0; r < NR; ++r) {
      const uint16_t* p = w + (long)(n + r) * K + k;
      if ((k * 2) % 64 == 0) prefetch_next(p, NR * K * 2L);
      if constexpr (BF16) {
        F lo, hi;
        V::bf16_pairs(p, lo, hi);
        for (int m = 0; m < M; ++m) {
          acc[m][r] = V::fma(V::load(x + (long)m * K + k), lo, acc[m][r]);
          acc[m][r] = V::fma(V::load(x + (long)m * K + k + W), hi, acc[m][r]);
        }
      } else {
        const F wv = V::f16(p);
        for (int m = 0; m < M; ++m) acc[m][r] = V::fma(V::load(x + (long)m * K + k), wv, acc[m][r]);
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) {
      float total = V::sum(acc[m][r]);
      const uint16_t* p = w + (long)(n + r) * K;
      for (int k = kv; k < k1; ++k) total += x[(long)m * K + k] * (BF16 ? bf16_to_f32(p[k]) : f16_to_f32(p[k]));
      sums[r * M + m] += total;
    }
}

template <class V, bool BF16, int M>
void h_rows_m(const float* x, int K, const uint16_t* w, int n0, int n1, void* out, DType odt, long ldo) {
  constexpr int NR = rows_per_pass<V, M>();
  const int block = X_BLOCK_FLOATS / M / (2 * V::W) * (2 * V::W);
  for (int nb = n0; nb < n1; nb += ROW_BLOCK) {
    const int ne = nb + ROW_BLOCK < n1 ? nb + ROW_BLOCK : n1;
    float sums[ROW_BLOCK * M] = {};
    for (int k0 = 0; k0 < K; k0 += block) {
      const int k1 = k0 + block < K ? k0 + block : K;
      int n = nb;
      for (; n + NR <= ne; n += NR) h_pass<V, BF16, M, NR>(x, K, w, n, k0, k1, sums + (n - nb) * M);
      for (; n < ne; ++n) h_pass<V, BF16, M, 1>(x, K, w, n, k0, k1, sums + (n - nb) * M);
    }
    store_sums<M>(sums, nb, ne, out, odt, ldo);
  }
}

template <class V, bool BF16>
void h_rows_t(const float* x, int M, int K, const uint16_t* w, int n0, int n1, void* out, DType odt, long ldo) {
  switch (M) {
    case 1: return h_rows_m<V, BF16, 1>(x, K, w, n0, n1, out, odt, ldo);
    case 2: return h_rows_m<V, BF16, 2>(x, K, w, n0, n1, out, odt, ldo);
    case 3: return h_rows_m<V, BF16, 3>(x, K, w, n0, n1, out, odt, ldo);
    case 4: return h_rows_m<V, BF16, 4>(x, K, w, n0, n1, out, odt, ldo);
    case 5: return h_rows_m<V, BF16, 5>(x, K, w, n0, n1, out, odt, ldo);
    case 6: return h_rows_m<V, BF16, 6>(x, K, w, n0, n1, out, odt, ldo);
    case 7: return h_rows_m<V, BF16, 7>(x, K, w, n0, n1, out, odt, ldo);
    default: return h_rows_m<V, BF16, 8>(x, K, w, n0, n1, out, odt, ldo);
  }
}

template <class V>
void h_rows(const float* x, int M, int K, const uint16_t* w, DType wdt, int n0, int n1, void* out, DType odt,
            long ldo) {
  if (wdt == DType::bf16)
    h_rows_t<V, true>(x, M, K, w, n0, n1, out, odt, ldo);
  else
    h_rows_t<V, false>(x, M, K, w, n0, n1, out, odt, ldo);
}

template <class V>
void dequantize(const Quantized& q, int K, int n0, int n1, float* dst) {
  using F = typename V::F;
  constexpr int W = V::W;
  const int gs = q.group_size, groups = K / gs;
  const long row_bytes = (long)K * q.bits / 8;
  for (int n = n0; n < n1; ++n) {
    const uint8_t* row = q.w + n * row_bytes;
    float* d = dst + (long)(n - n0) * K;
    for (int g = 0; g < groups; ++g) {
      const float s = load_scalar(q.scales, q.sdt, (size_t)n * groups + g);
      const float b = load_scalar(q.biases, q.bdt, (size_t)n * groups + g);
      if (q.bits == 4) {
        const typename V::G4 deq = V::group4(s, b);
        for (int k = g * gs; k < (g + 1) * gs; k += 2 * W) {
          F lo, hi;
          V::deq4(row + k / 2, deq, lo, hi);
          V::interleave(d + k, lo, hi);
        }
      } else {
        const F vs = V::set1(s), vb = V::set1(b);
        for (int k = g * gs; k < (g + 1) * gs; k += W) V::store(d + k, V::fma(V::u8(row + k), vs, vb));
      }
    }
  }
}

template <class V>
void widen(const void* src, DType dt, size_t n, float* dst) {
  constexpr size_t W = V::W;
  size_t i = 0;
  if (dt == DType::f32) {
    memcpy(dst, src, n * sizeof(float));
    return;
  }
  const uint16_t* s = (const uint16_t*)src;
  if (dt == DType::bf16)
    for (; i + W <= n; i += W) V::store(dst + i, V::bf16(s + i));
  else
    for (; i + W <= n; i += W) V::store(dst + i, V::f16(s + i));
  for (; i < n; ++i) dst[i] = load_scalar(src, dt, i);
}

template <class V>
void narrow(const float* src, size_t n, void* dst, DType dt) {
  constexpr size_t W = V::W;
  size_t i = 0;
  if (dt == DType::f32) {
    memcpy(dst, src, n * sizeof(float));
    return;
  }
  uint16_t* d = (uint16_t*)dst;
  if (dt == DType::bf16)
    for (; i + W <= n; i += W) V::narrow_bf16(src + i, d + i);
  else
    for (; i + W <= n; i += W) V::narrow_f16(src + i, d + i);
  for (; i < n; ++i) store_scalar(dst, dt, i, src[i]);
}

template <class V>
Kernels make_kernels(const char* name) {
  return Kernels{name, V::W, q_rows<V>, h_rows<V>, dequantize<V>, widen<V>, narrow<V>};
}

}  // namespace
}  // namespace rg_native
