#include "products.h"

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <typeinfo>

#include "kernels.h"
#include "mlx/allocator.h"
#include "mlx/backend/cpu/encoder.h"
#include "mlx/ops.h"
#include "mlx/primitives.h"
#include "mlx/utils.h"
#include "pool.h"

namespace mx = mlx::core;

// The sgemm MLX's CPU backend itself calls, resolved by name at load: rg_mlx's router (OpenBLAS) when
// rg_mlx's fast path loaded it, else the BLAS libmlx links.
extern "C" void cblas_sgemm(int order, int transa, int transb, int m, int n, int k, float alpha, const float* a,
                            int lda, const float* b, int ldb, float beta, float* c, int ldc);

namespace rg_native {
namespace {

// Products of up to this many rows read the weight once, decoding it on the fly; more rows go to the
// blocked bfloat16 product or to sgemm.
constexpr int DECODE_ROWS = 8;
// Weights smaller than this run on the calling thread alone (waking the pool costs more).
constexpr size_t MIN_SPLIT_BYTES = 256 << 10;
// The float32 tile a quantized or half-precision weight is widened into for sgemm, at most: the bench
// model's weights in one tile (OpenBLAS's sgemm on a third of a 7680-row weight at a time ran 15% slower).
constexpr size_t TILE_BYTES = 128 << 20;
// The bfloat16 product's block of x rows and of weight rows per task.
constexpr int BF16_M_BLOCK = 256, BF16_N_BLOCK = 96;

enum Isa { PORTABLE = 0, AVX2 = 1, AVX512 = 2, AVX512BF16 = 3 };
const char* const ISA_NAMES[] = {"portable", "avx2", "avx512", "avx512bf16"};

Isa best_isa() {
#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
  __builtin_cpu_init();
  const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return AVX512BF16;
  if (avx512) return AVX512;
  if (avx2) return AVX2;
#endif
  return PORTABLE;
}

std::atomic<int> active_isa{-1};

Isa current_isa() {
  int isa = active_isa.load(std::memory_order_relaxed);
  if (isa < 0) {
    isa = best_isa();
    active_isa.store(isa, std::memory_order_relaxed);
  }
  return (Isa)isa;
}

const Kernels* kernels() {
  switch (current_isa()) {
#if defined(__x86_64__) || defined(_M_X64)
    case AVX512BF16:
    case AVX512: return kernels_avx512();
    case AVX2: return kernels_avx2();
#endif
    default: return kernels_portable();
  }
}

DType to_dtype(mx::Dtype dt) {
  if (dt == mx::float32) return DType::f32;
  if (dt == mx::bfloat16) return DType::bf16;
  if (dt == mx::float16) return DType::f16;
  throw std::invalid_argument("[rg_mlx native] only float32, bfloat16 and float16 arrays are supported");
}

// One product, as the command encoder runs it: pointers into evaluated, row-contiguous arrays.
struct Product {
  const void* x;
  DType xdt;
  const void* w;  // dense: bfloat16 / float16 [N, K]
  DType wdt;
  Quantized q;  // q.bits == 0: dense
  void* out;
  DType odt;
  int M, N, K;  // x [M, K] (transposed: [M, N]), weight [N, K]
  bool transposed;  // out = x @ weight [M, K] (the gradient's product) instead of x @ weight.T [M, N]
};

// Contiguous parts of [0, n), about `parts` of them, each a multiple of `align` long (the kernels' rows
// per pass); f(begin, end) for each, over the pool.
template <class F>
void split(int n, int parts, int align, F&& f) {
  int step = (n + parts - 1) / parts;
  step = (step + align - 1) / align * align;
  const int count = (n + step - 1) / step;
  parallel_for(count, [&](int i) { f(i * step, std::min(n, (i + 1) * step)); });
}

// Several parts per thread, claimed as threads come free: a core taken by another process for a while
// delays one small part, not half the product.
int parts_for(size_t bytes) { return bytes < MIN_SPLIT_BYTES ? 1 : 8 * pool_threads(); }

void decode(const Product& p, const Kernels* k) {
#if defined(__x86_64__) || defined(_M_X64)
  if (!p.q.bits && p.wdt == DType::bf16 && p.xdt == DType::bf16 && current_isa() == AVX512BF16) {
    split(p.N, parts_for((size_t)p.N * p.K * 2), 8, [&](int n0, int n1) {
      bf16_rows((const uint16_t*)p.x, p.M, p.K, (const uint16_t*)p.w, n0, n1, p.out, p.odt, p.N);
    });
    return;
  }
#endif
  static thread_local std::vector<float> xbuf, tmp, xsums;
  const size_t n = (size_t)p.M * p.K;
  xbuf.resize(n);
  if (p.q.bits == 4 || (!p.q.bits && p.wdt == DType::bf16)) {
    // The kernels read these weights in pairs (values 2i and 2i + 1 of a chunk of 2 * width): x is laid out
    // to match, each row in chunks of 2 * width, even k then odd k, its last K % (2 * width) values in order.
    tmp.resize(n);
    k->widen(p.x, p.xdt, n, tmp.data());
    const int c = 2 * k->width, w = k->width;
    for (int m = 0; m < p.M; ++m) {
      const float* src = tmp.data() + (size_t)m * p.K;
      float* dst = xbuf.data() + (size_t)m * p.K;
      int base = 0;
      for (; base + c <= p.K; base += c)
        for (int i = 0; i < w; ++i) dst[base + i] = src[base + 2 * i], dst[base + w + i] = src[base + 2 * i + 1];
      for (; base < p.K; ++base) dst[base] = src[base];
    }
  } else {
    k->widen(p.x, p.xdt, n, xbuf.data());
  }
  const float* x = xbuf.data();
  if (p.q.bits) {
    const float* xs = nullptr;
    if (p.M <= 2) {  // the sums of x over each group, for the kernels that scale per group (the same in pairs)
      const int groups = p.K / p.q.group_size;
      xsums.resize((size_t)p.M * groups);
      for (int m = 0; m < p.M; ++m)
        for (int g = 0; g < groups; ++g) {
          float total = 0.0f;
          for (int i = 0; i < p.q.group_size; ++i) total += x[(size_t)m * p.K + (size_t)g * p.q.group_size + i];
          xsums[(size_t)m * groups + g] = total;
        }
      xs = xsums.data();
    }
    const size_t bytes = (size_t)p.N * p.K * p.q.bits / 8;
    split(p.N, parts_for(bytes), 8,
          [&](int n0, int n1) { k->q_rows(x, xs, p.M, p.K, p.q, n0, n1, p.out, p.odt, p.N); });
  } else {
    const size_t bytes = (size_t)p.N * p.K * 2;
    split(p.N, parts_for(bytes), 8,
          [&](int n0, int n1) { k->h_rows(x, p.M, p.K, (const uint16_t*)p.w, p.wdt, n0, n1, p.out, p.odt, p.N); });
  }
}

#if defined(__x86_64__) || defined(_M_X64)
void prompt_bf16(const Product& p) {
  // (A thread_local named inside a lambda is the running thread's own: the tasks get plain pointers.)
  static thread_local std::vector<uint32_t> xp_buf;
  xp_buf.resize(bf16_packed_x_size(p.M, p.K));
  uint32_t* xp = xp_buf.data();
  const uint16_t* x = (const uint16_t*)p.x;
  const int panels = (p.M + BF16_PANEL - 1) / BF16_PANEL;
  parallel_for(panels, [&](int i) { bf16_pack_x(x, p.M, p.K, i, xp); });
  const int mblocks = (p.M + BF16_M_BLOCK - 1) / BF16_M_BLOCK, nblocks = (p.N + BF16_N_BLOCK - 1) / BF16_N_BLOCK;
  parallel_for(mblocks * nblocks, [&](int t) {
    static thread_local std::vector<float> scratch;
    scratch.resize(bf16_scratch_floats(BF16_M_BLOCK, BF16_N_BLOCK));
    const int m0 = t / nblocks * BF16_M_BLOCK, n0 = t % nblocks * BF16_N_BLOCK;
    bf16_gemm_block(x, xp, p.M, p.K, (const uint16_t*)p.w, m0, std::min(p.M, m0 + BF16_M_BLOCK), n0,
                    std::min(p.N, n0 + BF16_N_BLOCK), p.out, p.odt, p.N, scratch.data());
  });
}
#endif

// A float32 buffer of at least n values, kept by the thread for its next product: allocating the
// weight's tile afresh each time costs page faults (glibc serves such sizes from new mappings in the
// arenas of threads other than the main one), 20% of a 512-row product.
float* floats(std::vector<float>& buffer, size_t n) {
  if (buffer.size() < n) buffer.resize(n);
  return buffer.data();
}

// Many rows on float32 sgemm: x widened once, the weight widened (or dequantized) tile by tile of its
// rows, each tile's product written (or, transposed, accumulated) into float32.
void prompt_f32(const Product& p, const Kernels* k) {
  static thread_local std::vector<float> xbuf, wbuf, cbuf;  // the tasks get plain pointers (see prompt_bf16)
  const int x_cols = p.transposed ? p.N : p.K, out_cols = p.transposed ? p.K : p.N;
  const size_t xn = (size_t)p.M * x_cols, cn = (size_t)p.M * out_cols;
  const float* x = (const float*)p.x;
  if (p.xdt != DType::f32) {
    float* xw = floats(xbuf, xn);
    split((int)((xn + 4095) / 4096), pool_threads(), 1, [&](int a, int b) {
      const size_t lo = (size_t)a * 4096, hi = std::min(xn, (size_t)b * 4096);
      k->widen((const uint16_t*)p.x + lo, p.xdt, hi - lo, xw + lo);
    });
    x = xw;
  }
  float* c = (float*)p.out;
  if (p.odt != DType::f32) {
    c = floats(cbuf, cn);
  }
  const int tile = (int)std::max<size_t>(16, std::min<size_t>(p.N, TILE_BYTES / (4 * (size_t)p.K)));
  float* wt = floats(wbuf, (size_t)tile * p.K);
  for (int t0 = 0; t0 < p.N; t0 += tile) {
    const int t1 = std::min(p.N, t0 + tile);
    split(t1 - t0, pool_threads(), 1, [&](int a, int b) {
      float* dst = wt + (size_t)a * p.K;
      if (p.q.bits)
        k->dequantize(p.q, p.K, t0 + a, t0 + b, dst);
      else
        k->widen((const uint16_t*)p.w + (size_t)(t0 + a) * p.K, p.wdt, (size_t)(b - a) * p.K, dst);
    });
    if (p.transposed)  // c [M, K] += x[:, t0:t1] @ tile
      cblas_sgemm(101, 111, 111, p.M, p.K, t1 - t0, 1.0f, x + t0, p.N, wt, p.K, t0 ? 1.0f : 0.0f, c, p.K);
    else  // c[:, t0:t1] = x @ tile.T
      cblas_sgemm(101, 111, 112, p.M, t1 - t0, p.K, 1.0f, x, p.K, wt, p.K, 0.0f, c + t0, p.N);
  }
  if (c != p.out)
    split((int)((cn + 4095) / 4096), pool_threads(), 1, [&](int a, int b) {
      const size_t lo = (size_t)a * 4096, hi = std::min(cn, (size_t)b * 4096);
      k->narrow(c + lo, hi - lo, (uint16_t*)p.out + lo, p.odt);
    });
}

void run(const Product& p) {
  const int inner = p.transposed ? p.N : p.K, outer = p.transposed ? p.K : p.N;
  if (p.M == 0 || outer == 0) return;
  const Kernels* k = kernels();
  if (inner == 0) {
    const size_t n = (size_t)p.M * outer;
    std::vector<float> zeros(n, 0.0f);
    k->narrow(zeros.data(), n, p.out, p.odt);
  } else if (p.transposed) {
    prompt_f32(p, k);
  } else if (p.M <= DECODE_ROWS) {
    decode(p, k);
#if defined(__x86_64__) || defined(_M_X64)
  } else if (!p.q.bits && p.wdt == DType::bf16 && p.xdt == DType::bf16 && current_isa() == AVX512BF16) {
    prompt_bf16(p);
#endif
  } else {
    prompt_f32(p, k);
  }
}

// The weight's columns: K of [N, K], unpacked for a quantized weight.
int weight_columns(const mx::array& w, int bits) { return bits ? (int)((long)w.shape(1) * 32 / bits) : w.shape(1); }

mx::array product(const mx::array& x, const std::vector<mx::array>& weights, mx::Dtype dtype, int bits,
                  int group_size, bool transposed);

class NativeProduct : public mx::Primitive {
 public:
  // bits 0: a dense half-precision weight; 4 or 8: MLX's affine format. transposed: x @ w, else x @ w.T.
  NativeProduct(mx::Stream stream, int bits, int group_size, bool transposed)
      : mx::Primitive(stream), bits_(bits), group_size_(group_size), transposed_(transposed) {}

  void eval_cpu(const std::vector<mx::array>& inputs, std::vector<mx::array>& outputs) override {
    mx::array& out = outputs[0];
    out.set_data(mx::allocator::malloc(out.nbytes()));
    const mx::array& x = inputs[0];
    const mx::array& w = inputs[1];
    for (const auto& a : inputs)
      if (!a.flags().row_contiguous) throw std::runtime_error("[rg_mlx native] inputs must be row-contiguous");
    Product p{};
    p.x = x.data<void>();
    p.xdt = to_dtype(x.dtype());
    p.out = out.data<void>();
    p.odt = to_dtype(out.dtype());
    p.transposed = transposed_;
    p.N = w.shape(0);
    p.K = weight_columns(w, bits_);
    const int x_cols = x.shape(-1), out_cols = out.shape(-1);
    p.M = x_cols > 0 ? (int)(x.size() / x_cols) : (out_cols > 0 ? (int)(out.size() / out_cols) : 0);
    if (bits_) {
      p.q = Quantized{(const uint8_t*)w.data<void>(), inputs[2].data<void>(), inputs[3].data<void>(),
                      to_dtype(inputs[2].dtype()), to_dtype(inputs[3].dtype()), bits_, group_size_};
    } else {
      p.w = w.data<void>();
      p.wdt = to_dtype(w.dtype());
    }
    auto& encoder = mx::cpu::get_command_encoder(stream());
    for (const auto& a : inputs) encoder.set_input_array(a);
    encoder.set_output_array(out);
    encoder.dispatch([p]() { run(p); });
  }

  void eval_gpu(const std::vector<mx::array>&, std::vector<mx::array>&) override {
    throw std::runtime_error("[rg_mlx native] these products run on the CPU only");
  }

  std::vector<mx::array> vjp(const std::vector<mx::array>& primals, const std::vector<mx::array>& cotangents,
                             const std::vector<int>& argnums, const std::vector<mx::array>&) override {
    const mx::array &x = primals[0], &w = primals[1];
    const mx::array& g = cotangents[0];
    const std::vector<mx::array> weights(primals.begin() + 1, primals.end());
    std::vector<mx::array> grads;
    for (int arg : argnums) {
      if (arg == 0) {  // the product with the weight the other way round, on these kernels
        grads.push_back(mx::astype(product(g, weights, g.dtype(), bits_, group_size_, !transposed_), x.dtype(),
                                   stream()));
      } else if (arg == 1 && !bits_ && !transposed_) {  // a dense weight: g^T x over all rows, in float32
        const int K = x.shape(-1), N = w.shape(0);
        mx::array g2 = mx::reshape(mx::astype(g, mx::float32, stream()), {-1, N}, stream());
        mx::array x2 = mx::reshape(mx::astype(x, mx::float32, stream()), {-1, K}, stream());
        grads.push_back(mx::astype(mx::matmul(mx::transpose(g2, stream()), x2, stream()), w.dtype(), stream()));
      } else {
        throw std::invalid_argument(
            "[rg_mlx native] no gradient for a quantized weight, its scales or biases: they are frozen "
            "(train LoRA adapters instead)");
      }
    }
    return grads;
  }

  std::vector<mx::array> jvp(const std::vector<mx::array>& primals, const std::vector<mx::array>& tangents,
                             const std::vector<int>& argnums) override {
    if (argnums.size() != 1 || argnums[0] != 0)
      throw std::invalid_argument("[rg_mlx native] forward-mode derivatives only with respect to the activations");
    const std::vector<mx::array> weights(primals.begin() + 1, primals.end());
    const mx::array t = mx::astype(tangents[0], primals[0].dtype(), stream());
    return {product(t, weights, t.dtype(), bits_, group_size_, transposed_)};
  }

  const char* name() const override { return bits_ ? "RgNativeQuantizedMatmul" : "RgNativeMatmul"; }

  bool is_equivalent(const mx::Primitive& other) const override {
    if (typeid(other) != typeid(*this)) return false;
    const auto& o = static_cast<const NativeProduct&>(other);
    return bits_ == o.bits_ && group_size_ == o.group_size_ && transposed_ == o.transposed_;
  }

  std::vector<mx::Shape> output_shapes(const std::vector<mx::array>& inputs) override {
    mx::Shape shape = inputs[0].shape();
    shape.back() = transposed_ ? weight_columns(inputs[1], bits_) : inputs[1].shape(0);
    return {shape};
  }

 private:
  int bits_, group_size_;
  bool transposed_;
};

mx::Stream cpu_stream() {
  mx::Stream s = mx::to_stream({});
  return s.device == mx::Device::cpu ? s : mx::default_stream(mx::Device::cpu);
}

bool floating(mx::Dtype dt) { return dt == mx::float32 || dt == mx::bfloat16 || dt == mx::float16; }

mx::array contiguous(const mx::array& a, const mx::Stream& s) {
  return a.is_available() && a.flags().row_contiguous ? a : mx::contiguous(a, false, s);
}

// The product of x and weights ({w} or {w, scales, biases}) in `dtype` (promoted with the weight's, as MLX
// does), the weight's dtype for the promotion given by the caller.
mx::array product(const mx::array& x, const std::vector<mx::array>& weights, mx::Dtype dtype, int bits,
                  int group_size, bool transposed) {
  const mx::Stream s = cpu_stream();
  const mx::array& w = weights[0];
  for (size_t i = bits ? 1 : 0; i < weights.size(); ++i) dtype = mx::promote_types(dtype, weights[i].dtype());
  mx::Shape shape = x.shape();
  shape.back() = transposed ? weight_columns(w, bits) : w.shape(0);
  std::vector<mx::array> args{contiguous(x, s)};
  for (const auto& a : weights) args.push_back(contiguous(a, s));
  return mx::array(std::move(shape), dtype, std::make_shared<NativeProduct>(s, bits, group_size, transposed),
                   std::move(args));
}

void check(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("[rg_mlx native] " + what);
}

}  // namespace

mx::array quantized_matmul(const mx::array& x, const mx::array& w, const mx::array& scales, const mx::array& biases,
                           int group_size, int bits) {
  check(bits == 4 || bits == 8, "bits must be 4 or 8");
  check(group_size == 32 || group_size == 64 || group_size == 128, "group_size must be 32, 64 or 128");
  check(x.ndim() >= 1 && floating(x.dtype()), "x must be a float32, bfloat16 or float16 array");
  check(w.ndim() == 2 && w.dtype() == mx::uint32, "w must be a 2-D uint32 array (MLX's packed format)");
  const int K = x.shape(-1), N = w.shape(0);
  check((long)w.shape(1) * 32 / bits == K, "x's last axis does not match w's packed width");
  check(K % group_size == 0, "x's last axis is not a multiple of group_size");
  const mx::Shape groups{N, K / group_size};
  for (const auto* a : {&scales, &biases})
    check(a->shape() == groups && floating(a->dtype()), "scales and biases must be float arrays [N, K / group_size]");
  return product(x, {w, scales, biases}, x.dtype(), bits, group_size, false);
}

mx::array matmul(const mx::array& x, const mx::array& w) {
  check(x.ndim() >= 1 && floating(x.dtype()), "x must be a float32, bfloat16 or float16 array");
  check(w.ndim() == 2 && (w.dtype() == mx::bfloat16 || w.dtype() == mx::float16),
        "w must be a 2-D bfloat16 or float16 array");
  check(x.shape(-1) == w.shape(1), "x's last axis does not match w's second axis");
  return product(x, {w}, x.dtype(), 0, 0, false);
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int i = best_isa(); i >= 0; --i) names.push_back(ISA_NAMES[i]);
  return names;
}

std::string isa() { return ISA_NAMES[current_isa()]; }

void set_isa(const std::string& name) {
  for (int i = 0; i <= best_isa(); ++i)
    if (name == ISA_NAMES[i]) {
      active_isa.store(i, std::memory_order_relaxed);
      return;
    }
  throw std::invalid_argument("[rg_mlx native] instruction set '" + name + "' is not available on this CPU");
}

}  // namespace rg_native
