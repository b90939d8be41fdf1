// kernels/runtime.cu — the cuda device's runtime (spec in kiln/core/cuda_runtime.hpp) and the
// system allocations behind caching_allocator<cuda>.
//
// This translation unit is compiled with KILN_WITH_CUDA, so kiln/core/allocator.hpp
// declares raw_memory<cuda> instead of defining its "built without CUDA" stubs, and the
// definitions below are the ones a CUDA program links.
#define KILN_WITH_CUDA 1

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "kiln/core/allocator.hpp"
#include "kiln/core/cuda_runtime.hpp"

namespace kiln {
namespace cuda_runtime {
namespace {

void ok(cudaError_t e, const char* what) { cuda_kernels::detail::check(e, what); }

// One compute stream and one copy stream per device, created on first use; never
// destroyed (tensors in static storage may free their blocks on the compute stream during exit).
constexpr int max_devices = 64;
struct stream_table {
  std::mutex mu;
  std::array<cudaStream_t, max_devices> streams{}, copies{};
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

int use_local_device() {
  int local = 0;
  for (const char* var : {"OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"})
    if (const char* v = std::getenv(var); v && *v) {
      local = std::atoi(v);
      break;
    }
  const int n = device_count();
  KILN_CHECK(n > 0, "cuda use_local_device: no CUDA device is visible");
  const int d = local % n;
  set_device(d);
  return d;
}

int device_of(const void* p) {
  cudaPointerAttributes a{};
  ok(cudaPointerGetAttributes(&a, p), "cudaPointerGetAttributes");
  return a.type == cudaMemoryTypeDevice || a.type == cudaMemoryTypeManaged ? a.device : -1;
}

void set_device(int device) {
  KILN_CHECK(device >= 0 && device < device_count(), "cuda set_device: device ", device, " does not exist (",
             device_count(), " visible)");
  ok(cudaSetDevice(device), "cudaSetDevice");
}

namespace {
// The current device's stream in one of the table's rows, created on first use.
stream_t stream_of(std::array<cudaStream_t, max_devices> stream_table::*row, const char* what) {
  const int d = current_device();
  KILN_CHECK(d < max_devices, what, ": device index ", d, " is beyond kiln's table of ", max_devices);
  auto& t = streams();
  std::lock_guard lock(t.mu);
  cudaStream_t& s = (t.*row)[d];
  if (!s) ok(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreate");
  return s;
}
}  // namespace

stream_t compute_stream() { return stream_of(&stream_table::streams, "cuda compute_stream"); }
stream_t copy_stream() { return stream_of(&stream_table::copies, "cuda copy_stream"); }

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

namespace {
template <class U>
__global__ void fill_kernel(U* p, std::size_t n, U v) {
  KILN_GRID_STRIDE(i, static_cast<std::int64_t>(n)) p[i] = v;
}
template <class U>
void launch_fill(void* p, std::size_t n, const void* value, cudaStream_t s) {
  U v;
  std::memcpy(&v, value, sizeof(U));
  const unsigned blocks = static_cast<unsigned>(std::min<std::size_t>((n + 255) / 256, 65535));
  fill_kernel<U><<<blocks, 256, 0, s>>>(static_cast<U*>(p), n, v);
  cuda_kernels::detail::check(cudaGetLastError(), "fill_kernel");
}
}  // namespace

// A value whose bytes are all zero (0, +0.0 of any type) is a memset; others a kernel
// writing the element pattern.
void raw_memory<cuda>::fill(void* p, std::size_t count, std::size_t elem_bytes, const void* value) {
  const auto s = static_cast<cudaStream_t>(cuda_runtime::compute_stream());
  const auto* b = static_cast<const unsigned char*>(value);
  bool zero = true;
  for (std::size_t i = 0; i < elem_bytes; ++i) zero = zero && b[i] == 0;
  if (zero || elem_bytes == 1) {
    cuda_kernels::detail::check(cudaMemsetAsync(p, zero ? 0 : b[0], count * elem_bytes, s), "cudaMemsetAsync");
    return;
  }
  switch (elem_bytes) {
    case 2:
      launch_fill<std::uint16_t>(p, count, value, s);
      break;
    case 4:
      launch_fill<std::uint32_t>(p, count, value, s);
      break;
    case 8:
      launch_fill<std::uint64_t>(p, count, value, s);
      break;
    default:
      throw error("cuda fill: element size " + std::to_string(elem_bytes) + " is not 1, 2, 4 or 8 bytes");
  }
}
void raw_memory<cuda>::copy(void* dst, const void* src, std::size_t bytes) {
  cuda_runtime::copy(dst, src, bytes, cuda_runtime::copy_kind::device_to_device, cuda_runtime::compute_stream());
}

namespace {
struct strided_geometry {
  int rank = 0;
  std::int64_t dims[8] = {}, dst[8] = {}, src[8] = {};
};
// One thread per element, in row-major order of `dims` (consecutive threads read and
// write consecutive elements of whichever side is contiguous in the last dimension).
template <class U>
__global__ void copy_strided_kernel(U* __restrict__ dst, const U* __restrict__ src, strided_geometry g,
                                    std::int64_t n) {
  KILN_GRID_STRIDE(i, n) {
    std::int64_t rest = i, od = 0, os = 0;
    for (int d = g.rank - 1; d >= 0; --d) {
      const std::int64_t idx = rest % g.dims[d];
      rest /= g.dims[d];
      od += idx * g.dst[d];
      os += idx * g.src[d];
    }
    dst[od] = src[os];
  }
}
template <class U>
void launch_copy_strided(void* dst, const void* src, const strided_geometry& g, std::int64_t n, cudaStream_t s) {
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>((n + 255) / 256, 65535LL * 32));
  copy_strided_kernel<U><<<blocks, 256, 0, s>>>(static_cast<U*>(dst), static_cast<const U*>(src), g, n);
  cuda_kernels::detail::check(cudaGetLastError(), "copy_strided_kernel");
}
}  // namespace

namespace {
// One element from -> to, through f32 for the 16-bit types (exact), rounded to nearest even.
template <class To, class From>
__device__ __forceinline__ To convert_one(From x) {
  using cuda_kernels::detail::from_f32;
  using cuda_kernels::detail::to_f32;
  if constexpr (std::is_same_v<To, From>)
    return x;
  else if constexpr (std::is_same_v<To, double>)
    return static_cast<double>(to_f32(x));
  else if constexpr (std::is_same_v<From, double>)
    return from_f32<To>(static_cast<float>(x));
  else
    return from_f32<To>(to_f32(x));
}
template <class To, class From>
__global__ void convert_kernel(To* __restrict__ dst, const From* __restrict__ src, std::int64_t n) {
  KILN_GRID_STRIDE(i, n) dst[i] = convert_one<To>(src[i]);
}
template <class To, class From>
void launch_convert(void* dst, const void* src, std::int64_t n, cudaStream_t s) {
  const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>((n + 255) / 256, 65535LL * 32));
  convert_kernel<To, From><<<blocks, 256, 0, s>>>(static_cast<To*>(dst), static_cast<const From*>(src), n);
  cuda_kernels::detail::check(cudaGetLastError(), "convert_kernel");
}
// Calls f(From{}) for a floating dtype (CUDA's types for the 16-bit ones).
template <class F>
void with_floating(dtype t, const char* side, F&& f) {
  switch (t) {
    case dtype::f64:
      return f(double{});
    case dtype::f32:
      return f(float{});
    case dtype::bf16:
      return f(__nv_bfloat16{});
    case dtype::f16:
      return f(__half{});
    default:
      throw error(std::string("cuda convert: the ") + side + " type " + std::string(dtype_name(t)) +
                  " is not a floating type (f64, f32, bf16, f16)");
  }
}
}  // namespace

void raw_memory<cuda>::convert(void* dst, dtype to, const void* src, dtype from, std::size_t count) {
  if (count == 0) return;
  const auto s = static_cast<cudaStream_t>(cuda_runtime::compute_stream());
  with_floating(to, "destination", [&](auto t) {
    with_floating(from, "source", [&](auto f) {
      launch_convert<decltype(t), decltype(f)>(dst, src, static_cast<std::int64_t>(count), s);
    });
  });
}

namespace {
template <class To, class From>
__global__ void convert_scaled_kernel(To* dst, const From* src, std::int64_t n, float factor, bool accumulate) {
  using cuda_kernels::detail::from_f32;
  using cuda_kernels::detail::to_f32;
  KILN_GRID_STRIDE(i, n) {
    const float v = to_f32(src[i]) * factor;
    dst[i] = from_f32<To>(accumulate ? to_f32(dst[i]) + v : v);
  }
}
}  // namespace
}  // namespace detail

void cuda_runtime::convert_scaled(void* dst, dtype to, const void* src, dtype from, std::size_t count, float factor,
                                  bool accumulate, stream_t stream) {
  if (count == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  const auto n = static_cast<std::int64_t>(count);
  auto only_16_32 = [](dtype t, const char* side) {
    if (t != dtype::f32 && t != dtype::bf16 && t != dtype::f16)
      throw error(std::string("cuda convert_scaled: the ") + side + " type " + std::string(dtype_name(t)) +
                  " is not f32, bf16 or f16");
  };
  only_16_32(to, "destination");
  only_16_32(from, "source");
  detail::with_floating(to, "destination", [&](auto t) {
    detail::with_floating(from, "source", [&](auto f) {
      using To = decltype(t);
      using From = decltype(f);
      if constexpr (!std::is_same_v<To, double> && !std::is_same_v<From, double>) {
        const unsigned blocks = static_cast<unsigned>(std::min<std::int64_t>((n + 255) / 256, 65535LL * 32));
        detail::convert_scaled_kernel<To, From>
            <<<blocks, 256, 0, s>>>(static_cast<To*>(dst), static_cast<const From*>(src), n, factor, accumulate);
        cuda_kernels::detail::check(cudaGetLastError(), "convert_scaled_kernel");
      }
    });
  });
}

namespace detail {
void raw_memory<cuda>::copy_strided(void* dst, const std::int64_t* dst_strides, const void* src,
                                    const std::int64_t* src_strides, const std::int64_t* dims, int rank,
                                    std::size_t elem_bytes) {
  if (rank < 0 || rank > 8) throw error("cuda strided copy: rank " + std::to_string(rank) + " is outside [0, 8]");
  strided_geometry g;
  g.rank = rank;
  std::int64_t n = 1;
  for (int d = 0; d < rank; ++d) {
    g.dims[d] = dims[d];
    g.dst[d] = dst_strides[d];
    g.src[d] = src_strides[d];
    n *= dims[d];
  }
  if (n == 0) return;
  const auto s = static_cast<cudaStream_t>(cuda_runtime::compute_stream());
  switch (elem_bytes) {
    case 1:
      launch_copy_strided<std::uint8_t>(dst, src, g, n, s);
      break;
    case 2:
      launch_copy_strided<std::uint16_t>(dst, src, g, n, s);
      break;
    case 4:
      launch_copy_strided<std::uint32_t>(dst, src, g, n, s);
      break;
    case 8:
      launch_copy_strided<std::uint64_t>(dst, src, g, n, s);
      break;
    default:
      throw error("cuda strided copy: element size " + std::to_string(elem_bytes) + " is not 1, 2, 4 or 8 bytes");
  }
}
}  // namespace detail

}  // namespace kiln
