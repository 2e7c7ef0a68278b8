// pybind11 binding of the distillation kernels (lsce_distill_api.h):
// lsce._C.distill_forward and lsce._C.distill_backward, keyword-only, one
// keyword per field of lsce::DistillArgs (pointers as ints, 0 for null).
// Called by binding.cpp's module definition; the kernels run without the GIL.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "lsce_distill_api.h"

namespace py = pybind11;

namespace {

template <typename P> P ptr(uintptr_t v) { return reinterpret_cast<P>(v); }

// Checks what the kernels cannot: codes, sizes, options, and the pointers a call with rows needs.
void check(const char* fn, const lsce::DistillArgs& a, bool backward) {
  const std::string where = std::string("lsce._C.") + fn + "()";
  auto bad_code = [](int d) { return d < lsce::kF32 || d > lsce::kF16; };
  if (bad_code(a.dtype) || bad_code(a.teacher_dtype)) throw py::value_error(where + ": unknown dtype code");
  if (a.N < 0 || a.K < 1 || a.row_stride < 0 || a.teacher_row_stride < 0)
    throw py::value_error(where + ": bad sizes or row strides");
  if (!(a.temperature > 0) || !(a.beta >= 0 && a.beta <= 1) || !(a.eps >= 0 && a.eps <= 1))
    throw py::value_error(where + ": temperature must be > 0, beta and eps in [0, 1]");
  if (a.N == 0) return;
  if (!a.student || !a.teacher || !a.stats)
    throw py::value_error(where + ": student, teacher and stats must not be null pointers");
  if (!backward && (!a.kd || !a.ce)) throw py::value_error(where + ": kd and ce must not be null pointers");
  if ((backward || a.grad) && (!a.grad_kd || !a.grad_ce))
    throw py::value_error(where + ": grad_kd and grad_ce must not be null pointers");
  if (backward && !a.grad) throw py::value_error(where + ": grad must not be a null pointer");
}

}  // namespace

void bind_distill(py::module_& m) {
  auto run = [](bool backward) {
    return [backward](int dtype, int teacher_dtype, uintptr_t student, int64_t N, int64_t K, int64_t row_stride,
                      uintptr_t teacher, int64_t teacher_row_stride, uintptr_t target, uintptr_t weight,
                      double temperature, double beta, double eps, double weight_sum, int64_t ignore_index,
                      int nthreads, uintptr_t kd, uintptr_t ce, uintptr_t stats, uintptr_t grad_kd,
                      int64_t grad_kd_stride, uintptr_t grad_ce, int64_t grad_ce_stride, uintptr_t grad) {
      lsce::DistillArgs a{dtype, teacher_dtype, ptr<const void*>(student), N, K, row_stride,
                          ptr<const void*>(teacher), teacher_row_stride, ptr<const int64_t*>(target),
                          ptr<const void*>(weight), temperature, beta, eps, weight_sum, ignore_index,
                          nthreads > 0 ? nthreads : 1, ptr<void*>(kd), ptr<void*>(ce), ptr<void*>(stats),
                          ptr<const void*>(grad_kd), grad_kd_stride, ptr<const void*>(grad_ce), grad_ce_stride,
                          ptr<void*>(grad)};
      check(backward ? "distill_backward" : "distill_forward", a, backward);
      py::gil_scoped_release release;
      return std::string(backward ? lsce::distill_backward(a) : lsce::distill_forward(a));
    };
  };
  const char* doc_f = "per-row kd, ce and stats (6, N) of distillation (lsce_distill_api.h); with grad also the "
                      "student's gradient for grad_kd / grad_ce in the same call (the fused step); returns the "
                      "instruction set used";
  const char* doc_b = "the student's gradient of distillation from the forward's stats; returns the instruction set";
  for (bool backward : {false, true})
    m.def(backward ? "distill_backward" : "distill_forward", run(backward), backward ? doc_b : doc_f, py::kw_only(),
          py::arg("dtype"), py::arg("teacher_dtype"), py::arg("student"), py::arg("N"), py::arg("K"),
          py::arg("row_stride"), py::arg("teacher"), py::arg("teacher_row_stride"), py::arg("target") = 0,
          py::arg("weight") = 0, py::arg("temperature") = 1.0, py::arg("beta") = 0.0, py::arg("eps") = 0.0,
          py::arg("weight_sum") = 0.0, py::arg("ignore_index") = -100, py::arg("nthreads") = 1, py::arg("kd") = 0,
          py::arg("ce") = 0, py::arg("stats") = 0, py::arg("grad_kd") = 0, py::arg("grad_kd_stride") = 0,
          py::arg("grad_ce") = 0, py::arg("grad_ce_stride") = 0, py::arg("grad") = 0);
}
