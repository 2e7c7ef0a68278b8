// Chooses the widest instruction set the CPU has, once, at first use.
#include <cstring>

#include "lsce_api.h"

namespace lsce {
namespace {

enum Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };
const char* const kNames[] = {"generic", "avx2", "avx512"};

bool cpu_has(Isa isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == kAvx512)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
           __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
  if (isa == kAvx2)
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
#endif
  return isa == kGeneric;
}

Isa best() {
  if (cpu_has(kAvx512)) return kAvx512;
  if (cpu_has(kAvx2)) return kAvx2;
  return kGeneric;
}

Isa& current() {
  static Isa isa = best();
  return isa;
}

}  // namespace

bool set_isa(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    current() = best();
    return true;
  }
  for (int i = 0; i < 3; ++i)
    if (std::strcmp(name, kNames[i]) == 0 && cpu_has(Isa(i))) {
      current() = Isa(i);
      return true;
    }
  return false;
}

const char* active_isa() { return kNames[current()]; }

const char* forward(const Args& a) {
  switch (current()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case kAvx512: avx512::forward(a); break;
    case kAvx2: avx2::forward(a); break;
#endif
    default: generic::forward(a);
  }
  return active_isa();
}

const char* backward(const Args& a) {
  switch (current()) {
#if defined(__x86_64__) && defined(__GNUC__)
    case kAvx512: avx512::backward(a); break;
    case kAvx2: avx2::backward(a); break;
#endif
    default: generic::backward(a);
  }
  return active_isa();
}

}  // namespace lsce
