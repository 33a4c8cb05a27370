// bfloat16 x bfloat16 matrix products with AVX512_BF16's vdpbf16ps (float32 accumulation); compiled with
// -mavx512bf16 and the AVX-512 flags, called only where CPUID has AVX512_BF16.
//
// out[m, n] = sum_k x[m, k] w[n, k]. vdpbf16ps adds to each float32 lane the products of one pair of
// bfloat16s from each operand: a weight pair w[n, 2k .. 2k+1] is broadcast to all lanes and x is packed
// so that one vector holds the pair (x[m, 2k], x[m, 2k+1]) for 16 rows m. A micro-kernel keeps a block
// of ROWS weight rows x BF16_PANEL activation rows in 24 registers over KC_PAIRS pairs of k; the sums
// are kept in a float32 scratch block [n][m] between the k blocks, then written out transposed.
// An odd K's last column is added in the epilogue. `bf16_rows` is the decode product (up to 8 rows).
#include "vec_avx512.h"

namespace rg_native {
namespace {

constexpr int ROWS = 6;  // weight rows per micro-kernel
constexpr int VECS = BF16_PANEL / 16;  // activation vectors per micro-kernel (ROWS * VECS = 24 accumulators)
constexpr int KC_PAIRS = 128;  // pairs of k per block: a panel's slice of x is 32 KB

alignas(64) const uint16_t zero_row[2 * KC_PAIRS] = {};

// c[i * ldc + j] (+)= sum over kp pairs of rows[i] . xp (ROWS x BF16_PANEL).
void micro_kernel(int kp, const uint16_t* const* rows, const uint32_t* xp, float* c, long ldc, bool first) {
  __m512 acc[ROWS][VECS];
  for (int i = 0; i < ROWS; ++i)
    for (int v = 0; v < VECS; ++v) acc[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + 16 * v);
  for (int k = 0; k < kp; ++k) {
    __m512bh xv[VECS];
    for (int v = 0; v < VECS; ++v) xv[v] = (__m512bh)_mm512_loadu_si512(xp + (long)k * BF16_PANEL + 16 * v);
    for (int i = 0; i < ROWS; ++i) {
      uint32_t pair;
      memcpy(&pair, rows[i] + 2 * k, 4);
      const __m512bh wv = (__m512bh)_mm512_set1_epi32((int)pair);
      for (int v = 0; v < VECS; ++v) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], wv, xv[v]);
    }
  }
  for (int i = 0; i < ROWS; ++i)
    for (int v = 0; v < VECS; ++v) _mm512_storeu_ps(c + i * ldc + 16 * v, acc[i][v]);
}

// One step of decode_pass: acc[m][r] += x[m, k .. k + 32) . w[n + r, same], through masked loads where
// MASKED (the tail of K; zeros add nothing).
template <int M, int NR, bool MASKED>
inline void decode_step(const uint16_t* x, int K, const uint16_t* w, int n, int k, __mmask32 mask,
                        __m512 (&acc)[M][NR]) {
  auto load = [&](const uint16_t* p) {
    return (__m512bh)(MASKED ? _mm512_maskz_loadu_epi16(mask, p) : _mm512_loadu_si512(p));
  };
  __m512bh xv[M];
  for (int m = 0; m < M; ++m) xv[m] = load(x + (long)m * K + k);
  for (int r = 0; r < NR; ++r) {
    const uint16_t* p = w + (long)(n + r) * K + k;
    if (!MASKED) prefetch_next(p, NR * K * 2L);
    const __m512bh wv = load(p);
    for (int m = 0; m < M; ++m) acc[m][r] = _mm512_dpbf16_ps(acc[m][r], xv[m], wv);
  }
}

// Decode: sums[r * M + m] += x[m, k0 .. k1) . w[n + r, same] for bfloat16 x and w, 32 values of k per
// vdpbf16ps. Blocked as kernels_impl.h's q_rows_m. Only the tail of K is loaded with masks: with masked loads
// in the main loop, GCC keeps the accumulators in memory too and stores all of them every step.
template <int M, int NR>
void decode_pass(const uint16_t* x, int K, const uint16_t* w, int n, int k0, int k1, float* sums) {
  __m512 acc[M][NR];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm512_setzero_ps();
  int k = k0;
  for (; k + 32 <= k1; k += 32) decode_step<M, NR, false>(x, K, w, n, k, 0, acc);
  if (k < k1) decode_step<M, NR, true>(x, K, w, n, k, ((__mmask32)1 << (k1 - k)) - 1, acc);
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < NR; ++r) sums[r * M + m] += _mm512_reduce_add_ps(acc[m][r]);
}

template <int M>
void decode_rows_m(const uint16_t* x, int K, const uint16_t* w, int n0, int n1, void* out, DType odt, long ldo) {
  constexpr int NR = 16 / M > 8 ? 8 : 16 / M;
  const int block = 2 * X_BLOCK_FLOATS / M / 32 * 32;  // bfloat16: twice the values in the same bytes
  for (int nb = n0; nb < n1; nb += ROW_BLOCK) {
    const int ne = nb + ROW_BLOCK < n1 ? nb + ROW_BLOCK : n1;
    float sums[ROW_BLOCK * M] = {};
    for (int k0 = 0; k0 < K; k0 += block) {
      const int k1 = k0 + block < K ? k0 + block : K;
      int n = nb;
      for (; n + NR <= ne; n += NR) decode_pass<M, NR>(x, K, w, n, k0, k1, sums + (n - nb) * M);
      for (; n < ne; ++n) decode_pass<M, 1>(x, K, w, n, k0, k1, sums + (n - nb) * M);
    }
    store_sums<M>(sums, nb, ne, out, odt, ldo);
  }
}

// r[i] (16 values of n + i over m .. m + 16) becomes r[j] (16 values of m + j over n .. n + 16).
void transpose16(__m512 r[16]) {
  __m512 t[16], u[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows interleaved within 128-bit lanes
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {  // u[i + c]: column c (+4, +8, +12 in the other lanes) of rows i .. i + 3
    const __m512d a = _mm512_castps_pd(t[i]), b = _mm512_castps_pd(t[i + 1]);
    const __m512d c = _mm512_castps_pd(t[i + 2]), d = _mm512_castps_pd(t[i + 3]);
    u[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
  for (int c = 0; c < 4; ++c) {  // gather the 128-bit lanes of column c, c + 4, c + 8, c + 12 over the row groups
    const __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88), v1 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
    const __m512 v3 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
    r[c] = _mm512_shuffle_f32x4(v0, v2, 0x88);
    r[c + 8] = _mm512_shuffle_f32x4(v0, v2, 0xDD);
    r[c + 4] = _mm512_shuffle_f32x4(v1, v3, 0x88);
    r[c + 12] = _mm512_shuffle_f32x4(v1, v3, 0xDD);
  }
}

void store16(void* out, DType odt, size_t at, __m512 v) {
  switch (odt) {
    case DType::bf16: {
      alignas(64) float tmp[16];
      _mm512_store_ps(tmp, v);
      Avx512::narrow_bf16(tmp, (uint16_t*)out + at);
      break;
    }
    case DType::f16:
      _mm256_storeu_si256((__m256i*)((uint16_t*)out + at), _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
      break;
    default: _mm512_storeu_ps((float*)out + at, v);
  }
}

// out[m, n] = scratch[n - n0][m - m0] (+ the last column's product for an odd K), 16 x 16 tiles transposed
// in registers, the edges one value at a time.
void epilogue(const uint16_t* x, int K, const uint16_t* w, const float* scratch, long ldc, int m0, int m1, int n0,
              int n1, void* out, DType odt, long ldo) {
  const bool odd = K % 2 == 1;
  auto last_x = [&](int m) { return odd ? bf16_to_f32(x[(long)m * K + K - 1]) : 0.0f; };
  auto value = [&](int m, int n) {
    return scratch[(long)(n - n0) * ldc + (m - m0)] + (odd ? last_x(m) * bf16_to_f32(w[(long)n * K + K - 1]) : 0.0f);
  };
  int n = n0;
  for (; n + 16 <= n1; n += 16) {
    alignas(64) float wl[16] = {};
    for (int i = 0; odd && i < 16; ++i) wl[i] = bf16_to_f32(w[(long)(n + i) * K + K - 1]);
    const __m512 wlast = _mm512_load_ps(wl);
    int m = m0;
    for (; m + 16 <= m1; m += 16) {
      __m512 r[16];
      for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_ps(scratch + (long)(n - n0 + i) * ldc + (m - m0));
      transpose16(r);
      for (int j = 0; j < 16; ++j)
        store16(out, odt, (size_t)(m + j) * ldo + n, odd ? _mm512_fmadd_ps(_mm512_set1_ps(last_x(m + j)), wlast, r[j])
                                                         : r[j]);
    }
    for (; m < m1; ++m)
      for (int i = 0; i < 16; ++i) store_scalar(out, odt, (size_t)m * ldo + n + i, value(m, n + i));
  }
  for (int m = m0; m < m1; ++m)
    for (int c = n; c < n1; ++c) store_scalar(out, odt, (size_t)m * ldo + c, value(m, c));
}

}  // namespace

void bf16_rows(const uint16_t* x, int M, int K, const uint16_t* w, int n0, int n1, void* out, DType odt, long ldo) {
  switch (M) {
    case 1: return decode_rows_m<1>(x, K, w, n0, n1, out, odt, ldo);
    case 2: return decode_rows_m<2>(x, K, w, n0, n1, out, odt, ldo);
    case 3: return decode_rows_m<3>(x, K, w, n0, n1, out, odt, ldo);
    case 4: return decode_rows_m<4>(x, K, w, n0, n1, out, odt, ldo);
    case 5: return decode_rows_m<5>(x, K, w, n0, n1, out, odt, ldo);
    case 6: return decode_rows_m<6>(x, K, w, n0, n1, out, odt, ldo);
    case 7: return decode_rows_m<7>(x, K, w, n0, n1, out, odt, ldo);
    default: return decode_rows_m<8>(x, K, w, n0, n1, out, odt, ldo);
  }
}

size_t bf16_packed_x_size(int M, int K) {
  const size_t panels = (M + BF16_PANEL - 1) / BF16_PANEL;
  return panels * BF16_PANEL * (size_t)(K / 2);
}

void bf16_pack_x(const uint16_t* x, int M, int K, int panel, uint32_t* xp) {
  const int kp = K / 2;
  uint32_t* dst = xp + (size_t)panel * BF16_PANEL * kp;
  for (int j = 0; j < BF16_PANEL; ++j) {
    const int m = panel * BF16_PANEL + j;
    if (m >= M) {
      for (int k = 0; k < kp; ++k) dst[(long)k * BF16_PANEL + j] = 0;
      continue;
    }
    const uint16_t* row = x + (long)m * K;
    for (int k = 0; k < kp; ++k) {
      uint32_t pair;
      memcpy(&pair, row + 2 * k, 4);
      dst[(long)k * BF16_PANEL + j] = pair;
    }
  }
}

size_t bf16_scratch_floats(int m_rows, int n_cols) {
  const size_t panels = (m_rows + BF16_PANEL - 1) / BF16_PANEL;
  const size_t rows = (n_cols + ROWS - 1) / ROWS * ROWS;
  return panels * BF16_PANEL * rows;
}

void bf16_gemm_block(const uint16_t* x, const uint32_t* xp, int M, int K, const uint16_t* w, int m0, int m1, int n0,
                     int n1, void* out, DType odt, long ldo, float* scratch) {
  const int kp_total = K / 2;
  const int panels = (m1 - m0 + BF16_PANEL - 1) / BF16_PANEL;
  const long ldc = (long)panels * BF16_PANEL;
  const uint32_t* xblock = xp + (size_t)(m0 / BF16_PANEL) * BF16_PANEL * kp_total;
  for (int kb = 0; kb < kp_total; kb += KC_PAIRS) {
    const int kp = kp_total - kb < KC_PAIRS ? kp_total - kb : KC_PAIRS;
    for (int j = n0; j < n1; j += ROWS) {
      const uint16_t* rows[ROWS];
      for (int i = 0; i < ROWS; ++i) rows[i] = j + i < n1 ? w + (long)(j + i) * K + 2 * kb : zero_row;
      float* c = scratch + (long)(j - n0) * ldc;
      for (int p = 0; p < panels; ++p)
        micro_kernel(kp, rows, xblock + (size_t)p * BF16_PANEL * kp_total + (size_t)kb * BF16_PANEL, c + p * BF16_PANEL,
                     ldc, kb == 0);
    }
  }
  if (kp_total == 0)
    for (long i = 0; i < (long)(n1 - n0) * ldc; ++i) scratch[i] = 0.0f;
  epilogue(x, K, w, scratch, ldc, m0, m1, n0, n1, out, odt, ldo);
}

}  // namespace rg_native
