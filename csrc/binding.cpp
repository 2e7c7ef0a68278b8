// pybind11 binding of the C++ core: Python passes data pointers, sizes,
// strides and a dtype code as keywords (lsce/ops.py); no torch headers, no
// libtorch. The kernels run with the GIL released.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "grad_cache.h"
#include "lsce_api.h"

namespace py = pybind11;

void bind_soft(py::module_& m);     // soft_binding.cpp: the probability-target kernels
void bind_distill(py::module_& m);  // distill_binding.cpp: the distillation kernels

namespace {

// ---------------------------------------------------------------------------
// The keywords of _C.forward and _C.backward: both take the same set, one per
// field of lsce::Args, with the field's name. Pointers are Python ints (0: null).

// Stores the Python value v into field M of Args; returns whether it is a null pointer.
template <typename M> struct FieldType;
template <typename T> struct FieldType<T lsce::Args::*> { using type = T; };
template <auto M>
bool set(lsce::Args& a, py::handle v) {
  using T = typename FieldType<decltype(M)>::type;
  if constexpr (std::is_pointer_v<T>) {
    a.*M = reinterpret_cast<T>(v.cast<uintptr_t>());
    return a.*M == nullptr;
  } else {
    a.*M = v.cast<T>();
    return false;
  }
}

// Who must pass a keyword: the backward, the forward, the fused forward (the
// forward with grad). A required pointer must not be 0 unless kMayBeNull, or
// the call has no rows (an empty tensor's data pointer may be 0).
enum : unsigned { kForward = 1, kBackward = 2, kFused = 4, kBoth = kForward | kBackward, kMayBeNull = 8 };

struct Field {
  const char* name;
  unsigned required_by;
  bool (*set)(lsce::Args&, py::handle);
};
#define LSCE_FIELD(name, required_by) Field{#name, required_by, &set<&lsce::Args::name>}
const Field kFields[] = {
    // the logits and targets
    LSCE_FIELD(dtype, kBoth), LSCE_FIELD(logits, kBoth), LSCE_FIELD(N, kBoth), LSCE_FIELD(K, kBoth),
    LSCE_FIELD(row_stride, kBoth), LSCE_FIELD(target, kBoth), LSCE_FIELD(ignore_index, kBoth),
    // the class coefficients and options
    LSCE_FIELD(weight, kBoth | kMayBeNull), LSCE_FIELD(c, kBoth | kMayBeNull), LSCE_FIELD(C, kBoth),
    LSCE_FIELD(uniform_over, kBoth),
    LSCE_FIELD(eps, kBoth), LSCE_FIELD(z_loss, kBoth), LSCE_FIELD(softcap, kBoth), LSCE_FIELD(nthreads, kBoth),
    // per-row values, upstream gradients and the gradient
    LSCE_FIELD(loss, kForward), LSCE_FIELD(m, kBoth), LSCE_FIELD(log_s, kBoth),
    LSCE_FIELD(grad_loss, kBackward | kFused), LSCE_FIELD(grad_loss_stride, kBackward | kFused),
    LSCE_FIELD(grad_lse, kBackward | kMayBeNull), LSCE_FIELD(grad_lse_stride, kBackward), LSCE_FIELD(grad, kBackward),
};
#undef LSCE_FIELD
constexpr size_t kNumFields = sizeof(kFields) / sizeof(kFields[0]);

// The Args of one call of lsce._C.<fn>: every keyword known, every required
// one given, the values valid for the kernels.
lsce::Args parse(const char* fn, bool backward, const py::kwargs& kw) {
  const std::string where = std::string("lsce._C.") + fn + "()";
  lsce::Args a{};
  bool given[kNumFields] = {}, null[kNumFields] = {};
  for (const auto& item : kw) {
    const std::string key = py::str(item.first);
    size_t f = 0;
    while (f < kNumFields && key != kFields[f].name) ++f;
    if (f == kNumFields) throw py::type_error(where + " got an unexpected keyword argument '" + key + "'");
    try {
      null[f] = kFields[f].set(a, item.second);
    } catch (const py::cast_error&) {
      throw py::type_error(where + ": keyword '" + key + "' has a value of the wrong type or range");
    }
    given[f] = true;
  }
  const unsigned role = backward ? kBackward : a.grad ? kForward | kFused : kForward;
  for (size_t f = 0; f < kNumFields; ++f) {
    const Field& field = kFields[f];
    if (!(field.required_by & role)) continue;
    if (!given[f]) throw py::type_error(where + " missing required keyword argument '" + field.name + "'");
    if (null[f] && a.N > 0 && !(field.required_by & kMayBeNull))
      throw py::value_error(where + ": keyword '" + field.name + "' is a null pointer");
  }
  if (a.dtype < lsce::kF32 || a.dtype > lsce::kF16) throw py::value_error(where + ": unknown dtype code");
  // Rows may overlap (row_stride < K, 0 for an expanded row): the logits are only read.
  if (a.N < 0 || a.K < 1 || a.row_stride < 0) throw py::value_error(where + ": bad sizes or row stride");
  if (a.uniform_over < 1) throw py::value_error(where + ": uniform_over must be >= 1");
  if (!backward && a.grad_lse) throw py::value_error(where + ": the fused forward takes no grad_lse");
  if (a.nthreads <= 0) a.nthreads = 1;
  return a;
}

std::string keyword_list() {
  std::string s;
  for (const Field& f : kFields) s += std::string(s.empty() ? "" : ", ") + f.name;
  return s;
}

std::string forward(const py::kwargs& kw) {
  const lsce::Args a = parse("forward", false, kw);
  py::gil_scoped_release release;
  return lsce::forward(a);
}

std::string backward(const py::kwargs& kw) {
  const lsce::Args a = parse("backward", true, kw);
  py::gil_scoped_release release;
  return lsce::backward(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lsce C++/OpenMP kernels (raw pointers; called from lsce.ops)";
  static const std::string keywords =
      " Keywords (the fields of lsce::Args, csrc/lsce_api.h; pointers as ints, 0 for null): " + keyword_list() + ".";
  static const std::string forward_doc =
      "per-row loss, m (row max) and log_s (log sum exp(z - m)), and with grad (N x K, contiguous) also the gradient for the upstream grad_loss in "
      "the same pass; returns the instruction set used." + keywords;
  static const std::string backward_doc = "gradient of the logits; returns the instruction set used." + keywords;
  m.def("forward", &forward, forward_doc.c_str());
  bind_soft(m);
  bind_distill(m);
  m.def("backward", &backward, backward_doc.c_str());
  py::class_<lsce::Buffer>(m, "Buffer", py::buffer_protocol(),
                           "writable bytes from lsce's gradient cache; back to the cache when the last user is gone")
      .def(py::init<size_t>(), py::arg("bytes"))
      .def_buffer([](lsce::Buffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1, {py::ssize_t(b.size())}, {1});
      });
  m.def("set_cache_limit", &lsce::set_cache_limit,
        "bytes of freed gradients to keep (0: none); returns the previous limit", py::arg("bytes"));
  m.def("cached_bytes", &lsce::cached_bytes, "bytes held by freed, cached gradients");
  m.def("empty_cache", &lsce::empty_cache, "frees every cached gradient");
  m.def("set_isa", [](const std::string& s) { return lsce::set_isa(s.c_str()); },
        "force 'avx512', 'avx2', 'generic' or 'auto'; False if unavailable", py::arg("name"));
  m.def("active_isa", [] { return std::string(lsce::active_isa()); });
}
