// kernels/adamw.cu — fused multi-tensor AdamW, and mixed precision's gradient fold
// (kiln/cuda/kernels.hpp).
//
// One block per chunk of at most adamw_chunk_elements elements of one tensor; each
// thread strides through its chunk, reading p, g, m, v once and writing p, m, v (and the
// rounded compute copy) once: the whole step is one pass over 4 (5) arrays, which is
// what the bandwidth benchmark measures against a device copy.
#include "common.cuh"
#include "kiln/cuda/kernels.hpp"

namespace kiln::cuda_kernels {
namespace {

template <class P, class Copy>
__global__ void adamw_kernel(const adamw_chunk* __restrict__ chunks, const adamw_group* __restrict__ groups) {
  using DP = detail::device_t<P>;
  const adamw_chunk c = chunks[blockIdx.x];
  const adamw_group grp = groups[c.group];
  const auto u = grp.update;
  DP* __restrict__ p = static_cast<DP*>(c.p);
  const DP* __restrict__ g = static_cast<const DP*>(c.g);
  DP* __restrict__ m = static_cast<DP*>(c.m);
  DP* __restrict__ v = static_cast<DP*>(c.v);
  for (std::int64_t i = threadIdx.x; i < c.n; i += blockDim.x) {
    float pi = detail::to_f32(p[i]), mi = detail::to_f32(m[i]), vi = detail::to_f32(v[i]);
    u(pi, detail::to_f32(g[i]), mi, vi);
    if constexpr (std::is_same_v<P, bf16>) {
      if (grp.stochastic) {
        const std::uint16_t bits =
            ops::fn::bf16_bits_stochastic(pi, grp.sr.bits(static_cast<std::uint64_t>(c.first + i)));
        p[i] = __ushort_as_bfloat16(bits);
      } else {
        p[i] = detail::from_f32<DP>(pi);
      }
    } else {
      p[i] = detail::from_f32<DP>(pi);
    }
    m[i] = detail::from_f32<DP>(mi);
    v[i] = detail::from_f32<DP>(vi);
    if constexpr (!std::is_void_v<Copy>) {
      using DC = detail::device_t<Copy>;
      if (c.copy == nullptr) continue;
      if constexpr (std::is_same_v<Copy, bf16>) {
        if (grp.copy_stochastic) {
          const std::uint16_t bits =
              ops::fn::bf16_bits_stochastic(pi, grp.copy_sr.bits(static_cast<std::uint64_t>(c.copy_first + i)));
          static_cast<DC*>(c.copy)[i] = __ushort_as_bfloat16(bits);
          continue;
        }
      }
      static_cast<DC*>(c.copy)[i] = detail::from_f32<DC>(pi);
    }
  }
}

template <class Half>
__global__ void fold_kernel(const fold_chunk* __restrict__ chunks) {
  using DH = detail::device_t<Half>;
  const fold_chunk c = chunks[blockIdx.x];
  const DH* __restrict__ g = static_cast<const DH*>(c.g);
  float* __restrict__ mg = c.master_grad;
  if (c.accumulate) {
    for (std::int64_t i = threadIdx.x; i < c.n; i += blockDim.x) mg[i] = mg[i] + detail::to_f32(g[i]);
  } else {
    for (std::int64_t i = threadIdx.x; i < c.n; i += blockDim.x) mg[i] = detail::to_f32(g[i]);
  }
}

}  // namespace

template <class Half>
void fold_gradients(const fold_chunk* chunks, int num_chunks, stream_t stream) {
  if (num_chunks <= 0) return;
  fold_kernel<Half><<<static_cast<unsigned>(num_chunks), 512, 0, detail::as_stream(stream)>>>(chunks);
  detail::check_launch("fold_gradients");
}
template void fold_gradients<bf16>(const fold_chunk*, int, stream_t);
template void fold_gradients<f16>(const fold_chunk*, int, stream_t);

template <class P, class Copy>
void adamw_step(const adamw_chunk* chunks, int num_chunks, const adamw_group* groups, stream_t stream) {
  if (num_chunks <= 0) return;
  adamw_kernel<P, Copy><<<static_cast<unsigned>(num_chunks), 512, 0, detail::as_stream(stream)>>>(chunks, groups);
  detail::check_launch("adamw_step");
}

// The configurations the precision policies compose: fp32; f32 masters with a bf16 or
// f16 compute copy (bf16_mixed, f16_mixed); bf16 and f16 parameters (the _true policies).
template void adamw_step<f32, void>(const adamw_chunk*, int, const adamw_group*, stream_t);
template void adamw_step<f32, bf16>(const adamw_chunk*, int, const adamw_group*, stream_t);
template void adamw_step<f32, f16>(const adamw_chunk*, int, const adamw_group*, stream_t);
template void adamw_step<bf16, void>(const adamw_chunk*, int, const adamw_group*, stream_t);
template void adamw_step<f16, void>(const adamw_chunk*, int, const adamw_group*, stream_t);

}  // namespace kiln::cuda_kernels
