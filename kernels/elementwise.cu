// kernels/elementwise.cu — GELU, SwiGLU, RoPE, dropout and the embedding gradient
// (kiln/cuda/kernels.hpp): grid-stride loops over the shared scalar functors.
#include "common.cuh"
#include "kiln/cuda/kernels.hpp"

namespace kiln::cuda_kernels {
namespace {

constexpr int block = 256;

template <class D>
__global__ void gelu_forward_kernel(const D* __restrict__ x, D* __restrict__ y, std::int64_t n) {
  KILN_GRID_STRIDE(i, n) y[i] = detail::from_f32<D>(ops::fn::gelu_tanh{}(detail::to_f32(x[i])));
}
template <class D>
__global__ void gelu_backward_kernel(const D* __restrict__ x, const D* __restrict__ dy, D* __restrict__ dx,
                                     std::int64_t n) {
  KILN_GRID_STRIDE(i, n)
  dx[i] = detail::from_f32<D>(ops::fn::gelu_tanh{}.grad(detail::to_f32(x[i]), detail::to_f32(dy[i])));
}
template <class D>
__global__ void swiglu_forward_kernel(const D* __restrict__ gate, const D* __restrict__ up, D* __restrict__ y,
                                      std::int64_t n) {
  KILN_GRID_STRIDE(i, n)
  y[i] = detail::from_f32<D>(ops::fn::silu{}(detail::to_f32(gate[i])) * detail::to_f32(up[i]));
}
template <class D>
__global__ void swiglu_backward_kernel(const D* __restrict__ gate, const D* __restrict__ up, const D* __restrict__ dy,
                                       D* __restrict__ dgate, D* __restrict__ dup, std::int64_t n) {
  KILN_GRID_STRIDE(i, n) {
    const float g = detail::to_f32(gate[i]), d = detail::to_f32(dy[i]);
    if (dgate) dgate[i] = detail::from_f32<D>(ops::fn::silu{}.grad(g, d * detail::to_f32(up[i])));
    if (dup) dup[i] = detail::from_f32<D>(ops::fn::silu{}(g)*d);
  }
}
// One thread per rotated pair (b, t, h, c < D/2).
template <class D>
__global__ void rope_kernel(const D* __restrict__ x, D* __restrict__ y, std::int64_t pairs, std::int64_t len,
                            std::int64_t heads, std::int64_t dim, std::int64_t first, float theta, bool backward) {
  const std::int64_t half = dim / 2;
  KILN_GRID_STRIDE(i, pairs) {
    const std::int64_t c = i % half, row = i / half;  // row = (b·T + t)·H + h
    const std::int64_t t = (row / heads) % len;
    const float angle = static_cast<float>(first + t) * ops::fn::rope_inv_freq(c, dim, theta);
    const float co = cosf(angle), si = sinf(angle);
    const std::int64_t base = row * dim;
    const float a = detail::to_f32(x[base + c]), b = detail::to_f32(x[base + c + half]);
    float o1, o2;
    if (backward)
      ops::fn::rope_rotate::backward(a, b, co, si, o1, o2);
    else
      ops::fn::rope_rotate::forward(a, b, co, si, o1, o2);
    y[base + c] = detail::from_f32<D>(o1);
    y[base + c + half] = detail::from_f32<D>(o2);
  }
}
template <class D>
__global__ void dropout_kernel(const D* __restrict__ x, D* __restrict__ y, std::int64_t n, float p, philox_stream rng) {
  const float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
  KILN_GRID_STRIDE(i, n) {
    const bool keep = rng.uniform(static_cast<std::uint64_t>(i)) >= p;
    y[i] = detail::from_f32<D>(keep ? detail::to_f32(x[i]) * scale : 0.0f);
  }
}
template <class D>
__global__ void embedding_backward_kernel(const std::int64_t* __restrict__ tokens, const D* __restrict__ dy,
                                          float* __restrict__ dw, std::int64_t n, std::int64_t cols) {
  KILN_GRID_STRIDE(i, n * cols) {
    const std::int64_t row = i / cols, c = i % cols;
    atomicAdd(dw + tokens[row] * cols + c, detail::to_f32(dy[i]));
  }
}
#undef KILN_GRID_STRIDE

}  // namespace

template <class T>
void gelu_forward(const T* x, T* y, std::int64_t n, stream_t stream) {
  if (n <= 0) return;
  gelu_forward_kernel<<<detail::grid_for(n, block), block, 0, detail::as_stream(stream)>>>(detail::dev(x),
                                                                                           detail::dev(y), n);
  detail::check_launch("gelu forward");
}
template <class T>
void gelu_backward(const T* x, const T* dy, T* dx, std::int64_t n, stream_t stream) {
  if (n <= 0) return;
  gelu_backward_kernel<<<detail::grid_for(n, block), block, 0, detail::as_stream(stream)>>>(
      detail::dev(x), detail::dev(dy), detail::dev(dx), n);
  detail::check_launch("gelu backward");
}
template <class T>
void swiglu_forward(const T* gate, const T* up, T* y, std::int64_t n, stream_t stream) {
  if (n <= 0) return;
  swiglu_forward_kernel<<<detail::grid_for(n, block), block, 0, detail::as_stream(stream)>>>(
      detail::dev(gate), detail::dev(up), detail::dev(y), n);
  detail::check_launch("swiglu forward");
}
template <class T>
void swiglu_backward(const T* gate, const T* up, const T* dy, T* dgate, T* dup, std::int64_t n, stream_t stream) {
  if (n <= 0) return;
  swiglu_backward_kernel<<<detail::grid_for(n, block), block, 0, detail::as_stream(stream)>>>(
      detail::dev(gate), detail::dev(up), detail::dev(dy), detail::dev(dgate), detail::dev(dup), n);
  detail::check_launch("swiglu backward");
}
template <class T>
void rope(const T* x, T* y, std::int64_t batch, std::int64_t len, std::int64_t heads, std::int64_t dim,
          std::int64_t first, float theta, bool backward, stream_t stream) {
  const std::int64_t pairs = batch * len * heads * (dim / 2);
  if (pairs <= 0) return;
  rope_kernel<<<detail::grid_for(pairs, block), block, 0, detail::as_stream(stream)>>>(
      detail::dev(x), detail::dev(y), pairs, len, heads, dim, first, theta, backward);
  detail::check_launch("rope");
}
template <class T>
void dropout(const T* x, T* y, std::int64_t n, float p, philox_stream rng, stream_t stream) {
  if (n <= 0) return;
  dropout_kernel<<<detail::grid_for(n, block), block, 0, detail::as_stream(stream)>>>(detail::dev(x), detail::dev(y), n,
                                                                                      p, rng);
  detail::check_launch("dropout");
}
template <class T>
void embedding_backward(const std::int64_t* tokens, const T* dy, float* dw, std::int64_t n, std::int64_t cols,
                        stream_t stream) {
  if (n <= 0 || cols <= 0) return;
  embedding_backward_kernel<<<detail::grid_for(n * cols, block), block, 0, detail::as_stream(stream)>>>(
      tokens, detail::dev(dy), dw, n, cols);
  detail::check_launch("embedding backward");
}

#define KILN_ELEMENTWISE_INSTANTIATE(T)                                                                            \
  template void gelu_forward<T>(const T*, T*, std::int64_t, stream_t);                                             \
  template void gelu_backward<T>(const T*, const T*, T*, std::int64_t, stream_t);                                  \
  template void swiglu_forward<T>(const T*, const T*, T*, std::int64_t, stream_t);                                 \
  template void swiglu_backward<T>(const T*, const T*, const T*, T*, T*, std::int64_t, stream_t);                  \
  template void rope<T>(const T*, T*, std::int64_t, std::int64_t, std::int64_t, std::int64_t, std::int64_t, float, \
                        bool, stream_t);                                                                           \
  template void dropout<T>(const T*, T*, std::int64_t, float, philox_stream, stream_t);                            \
  template void embedding_backward<T>(const std::int64_t*, const T*, float*, std::int64_t, std::int64_t, stream_t);
KILN_ELEMENTWISE_INSTANTIATE(f32)
KILN_ELEMENTWISE_INSTANTIATE(bf16)
KILN_ELEMENTWISE_INSTANTIATE(f16)
#undef KILN_ELEMENTWISE_INSTANTIATE

}  // namespace kiln::cuda_kernels
