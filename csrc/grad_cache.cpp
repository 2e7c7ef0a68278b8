// The gradient cache (grad_cache.h): freed gradient buffers kept for the next step.
#include "grad_cache.h"

#include <list>
#include <mutex>
#include <new>
#include <utility>

namespace lsce {
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

}  // namespace

Buffer::Buffer(size_t bytes) : bytes_(bytes) { p_ = Pool::get().take(bytes, capacity_); }
Buffer::~Buffer() { Pool::get().give(p_, capacity_); }

size_t set_cache_limit(size_t bytes) { return Pool::get().set_limit(bytes); }
size_t cached_bytes() { return Pool::get().cached(); }
void empty_cache() { Pool::get().clear(); }

}  // namespace lsce
