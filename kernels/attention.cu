// kernels/attention.cu — flash-style attention forward and backward
// (kiln/cuda/kernels.hpp).
//
// The CPU op's algorithm (kiln/ops/cpu/attention.hpp) on the GPU: the forward streams
// key/value tiles through shared memory and keeps, per query row, an online softmax
// (running max m, running sum l, accumulator of D values) in registers, writing O and
// the row's log-sum-exp — never a T×S matrix. The backward recomputes the probabilities
// from the log-sum-exp: one kernel for delta = rowsum(dO∘O), one for dQ (a thread per
// query row, streaming keys), one for dK and dV (a thread per key row, streaming the
// query rows of every query head of its group, so grouped-query attention sums over
// the group without atomics: deterministic). Masks are the CPU's policy types (none,
// causal), or their value forms (local_n, strided_n: one instantiation for every width);
// a block visits only the keys its rows may see. Dropout on the probabilities draws the
// CPU's Philox index (b, h, i, j).
// These are the reference kernels (CUDA cores, f32 arithmetic, one row per thread): they
// serve f32 and head dimension 32. bf16 and f16 with head dimensions 64 and 128 run
// tensor-core block programs, which g++ also runs on host threads in the CPU test suite:
// by default the register-resident ones of kiln/cuda/flash_registers.hpp (FlashAttention-2
// on mma.sync, ldmatrix and cp.async), or, with attention_dims::staged_tiles, those of
// kiln/cuda/flash_tiles.hpp (the same tiling on wmma, S, P and O staged through shared
// memory).
#include <algorithm>
#include <atomic>

#include "common.cuh"
#include "kiln/cuda/flash_registers.hpp"
#include "kiln/cuda/flash_tiles.hpp"
#include "kiln/cuda/kernels.hpp"
#include "kiln/ops/kernel/attention_mask.hpp"

namespace kiln::cuda_kernels {
namespace {

constexpr int rows_per_block = 64;  // query rows (forward, dQ) or key rows (dK/dV) per block
constexpr int tile = 32;            // keys (or queries) per shared-memory tile

// Shared with the tensor-core block programs: the [B, L, H, D] offset, the dropout factor
// from the CPU's Philox index, and the first key a block of rows may see.
using flash::at;
using flash::block_first_key;
using flash::keep;

template <int D>
__device__ __forceinline__ float dot(const float* a, const float* b) {
  float s = 0;
#pragma unroll
  for (int c = 0; c < D; ++c) s += a[c] * b[c];
  return s;
}
template <class DT, class Mask, int D>
__global__ void attention_forward_kernel(const DT* __restrict__ q, const DT* __restrict__ k, const DT* __restrict__ v,
                                         DT* __restrict__ o, float* __restrict__ lse, attention_dims d,
                                         const Mask mask) {
  __shared__ float ks[tile][D], vs[tile][D];
  const std::int64_t bh = blockIdx.y, b = bh / d.q_heads, h = bh % d.q_heads;
  const std::int64_t g = h / (d.q_heads / d.kv_heads);
  const std::int64_t i0 = static_cast<std::int64_t>(blockIdx.x) * rows_per_block, i = i0 + threadIdx.x;
  const bool active = i < d.q_len;
  const std::int64_t pos = d.q_offset + i;
  float qr[D], acc[D];
  float m = -INFINITY, l = 0;
#pragma unroll
  for (int c = 0; c < D; ++c) {
    qr[c] = active ? detail::to_f32(q[at(b, i, h, d.q_len, d.q_heads, D) + c]) * d.scale : 0.0f;
    acc[c] = 0;
  }
  const std::int64_t last = (i0 + rows_per_block < d.q_len ? i0 + rows_per_block : d.q_len) - 1;
  const std::int64_t j_begin = block_first_key(mask, d.q_offset + i0, d.q_offset + last),
                     j_end = mask.end_key(d.q_offset + last, d.kv_len);
  const std::int64_t row_first = mask.first_key(pos), row_end = mask.end_key(pos, d.kv_len);
  for (std::int64_t j0 = j_begin; j0 < j_end; j0 += tile) {
    for (int e = threadIdx.x; e < tile * D; e += blockDim.x) {
      const int jj = e / D, c = e % D;
      const std::int64_t j = j0 + jj;
      ks[jj][c] = j < d.kv_len ? detail::to_f32(k[at(b, j, g, d.kv_len, d.kv_heads, D) + c]) : 0.0f;
      vs[jj][c] = j < d.kv_len ? detail::to_f32(v[at(b, j, g, d.kv_len, d.kv_heads, D) + c]) : 0.0f;
    }
    __syncthreads();
    if (active) {
      for (int jj = 0; jj < tile; ++jj) {
        const std::int64_t j = j0 + jj;
        if (j < row_first || j >= row_end || !mask.allowed(pos, j)) continue;
        const float s = dot<D>(qr, ks[jj]);
        const float mn = s > m ? s : m;
        const float corr = expf(m - mn), p = expf(s - mn);
        l = l * corr + p;
        const float pv = p * keep(d, b, h, i, j);
#pragma unroll
        for (int c = 0; c < D; ++c) acc[c] = acc[c] * corr + pv * vs[jj][c];
        m = mn;
      }
    }
    __syncthreads();
  }
  if (!active) return;
  const float inv = l > 0 ? 1.0f / l : 0.0f;
#pragma unroll
  for (int c = 0; c < D; ++c) o[at(b, i, h, d.q_len, d.q_heads, D) + c] = detail::from_f32<DT>(acc[c] * inv);
  lse[bh * d.q_len + i] = m + logf(l);
}

// delta[(b·Hq + h)·T + i] = Σ_c dO·O (O as stored, dropout included); both kernel sets'
// backward starts with it.
template <class DT>
__global__ void attention_delta_kernel(const DT* __restrict__ o, const DT* __restrict__ dout, float* __restrict__ delta,
                                       attention_dims d) {
  const std::int64_t rows = d.batch * d.q_heads * d.q_len;
  for (std::int64_t r = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; r < rows;
       r += static_cast<std::int64_t>(gridDim.x) * blockDim.x) {
    const std::int64_t i = r % d.q_len, bh = r / d.q_len, b = bh / d.q_heads, h = bh % d.q_heads;
    const int D = static_cast<int>(d.head_dim);
    const std::int64_t base = at(b, i, h, d.q_len, d.q_heads, D);
    float s = 0;
    for (int c = 0; c < D; ++c) s += detail::to_f32(dout[base + c]) * detail::to_f32(o[base + c]);
    delta[r] = s;
  }
}

template <class DT, class Mask, int D>
__global__ void attention_dq_kernel(const DT* __restrict__ q, const DT* __restrict__ k, const DT* __restrict__ v,
                                    const DT* __restrict__ dout, const float* __restrict__ lse,
                                    const float* __restrict__ delta, DT* __restrict__ dq, attention_dims d,
                                    const Mask mask) {
  __shared__ float ks[tile][D], vs[tile][D];
  const std::int64_t bh = blockIdx.y, b = bh / d.q_heads, h = bh % d.q_heads;
  const std::int64_t g = h / (d.q_heads / d.kv_heads);
  const std::int64_t i0 = static_cast<std::int64_t>(blockIdx.x) * rows_per_block, i = i0 + threadIdx.x;
  const bool active = i < d.q_len;
  const std::int64_t pos = d.q_offset + i;
  float qr[D], gr[D], acc[D];
  const std::int64_t base = at(b, active ? i : 0, h, d.q_len, d.q_heads, D);
#pragma unroll
  for (int c = 0; c < D; ++c) {
    qr[c] = active ? detail::to_f32(q[base + c]) * d.scale : 0.0f;
    gr[c] = active ? detail::to_f32(dout[base + c]) : 0.0f;
    acc[c] = 0;
  }
  const float L = active ? lse[bh * d.q_len + i] : 0.0f, dl = active ? delta[bh * d.q_len + i] : 0.0f;
  const std::int64_t last = (i0 + rows_per_block < d.q_len ? i0 + rows_per_block : d.q_len) - 1;
  const std::int64_t j_begin = block_first_key(mask, d.q_offset + i0, d.q_offset + last),
                     j_end = mask.end_key(d.q_offset + last, d.kv_len);
  const std::int64_t row_first = mask.first_key(pos), row_end = mask.end_key(pos, d.kv_len);
  for (std::int64_t j0 = j_begin; j0 < j_end; j0 += tile) {
    for (int e = threadIdx.x; e < tile * D; e += blockDim.x) {
      const int jj = e / D, c = e % D;
      const std::int64_t j = j0 + jj;
      ks[jj][c] = j < d.kv_len ? detail::to_f32(k[at(b, j, g, d.kv_len, d.kv_heads, D) + c]) : 0.0f;
      vs[jj][c] = j < d.kv_len ? detail::to_f32(v[at(b, j, g, d.kv_len, d.kv_heads, D) + c]) : 0.0f;
    }
    __syncthreads();
    if (active) {
      for (int jj = 0; jj < tile; ++jj) {
        const std::int64_t j = j0 + jj;
        if (j < row_first || j >= row_end || !mask.allowed(pos, j)) continue;
        const float p = expf(dot<D>(qr, ks[jj]) - L);
        const float ds = p * (dot<D>(gr, vs[jj]) * keep(d, b, h, i, j) - dl);
#pragma unroll
        for (int c = 0; c < D; ++c) acc[c] += ds * ks[jj][c];
      }
    }
    __syncthreads();
  }
  if (!active) return;
#pragma unroll
  for (int c = 0; c < D; ++c) dq[base + c] = detail::from_f32<DT>(acc[c] * d.scale);
}

// One thread per key row j of kv head g; the query rows of every query head of the
// group stream through shared memory.
template <class DT, class Mask, int D>
__global__ void attention_dkv_kernel(const DT* __restrict__ q, const DT* __restrict__ k, const DT* __restrict__ v,
                                     const DT* __restrict__ dout, const float* __restrict__ lse,
                                     const float* __restrict__ delta, DT* __restrict__ dk, DT* __restrict__ dv,
                                     attention_dims d, const Mask mask) {
  __shared__ float qs[tile][D], gs[tile][D], ls[tile], dls[tile];
  const std::int64_t bg = blockIdx.y, b = bg / d.kv_heads, g = bg % d.kv_heads;
  const std::int64_t group = d.q_heads / d.kv_heads;
  const std::int64_t j = static_cast<std::int64_t>(blockIdx.x) * rows_per_block + threadIdx.x;
  const bool active = j < d.kv_len;
  const std::int64_t kbase = at(b, active ? j : 0, g, d.kv_len, d.kv_heads, D);
  float kr[D], vr[D], gk[D], gv[D];
#pragma unroll
  for (int c = 0; c < D; ++c) {
    kr[c] = active ? detail::to_f32(k[kbase + c]) : 0.0f;
    vr[c] = active ? detail::to_f32(v[kbase + c]) : 0.0f;
    gk[c] = gv[c] = 0;
  }
  for (std::int64_t hh = 0; hh < group; ++hh) {
    const std::int64_t h = g * group + hh, bh = b * d.q_heads + h;
    for (std::int64_t i0 = 0; i0 < d.q_len; i0 += tile) {
      for (int e = threadIdx.x; e < tile * D; e += blockDim.x) {
        const int ii = e / D, c = e % D;
        const std::int64_t i = i0 + ii;
        const bool in = i < d.q_len;
        qs[ii][c] = in ? detail::to_f32(q[at(b, i, h, d.q_len, d.q_heads, D) + c]) * d.scale : 0.0f;
        gs[ii][c] = in ? detail::to_f32(dout[at(b, i, h, d.q_len, d.q_heads, D) + c]) : 0.0f;
      }
      for (int ii = threadIdx.x; ii < tile; ii += blockDim.x) {
        const std::int64_t i = i0 + ii;
        ls[ii] = i < d.q_len ? lse[bh * d.q_len + i] : 0.0f;
        dls[ii] = i < d.q_len ? delta[bh * d.q_len + i] : 0.0f;
      }
      __syncthreads();
      if (active) {
        for (int ii = 0; ii < tile; ++ii) {
          const std::int64_t i = i0 + ii;
          if (i >= d.q_len) break;
          const std::int64_t pos = d.q_offset + i;
          if (j < mask.first_key(pos) || j >= mask.end_key(pos, d.kv_len) || !mask.allowed(pos, j)) continue;
          const float p = expf(dot<D>(qs[ii], kr) - ls[ii]);
          const float z = keep(d, b, h, i, j);
          const float ds = p * (dot<D>(gs[ii], vr) * z - dls[ii]);
#pragma unroll
          for (int c = 0; c < D; ++c) {
            gv[c] += p * z * gs[ii][c];
            gk[c] += ds * qs[ii][c];  // qs is q·scale: dK = Σ dS·q·scale
          }
        }
      }
      __syncthreads();
    }
  }
  if (!active) return;
#pragma unroll
  for (int c = 0; c < D; ++c) {
    dk[kbase + c] = detail::from_f32<DT>(gk[c]);
    dv[kbase + c] = detail::from_f32<DT>(gv[c]);
  }
}

template <class T, class Mask, int D>
void forward_d(const T* q, const T* k, const T* v, T* o, float* lse, const attention_dims& d, Mask mask,
               cudaStream_t s) {
  const dim3 grid(detail::grid_for(d.q_len, rows_per_block), static_cast<unsigned>(d.batch * d.q_heads));
  attention_forward_kernel<detail::device_t<T>, Mask, D>
      <<<grid, rows_per_block, 0, s>>>(detail::dev(q), detail::dev(k), detail::dev(v), detail::dev(o), lse, d, mask);
}
template <class T, class Mask, int D>
void backward_d(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, T* dq, T* dk,
                T* dv, const attention_dims& d, Mask mask, cudaStream_t s) {
  const dim3 qgrid(detail::grid_for(d.q_len, rows_per_block), static_cast<unsigned>(d.batch * d.q_heads));
  attention_dq_kernel<detail::device_t<T>, Mask, D><<<qgrid, rows_per_block, 0, s>>>(
      detail::dev(q), detail::dev(k), detail::dev(v), detail::dev(dout), lse, delta, detail::dev(dq), d, mask);
  const dim3 kgrid(detail::grid_for(d.kv_len, rows_per_block), static_cast<unsigned>(d.batch * d.kv_heads));
  attention_dkv_kernel<detail::device_t<T>, Mask, D>
      <<<kgrid, rows_per_block, 0, s>>>(detail::dev(q), detail::dev(k), detail::dev(v), detail::dev(dout), lse, delta,
                                        detail::dev(dk), detail::dev(dv), d, mask);
}

// ---- tensor-core kernels (kiln/cuda/flash_tiles.hpp) ------------------------------------------
// A CUDA block as the block programs see it: W warps of 32 threads and a barrier.
struct device_block {
  int tid, nthreads, warp, nwarps, lane, lanes;
  __device__ void sync() const { __syncthreads(); }
  __device__ void warp_sync() const { __syncwarp(); }
  // Butterfly reductions: every lane ends with the same bits (each step is commutative).
  __device__ float warp_max(float x) const {
    for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
  }
  __device__ float warp_sum(float x) const {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
  }
};
__device__ __forceinline__ device_block this_block() {
  const int t = static_cast<int>(threadIdx.x), n = static_cast<int>(blockDim.x);
  return {t, n, t / 32, n / 32, t % 32, 32};
}
constexpr int forward_warps = 4, dq_warps = 4, dkv_warps = 8;

template <int D, class DT, class Mask>
__global__ void __launch_bounds__(forward_warps * 32)
    flash_forward_kernel(const DT* q, const DT* k, const DT* v, DT* o, float* lse, attention_dims d, const Mask mask) {
  extern __shared__ __align__(128) unsigned char smem[];
  flash::forward_block<D, forward_warps>(this_block(), smem, blockIdx.x, blockIdx.y, q, k, v, o, lse, d, mask);
}
template <int D, class DT, class Mask>
__global__ void __launch_bounds__(dq_warps * 32)
    flash_dq_kernel(const DT* q, const DT* k, const DT* v, const DT* dout, const float* lse, const float* delta, DT* dq,
                    attention_dims d, const Mask mask) {
  extern __shared__ __align__(128) unsigned char smem[];
  flash::dq_block<D, dq_warps>(this_block(), smem, blockIdx.x, blockIdx.y, q, k, v, dout, lse, delta, dq, d, mask);
}
template <int D, class DT, class Mask>
__global__ void __launch_bounds__(dkv_warps * 32)
    flash_dkv_kernel(const DT* q, const DT* k, const DT* v, const DT* dout, const float* lse, const float* delta,
                     DT* dk, DT* dv, attention_dims d, const Mask mask) {
  extern __shared__ __align__(128) unsigned char smem[];
  flash::dkv_block<D, dkv_warps>(this_block(), smem, blockIdx.x, blockIdx.y, q, k, v, dout, lse, delta, dk, dv, d,
                                 mask);
}

// The register-resident programs (kiln/cuda/flash_registers.hpp): four warps a block.
template <int D, class DT, class Mask>
__global__ void __launch_bounds__(flash::reg::warps * 32)
    reg_forward_kernel(const DT* q, const DT* k, const DT* v, DT* o, float* lse, attention_dims d, const Mask mask) {
  extern __shared__ __align__(128) unsigned char smem[];
  flash::reg::forward_block<D>(this_block(), smem, blockIdx.x, blockIdx.y, q, k, v, o, lse, d, mask);
}
template <int D, class DT, class Mask>
__global__ void __launch_bounds__(flash::reg::warps * 32)
    reg_dq_kernel(const DT* q, const DT* k, const DT* v, const DT* dout, const float* lse, const float* delta, DT* dq,
                  attention_dims d, const Mask mask) {
  extern __shared__ __align__(128) unsigned char smem[];
  flash::reg::dq_block<D>(this_block(), smem, blockIdx.x, blockIdx.y, q, k, v, dout, lse, delta, dq, d, mask);
}
template <int D, class DT, class Mask>
__global__ void __launch_bounds__(flash::reg::warps * 32)
    reg_dkv_kernel(const DT* q, const DT* k, const DT* v, const DT* dout, const float* lse, const float* delta, DT* dk,
                   DT* dv, attention_dims d, const Mask mask) {
  extern __shared__ __align__(128) unsigned char smem[];
  flash::reg::dkv_block<D>(this_block(), smem, blockIdx.x, blockIdx.y, q, k, v, dout, lse, delta, dk, dv, d, mask);
}

// Raises a kernel's dynamic shared memory limit to `bytes`, once per kernel and device
// (keyed by the kernel itself: the D = 64 and 128 kernels share a function type).
template <auto Kernel>
void allow_shared(int bytes, const char* what) {
  thread_local int done_for = -1;
  int dev = 0;
  detail::check(cudaGetDevice(&dev), what);
  if (done_for == dev) return;
  detail::check(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), what);
  done_for = dev;
}

template <class T>
constexpr bool tensor_core_type = std::is_same_v<T, bf16> || std::is_same_v<T, f16>;
// The shared memory a block may opt into on the current device (163 KB on sm_80, 227 KB on
// sm_90, but 99 KB on sm_86/sm_89, which run the sm_80 build), read once per device.
int max_shared_per_block() {
  constexpr int devices = 64;
  static std::atomic<int> known[devices] = {};
  int dev = 0;
  detail::check(cudaGetDevice(&dev), "attention: cudaGetDevice");
  if (dev >= devices) dev = devices - 1;
  int bytes = known[dev].load(std::memory_order_relaxed);
  if (bytes == 0) {
    detail::check(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev),
                  "attention: cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
    known[dev].store(bytes, std::memory_order_relaxed);
  }
  return bytes;
}
// The tensor-core path takes D 64 or 128, 16-byte aligned buffers (its tile loads move 8
// elements at a time), and a device whose blocks can hold its tiles; otherwise the
// reference kernels run.
template <class Z>
constexpr int most_shared = std::max({Z::forward, Z::dq, Z::dkv});
bool tensor_cores(const attention_dims& d, std::initializer_list<const void*> buffers) {
  if (d.reference_kernels || (d.head_dim != 64 && d.head_dim != 128)) return false;
  for (const void* p : buffers)
    if (reinterpret_cast<std::uintptr_t>(p) % 16 != 0) return false;
  const int need = d.staged_tiles
                       ? (d.head_dim == 64 ? most_shared<flash::sizes<64>> : most_shared<flash::sizes<128>>)
                       : (d.head_dim == 64 ? most_shared<flash::reg::sizes<64>> : most_shared<flash::reg::sizes<128>>);
  return need <= max_shared_per_block();
}

template <class T, class Mask, int D>
void flash_forward(const T* q, const T* k, const T* v, T* o, float* lse, const attention_dims& d, Mask mask,
                   cudaStream_t s) {
  using DT = detail::device_t<T>;
  if (!d.staged_tiles) {
    constexpr int bytes = flash::reg::sizes<D>::forward;
    allow_shared<reg_forward_kernel<D, DT, Mask>>(bytes, "attention forward (registers): shared memory limit");
    const dim3 grid(detail::grid_for(d.q_len, flash::br), static_cast<unsigned>(d.batch * d.q_heads));
    reg_forward_kernel<D, DT, Mask><<<grid, flash::reg::warps * 32, bytes, s>>>(
        detail::dev(q), detail::dev(k), detail::dev(v), detail::dev(o), lse, d, mask);
    return;
  }
  constexpr int bytes = flash::sizes<D>::forward;
  allow_shared<flash_forward_kernel<D, DT, Mask>>(bytes, "attention forward (tensor cores): shared memory limit");
  const dim3 grid(detail::grid_for(d.q_len, flash::br), static_cast<unsigned>(d.batch * d.q_heads));
  flash_forward_kernel<D, DT, Mask><<<grid, forward_warps * 32, bytes, s>>>(
      detail::dev(q), detail::dev(k), detail::dev(v), detail::dev(o), lse, d, mask);
}
template <class T, class Mask, int D>
void flash_backward(const T* q, const T* k, const T* v, const T* dout, const float* lse, const float* delta, T* dq,
                    T* dk, T* dv, const attention_dims& d, Mask mask, cudaStream_t s) {
  using DT = detail::device_t<T>;
  if (!d.staged_tiles) {
    constexpr int dq_bytes = flash::reg::sizes<D>::dq, dkv_bytes = flash::reg::sizes<D>::dkv;
    allow_shared<reg_dq_kernel<D, DT, Mask>>(dq_bytes, "attention dq (registers): shared memory limit");
    allow_shared<reg_dkv_kernel<D, DT, Mask>>(dkv_bytes, "attention dk/dv (registers): shared memory limit");
    const dim3 qgrid(detail::grid_for(d.q_len, flash::br), static_cast<unsigned>(d.batch * d.q_heads));
    reg_dq_kernel<D, DT, Mask><<<qgrid, flash::reg::warps * 32, dq_bytes, s>>>(
        detail::dev(q), detail::dev(k), detail::dev(v), detail::dev(dout), lse, delta, detail::dev(dq), d, mask);
    const dim3 kgrid(detail::grid_for(d.kv_len, flash::bc), static_cast<unsigned>(d.batch * d.kv_heads));
    reg_dkv_kernel<D, DT, Mask><<<kgrid, flash::reg::warps * 32, dkv_bytes, s>>>(
        detail::dev(q), detail::dev(k), detail::dev(v), detail::dev(dout), lse, delta, detail::dev(dk), detail::dev(dv),
        d, mask);
    return;
  }
  constexpr int dq_bytes = flash::sizes<D>::dq, dkv_bytes = flash::sizes<D>::dkv;
  allow_shared<flash_dq_kernel<D, DT, Mask>>(dq_bytes, "attention dq (tensor cores): shared memory limit");
  allow_shared<flash_dkv_kernel<D, DT, Mask>>(dkv_bytes, "attention dk/dv (tensor cores): shared memory limit");
  const dim3 qgrid(detail::grid_for(d.q_len, flash::br), static_cast<unsigned>(d.batch * d.q_heads));
  flash_dq_kernel<D, DT, Mask><<<qgrid, dq_warps * 32, dq_bytes, s>>>(
      detail::dev(q), detail::dev(k), detail::dev(v), detail::dev(dout), lse, delta, detail::dev(dq), d, mask);
  const dim3 kgrid(detail::grid_for(d.kv_len, flash::bc), static_cast<unsigned>(d.batch * d.kv_heads));
  flash_dkv_kernel<D, DT, Mask><<<kgrid, dkv_warps * 32, dkv_bytes, s>>>(detail::dev(q), detail::dev(k), detail::dev(v),
                                                                         detail::dev(dout), lse, delta, detail::dev(dk),
                                                                         detail::dev(dv), d, mask);
}

void check_dims(const attention_dims& d, const char* what) {
  if (d.head_dim != 32 && d.head_dim != 64 && d.head_dim != 128)
    throw error(std::string(what) + ": head dimension " + std::to_string(d.head_dim) +
                " has no kernel (compiled for 32, 64 and 128)");
  if (d.kv_heads <= 0 || d.q_heads % d.kv_heads != 0)
    throw error(std::string(what) + ": " + std::to_string(d.q_heads) + " query heads cannot share " +
                std::to_string(d.kv_heads) + " key/value heads");
}

}  // namespace

template <class T, class Mask>
void attention_forward(const T* q, const T* k, const T* v, T* o, float* lse, const attention_dims& d, stream_t stream,
                       Mask mask) {
  check_dims(d, "attention forward");
  if (d.batch * d.q_heads * d.q_len == 0) return;
  auto s = detail::as_stream(stream);
  if constexpr (tensor_core_type<T>) {
    if (tensor_cores(d, {q, k, v, o})) {
      if (d.head_dim == 64)
        flash_forward<T, Mask, 64>(q, k, v, o, lse, d, mask, s);
      else
        flash_forward<T, Mask, 128>(q, k, v, o, lse, d, mask, s);
      detail::check_launch("attention forward (tensor cores)");
      return;
    }
  }
  if (d.head_dim == 32)
    forward_d<T, Mask, 32>(q, k, v, o, lse, d, mask, s);
  else if (d.head_dim == 64)
    forward_d<T, Mask, 64>(q, k, v, o, lse, d, mask, s);
  else
    forward_d<T, Mask, 128>(q, k, v, o, lse, d, mask, s);
  detail::check_launch("attention forward");
}

template <class T, class Mask>
void attention_backward(const T* q, const T* k, const T* v, const T* o, const T* dout, const float* lse, float* delta,
                        T* dq, T* dk, T* dv, const attention_dims& d, stream_t stream, Mask mask) {
  check_dims(d, "attention backward");
  if (d.batch * d.q_heads * d.q_len == 0) return;
  auto s = detail::as_stream(stream);
  const std::int64_t rows = d.batch * d.q_heads * d.q_len;
  attention_delta_kernel<detail::device_t<T>>
      <<<detail::grid_for(rows, 256), 256, 0, s>>>(detail::dev(o), detail::dev(dout), delta, d);
  if constexpr (tensor_core_type<T>) {
    if (tensor_cores(d, {q, k, v, o, dout, dq, dk, dv})) {
      if (d.head_dim == 64)
        flash_backward<T, Mask, 64>(q, k, v, dout, lse, delta, dq, dk, dv, d, mask, s);
      else
        flash_backward<T, Mask, 128>(q, k, v, dout, lse, delta, dq, dk, dv, d, mask, s);
      detail::check_launch("attention backward (tensor cores)");
      return;
    }
  }
  if (d.head_dim == 32)
    backward_d<T, Mask, 32>(q, k, v, dout, lse, delta, dq, dk, dv, d, mask, s);
  else if (d.head_dim == 64)
    backward_d<T, Mask, 64>(q, k, v, dout, lse, delta, dq, dk, dv, d, mask, s);
  else
    backward_d<T, Mask, 128>(q, k, v, dout, lse, delta, dq, dk, dv, d, mask, s);
  detail::check_launch("attention backward");
}

#define KILN_ATTENTION_INSTANTIATE(T, M)                                                                               \
  template void attention_forward<T, M>(const T*, const T*, const T*, T*, float*, const attention_dims&, stream_t, M); \
  template void attention_backward<T, M>(const T*, const T*, const T*, const T*, const T*, const float*, float*, T*,   \
                                         T*, T*, const attention_dims&, stream_t, M);
#define KILN_ATTENTION_INSTANTIATE_MASKS(T)         \
  KILN_ATTENTION_INSTANTIATE(T, ops::mask::causal)  \
  KILN_ATTENTION_INSTANTIATE(T, ops::mask::none)    \
  KILN_ATTENTION_INSTANTIATE(T, ops::mask::local_n) \
  KILN_ATTENTION_INSTANTIATE(T, ops::mask::strided_n)
KILN_ATTENTION_INSTANTIATE_MASKS(f32)
KILN_ATTENTION_INSTANTIATE_MASKS(bf16)
KILN_ATTENTION_INSTANTIATE_MASKS(f16)
#undef KILN_ATTENTION_INSTANTIATE_MASKS
#undef KILN_ATTENTION_INSTANTIATE

}  // namespace kiln::cuda_kernels
