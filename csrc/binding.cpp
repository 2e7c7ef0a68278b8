// pybind11 binding of the C++ core: Python passes data pointers, sizes,
// strides and a dtype code (lsce/ops.py); no torch headers, no libtorch.
// The kernels run with the GIL released.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <list>
#include <mutex>
#include <new>
#include <vector>

#include "lsce_api.h"

namespace py = pybind11;

namespace {

// Gradient buffers that outlive one step. A new N x K gradient takes one page
// fault per 4 KiB on first write, and on the VMs this was measured on those
// faults cost 3-4x the kernel itself (fp32 4096 x 32000: 40 ms into a warm
// buffer, 170 ms into fresh memory). Liger-Kernel avoids them by writing into
// the logits; lsce instead keeps the last freed gradients, as PyTorch's CUDA
// caching allocator does on the GPU. A Buffer is handed to Python, wrapped by
// torch.frombuffer, whose storage holds it: its destructor runs when the last
// tensor using the memory is gone, never earlier, and returns it here.
// (2 MiB pages were tried instead: on these VMs a fresh huge page is
// sometimes backed lazily by the host and the step took 2-10x longer.)
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: buffers may die after static destructors
    return *pool;
  }
  void* take(size_t bytes, size_t& capacity) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Best fit among the free buffers, wasting at most a quarter.
      auto best = free_.end();
      for (auto it = free_.begin(); it != free_.end(); ++it)
        if (it->second >= bytes && it->second - bytes <= bytes / 4 && (best == free_.end() || it->second < best->second))
          best = it;
      if (best != free_.end()) {
        void* p = best->first;
        capacity = best->second;
        free_bytes_ -= capacity;
        free_.erase(best);
        return p;
      }
    }
    capacity = bytes;
    return ::operator new(bytes, std::align_val_t(64));
  }
  // Called from ~Buffer: allocates nothing but the list node (a failure there
  // frees the buffer instead of throwing out of a destructor).
  void give(void* p, size_t capacity) noexcept {
    std::lock_guard<std::mutex> lock(mu_);
    try {
      free_.emplace_front(p, capacity);
    } catch (...) {
      ::operator delete(p, std::align_val_t(64));
      return;
    }
    free_bytes_ += capacity;
    evict(limit_, kMaxFree);
  }
  size_t set_limit(size_t bytes) {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t old = limit_;
    limit_ = bytes;
    evict(limit_, kMaxFree);  // frees what the new limit no longer allows
    return old;
  }
  size_t cached() {
    std::lock_guard<std::mutex> lock(mu_);
    return free_bytes_;
  }
  void clear() {
    std::lock_guard<std::mutex> lock(mu_);
    evict(0, 0);
  }

 private:
  static constexpr size_t kMaxFree = 2;  // a training loop needs one; a last, smaller batch a second
  std::mutex mu_;
  std::list<std::pair<void*, size_t>> free_;  // most recently freed first
  size_t free_bytes_ = 0;
  size_t limit_ = size_t(4) << 30;

  // Frees the oldest free buffers until at most max_count and max_bytes remain; mu_ held.
  void evict(size_t max_bytes, size_t max_count) {
    while (!free_.empty() && (free_.size() > max_count || free_bytes_ > max_bytes)) {
      free_bytes_ -= free_.back().second;
      ::operator delete(free_.back().first, std::align_val_t(64));
      free_.pop_back();
    }
  }
};

// bytes of writable memory, given back to the Pool when Python drops it.
struct Buffer {
  void* p;
  size_t bytes, capacity;
  explicit Buffer(size_t n) : bytes(n) { p = Pool::get().take(n, capacity); }
  ~Buffer() { Pool::get().give(p, capacity); }
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
};

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
  py::class_<Buffer>(m, "Buffer", py::buffer_protocol(),
                     "writable bytes from lsce's gradient cache; back to the cache when the last user is gone")
      .def(py::init<size_t>(), py::arg("bytes"))
      .def_buffer([](Buffer& b) {
        return py::buffer_info(b.p, 1, py::format_descriptor<uint8_t>::format(), 1, {py::ssize_t(b.bytes)}, {1});
      });
  m.def("set_cache_limit", [](size_t bytes) { return Pool::get().set_limit(bytes); },
        "bytes of freed gradients to keep (0: none); returns the previous limit", py::arg("bytes"));
  m.def("cached_bytes", [] { return Pool::get().cached(); }, "bytes held by freed, cached gradients");
  m.def("empty_cache", [] { Pool::get().clear(); }, "frees every cached gradient");
  m.def("set_isa", [](const std::string& s) { return lsce::set_isa(s.c_str()); },
        "force 'avx512', 'avx2', 'generic' or 'auto'; False if unavailable", py::arg("name"));
  m.def("active_isa", [] { return std::string(lsce::active_isa()); });
}
