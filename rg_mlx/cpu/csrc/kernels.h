// The interface between the MLX primitives (native.cpp) and the kernels compiled once per instruction
// set (kernels_portable.cpp, kernels_avx2.cpp, kernels_avx512.cpp, gemm_bf16.cpp).
//
// Only plain C types cross it: the per-ISA files are compiled with -mavx2 / -mavx512* and must not
// include MLX or standard C++ headers, whose inline functions the linker could otherwise take from the
// wider-ISA copy for the whole library (and run on a CPU without those instructions).
#pragma once

#include <stddef.h>
#include <stdint.h>

namespace rg_native {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };

// A weight [N, K] in MLX's affine format (`mx.quantize`): row n holds K values of `bits` bits packed
// little-endian, value k in bits [bits * (k % (8 / bits)), ...) of byte k * bits / 8 of the row, and
// w[n, k] = scales[n, g] * q + biases[n, g] with g = k / group_size.
struct Quantized {
  const uint8_t* w;  // [N, K * bits / 8]
  const void* scales;  // [N, K / group_size]
  const void* biases;  // [N, K / group_size]
  DType sdt, bdt;
  int bits, group_size;
};

struct Kernels {
  const char* name;
  // Lanes of a vector: x for a 4-bit or bfloat16 weight is laid out in pairs (kernels_impl.h): each row in
  // chunks of 2 * width, even k then odd k, the row's last K % (2 * width) values in order.
  int width;
  // out[m, n] for n in [n0, n1) and m < M (at most 8): x [M, K] float32 (laid out as above) times a
  // quantized weight; out has row stride ldo and dtype odt. For M <= 2, xs [M, K / group_size] holds the
  // sums of x over each group (in order).
  void (*q_rows)(const float* x, const float* xs, int M, int K, const Quantized& w, int n0, int n1, void* out,
                 DType odt, long ldo);
  // The same for a dense bfloat16 / float16 weight [N, K].
  void (*h_rows)(const float* x, int M, int K, const uint16_t* w, DType wdt, int n0, int n1, void* out, DType odt,
                 long ldo);
  // Rows [n0, n1) of a quantized weight as float32: dst [n1 - n0, K].
  void (*dequantize)(const Quantized& w, int K, int n0, int n1, float* dst);
  // n values of src (dtype dt) to float32, and back (rounding to nearest even).
  void (*widen)(const void* src, DType dt, size_t n, float* dst);
  void (*narrow)(const float* src, size_t n, void* dst, DType dt);
};

const Kernels* kernels_portable();
#if defined(__x86_64__) || defined(_M_X64)
const Kernels* kernels_avx2();
const Kernels* kernels_avx512();

// bfloat16 x bfloat16 products with AVX512_BF16 (gemm_bf16.cpp): out = x @ w.T for x [M, K] and w [N, K].
// x is first packed into panels of BF16_PANEL rows, pairs of k interleaved across the rows
// (`bf16_pack_x`, one call per panel); then `bf16_gemm_block` computes out[m, n] for m in [m0, m1) (m0 a
// multiple of BF16_PANEL) and n in [n0, n1), with `scratch` (`bf16_scratch_floats`) for float32 sums.
constexpr int BF16_PANEL = 64;
// Decode (M <= 8) with bfloat16 x and w: out[m, n] for n in [n0, n1), as Kernels::h_rows.
void bf16_rows(const uint16_t* x, int M, int K, const uint16_t* w, int n0, int n1, void* out, DType odt, long ldo);
size_t bf16_packed_x_size(int M, int K);  // in uint32 (pairs of bfloat16)
void bf16_pack_x(const uint16_t* x, int M, int K, int panel, uint32_t* xp);
size_t bf16_scratch_floats(int m_rows, int n_cols);
void bf16_gemm_block(const uint16_t* x, const uint32_t* xp, int M, int K, const uint16_t* w, int m0, int m1, int n0,
                     int n1, void* out, DType odt, long ldo, float* scratch);
#endif

}  // namespace rg_native
