// kiln/strategy/buffers.hpp — the multi-rank strategies' flat buffers, on the device the
// model lives on, and their way into the communicator's memory.
//
// Spec: comm_device<Comm> is the device whose pointers Comm's collectives take: cpu for
// comm::local and comm::mpi, cuda for comm::nccl. A strategy over Dev packs gradients
// and parameters into flat buffers on Dev (convert: one floating type into another times
// a factor, a host loop or a kernel on kiln's compute stream) and runs collectives on
// them through one of two routes:
//   comm_buffer<T, Dev, Comm>  a persistent buffer (ddp's buckets, zero's reduce-scatter
//       and gather buffers). send(c) returns the pointer to hand the collective: Dev's
//       own memory when Dev is the communicator's device (on cuda the NCCL stream is
//       first told to wait for the compute stream, so the packing kernels are done), or
//       a pinned host mirror the buffer was copied into (a cuda model on a host
//       communicator: ddp<comm::mpi, cuda>, MPI's path for GPUs; the copy waits for the
//       stream). After the collective's wait(), receive() brings a mirrored result back
//       (a host-to-device copy enqueued on the compute stream; nothing to do otherwise).
//   through_comm_memory<Where>(c, p, n, f)  one blocking collective f(q) over n
//       elements at p on device Where: q is p itself, or a temporary on the
//       communicator's side that p is copied into and back from. For the small
//       exchanges: flags, counters, a logged value, a broadcast parameter.
// A cpu model on a device communicator (comm::nccl with Dev = cpu) is a compile error.
// Ensures: the values the collectives see are exactly the packed ones (copies are
// bitwise); the host loops are the arithmetic the CPU strategies always did.
#pragma once

#include <algorithm>
#include <cstring>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kiln/comm/communicator.hpp"
#include "kiln/core/allocator.hpp"
#include "kiln/core/cuda_runtime.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/ops/kernel/grad_write.hpp"
#include "kiln/strategy/memory.hpp"

namespace kiln::strategy::detail {

template <class Comm>
using comm_device = std::conditional_t<Comm::host_memory, cpu, cuda>;

// Whether Comm can reduce buffers of a model on Dev (strategy::detail::distributed checks).
template <class Comm, class Dev>
inline constexpr bool comm_reaches = Comm::host_memory || !Dev::is_host;

// dst[i] = To(f32(src[i]) · factor), n contiguous elements on Dev (dst may be src); with
// grad_write::accumulate, To(f32(dst[i]) + f32(src[i]) · factor) (store_grad's rule).
template <device Dev, class To, class From>
void convert(To* dst, const From* src, std::int64_t n, float factor = 1.0f, grad_write mode = grad_write::overwrite) {
  if (n == 0) return;
  const bool add = mode == grad_write::accumulate;
  if constexpr (Dev::is_host) {
    if constexpr (std::is_same_v<To, From>)
      if (factor == 1.0f && !add) {
        if (static_cast<const void*>(dst) != static_cast<const void*>(src))
          std::memcpy(static_cast<void*>(dst), src, static_cast<std::size_t>(n) * sizeof(To));
        return;
      }
    for (std::int64_t i = 0; i < n; ++i) store_grad(dst[i], static_cast<float>(src[i]) * factor, mode);
  } else {
    cuda_runtime::convert_scaled(dst, dtype_of<To>, src, dtype_of<From>, static_cast<std::size_t>(n), factor, add,
                                 cuda_runtime::compute_stream());
  }
}

// n elements from src to dst, both on Dev (kiln's compute stream on cuda).
template <device Dev, class T>
void copy_elements(T* dst, const T* src, std::int64_t n) {
  if (n == 0 || dst == src) return;
  const auto bytes = static_cast<std::size_t>(n) * sizeof(T);
  if constexpr (Dev::is_host)
    std::memcpy(static_cast<void*>(dst), static_cast<const void*>(src), bytes);
  else
    cuda_runtime::copy(dst, src, bytes, cuda_runtime::copy_kind::device_to_device, cuda_runtime::compute_stream());
}

// n copies of v at p on Dev.
template <device Dev, class T>
void fill(T* p, std::int64_t n, T v) {
  if (n == 0) return;
  if constexpr (Dev::is_host)
    std::fill(p, p + n, v);
  else
    kiln::detail::raw_memory<Dev>::fill(p, static_cast<std::size_t>(n), sizeof(T), &v);
}
template <device Dev, class T>
void fill_zero(T* p, std::int64_t n) {
  fill<Dev>(p, n, T(0));
}
// n elements at src on Dev into host memory (on cuda: a copy, then the stream waits).
template <device Dev, class T>
void read_to_host(T* host, const T* src, std::int64_t n) {
  if (n == 0) return;
  const auto bytes = static_cast<std::size_t>(n) * sizeof(T);
  if constexpr (Dev::is_host) {
    std::memcpy(static_cast<void*>(host), static_cast<const void*>(src), bytes);
  } else {
    const auto s = cuda_runtime::compute_stream();
    cuda_runtime::copy(host, src, bytes, cuda_runtime::copy_kind::device_to_host, s);
    cuda_runtime::synchronize(s);
  }
}

// n elements from host memory to dst on Dev (on cuda: a copy enqueued on the compute
// stream; a pageable source is staged before the call returns).
template <device Dev, class T>
void write_from_host(T* dst, const T* host, std::int64_t n) {
  if (n == 0) return;
  const auto bytes = static_cast<std::size_t>(n) * sizeof(T);
  if constexpr (Dev::is_host)
    std::memcpy(static_cast<void*>(dst), static_cast<const void*>(host), bytes);
  else
    cuda_runtime::copy(dst, host, bytes, cuda_runtime::copy_kind::host_to_device, cuda_runtime::compute_stream());
}

// n elements from src (on device From) to dst (on device To).
template <device To, device From, class T>
void copy_across(T* dst, const T* src, std::int64_t n) {
  if constexpr (std::is_same_v<To, From>)
    copy_elements<To>(dst, src, n);
  else if constexpr (From::is_host)
    write_from_host<To>(dst, src, n);
  else
    read_to_host<From>(dst, src, n);
}

// The communicator's stream waits for kiln's compute stream (comm::nccl); nothing else.
template <class Comm>
void after_compute(Comm& c) {
  if constexpr (requires { c.after(static_cast<void*>(nullptr)); }) c.after(cuda_runtime::compute_stream());
}

template <class T, device Dev, class Comm>
class comm_buffer {
  static constexpr bool mirrored = !Dev::is_host && Comm::host_memory;

 public:
  // At least n elements (contents undefined after a growth); the buffer only grows.
  void reserve(std::int64_t n) {
    if (n > size()) resize(n);
  }
  // n elements, zero.
  void resize(std::int64_t n) {
    values_ = tensor<T, Dev>::zeros(shape{n});
    n_ = n;
    if constexpr (mirrored) {
      host_.reset(n > 0 ? cuda_runtime::pinned_allocate(static_cast<std::size_t>(n) * sizeof(T)) : nullptr);
      if (n > 0) std::memset(host_.get(), 0, static_cast<std::size_t>(n) * sizeof(T));
    }
  }
  std::int64_t size() const { return n_; }
  // What the buffer holds: the device tensor's allocator block, and the pinned mirror.
  std::int64_t device_bytes() const { return block(n_ * std::int64_t(sizeof(T))); }
  std::int64_t host_bytes() const { return mirrored ? n_ * std::int64_t(sizeof(T)) : 0; }
  // The same figures for a buffer of n elements (the memory plan's prediction).
  static strategy::communication_bytes planned(std::int64_t n) {
    return {block(n * std::int64_t(sizeof(T))), mirrored ? n * std::int64_t(sizeof(T)) : 0};
  }
  T* data() { return values_.data(); }  // on Dev
  tensor<T, Dev>& values() { return values_; }

  // Where the collective reads and writes the buffer's current contents, its first n
  // elements (all by default; see the spec).
  T* send(Comm& c, std::int64_t n = -1) {
    if constexpr (mirrored) {
      const auto s = cuda_runtime::compute_stream();
      cuda_runtime::copy(host(), values_.data(), bytes(n), cuda_runtime::copy_kind::device_to_host, s);
      cuda_runtime::synchronize(s);
      return host();
    } else {
      after_compute(c);
      return values_.data();
    }
  }
  // Where a collective writes a result this buffer only receives (reduce-scatter's output).
  T* target(Comm& c) {
    if constexpr (mirrored) {
      cuda_runtime::synchronize(cuda_runtime::compute_stream());  // a previous receive() read the mirror
      return host();
    } else {
      after_compute(c);  // the kernels that read the last result are done before it is overwritten
      return values_.data();
    }
  }
  // After the collective's wait(): the result (the first n elements) on Dev.
  void receive(std::int64_t n = -1) {
    if constexpr (mirrored)
      cuda_runtime::copy(values_.data(), host(), bytes(n), cuda_runtime::copy_kind::host_to_device,
                         cuda_runtime::compute_stream());
  }

 private:
  static std::int64_t block(std::int64_t bytes) {
    return bytes <= 0 ? 0 : static_cast<std::int64_t>(kiln::detail::round_block_size(static_cast<std::size_t>(bytes)));
  }
  T* host() { return static_cast<T*>(host_.get()); }
  std::size_t bytes(std::int64_t n = -1) const { return static_cast<std::size_t>(n < 0 ? n_ : n) * sizeof(T); }
  tensor<T, Dev> values_;
  std::int64_t n_ = 0;  // (a default tensor is a one-element scalar)
  std::conditional_t<mirrored, cuda_runtime::pinned_buffer, std::nullptr_t> host_{};
};

// One blocking collective f(q) over n elements at p (on device Where); see the spec.
// T is a trivially copyable element the communicator takes (f32, f64, i64, std::byte).
template <device Where, class Comm, class T, class F>
void through_comm_memory(Comm& c, T* p, std::int64_t n, F&& f) {
  using On = comm_device<Comm>;
  const auto bytes = static_cast<std::size_t>(n) * sizeof(T);
  if constexpr (std::is_same_v<Where, On>) {
    if constexpr (!On::is_host) after_compute(c);
    f(p);
  } else if constexpr (Where::is_host) {  // host values, device communicator
    tensor<u8, cuda> d(shape{static_cast<std::int64_t>(bytes)});
    T* q = reinterpret_cast<T*>(d.data());
    const auto s = cuda_runtime::compute_stream();
    if (bytes) cuda_runtime::copy(q, p, bytes, cuda_runtime::copy_kind::host_to_device, s);
    after_compute(c);
    f(q);
    if (bytes) cuda_runtime::copy(p, q, bytes, cuda_runtime::copy_kind::device_to_host, s);
    cuda_runtime::synchronize(s);
  } else {  // device values, host communicator
    std::vector<T> h(static_cast<std::size_t>(n));
    const auto s = cuda_runtime::compute_stream();
    if (bytes) cuda_runtime::copy(h.data(), p, bytes, cuda_runtime::copy_kind::device_to_host, s);
    cuda_runtime::synchronize(s);
    f(h.data());
    if (bytes) cuda_runtime::copy(p, h.data(), bytes, cuda_runtime::copy_kind::host_to_device, s);
    cuda_runtime::synchronize(s);  // h is pageable and goes out of scope
  }
}

}  // namespace kiln::strategy::detail
