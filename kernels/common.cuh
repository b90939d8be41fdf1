// kernels/common.cuh — what every kernel file shares: kiln's element types as CUDA's,
// f32 loads and stores, launch checks, and block reductions (CUB).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cub/block/block_reduce.cuh>
#include <string>

#include "kiln/core/dtype.hpp"
#include "kiln/core/error.hpp"

// A grid-stride loop: i runs over [0, n) across every thread of the launch.
#define KILN_GRID_STRIDE(i, n)                                                                     \
  for (std::int64_t i = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); \
       i += static_cast<std::int64_t>(gridDim.x) * blockDim.x)

namespace kiln::cuda_kernels::detail {

// kiln's types and CUDA's have the same bits; kernels use CUDA's.
template <class T>
struct device_type {
  using type = T;
};
template <>
struct device_type<bf16> {
  using type = __nv_bfloat16;
};
template <>
struct device_type<f16> {
  using type = __half;
};
template <class T>
using device_t = typename device_type<T>::type;
static_assert(sizeof(device_t<bf16>) == sizeof(bf16) && sizeof(device_t<f16>) == sizeof(f16));

template <class T>
device_t<T>* dev(T* p) {
  return reinterpret_cast<device_t<T>*>(p);
}
template <class T>
const device_t<T>* dev(const T* p) {
  return reinterpret_cast<const device_t<T>*>(p);
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <class D>
__device__ __forceinline__ D from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) {
  return __float2half_rn(x);
}

inline cudaStream_t as_stream(void* s) { return static_cast<cudaStream_t>(s); }

// Throws kiln::error naming the kernel when its launch failed.
inline void check_launch(const char* kernel) {
  const cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess) throw error(std::string("cuda kernel ") + kernel + ": " + cudaGetErrorString(e));
}

// Throws kiln::error naming the runtime call when it failed.
inline void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw error(std::string(what) + ": " + cudaGetErrorString(e));
}

inline unsigned grid_for(std::int64_t n, int block, std::int64_t cap = 65535LL * 32) {
  std::int64_t g = (n + block - 1) / block;
  if (g < 1) g = 1;
  return static_cast<unsigned>(g < cap ? g : cap);
}

// The sum over a block of one float per thread, in a fixed tree order (CUB), broadcast
// to every thread.
template <int Block>
__device__ float block_sum(float v) {
  using reduce = cub::BlockReduce<float, Block>;
  __shared__ typename reduce::TempStorage tmp;
  __shared__ float result;
  const float s = reduce(tmp).Sum(v);
  if (threadIdx.x == 0) result = s;
  __syncthreads();
  const float r = result;
  __syncthreads();  // tmp and result are reused by the next call
  return r;
}
struct max_op {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
template <int Block>
__device__ float block_max(float v) {
  using reduce = cub::BlockReduce<float, Block>;
  __shared__ typename reduce::TempStorage tmp;
  __shared__ float result;
  const float s = reduce(tmp).Reduce(v, max_op{});
  if (threadIdx.x == 0) result = s;
  __syncthreads();
  const float r = result;
  __syncthreads();
  return r;
}

}  // namespace kiln::cuda_kernels::detail
