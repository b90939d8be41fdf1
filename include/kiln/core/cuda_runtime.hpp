// kiln/core/cuda_runtime.hpp — the cuda device's runtime: devices, kiln's compute stream,
// events, copies, pinned host memory, and the memory behind tensor<T, cuda>
// (kernels/runtime.cu).
//
// Spec (streams and memory): each device has one compute stream, created on first use
// (non-blocking: it never waits for the legacy default stream). tensor<T, cuda> storage
// comes from caching_allocator<cuda> (kiln/core/allocator.hpp), whose system allocations
// are cudaMallocAsync / cudaFreeAsync on that stream: stream-ordered, so a block freed by
// one op can be handed to the next op at once, without a device synchronisation, as long
// as every op that touches kiln's tensors is enqueued on the compute stream. Work on
// another stream must first wait for the compute stream (event::record on it, then
// event::wait_on the other stream) and the compute stream must wait for that work before
// the tensor is released.
// Spec (copies): to_device / to_host copy a tensor's elements on the compute stream
// through a pinned staging buffer; to_host synchronises the stream before it returns.
// Errors throw kiln::error naming the call and CUDA's message; device_count() returns 0
// (never throws) where there is no driver or no GPU.
// Using it: every translation unit of a program that makes cuda tensors defines
// KILN_WITH_CUDA and the program links libkiln_kernels.a, cudart and cublasLt (the
// gpu_kernels test in tests/meson.build is built that way). Without KILN_WITH_CUDA a
// cuda tensor's allocation throws "built without CUDA".
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "kiln/core/tensor.hpp"

namespace kiln::cuda_runtime {

using stream_t = void*;

int device_count() noexcept;
struct device_info {
  std::string name;
  int major = 0, minor = 0, multiprocessors = 0;
  std::size_t memory_bytes = 0;
};
device_info info(int device);
int current_device();
void set_device(int device);
// The GPU a process launched by mpirun or srun should use: its node-local rank
// (OMPI_COMM_WORLD_LOCAL_RANK, SLURM_LOCALID or LOCAL_RANK, in that order) modulo the
// visible devices, made current; 0 when none of them is set. Call it before the first
// cuda tensor of a multi-GPU program — comm::nccl picks the same device — so the model
// is built where its rank communicates. Returns the device.
int use_local_device();
// The device a pointer from cudaMalloc(Async) belongs to; -1 for host memory.
int device_of(const void* p);

// kiln's compute stream on the current device.
stream_t compute_stream();
// A second stream per device for host-to-device copies that overlap compute
// (data::on_device); created on first use, never destroyed, non-blocking.
stream_t copy_stream();
void synchronize(stream_t stream);

class event {
 public:
  explicit event(bool timing = false);
  ~event();
  event(const event&) = delete;
  event& operator=(const event&) = delete;
  void record(stream_t stream);
  void wait_on(stream_t waiting) const;  // `waiting` runs nothing enqueued after this until the event
  void synchronize() const;
  float elapsed_ms(const event& start) const;  // both recorded with timing = true

 private:
  void* e_ = nullptr;
};

enum class copy_kind { host_to_device, device_to_host, device_to_device, host_to_host };
void copy(void* dst, const void* src, std::size_t bytes, copy_kind kind, stream_t stream);

// dst[i] = to(f32(src[i]) · factor), or with accumulate to(f32(dst[i]) + f32(src[i]) ·
// factor) (a gradient's grad_write::accumulate), for `count` contiguous device elements,
// floating types f32, bf16 and f16, rounded to nearest even; dst may be src (in place,
// without accumulate). The strategies' packing of gradients into f32 buckets and the
// averaged result back (factor 1/world).
void convert_scaled(void* dst, dtype to, const void* src, dtype from, std::size_t count, float factor, bool accumulate,
                    stream_t stream);

// Page-locked host memory (DMA at full PCIe/NVLink speed, asynchronous copies).
void* pinned_allocate(std::size_t bytes);
void pinned_free(void* p) noexcept;
struct pinned_deleter {
  void operator()(void* p) const noexcept { pinned_free(p); }
};
using pinned_buffer = std::unique_ptr<void, pinned_deleter>;

// Pinned staging memory for one synchronous copy on the calling thread. Up to
// staging_cache_bytes it is one buffer per thread, grown on demand and kept, so the
// copies of a step (the loss, a metric, the batch) do not each pay a cudaHostAlloc;
// larger copies (checkpoint tensors) get a buffer of their own, freed with the lease.
// The copies below synchronise before they return, so a thread never holds two leases.
inline constexpr std::size_t staging_cache_bytes = std::size_t{64} << 20;
struct staging_lease {
  void* data;
  pinned_buffer owned;  // set when the buffer is not the thread's cached one
};
inline staging_lease pinned_staging(std::size_t bytes) {
  if (bytes > staging_cache_bytes) {
    pinned_buffer b(pinned_allocate(bytes));
    void* p = b.get();
    return {p, std::move(b)};
  }
  thread_local pinned_buffer cached;
  thread_local std::size_t cached_bytes = 0;
  if (cached_bytes < bytes) {
    std::size_t grown = std::max<std::size_t>(cached_bytes, 4096);
    while (grown < bytes) grown *= 2;
    cached.reset();  // first, so the old and the new buffer are never held together
    cached_bytes = 0;
    cached.reset(pinned_allocate(grown));  // may throw: the cache is then empty, not stale
    cached_bytes = grown;
  }
  return {cached.get(), nullptr};
}

// A device copy of a host tensor (any strides; the result is contiguous).
template <element T>
tensor<T, cuda> to_device(const tensor<T, cpu>& host, stream_t stream = compute_stream()) {
  const tensor<T, cpu> src = host.contiguous();
  tensor<T, cuda> out(src.shape());
  const std::size_t bytes = static_cast<std::size_t>(src.numel()) * sizeof(T);
  if (bytes == 0) return out;
  const staging_lease staging = pinned_staging(bytes);
  std::memcpy(staging.data, src.data(), bytes);
  copy(out.data(), staging.data, bytes, copy_kind::host_to_device, stream);
  synchronize(stream);  // the staging buffer is free for the next copy on return
  return out;
}

// A host copy of a contiguous device tensor; waits for the stream.
template <element T>
tensor<T, cpu> to_host(const tensor<T, cuda>& device, stream_t stream = compute_stream()) {
  KILN_CHECK(device.is_contiguous(), "to_host: the device tensor ", device.shape().str(),
             " is not contiguous; strided device copies come with the cuda ops");
  tensor<T, cpu> out(device.shape());
  const std::size_t bytes = static_cast<std::size_t>(device.numel()) * sizeof(T);
  if (bytes == 0) return out;
  const staging_lease staging = pinned_staging(bytes);
  copy(staging.data, device.data(), bytes, copy_kind::device_to_host, stream);
  synchronize(stream);
  std::memcpy(out.data(), staging.data, bytes);
  return out;
}

// A multi-tensor kernel's table (chunk records) in device memory from the caching
// allocator, copied on `stream`. The copy is from pageable memory: CUDA copies such a
// source into its own staging memory before cudaMemcpyAsync returns (its API notes call
// these copies "possibly synchronous"; for pageable host-to-device copies the driver
// returns once the source is staged), so `records` may go at once. The block returns to
// the allocator stream-ordered, after the kernel that reads it.
template <class E>
tensor<u8, cuda> upload(const std::vector<E>& records, stream_t stream = compute_stream()) {
  static_assert(std::is_trivially_copyable_v<E>, "cuda_runtime::upload: records are copied as bytes");
  const std::size_t bytes = records.size() * sizeof(E);
  tensor<u8, cuda> buf(shape{static_cast<std::int64_t>(bytes)});
  if (bytes > 0) copy(buf.data(), records.data(), bytes, copy_kind::host_to_device, stream);
  return buf;
}

}  // namespace kiln::cuda_runtime
