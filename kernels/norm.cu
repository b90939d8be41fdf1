// kernels/norm.cu — layer_norm and rms_norm forward and backward (kiln/cuda/kernels.hpp).
//
// Forward: one block per row; the row's sum, then its centred sum of squares, each a
// CUB block reduction in fixed order (the row is re-read from cache, not kept in
// shared memory, so any width works). Backward: one block per row for dx (the two row
// means of the classic formula), then the weight and bias gradients as column sums in
// two fixed-order passes — norm_slabs partial sums per column, then their sum — so
// they are deterministic without atomics.
#include "common.cuh"
#include "kiln/cuda/kernels.hpp"

namespace kiln::cuda_kernels {
namespace {

constexpr int block = 256;

template <class D>
__global__ void norm_forward_kernel(const D* __restrict__ x, const D* __restrict__ res, D* __restrict__ res_out,
                                    const D* __restrict__ w, const D* __restrict__ b, D* __restrict__ y,
                                    float* __restrict__ mean, float* __restrict__ rstd, std::int64_t cols, float eps,
                                    bool rms) {
  const std::int64_t r = blockIdx.x;
  const D* xr = x + r * cols;
  const D* rr = res ? res + r * cols : nullptr;
  D* hr = res_out ? res_out + r * cols : nullptr;
  // h as a pre-norm block's unfused add would round it: to D, then back.
  auto h = [&](std::int64_t j) {
    return rr ? detail::to_f32(detail::from_f32<D>(detail::to_f32(xr[j]) + detail::to_f32(rr[j])))
              : detail::to_f32(xr[j]);
  };
  float s = 0;
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float v = h(j);
    if (hr) hr[j] = detail::from_f32<D>(v);
    s += v;
  }
  const float mu = rms ? 0.0f : detail::block_sum<block>(s) / static_cast<float>(cols);
  float q = 0;
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float c = h(j) - mu;
    q += c * c;
  }
  const float rs = 1.0f / sqrtf(detail::block_sum<block>(q) / static_cast<float>(cols) + eps);
  if (threadIdx.x == 0) {
    if (mean) mean[r] = mu;
    rstd[r] = rs;
  }
  D* yr = y + r * cols;
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    float v = (h(j) - mu) * rs;
    if (w) v *= detail::to_f32(w[j]);
    if (b) v += detail::to_f32(b[j]);
    yr[j] = detail::from_f32<D>(v);
  }
}

template <class D>
__global__ void norm_dx_kernel(const D* __restrict__ h, const D* __restrict__ w, const float* __restrict__ mean,
                               const float* __restrict__ rstd, const D* __restrict__ dy, D* __restrict__ dx,
                               bool accumulate, std::int64_t cols, bool rms) {
  const std::int64_t r = blockIdx.x;
  const D *hr = h + r * cols, *gr = dy + r * cols;
  D* dr = dx + r * cols;
  const float mu = rms ? 0.0f : mean[r], rs = rstd[r];
  float a = 0, c = 0;  // Σ dy·w and Σ dy·w·x̂
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float g = detail::to_f32(gr[j]) * (w ? detail::to_f32(w[j]) : 1.0f);
    const float xh = (detail::to_f32(hr[j]) - mu) * rs;
    a += g;
    c += g * xh;
  }
  const float inv = 1.0f / static_cast<float>(cols);
  const float ma = rms ? 0.0f : detail::block_sum<block>(a) * inv;
  const float mc = detail::block_sum<block>(c) * inv;
  for (std::int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const float g = detail::to_f32(gr[j]) * (w ? detail::to_f32(w[j]) : 1.0f);
    const float xh = (detail::to_f32(hr[j]) - mu) * rs;
    float v = rs * (g - ma - xh * mc);
    if (accumulate) v += detail::to_f32(dr[j]);
    dr[j] = detail::from_f32<D>(v);
  }
}

// scratch[s·cols + c] = Σ over slab s's rows of dy·x̂; scratch[(slabs + s)·cols + c] = Σ dy.
template <class D>
__global__ void norm_dw_partial_kernel(const D* __restrict__ h, const float* __restrict__ mean,
                                       const float* __restrict__ rstd, const D* __restrict__ dy,
                                       float* __restrict__ scratch, std::int64_t rows, std::int64_t cols, bool rms) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int s = blockIdx.y;
  if (c >= cols) return;
  const std::int64_t per = (rows + norm_slabs - 1) / norm_slabs;
  const std::int64_t r0 = s * per, r1 = r0 + per < rows ? r0 + per : rows;
  float sw = 0, sb = 0;
  for (std::int64_t r = r0; r < r1; ++r) {
    const float g = detail::to_f32(dy[r * cols + c]);
    const float xh = (detail::to_f32(h[r * cols + c]) - (rms ? 0.0f : mean[r])) * rstd[r];
    sw += g * xh;
    sb += g;
  }
  scratch[static_cast<std::int64_t>(s) * cols + c] = sw;
  scratch[static_cast<std::int64_t>(norm_slabs + s) * cols + c] = sb;
}

__global__ void norm_dw_final_kernel(const float* __restrict__ scratch, float* __restrict__ dw, float* __restrict__ db,
                                     std::int64_t cols) {
  const std::int64_t c = static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  float sw = 0, sb = 0;
  for (int s = 0; s < norm_slabs; ++s) {
    sw += scratch[static_cast<std::int64_t>(s) * cols + c];
    sb += scratch[static_cast<std::int64_t>(norm_slabs + s) * cols + c];
  }
  if (dw) dw[c] = sw;
  if (db) db[c] = sb;
}

}  // namespace

template <class T>
void norm_forward(const T* x, const T* residual, T* residual_out, const T* w, const T* b, T* y, float* mean,
                  float* rstd, std::int64_t rows, std::int64_t cols, float eps, bool rms, stream_t stream) {
  if (rows <= 0) return;
  norm_forward_kernel<<<static_cast<unsigned>(rows), block, 0, detail::as_stream(stream)>>>(
      detail::dev(x), detail::dev(residual), detail::dev(residual_out), detail::dev(w), rms ? nullptr : detail::dev(b),
      detail::dev(y), rms ? nullptr : mean, rstd, cols, eps, rms);
  detail::check_launch(rms ? "rms_norm forward" : "layer_norm forward");
}

template <class T>
void norm_backward(const T* h, const T* w, const float* mean, const float* rstd, const T* dy, T* dx, bool accumulate,
                   float* dw, float* db, float* scratch, std::int64_t rows, std::int64_t cols, bool rms,
                   stream_t stream) {
  if (rows <= 0) return;
  auto s = detail::as_stream(stream);
  if (dx) {
    norm_dx_kernel<<<static_cast<unsigned>(rows), block, 0, s>>>(
        detail::dev(h), detail::dev(w), mean, rstd, detail::dev(dy), detail::dev(dx), accumulate, cols, rms);
    detail::check_launch("norm backward (dx)");
  }
  if (dw || db) {
    const dim3 grid(detail::grid_for(cols, block), norm_slabs);
    norm_dw_partial_kernel<<<grid, block, 0, s>>>(detail::dev(h), mean, rstd, detail::dev(dy), scratch, rows, cols,
                                                  rms);
    norm_dw_final_kernel<<<detail::grid_for(cols, block), block, 0, s>>>(scratch, dw, rms ? nullptr : db, cols);
    detail::check_launch("norm backward (dw, db)");
  }
}

#define KILN_NORM_INSTANTIATE(T)                                                                                     \
  template void norm_forward<T>(const T*, const T*, T*, const T*, const T*, T*, float*, float*, std::int64_t,        \
                                std::int64_t, float, bool, stream_t);                                                \
  template void norm_backward<T>(const T*, const T*, const float*, const float*, const T*, T*, bool, float*, float*, \
                                 float*, std::int64_t, std::int64_t, bool, stream_t);
KILN_NORM_INSTANTIATE(f32)
KILN_NORM_INSTANTIATE(bf16)
KILN_NORM_INSTANTIATE(f16)
#undef KILN_NORM_INSTANTIATE

}  // namespace kiln::cuda_kernels
