// Chooses the widest instruction set the CPU has, once, at first use.
#include <cstring>

#include "lsce_api.h"

namespace lsce {
namespace {

#if defined(__x86_64__) && defined(__GNUC__)
bool has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("f16c") && __builtin_cpu_supports("fma");
}
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#endif
bool always() { return true; }

// One row per instruction set this build has, widest first.
struct Isa {
  const char* name;
  bool (*available)();  // whether this CPU runs it
  void (*forward)(const Args&);
  void (*backward)(const Args&);
};
const Isa kIsas[] = {
#if defined(__x86_64__) && defined(__GNUC__)
    {"avx512", has_avx512, avx512::forward, avx512::backward},
    {"avx2", has_avx2, avx2::forward, avx2::backward},
#endif
    {"generic", always, generic::forward, generic::backward},
};

const Isa* best() {
  const Isa* isa = kIsas;
  while (!isa->available()) ++isa;  // stops at generic, the last, at the latest
  return isa;
}

const Isa*& current() {
  static const Isa* isa = best();
  return isa;
}

}  // namespace

bool set_isa(const char* name) {
  if (std::strcmp(name, "auto") == 0) {
    current() = best();
    return true;
  }
  for (const Isa& isa : kIsas)
    if (std::strcmp(name, isa.name) == 0 && isa.available()) {
      current() = &isa;
      return true;
    }
  return false;
}

const char* active_isa() { return current()->name; }

const char* forward(const Args& a) {
  const Isa* isa = current();
  isa->forward(a);
  return isa->name;
}

const char* backward(const Args& a) {
  const Isa* isa = current();
  isa->backward(a);
  return isa->name;
}

}  // namespace lsce

// The probability-target kernels (lsce_soft_api.h), of the instruction set
// chosen above: looked up by its name, so that the table stays the class-index
// kernels' own.
#include "lsce_soft_api.h"

namespace lsce {

namespace {
struct SoftIsa {
  const char* name;
  void (*forward)(const SoftArgs&);
  void (*backward)(const SoftArgs&);
};
const SoftIsa kSoftIsas[] = {
#if defined(__x86_64__) && defined(__GNUC__)
    {"avx512", avx512::soft_forward, avx512::soft_backward},
    {"avx2", avx2::soft_forward, avx2::soft_backward},
#endif
    {"generic", generic::soft_forward, generic::soft_backward},
};
const SoftIsa& soft_current() {
  const char* name = active_isa();
  for (const SoftIsa& isa : kSoftIsas)
    if (std::strcmp(isa.name, name) == 0) return isa;
  return kSoftIsas[sizeof(kSoftIsas) / sizeof(kSoftIsas[0]) - 1];
}
}  // namespace

const char* soft_forward(const SoftArgs& a) {
  const SoftIsa& isa = soft_current();
  isa.forward(a);
  return isa.name;
}

const char* soft_backward(const SoftArgs& a) {
  const SoftIsa& isa = soft_current();
  isa.backward(a);
  return isa.name;
}

}  // namespace lsce

// The distillation kernels (lsce_distill_api.h), of the same instruction set.
#include "lsce_distill_api.h"

namespace lsce {

namespace {
struct DistillIsa {
  const char* name;
  void (*forward)(const DistillArgs&);
  void (*backward)(const DistillArgs&);
};
const DistillIsa kDistillIsas[] = {
#if defined(__x86_64__) && defined(__GNUC__)
    {"avx512", avx512::distill_forward, avx512::distill_backward},
    {"avx2", avx2::distill_forward, avx2::distill_backward},
#endif
    {"generic", generic::distill_forward, generic::distill_backward},
};
const DistillIsa& distill_current() {
  const char* name = active_isa();
  for (const DistillIsa& isa : kDistillIsas)
    if (std::strcmp(isa.name, name) == 0) return isa;
  return kDistillIsas[sizeof(kDistillIsas) / sizeof(kDistillIsas[0]) - 1];
}
}  // namespace

const char* distill_forward(const DistillArgs& a) {
  const DistillIsa& isa = distill_current();
  isa.forward(a);
  return isa.name;
}

const char* distill_backward(const DistillArgs& a) {
  const DistillIsa& isa = distill_current();
  isa.backward(a);
  return isa.name;
}

}  // namespace lsce
