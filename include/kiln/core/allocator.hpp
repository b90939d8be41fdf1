// kiln/core/allocator.hpp — a caching allocator per device.
//
// Spec: `caching_allocator<Dev>::instance()` hands out blocks aligned to 64 bytes
// and keeps freed blocks in size-class bins for reuse, so a training step that
// allocates the same shapes every iteration stops calling the system allocator after
// the first step. Sizes round up to 512 B below 1 MiB and to 2^k·(1, 1.25, 1.5, 1.75)
// above, bounding waste at 25%. `stats()` reports bytes in use, the peak, and bytes
// cached; `reset_peak()` starts a new measurement window (the memory planner compares
// its estimate against this peak). `empty_cache()` returns cached blocks to the system.
// Thread-safe.
#pragma once

#include <bit>
#include <cstddef>
#include <cstdlib>
#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "kiln/core/device.hpp"
#include "kiln/core/dtype.hpp"
#include "kiln/core/error.hpp"

namespace kiln {

struct allocator_stats {
  std::size_t in_use = 0;         // bytes handed out and not yet returned
  std::size_t peak_in_use = 0;    // high-water mark of in_use since the last reset_peak()
  std::size_t cached = 0;         // bytes held in free bins
  std::size_t system_allocs = 0;  // calls that reached the system allocator
  std::size_t cache_hits = 0;
};

namespace detail {
inline std::size_t round_block_size(std::size_t n) {
  if (n == 0) n = 1;
  if (n < (std::size_t{1} << 20)) return (n + 511) & ~std::size_t{511};
  const int hi = std::bit_width(n) - 1;  // n in [2^hi, 2^(hi+1))
  const std::size_t quarter = std::size_t{1} << (hi - 2);
  return (n + quarter - 1) / quarter * quarter;  // next multiple of 2^hi / 4
}

template <device Dev>
struct raw_memory;
template <>
struct raw_memory<cpu> {
  static void* allocate(std::size_t n) { return std::aligned_alloc(64, (n + 63) & ~std::size_t{63}); }
  static void deallocate(void* p) { std::free(p); }
};
template <>
struct raw_memory<cuda> {
  // The CUDA backend supplies these (kernels/runtime); without it, CUDA tensors cannot exist.
  static void* allocate(std::size_t);
  static void deallocate(void*);
  // On kiln's compute stream, asynchronous: `count` elements of `elem_bytes` bytes (1, 2,
  // 4 or 8) set to *value; a device-to-device copy of `bytes`.
  static void fill(void* p, std::size_t count, std::size_t elem_bytes, const void* value);
  static void copy(void* dst, const void* src, std::size_t bytes);
  // Element (i0, .., i{rank-1}) of `dims` from src to dst, each addressed through its own
  // strides (in elements of elem_bytes: 1, 2, 4 or 8); rank <= 8. What contiguous() and
  // copy_from need for transposed, sliced and broadcast views.
  static void copy_strided(void* dst, const std::int64_t* dst_strides, const void* src, const std::int64_t* src_strides,
                           const std::int64_t* dims, int rank, std::size_t elem_bytes);
  // `count` contiguous elements of src (floating type `from`) converted into dst (floating
  // type `to`), rounded to nearest even as the host's static_cast does: what
  // tensor::to<U>() runs on a device tensor.
  static void convert(void* dst, dtype to, const void* src, dtype from, std::size_t count);
};
#if !defined(KILN_WITH_CUDA)
inline void* raw_memory<cuda>::allocate(std::size_t) {
  throw error("cuda tensor requested, but kiln was built without CUDA (configure with -Dcuda=enabled)");
}
inline void raw_memory<cuda>::deallocate(void*) {}
inline void raw_memory<cuda>::fill(void*, std::size_t, std::size_t, const void*) {
  throw error("cuda tensor fill, but kiln was built without CUDA");
}
inline void raw_memory<cuda>::copy(void*, const void*, std::size_t) {
  throw error("cuda tensor copy, but kiln was built without CUDA");
}
inline void raw_memory<cuda>::copy_strided(void*, const std::int64_t*, const void*, const std::int64_t*,
                                           const std::int64_t*, int, std::size_t) {
  throw error("cuda tensor copy, but kiln was built without CUDA");
}
inline void raw_memory<cuda>::convert(void*, dtype, const void*, dtype, std::size_t) {
  throw error("cuda tensor conversion, but kiln was built without CUDA");
}
#endif
}  // namespace detail

template <device Dev>
class caching_allocator {
 public:
  static caching_allocator& instance() {
    static caching_allocator* a = new caching_allocator;  // leaked on purpose: outlives static tensors
    return *a;
  }

  void* allocate(std::size_t bytes) {
    const std::size_t size = detail::round_block_size(bytes);
    std::lock_guard lock(mu_);
    void* p = nullptr;
    if (auto it = free_.find(size); it != free_.end() && !it->second.empty()) {
      p = it->second.back();
      it->second.pop_back();
      stats_.cached -= size;
      ++stats_.cache_hits;
    } else {
      p = detail::raw_memory<Dev>::allocate(size);
      if (!p) {  // give cached memory back and retry once before failing
        release_cached_locked();
        p = detail::raw_memory<Dev>::allocate(size);
      }
      KILN_CHECK(p != nullptr, "out of memory on ", Dev::name, ": could not allocate ", size, " bytes (", stats_.in_use,
                 " in use)");
      ++stats_.system_allocs;
    }
    sizes_[p] = size;
    stats_.in_use += size;
    if (stats_.in_use > stats_.peak_in_use) stats_.peak_in_use = stats_.in_use;
    return p;
  }

  void deallocate(void* p) noexcept {
    if (!p) return;
    std::lock_guard lock(mu_);
    auto it = sizes_.find(p);
    if (it == sizes_.end()) return;
    const std::size_t size = it->second;
    sizes_.erase(it);
    stats_.in_use -= size;
    stats_.cached += size;
    free_[size].push_back(p);
  }

  allocator_stats stats() const {
    std::lock_guard lock(mu_);
    return stats_;
  }
  void reset_peak() {
    std::lock_guard lock(mu_);
    stats_.peak_in_use = stats_.in_use;
  }
  void empty_cache() {
    std::lock_guard lock(mu_);
    release_cached_locked();
  }

 private:
  caching_allocator() = default;
  void release_cached_locked() {
    for (auto& [size, blocks] : free_)
      for (void* p : blocks) detail::raw_memory<Dev>::deallocate(p);
    free_.clear();
    stats_.cached = 0;
  }

  mutable std::mutex mu_;
  std::map<std::size_t, std::vector<void*>> free_;
  std::unordered_map<void*, std::size_t> sizes_;
  allocator_stats stats_;
};

}  // namespace kiln
