// The kernels compiled for AVX2 + FMA + F16C; run only where the CPU has them.
#include <cstdint>
#include <cstring>

#include "lsce_api.h"
#include "lsce_soft_api.h"
#include "lsce_distill_api.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace lsce {
namespace avx2 {
#include "lsce_kernels.h"
#include "lsce_soft.h"
#include "lsce_distill.h"
}  // namespace avx2
}  // namespace lsce
#pragma GCC pop_options
#endif
