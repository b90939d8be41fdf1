// kernels/ops_common.cuh — what the kernels/ops_*.cu files (the device side of kiln's
// ops, spec in kiln/cuda/ops.hpp) share: the launch block size, kiln's compute stream, a
// store under a gradient's write mode, and mode_target for kernels that only overwrite.
#pragma once

#ifndef KILN_WITH_CUDA
#error "kernels/ops_*.cu define KILN_WITH_CUDA before any include; ops_common.cuh needs it"
#endif

#include <cstdint>

#include "common.cuh"
#include "kiln/core/cuda_runtime.hpp"
#include "kiln/cuda/kernels.hpp"
#include "kiln/cuda/ops.hpp"

namespace kiln::ops::gpu::detail {

using cuda_kernels::detail::check_launch;
using cuda_kernels::detail::dev;
using cuda_kernels::detail::device_t;
using cuda_kernels::detail::from_f32;
using cuda_kernels::detail::grid_for;
using cuda_kernels::detail::to_f32;

inline constexpr int block = 256;
inline cudaStream_t stream() { return static_cast<cudaStream_t>(cuda_runtime::compute_stream()); }

template <class D>
__device__ __forceinline__ void store(D& dst, float v, grad_write mode) {
  dst = from_f32<D>(mode == grad_write::accumulate ? to_f32(dst) + v : v);
}

// A kernel that overwrites its output, under a gradient's mode: straight into g when
// overwriting (or a null g: not wanted), through scratch added into g when accumulating.
template <class T>
struct mode_target {
  dtensor<T>* g;
  grad_write mode;
  dtensor<T> scratch;
  mode_target(dtensor<T>* g_, grad_write m, const shape& s) : g(g_), mode(m) {
    if (g && mode == grad_write::accumulate) scratch = dtensor<T>(s);
  }
  T* ptr() { return !g ? nullptr : mode == grad_write::accumulate ? scratch.data() : g->data(); }
  void finish() {
    if (g && mode == grad_write::accumulate) scale(scratch, 1.0f, *g, grad_write::accumulate);
  }
};

}  // namespace kiln::ops::gpu::detail
