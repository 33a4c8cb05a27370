// The kernels with AVX-512 F/BW/VL/DQ (compiled with -mavx512f -mavx512bw -mavx512vl -mavx512dq -mfma
// -mf16c; called only where CPUID has them).
#include "vec_avx512.h"

namespace rg_native {

const Kernels* kernels_avx512() {
  static const Kernels k = make_kernels<Avx512>("avx512");
  return &k;
}

}  // namespace rg_native
