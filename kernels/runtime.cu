// kernels/runtime.cu — the cuda device's runtime (spec in kiln/cuda/runtime.hpp) and the
// system allocations behind caching_allocator<cuda>.
//
// This translation unit is compiled with KILN_WITH_CUDA, so kiln/core/allocator.hpp
// declares raw_memory<cuda> instead of defining its "built without CUDA" stubs, and the
// definitions below are the ones a CUDA program links.
#define KILN_WITH_CUDA 1

#include <array>
#include <mutex>

#include "common.cuh"
#include "kiln/core/allocator.hpp"
#include "kiln/cuda/runtime.hpp"

namespace kiln {
namespace cuda_runtime {
namespace {

void ok(cudaError_t e, const char* what) { cuda_kernels::detail::check(e, what); }

// One compute stream per device, created on first use; never destroyed (tensors in
// static storage may free their blocks on it during exit).
constexpr int max_devices = 64;
struct stream_table {
  std::mutex mu;
  std::array<cudaStream_t, max_devices> streams{};
};
stream_table& streams() {
  static stream_table* t = new stream_table;
  return *t;
}

}  // namespace

int device_count() noexcept {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return 0;
  }
  return n;
}

device_info info(int device) {
  cudaDeviceProp p{};
  ok(cudaGetDeviceProperties(&p, device), "cudaGetDeviceProperties");
  return {p.name, p.major, p.minor, p.multiProcessorCount, p.totalGlobalMem};
}

int current_device() {
  int d = 0;
  ok(cudaGetDevice(&d), "cudaGetDevice");
  return d;
}

void set_device(int device) {
  KILN_CHECK(device >= 0 && device < device_count(), "cuda set_device: device ", device, " does not exist (",
             device_count(), " visible)");
  ok(cudaSetDevice(device), "cudaSetDevice");
}

stream_t compute_stream() {
  const int d = current_device();
  KILN_CHECK(d < max_devices, "cuda compute_stream: device index ", d, " is beyond kiln's table of ", max_devices);
  auto& t = streams();
  std::lock_guard lock(t.mu);
  if (!t.streams[d]) ok(cudaStreamCreateWithFlags(&t.streams[d], cudaStreamNonBlocking), "cudaStreamCreate");
  return t.streams[d];
}

void synchronize(stream_t stream) {
  ok(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
}

event::event(bool timing) {
  cudaEvent_t e = nullptr;
  ok(cudaEventCreateWithFlags(&e, timing ? cudaEventDefault : cudaEventDisableTiming), "cudaEventCreate");
  e_ = e;
}
event::~event() { cudaEventDestroy(static_cast<cudaEvent_t>(e_)); }
void event::record(stream_t stream) {
  ok(cudaEventRecord(static_cast<cudaEvent_t>(e_), static_cast<cudaStream_t>(stream)), "cudaEventRecord");
}
void event::wait_on(stream_t waiting) const {
  ok(cudaStreamWaitEvent(static_cast<cudaStream_t>(waiting), static_cast<cudaEvent_t>(e_), 0), "cudaStreamWaitEvent");
}
void event::synchronize() const { ok(cudaEventSynchronize(static_cast<cudaEvent_t>(e_)), "cudaEventSynchronize"); }
float event::elapsed_ms(const event& start) const {
  float ms = 0;
  ok(cudaEventElapsedTime(&ms, static_cast<cudaEvent_t>(start.e_), static_cast<cudaEvent_t>(e_)),
     "cudaEventElapsedTime");
  return ms;
}

void copy(void* dst, const void* src, std::size_t bytes, copy_kind kind, stream_t stream) {
  cudaMemcpyKind k = cudaMemcpyDefault;
  switch (kind) {
    case copy_kind::host_to_device:
      k = cudaMemcpyHostToDevice;
      break;
    case copy_kind::device_to_host:
      k = cudaMemcpyDeviceToHost;
      break;
    case copy_kind::device_to_device:
      k = cudaMemcpyDeviceToDevice;
      break;
    case copy_kind::host_to_host:
      k = cudaMemcpyHostToHost;
      break;
  }
  ok(cudaMemcpyAsync(dst, src, bytes, k, static_cast<cudaStream_t>(stream)), "cudaMemcpyAsync");
}

void* pinned_allocate(std::size_t bytes) {
  void* p = nullptr;
  ok(cudaHostAlloc(&p, bytes, cudaHostAllocDefault), "cudaHostAlloc (pinned host memory)");
  return p;
}
void pinned_free(void* p) noexcept {
  if (p) cudaFreeHost(p);
}

}  // namespace cuda_runtime

namespace detail {
// Stream-ordered: the block is usable by work enqueued on the compute stream after this
// call, and cudaFreeAsync lets the driver reuse it once the stream has passed the free.
// Out of memory returns null, so the caching allocator can release its cache and retry.
void* raw_memory<cuda>::allocate(std::size_t n) {
  void* p = nullptr;
  const cudaError_t e = cudaMallocAsync(&p, n, static_cast<cudaStream_t>(cuda_runtime::compute_stream()));
  if (e == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    return nullptr;
  }
  cuda_kernels::detail::check(e, "cudaMallocAsync");
  return p;
}
void raw_memory<cuda>::deallocate(void* p) {
  if (p) cudaFreeAsync(p, static_cast<cudaStream_t>(cuda_runtime::compute_stream()));
}
}  // namespace detail

}  // namespace kiln
