// kernels/ops_reduce.cu — the device side of kiln's reductions (spec in
// kiln/cuda/ops.hpp): sum and mean over one dimension or all, max over one dimension,
// softmax and log-softmax over rows, and gradient clipping's sum of squares. Every sum
// runs in a fixed order: results are deterministic run to run.
#define KILN_WITH_CUDA 1

#include "ops_common.cuh"

namespace kiln::ops::gpu {
using namespace detail;

namespace {

// ---- sum / mean over one dimension (or all) ---------------------------------------------
// g.inner == 1: a block per output row, each thread summing k = t, t + block, .. in order,
// then CUB's fixed tree over the block.
template <class D>
__global__ void sum_rows_kernel(const D* __restrict__ x, D* __restrict__ out, std::int64_t outer, std::int64_t n,
                                float scale) {
  for (std::int64_t o = blockIdx.x; o < outer; o += gridDim.x) {
    float s = 0.0f;
    for (std::int64_t k = threadIdx.x; k < n; k += block) s += to_f32(x[o * n + k]);
    const float total = cuda_kernels::detail::block_sum<block>(s);
    if (threadIdx.x == 0) out[o] = from_f32<D>(total * scale);
  }
}
template <class D>
__global__ void sum_strided_kernel(const D* __restrict__ x, D* __restrict__ out, std::int64_t outer, std::int64_t n,
                                   std::int64_t inner, float scale) {
  KILN_GRID_STRIDE(t, outer * inner) {
    const std::int64_t o = t / inner, i = t % inner;
    float s = 0.0f;
    for (std::int64_t k = 0; k < n; ++k) s += to_f32(x[(o * n + k) * inner + i]);
    out[t] = from_f32<D>(s * scale);
  }
}
template <class D>
__global__ void sum_backward_kernel(const D* __restrict__ gy, D* __restrict__ gx, std::int64_t total, std::int64_t n,
                                    std::int64_t inner, float scale, grad_write mode) {
  KILN_GRID_STRIDE(t, total) {
    const std::int64_t o = t / (n * inner), i = t % inner;
    store(gx[t], to_f32(gy[o * inner + i]) * scale, mode);
  }
}

// ---- whole-tensor sums (sum/mean of everything; Σ x² for gradient clipping) -------------
// 256 blocks' fixed-order partial sums in Acc, then one block over them, whose result goes
// to `finish` — deterministic, and spread over the device rather than one SM.
constexpr int partial_blocks = 256;
template <class Acc, bool Square, class D>
__global__ void partial_sums_kernel(const D* __restrict__ x, std::int64_t n, Acc* __restrict__ partial) {
  Acc s = 0;
  KILN_GRID_STRIDE(i, n) {
    const Acc v = to_f32(x[i]);
    s += Square ? v * v : v;
  }
  using reduce = cub::BlockReduce<Acc, block>;
  __shared__ typename reduce::TempStorage tmp;
  const Acc total = reduce(tmp).Sum(s);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}
template <class Acc, class Finish>
__global__ void total_sum_kernel(const Acc* __restrict__ partial, Finish finish) {
  Acc s = 0;
  for (int i = threadIdx.x; i < partial_blocks; i += block) s += partial[i];
  using reduce = cub::BlockReduce<Acc, block>;
  __shared__ typename reduce::TempStorage tmp;
  const Acc total = reduce(tmp).Sum(s);
  if (threadIdx.x == 0) finish(total);
}
template <class D>
struct store_scaled {  // *out = Σ · scale (sum, mean)
  D* out;
  float scale;
  __device__ void operator()(float total) const { *out = from_f32<D>(total * scale); }
};
struct add_to {  // *acc += Σ (the gradient norm's running sum over tensors)
  double* acc;
  __device__ void operator()(double total) const { *acc += total; }
};
template <class Acc, bool Square, class D, class Finish>
void whole_sum(const D* x, std::int64_t n, Finish finish) {
  dtensor<Acc> partial(shape{partial_blocks});
  partial_sums_kernel<Acc, Square><<<partial_blocks, block, 0, stream()>>>(x, n, partial.data());
  total_sum_kernel<<<1, block, 0, stream()>>>(partial.data(), finish);
}

// ---- softmax over rows: a block per row ----------------------------------------------------
template <class D>
__global__ void softmax_forward_kernel(const D* __restrict__ x, D* __restrict__ y, std::int64_t rows, std::int64_t cols,
                                       bool log) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const D* xr = x + r * cols;
    D* yr = y + r * cols;
    float mx = -INFINITY;
    for (std::int64_t c = threadIdx.x; c < cols; c += block) mx = fmaxf(mx, to_f32(xr[c]));
    mx = cuda_kernels::detail::block_max<block>(mx);
    float s = 0.0f;
    for (std::int64_t c = threadIdx.x; c < cols; c += block) s += expf(to_f32(xr[c]) - mx);
    s = cuda_kernels::detail::block_sum<block>(s);
    const float lse = mx + logf(s), inv = 1.0f / s;
    for (std::int64_t c = threadIdx.x; c < cols; c += block) {
      const float v = to_f32(xr[c]);
      yr[c] = from_f32<D>(log ? v - lse : expf(v - mx) * inv);
    }
  }
}
// softmax: gx = y·(gy − Σ gy·y); log-softmax: gx = gy − exp(y)·Σ gy.
template <class D>
__global__ void softmax_backward_kernel(const D* __restrict__ y, const D* __restrict__ gy, D* __restrict__ gx,
                                        std::int64_t rows, std::int64_t cols, bool log, grad_write mode) {
  for (std::int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const D *yr = y + r * cols, *gr = gy + r * cols;
    D* out = gx + r * cols;
    float s = 0.0f;
    for (std::int64_t c = threadIdx.x; c < cols; c += block) s += log ? to_f32(gr[c]) : to_f32(gr[c]) * to_f32(yr[c]);
    s = cuda_kernels::detail::block_sum<block>(s);
    for (std::int64_t c = threadIdx.x; c < cols; c += block) {
      const float yv = to_f32(yr[c]), g = to_f32(gr[c]);
      store(out[c], log ? g - expf(yv) * s : yv * (g - s), mode);
    }
  }
}

// ---- max over one dimension, and its backward to the argmax ------------------------------
template <class D>
__global__ void max_dim_kernel(const D* __restrict__ x, D* __restrict__ out, std::int64_t* __restrict__ arg,
                               std::int64_t outer, std::int64_t n, std::int64_t inner) {
  KILN_GRID_STRIDE(t, outer * inner) {
    const std::int64_t o = t / inner, i = t % inner;
    float best = -INFINITY;
    std::int64_t bk = 0;
    for (std::int64_t k = 0; k < n; ++k) {
      const float v = to_f32(x[(o * n + k) * inner + i]);
      if (k == 0 || v > best) {
        best = v;
        bk = k;
      }
    }
    out[t] = from_f32<D>(best);
    arg[t] = bk;
  }
}
template <class D>
__global__ void max_backward_kernel(const D* __restrict__ gy, const std::int64_t* __restrict__ arg, D* __restrict__ gx,
                                    std::int64_t total, std::int64_t n, std::int64_t inner, grad_write mode) {
  KILN_GRID_STRIDE(e, total) {
    const std::int64_t o = e / (n * inner), k = (e / inner) % n, i = e % inner, j = o * inner + i;
    store(gx[e], arg[j] == k ? to_f32(gy[j]) : 0.0f, mode);
  }
}

}  // namespace

template <class T>
void sum_dim(const dtensor<T>& x, cpu::reduce_geometry g, float scale_by, dtensor<T>& out) {
  if (g.outer * g.inner == 0) return;
  if (g.outer == 1 && g.inner == 1)
    whole_sum<float, false>(dev(x.data()), g.n, store_scaled<device_t<T>>{dev(out.data()), scale_by});
  else if (g.inner == 1)
    sum_rows_kernel<<<grid_for(g.outer * block, block), block, 0, stream()>>>(dev(x.data()), dev(out.data()), g.outer,
                                                                              g.n, scale_by);
  else
    sum_strided_kernel<<<grid_for(g.outer * g.inner, block), block, 0, stream()>>>(dev(x.data()), dev(out.data()),
                                                                                   g.outer, g.n, g.inner, scale_by);
  check_launch("sum");
}
template <class T>
void sum_dim_backward(const dtensor<T>& gy, cpu::reduce_geometry g, float scale_by, dtensor<T>& gx, grad_write mode) {
  const std::int64_t total = g.outer * g.n * g.inner;
  if (!total) return;
  sum_backward_kernel<<<grid_for(total, block), block, 0, stream()>>>(dev(gy.data()), dev(gx.data()), total, g.n,
                                                                      g.inner, scale_by, mode);
  check_launch("sum backward");
}

template <class T>
void max_dim(const dtensor<T>& x, cpu::reduce_geometry g, dtensor<T>& out, dtensor<std::int64_t>& arg) {
  const std::int64_t m = g.outer * g.inner;
  if (!m) return;
  max_dim_kernel<<<grid_for(m, block), block, 0, stream()>>>(dev(x.data()), dev(out.data()), arg.data(), g.outer, g.n,
                                                             g.inner);
  check_launch("max");
}
template <class T>
void max_dim_backward(const dtensor<T>& gy, cpu::reduce_geometry g, const dtensor<std::int64_t>& arg, dtensor<T>& gx,
                      grad_write mode) {
  const std::int64_t total = g.outer * g.n * g.inner;
  if (!total) return;
  max_backward_kernel<<<grid_for(total, block), block, 0, stream()>>>(dev(gy.data()), arg.data(), dev(gx.data()), total,
                                                                      g.n, g.inner, mode);
  check_launch("max backward");
}

template <class T>
void add_sum_squares(const dtensor<T>& x, dtensor<double>& acc) {
  const std::int64_t n = x.numel();
  if (!n) return;
  whole_sum<double, true>(dev(x.data()), n, add_to{acc.data()});
  check_launch("gradient sum of squares");
}

template <class T>
void softmax_forward(const dtensor<T>& x, dtensor<T>& y, bool log) {
  const std::int64_t cols = x.shape().back(), rows = x.shape().rows();
  if (!rows || !cols) return;
  softmax_forward_kernel<<<grid_for(rows * block, block), block, 0, stream()>>>(dev(x.data()), dev(y.data()), rows,
                                                                                cols, log);
  check_launch("softmax forward");
}
template <class T>
void softmax_backward(const dtensor<T>& y, const dtensor<T>& gy, dtensor<T>& gx, bool log, grad_write mode) {
  const std::int64_t cols = y.shape().back(), rows = y.shape().rows();
  if (!rows || !cols) return;
  softmax_backward_kernel<<<grid_for(rows * block, block), block, 0, stream()>>>(dev(y.data()), dev(gy.data()),
                                                                                 dev(gx.data()), rows, cols, log, mode);
  check_launch("softmax backward");
}

// ---- explicit instantiations -------------------------------------------------------------
#define KILN_GPU_REDUCE(T)                                                                                    \
  template void sum_dim<T>(const dtensor<T>&, cpu::reduce_geometry, float, dtensor<T>&);                      \
  template void sum_dim_backward<T>(const dtensor<T>&, cpu::reduce_geometry, float, dtensor<T>&, grad_write); \
  template void max_dim<T>(const dtensor<T>&, cpu::reduce_geometry, dtensor<T>&, dtensor<std::int64_t>&);     \
  template void max_dim_backward<T>(const dtensor<T>&, cpu::reduce_geometry, const dtensor<std::int64_t>&,    \
                                    dtensor<T>&, grad_write);                                                 \
  template void add_sum_squares<T>(const dtensor<T>&, dtensor<double>&);                                      \
  template void softmax_forward<T>(const dtensor<T>&, dtensor<T>&, bool);                                     \
  template void softmax_backward<T>(const dtensor<T>&, const dtensor<T>&, dtensor<T>&, bool, grad_write);
KILN_GPU_REDUCE(f32)
KILN_GPU_REDUCE(bf16)
KILN_GPU_REDUCE(f16)

}  // namespace kiln::ops::gpu
