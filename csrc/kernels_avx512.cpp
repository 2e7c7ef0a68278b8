// The kernels compiled for AVX-512 (F, BW, VL, DQ) + F16C; run only where the CPU has them.
#include <cstdint>
#include <cstring>

#include "lsce_api.h"
#include "lsce_soft_api.h"
#include "lsce_distill_api.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LSCE_AVX512 1  // lsce_kernels.h adds the hand-vectorised loops of lsce_avx512.h
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
namespace lsce {
namespace avx512 {
#include "lsce_kernels.h"
#include "lsce_soft.h"
#include "lsce_distill.h"
}  // namespace avx512
}  // namespace lsce
#pragma GCC pop_options
#endif
