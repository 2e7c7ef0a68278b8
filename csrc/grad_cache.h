// lsce C++ core: the cache of gradient buffers that outlive one step (the
// buffers behind lsce.cache, handed to Python by binding.cpp).
#pragma once
#include <cstddef>

namespace lsce {

// `bytes` of writable memory, 64-byte aligned, taken from the cache of freed
// gradients when one fits and given back to it by the destructor.
class Buffer {
 public:
  explicit Buffer(size_t bytes);
  ~Buffer();
  Buffer(const Buffer&) = delete;
  Buffer& operator=(const Buffer&) = delete;
  void* data() const { return p_; }
  size_t size() const { return bytes_; }

 private:
  void* p_;
  size_t bytes_, capacity_;
};

// Bytes of freed gradients to keep (0: none); returns the previous limit.
size_t set_cache_limit(size_t bytes);
// Bytes held by freed, cached gradients.
size_t cached_bytes();
// Frees every cached gradient.
void empty_cache();

}  // namespace lsce
