// pybind11 binding of the probability-target kernels (lsce_soft_api.h):
// lsce._C.soft_forward and lsce._C.soft_backward, keyword-only, one keyword
// per field of lsce::SoftArgs (pointers as ints, 0 for null). Called by
// binding.cpp's module definition; the kernels run with the GIL released.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "lsce_soft_api.h"

namespace py = pybind11;

namespace {

template <typename P> P ptr(uintptr_t v) { return reinterpret_cast<P>(v); }

// Checks what the kernels cannot: codes, sizes, and the pointers a call with rows needs.
void check(const char* fn, const lsce::SoftArgs& a, bool backward) {
  const std::string where = std::string("lsce._C.") + fn + "()";
  auto bad_code = [](int d) { return d < lsce::kF32 || d > lsce::kF16; };
  if (bad_code(a.dtype) || bad_code(a.target_dtype)) throw py::value_error(where + ": unknown dtype code");
  if (a.N < 0 || a.K < 1 || a.row_stride < 0 || a.target_row_stride < 0)
    throw py::value_error(where + ": bad sizes or row strides");
  if (a.N == 0) return;
  const void* needed[] = {a.logits, a.target, a.m, a.log_s, a.mass};
  for (const void* p : needed)
    if (!p) throw py::value_error(where + ": logits, target, m, log_s and mass must not be null pointers");
  if (!backward && !a.loss) throw py::value_error(where + ": loss must not be a null pointer");
  if ((backward || a.grad) && !a.grad_loss) throw py::value_error(where + ": grad_loss must not be a null pointer");
  if (backward && !a.grad) throw py::value_error(where + ": grad must not be a null pointer");
  if (!backward && (a.grad_lse || a.grad_target))
    throw py::value_error(where + ": the fused forward takes no grad_lse and writes no grad_target");
}

lsce::SoftArgs make(int dtype, int target_dtype, uintptr_t logits, int64_t N, int64_t K, int64_t row_stride,
                    uintptr_t target, int64_t target_row_stride, uintptr_t weight, double eps, double z_loss,
                    double softcap, int nthreads, uintptr_t loss, uintptr_t m, uintptr_t log_s, uintptr_t mass,
                    uintptr_t grad_loss, int64_t grad_loss_stride, uintptr_t grad_lse, int64_t grad_lse_stride,
                    uintptr_t grad, uintptr_t grad_target) {
  lsce::SoftArgs a{};
  a.dtype = dtype;
  a.target_dtype = target_dtype;
  a.logits = ptr<const void*>(logits);
  a.N = N;
  a.K = K;
  a.row_stride = row_stride;
  a.target = ptr<const void*>(target);
  a.target_row_stride = target_row_stride;
  a.weight = ptr<const void*>(weight);
  a.eps = eps;
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.nthreads = nthreads > 0 ? nthreads : 1;
  a.loss = ptr<void*>(loss);
  a.m = ptr<void*>(m);
  a.log_s = ptr<void*>(log_s);
  a.mass = ptr<void*>(mass);
  a.grad_loss = ptr<const void*>(grad_loss);
  a.grad_loss_stride = grad_loss_stride;
  a.grad_lse = ptr<const void*>(grad_lse);
  a.grad_lse_stride = grad_lse_stride;
  a.grad = ptr<void*>(grad);
  a.grad_target = ptr<void*>(grad_target);
  return a;
}

}  // namespace

void bind_soft(py::module_& m) {
  auto run = [](bool backward) {
    return [backward](int dtype, int target_dtype, uintptr_t logits, int64_t N, int64_t K, int64_t row_stride,
                      uintptr_t target, int64_t target_row_stride, uintptr_t weight, double eps, double z_loss,
                      double softcap, int nthreads, uintptr_t loss, uintptr_t mm, uintptr_t log_s, uintptr_t mass,
                      uintptr_t grad_loss, int64_t grad_loss_stride, uintptr_t grad_lse, int64_t grad_lse_stride,
                      uintptr_t grad, uintptr_t grad_target) {
      const lsce::SoftArgs a = make(dtype, target_dtype, logits, N, K, row_stride, target, target_row_stride, weight,
                                    eps, z_loss, softcap, nthreads, loss, mm, log_s, mass, grad_loss,
                                    grad_loss_stride, grad_lse, grad_lse_stride, grad, grad_target);
      check(backward ? "soft_backward" : "soft_forward", a, backward);
      py::gil_scoped_release release;
      return std::string(backward ? lsce::soft_backward(a) : lsce::soft_forward(a));
    };
  };
  const char* doc_f =
      "per-row loss, m, log_s and mass of probability targets (lsce_soft_api.h); with grad also the logits' "
      "gradient for grad_loss in the same pass (the fused step); returns the instruction set used";
  const char* doc_b = "gradient of the logits (and of the target with grad_target) of probability targets; "
                      "returns the instruction set used";
  for (bool backward : {false, true})
    m.def(backward ? "soft_backward" : "soft_forward", run(backward), backward ? doc_b : doc_f, py::kw_only(),
          py::arg("dtype"), py::arg("target_dtype"), py::arg("logits"), py::arg("N"), py::arg("K"),
          py::arg("row_stride"), py::arg("target"), py::arg("target_row_stride"), py::arg("weight") = 0,
          py::arg("eps") = 0.0, py::arg("z_loss") = 0.0, py::arg("softcap") = 0.0, py::arg("nthreads") = 1,
          py::arg("loss") = 0, py::arg("m") = 0, py::arg("log_s") = 0, py::arg("mass") = 0, py::arg("grad_loss") = 0,
          py::arg("grad_loss_stride") = 0, py::arg("grad_lse") = 0, py::arg("grad_lse_stride") = 0,
          py::arg("grad") = 0, py::arg("grad_target") = 0);
}
