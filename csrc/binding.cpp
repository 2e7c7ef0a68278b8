// pybind11 binding of the C++ core: Python passes data pointers, sizes,
// strides and a dtype code (lsce/ops.py); no torch headers, no libtorch.
// The kernels run with the GIL released.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "grad_cache.h"
#include "lsce_api.h"

namespace py = pybind11;

namespace {

// Class coefficients c_k = prior_k * w_k (prior defaults to 1/K) and their sum.
template <typename A>
double coefficients(std::vector<A>& c, int64_t K, const void* weight, const void* prior) {
  c.resize(size_t(K));
  double C = 0.0;
  for (int64_t k = 0; k < K; ++k) {
    A v = prior ? static_cast<const A*>(prior)[k] : A(1) / A(K);
    if (weight) v *= static_cast<const A*>(weight)[k];
    c[size_t(k)] = v;
    C += double(v);
  }
  return C;
}

// Fills the option fields shared by forward and backward; `storage` keeps the
// coefficient array alive for the call.
lsce::Args make_args(int dtype, uintptr_t logits, int64_t N, int64_t K, int64_t row_stride,
                     uintptr_t target, int64_t ignore_index, uintptr_t weight, uintptr_t prior,
                     double eps, double z_loss, double softcap, int nthreads,
                     std::vector<float>& cf, std::vector<double>& cd) {
  if (dtype < lsce::kF32 || dtype > lsce::kF16) throw py::value_error("lsce._C: unknown dtype code");
  // Rows may overlap (row_stride < K, 0 for an expanded row): the logits are only read.
  if (N < 0 || K < 1 || row_stride < 0) throw py::value_error("lsce._C: bad sizes or row stride");
  lsce::Args a{};
  a.dtype = dtype;
  a.logits = reinterpret_cast<const void*>(logits);
  a.N = N;
  a.K = K;
  a.row_stride = row_stride;
  a.target = reinterpret_cast<const int64_t*>(target);
  a.ignore_index = ignore_index;
  a.weight = reinterpret_cast<const void*>(weight);
  a.eps = eps;
  a.z_loss = z_loss;
  a.softcap = softcap;
  a.nthreads = nthreads > 0 ? nthreads : 1;
  a.C = 1.0;
  a.uniform_over = K;
  // The coefficients only enter the smoothing term: without smoothing the
  // plain path runs (w_y still comes from `weight`).
  if ((weight || prior) && eps > 0) {
    const void* p = reinterpret_cast<const void*>(prior);
    if (dtype == lsce::kF64) {
      a.C = coefficients(cd, K, a.weight, p);
      a.c = cd.data();
    } else {
      a.C = coefficients(cf, K, a.weight, p);
      a.c = cf.data();
    }
  }
  return a;
}

std::string forward(int dtype, uintptr_t logits, int64_t N, int64_t K, int64_t row_stride,
                    uintptr_t target, int64_t ignore_index, uintptr_t weight, uintptr_t prior,
                    double eps, double z_loss, double softcap, uintptr_t loss, uintptr_t lse,
                    int nthreads, uintptr_t grad, uintptr_t grad_loss, int64_t grad_loss_stride) {
  std::vector<float> cf;
  std::vector<double> cd;
  lsce::Args a = make_args(dtype, logits, N, K, row_stride, target, ignore_index, weight, prior,
                           eps, z_loss, softcap, nthreads, cf, cd);
  a.loss = reinterpret_cast<void*>(loss);
  a.lse = reinterpret_cast<void*>(lse);
  if (grad && !grad_loss) throw py::value_error("lsce._C.forward: grad needs grad_loss");
  a.grad = reinterpret_cast<void*>(grad);
  a.grad_loss = reinterpret_cast<const void*>(grad_loss);
  a.grad_loss_stride = grad_loss_stride;
  py::gil_scoped_release release;
  return lsce::forward(a);
}

std::string backward(int dtype, uintptr_t logits, int64_t N, int64_t K, int64_t row_stride,
                     uintptr_t target, int64_t ignore_index, uintptr_t weight, uintptr_t prior,
                     double eps, double z_loss, double softcap, uintptr_t lse, uintptr_t grad_loss,
                     int64_t grad_loss_stride, uintptr_t grad_lse, int64_t grad_lse_stride,
                     uintptr_t grad, int nthreads) {
  std::vector<float> cf;
  std::vector<double> cd;
  lsce::Args a = make_args(dtype, logits, N, K, row_stride, target, ignore_index, weight, prior,
                           eps, z_loss, softcap, nthreads, cf, cd);
  a.lse = reinterpret_cast<void*>(lse);
  a.grad_loss = reinterpret_cast<const void*>(grad_loss);
  a.grad_loss_stride = grad_loss_stride;
  a.grad_lse = reinterpret_cast<const void*>(grad_lse);
  a.grad_lse_stride = grad_lse_stride;
  a.grad = reinterpret_cast<void*>(grad);
  py::gil_scoped_release release;
  return lsce::backward(a);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lsce C++/OpenMP kernels (raw pointers; called from lsce.ops)";
  m.def("forward", &forward,
        "per-row loss and lse, and with grad (N x K, contiguous) also the gradient for the "
        "upstream grad_loss in the same pass; returns the instruction set used",
        py::arg("dtype"), py::arg("logits"), py::arg("N"), py::arg("K"), py::arg("row_stride"),
        py::arg("target"), py::arg("ignore_index"), py::arg("weight"), py::arg("prior"),
        py::arg("eps"), py::arg("z_loss"), py::arg("softcap"), py::arg("loss"), py::arg("lse"),
        py::arg("nthreads"), py::arg("grad") = 0, py::arg("grad_loss") = 0, py::arg("grad_loss_stride") = 0);
  m.def("backward", &backward, "gradient of the logits; returns the instruction set used",
        py::arg("dtype"), py::arg("logits"), py::arg("N"), py::arg("K"), py::arg("row_stride"),
        py::arg("target"), py::arg("ignore_index"), py::arg("weight"), py::arg("prior"),
        py::arg("eps"), py::arg("z_loss"), py::arg("softcap"), py::arg("lse"),
        py::arg("grad_loss"), py::arg("grad_loss_stride"), py::arg("grad_lse"),
        py::arg("grad_lse_stride"), py::arg("grad"), py::arg("nthreads"));
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
