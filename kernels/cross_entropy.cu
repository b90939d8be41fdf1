// kernels/cross_entropy.cu — softmax cross-entropy that never materialises the
// probabilities (kiln/cuda/kernels.hpp).
//
// One block per row. Pass 1 reads the row once, each thread keeping an online
// (max, Σ exp(x − max)) over its strided elements (Milakov & Gimelshein 2018); the
// block combines them (max, then the rescaled sums) into logsumexp. Pass 2, only when a
// gradient is asked for, writes (exp(x − lse) − onehot)·scale over the row, in place if
// dlogits aliases logits. Label smoothing ε (PyTorch's) adds ε·(lse − mean(row)) to the
// loss, from a sum of the row kept in pass 1, and ε/vocab to every target probability.
// Memory: the logits and their gradient, nothing [rows, vocab] besides. A target outside [0, vocab) that is not
// ignore_index gives a NaN loss (a kernel cannot throw; the trainer's finite check names it).
#include <cmath>

#include "common.cuh"
#include "kiln/cuda/kernels.hpp"

namespace kiln::cuda_kernels {
namespace {

constexpr int block = 256;

template <class D>
__global__ void cross_entropy_kernel(const D* logits, const std::int64_t* __restrict__ targets,
                                     float* __restrict__ loss, D* dlogits, float scale, std::int64_t vocab,
                                     std::int64_t ignore_index, float eps) {
  const std::int64_t r = blockIdx.x;
  const D* xr = logits + r * vocab;
  const std::int64_t t = targets[r];
  const bool ignored = t == ignore_index;
  const bool valid = !ignored && t >= 0 && t < vocab;
  // Read before pass 2 can overwrite it (the reductions below synchronise the block).
  const float xt = valid ? detail::to_f32(xr[t]) : 0.0f;
  float m = -INFINITY, s = 0, sum_x = 0;
  for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float v = detail::to_f32(xr[j]);
    sum_x += v;                    // only the smoothing term reads it (a masked −inf logit makes it −inf)
    if (v == -INFINITY) continue;  // a masked logit adds nothing (and would make exp(−inf + inf))
    if (v > m) {
      s = s * expf(m - v) + 1.0f;
      m = v;
    } else {
      s += expf(v - m);
    }
  }
  const float M = detail::block_max<block>(m);
  const float S = detail::block_sum<block>(m == -INFINITY ? 0.0f : s * expf(m - M));
  const float lse = M + logf(S);
  const float row_sum = eps != 0.0f ? detail::block_sum<block>(sum_x) : 0.0f;
  if (threadIdx.x == 0) {
    const float smooth = eps != 0.0f ? eps * (lse - row_sum / float(vocab)) : 0.0f;
    loss[r] = ignored ? 0.0f : valid ? (1.0f - eps) * (lse - xt) + smooth : NAN;
  }
  if (!dlogits) return;
  D* gr = dlogits + r * vocab;
  for (std::int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    const float p = ignored ? 0.0f : expf(detail::to_f32(xr[j]) - lse);
    const float q = (j == t ? 1.0f - eps : 0.0f) + eps / float(vocab);
    const float g = ignored ? 0.0f : (p - q) * scale;
    gr[j] = detail::from_f32<D>(g);
  }
}

}  // namespace

template <class T>
void cross_entropy(const T* logits, const std::int64_t* targets, float* loss, T* dlogits, float grad_scale,
                   std::int64_t rows, std::int64_t vocab, std::int64_t ignore_index, stream_t stream,
                   float label_smoothing) {
  if (rows <= 0) return;
  cross_entropy_kernel<<<static_cast<unsigned>(rows), block, 0, detail::as_stream(stream)>>>(
      detail::dev(logits), targets, loss, detail::dev(dlogits), grad_scale, vocab, ignore_index, label_smoothing);
  detail::check_launch("cross_entropy");
}

template void cross_entropy<f32>(const f32*, const std::int64_t*, float*, f32*, float, std::int64_t, std::int64_t,
                                 std::int64_t, stream_t, float);
template void cross_entropy<bf16>(const bf16*, const std::int64_t*, float*, bf16*, float, std::int64_t, std::int64_t,
                                  std::int64_t, stream_t, float);
template void cross_entropy<f16>(const f16*, const std::int64_t*, float*, f16*, float, std::int64_t, std::int64_t,
                                 std::int64_t, stream_t, float);

}  // namespace kiln::cuda_kernels
