// The kernels for any CPU of the target architecture (x86-64: SSE2).
#include <cstdint>
#include <cstring>

#include "lsce_api.h"
#include "lsce_soft_api.h"
#include "lsce_distill_api.h"

namespace lsce {
namespace generic {
#include "lsce_kernels.h"
#include "lsce_soft.h"
#include "lsce_distill.h"
}  // namespace generic
}  // namespace lsce
