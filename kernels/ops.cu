// kernels/ops.cu — the device side of kiln's ops (spec in kiln/cuda/ops.hpp): element-wise
// functors, broadcasting binary ops and their reductions, scaling, linear on cuBLASLt,
// and the fused cross-entropy's loss reduction.
#define KILN_WITH_CUDA 1

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "common.cuh"
#include "kiln/core/cuda_runtime.hpp"
#include "kiln/cuda/blas.hpp"
#include "kiln/cuda/kernels.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/kernel/attention_mask.hpp"

#include <cub/device/device_radix_sort.cuh>

namespace kiln::ops::gpu {
namespace {

using cuda_kernels::detail::check_launch;
using cuda_kernels::detail::dev;
using cuda_kernels::detail::device_t;
using cuda_kernels::detail::from_f32;
using cuda_kernels::detail::grid_for;
using cuda_kernels::detail::to_f32;

constexpr int block = 256;
cudaStream_t stream() { return static_cast<cudaStream_t>(cuda_runtime::compute_stream()); }

template <class D>
__device__ __forceinline__ void store(D& dst, float v, grad_write mode) {
  dst = from_f32<D>(mode == grad_write::accumulate ? to_f32(dst) + v : v);
}

// ---- element-wise functors -------------------------------------------------------------
template <class F, class D>
__global__ void unary_forward_kernel(F f, const D* __restrict__ x, D* __restrict__ y, std::int64_t n) {
  KILN_GRID_STRIDE(i, n)
  y[i] = from_f32<D>(f(to_f32(x[i])));
}
template <class F, class D>
__global__ void unary_backward_kernel(F f, const D* __restrict__ x, const D* __restrict__ gy, D* __restrict__ gx,
                                      std::int64_t n, grad_write mode) {
  KILN_GRID_STRIDE(i, n)
  store(gx[i], f.grad(to_f32(x[i]), to_f32(gy[i])), mode);
}
template <class D>
__global__ void scale_kernel(const D* __restrict__ x, float s, D* __restrict__ y, std::int64_t n, grad_write mode) {
  KILN_GRID_STRIDE(i, n)
  store(y[i], to_f32(x[i]) * s, mode);
}

// ---- broadcasting ----------------------------------------------------------------------
// Output dimensions and each operand's strides over them (0 where it is broadcast).
struct bcast {
  int rank = 0;
  std::int64_t dims[8] = {};
  std::int64_t sa[8] = {}, sb[8] = {};
};
bcast make_bcast(const shape& out, const shape& a, const shape& b) {
  KILN_CHECK(out.rank() <= 8, "cuda binary op: rank ", out.rank(), " exceeds the device limit of 8 dimensions");
  bcast bc;
  bc.rank = out.rank();
  const shape sa = cpu::broadcast_strides(a, out), sb = cpu::broadcast_strides(b, out);
  for (int d = 0; d < out.rank(); ++d) {
    bc.dims[d] = out[d];
    bc.sa[d] = sa[d];
    bc.sb[d] = sb[d];
  }
  return bc;
}
__device__ __forceinline__ void offsets(const bcast& bc, std::int64_t o, std::int64_t& ia, std::int64_t& ib) {
  ia = 0;
  ib = 0;
  for (int d = bc.rank - 1; d >= 0; --d) {
    const std::int64_t idx = o % bc.dims[d];
    o /= bc.dims[d];
    ia += idx * bc.sa[d];
    ib += idx * bc.sb[d];
  }
}

template <cpu::binary_op Op>
__device__ __forceinline__ float partial(int which, float av, float bv, float gv) {
  if constexpr (Op == cpu::binary_op::add) return gv;
  if constexpr (Op == cpu::binary_op::sub) return which == 0 ? gv : -gv;
  if constexpr (Op == cpu::binary_op::mul) return which == 0 ? gv * bv : gv * av;
  if constexpr (Op == cpu::binary_op::div) return which == 0 ? gv / bv : -gv * av / (bv * bv);
}

template <cpu::binary_op Op, class D>
__global__ void binary_forward_kernel(bcast bc, const D* __restrict__ a, const D* __restrict__ b, D* __restrict__ y,
                                      std::int64_t n) {
  KILN_GRID_STRIDE(o, n) {
    std::int64_t ia, ib;
    offsets(bc, o, ia, ib);
    y[o] = from_f32<D>(cpu::apply_binary<Op>(to_f32(a[ia]), to_f32(b[ib])));
  }
}
// One thread per element of the operand's gradient: the sum, in index order, over the
// output elements it was broadcast to (the dimensions in `red`, of sizes rdims).
struct reduction {
  int rank = 0;                // the output's
  std::int64_t tdims[8] = {};  // the operand's sizes aligned to the output (1 where broadcast)
  int nred = 0;                // dimensions summed over
  int red[8] = {};             // which output dimensions
  std::int64_t count = 1;      // Π of their sizes
};
template <cpu::binary_op Op, class D>
__global__ void binary_backward_kernel(bcast bc, reduction r, int which, const D* __restrict__ a,
                                       const D* __restrict__ b, const D* __restrict__ gy, D* __restrict__ g,
                                       std::int64_t n, grad_write mode) {
  KILN_GRID_STRIDE(t, n) {
    std::int64_t idx[8];
    std::int64_t rest = t;
    for (int d = r.rank - 1; d >= 0; --d) {
      idx[d] = rest % r.tdims[d];
      rest /= r.tdims[d];
    }
    float sum = 0.0f;
    for (std::int64_t k = 0; k < r.count; ++k) {
      std::int64_t kk = k;
      for (int j = r.nred - 1; j >= 0; --j) {
        const int d = r.red[j];
        idx[d] = kk % bc.dims[d];
        kk /= bc.dims[d];
      }
      std::int64_t o = 0, ia = 0, ib = 0;
      for (int d = 0; d < r.rank; ++d) {
        o = o * bc.dims[d] + idx[d];
        ia += idx[d] * bc.sa[d];
        ib += idx[d] * bc.sb[d];
      }
      sum += partial<Op>(which, to_f32(a[ia]), to_f32(b[ib]), to_f32(gy[o]));
    }
    store(g[t], sum, mode);
  }
}

// ---- linear's bias gradient: column sums, a thread per column, rows in order ------------
template <class D>
__global__ void column_sum_kernel(const D* __restrict__ gy, D* __restrict__ gb, std::int64_t rows, std::int64_t cols,
                                  grad_write mode) {
  KILN_GRID_STRIDE(c, cols) {
    float s = 0.0f;
    for (std::int64_t r = 0; r < rows; ++r) s += to_f32(gy[r * cols + c]);
    store(gb[c], s, mode);
  }
}

// ---- cross-entropy: the per-row losses to one value, and the count of counted rows -----
template <class D>
__global__ void loss_reduce_kernel(const float* __restrict__ rows_loss, const std::int64_t* __restrict__ target,
                                   std::int64_t rows, std::int64_t ignore_index, bool mean, D* __restrict__ out,
                                   std::int64_t* __restrict__ count_out) {
  using count_reduce = cub::BlockReduce<long long, block>;
  __shared__ typename count_reduce::TempStorage tmp;
  float s = 0.0f;
  long long c = 0;
  for (std::int64_t r = threadIdx.x; r < rows; r += block)
    if (target[r] != ignore_index) {
      s += rows_loss[r];
      ++c;
    }
  const float total = cuda_kernels::detail::block_sum<block>(s);
  const long long count = count_reduce(tmp).Sum(c);
  if (threadIdx.x == 0) {
    *count_out = count;
    *out = from_f32<D>(mean ? (count ? total / float(count) : 0.0f) : total);
  }
}

// f32 sums into a T gradient, honouring its mode.
template <class D>
__global__ void store_f32_kernel(const float* __restrict__ src, D* __restrict__ dst, std::int64_t n, grad_write mode) {
  KILN_GRID_STRIDE(i, n)
  store(dst[i], src[i], mode);
}

// ---- views: a contiguous source stored through a strided destination --------------------
struct view_geometry {
  int rank = 0;
  std::int64_t dims[8] = {}, strides[8] = {};
};
template <class D>
__global__ void strided_store_kernel(D* __restrict__ dst, view_geometry g, const D* __restrict__ src, std::int64_t n,
                                     grad_write mode) {
  KILN_GRID_STRIDE(i, n) {
    std::int64_t rest = i, off = 0;
    for (int d = g.rank - 1; d >= 0; --d) {
      off += (rest % g.dims[d]) * g.strides[d];
      rest /= g.dims[d];
    }
    store(dst[off], to_f32(src[i]), mode);
  }
}

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
template <class D>
__global__ void clamp_kernel(D* __restrict__ x, std::int64_t n, float lo, float hi) {
  KILN_GRID_STRIDE(i, n) {
    const float v = to_f32(x[i]);  // fmaxf would drop a NaN: keep it, as std::clamp does
    x[i] = from_f32<D>(isnan(v) ? v : fminf(fmaxf(v, lo), hi));
  }
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

// ---- embedding ---------------------------------------------------------------------------
template <class D, class I>
__global__ void embedding_forward_kernel(const I* __restrict__ ids, const D* __restrict__ w, D* __restrict__ y,
                                         std::int64_t n, std::int64_t vocab, std::int64_t cols,
                                         long long* __restrict__ bad) {
  KILN_GRID_STRIDE(t, n * cols) {
    const std::int64_t r = t / cols, c = t % cols, id = static_cast<std::int64_t>(ids[r]);
    if (id < 0 || id >= vocab) {
      if (c == 0) atomicMin(bad, static_cast<long long>(r));  // the first bad position
      y[t] = from_f32<D>(0.0f);
    } else {
      y[t] = w[id * cols + c];
    }
  }
}
template <class I>
__global__ void embedding_keys_kernel(const I* __restrict__ ids, std::int64_t* __restrict__ keys,
                                      std::int64_t* __restrict__ pos, std::int64_t n) {
  KILN_GRID_STRIDE(i, n) {
    keys[i] = static_cast<std::int64_t>(ids[i]);
    pos[i] = i;
  }
}
// A block per sorted position i; the block that starts a run of equal ids sums the run's
// rows of gy (in position order) into that id's row of gw, its threads across columns.
template <class D>
__global__ void embedding_backward_kernel(const std::int64_t* __restrict__ keys, const std::int64_t* __restrict__ pos,
                                          const D* __restrict__ gy, D* __restrict__ gw, std::int64_t n,
                                          std::int64_t cols) {
  for (std::int64_t i = blockIdx.x; i < n; i += gridDim.x) {
    const std::int64_t id = keys[i];
    if (i > 0 && keys[i - 1] == id) continue;
    for (std::int64_t c = threadIdx.x; c < cols; c += blockDim.x) {
      float s = 0.0f;
      for (std::int64_t j = i; j < n && keys[j] == id; ++j) s += to_f32(gy[pos[j] * cols + c]);
      gw[id * cols + c] = from_f32<D>(to_f32(gw[id * cols + c]) + s);
    }
  }
}

}  // namespace

template <class T>
void norm_forward(const dtensor<T>& x, const T* w, const T* b, double eps, bool rms, dtensor<T>& y,
                  dtensor<float>& stats) {
  const std::int64_t cols = x.shape().back(), rows = x.shape().rows();
  cuda_kernels::norm_forward<T>(x.data(), nullptr, nullptr, w, b, y.data(), stats.data(), stats.data() + rows, rows,
                                cols, static_cast<float>(eps), rms, cuda_runtime::compute_stream());
}

template <class T>
void norm_backward(const dtensor<T>& x, const T* w, const dtensor<T>& gy, const dtensor<float>& stats, bool rms, T* gx,
                   grad_write mx, T* gw, grad_write mw, T* gb, grad_write mb) {
  const std::int64_t cols = x.shape().back(), rows = x.shape().rows();
  dtensor<float> scratch, dw, db;
  if (gw || gb) scratch = dtensor<float>(shape{2 * cuda_kernels::norm_slabs * cols});
  if (gw) dw = dtensor<float>(shape{cols});
  if (gb && !rms) db = dtensor<float>(shape{cols});
  cuda_kernels::norm_backward<T>(x.data(), w, stats.data(), stats.data() + rows, gy.data(), gx,
                                 mx == grad_write::accumulate, gw ? dw.data() : nullptr,
                                 gb && !rms ? db.data() : nullptr, gw || gb ? scratch.data() : nullptr, rows, cols, rms,
                                 cuda_runtime::compute_stream());
  if (gw) store_f32_kernel<<<grid_for(cols, block), block, 0, stream()>>>(dw.data(), dev(gw), cols, mw);
  if (gb && !rms) store_f32_kernel<<<grid_for(cols, block), block, 0, stream()>>>(db.data(), dev(gb), cols, mb);
  check_launch("norm backward (weight gradients)");
}

template <class F, class T>
void unary_forward(F f, const dtensor<T>& x, dtensor<T>& y) {
  const std::int64_t n = x.numel();
  if (!n) return;
  unary_forward_kernel<<<grid_for(n, block), block, 0, stream()>>>(f, dev(x.data()), dev(y.data()), n);
  check_launch("unary_forward");
}
template <class F, class T>
void unary_backward(F f, const dtensor<T>& x, const dtensor<T>& gy, dtensor<T>& gx, grad_write mode) {
  const std::int64_t n = x.numel();
  if (!n) return;
  unary_backward_kernel<<<grid_for(n, block), block, 0, stream()>>>(f, dev(x.data()), dev(gy.data()), dev(gx.data()), n,
                                                                    mode);
  check_launch("unary_backward");
}

template <class T>
void scale(const dtensor<T>& x, float s, dtensor<T>& y, grad_write mode) {
  const std::int64_t n = x.numel();
  if (!n) return;
  scale_kernel<<<grid_for(n, block), block, 0, stream()>>>(dev(x.data()), s, dev(y.data()), n, mode);
  check_launch("scale");
}

template <cpu::binary_op Op, class T>
void binary_forward(const dtensor<T>& a, const dtensor<T>& b, dtensor<T>& out) {
  const std::int64_t n = out.numel();
  if (!n) return;
  binary_forward_kernel<Op><<<grid_for(n, block), block, 0, stream()>>>(
      make_bcast(out.shape(), a.shape(), b.shape()), dev(a.data()), dev(b.data()), dev(out.data()), n);
  check_launch("binary_forward");
}

template <cpu::binary_op Op, class T>
void binary_backward(const dtensor<T>& a, const dtensor<T>& b, const dtensor<T>& gy, int which, dtensor<T>& g,
                     grad_write mode) {
  const std::int64_t n = g.numel();
  if (!n) return;
  const bcast bc = make_bcast(gy.shape(), a.shape(), b.shape());
  const shape& target = which == 0 ? a.shape() : b.shape();
  reduction r;
  r.rank = gy.shape().rank();
  const int lead = r.rank - target.rank();
  for (int d = 0; d < r.rank; ++d) {
    const std::int64_t td = d < lead ? 1 : target[d - lead];
    r.tdims[d] = td;
    if (td == 1 && gy.shape()[d] != 1) {
      r.red[r.nred++] = d;
      r.count *= gy.shape()[d];
    }
  }
  binary_backward_kernel<Op><<<grid_for(n, block), block, 0, stream()>>>(bc, r, which, dev(a.data()), dev(b.data()),
                                                                         dev(gy.data()), dev(g.data()), n, mode);
  check_launch("binary_backward");
}

template <class T>
void linear_forward(const dtensor<T>& x, const dtensor<T>& w, const dtensor<T>* bias, dtensor<T>& y) {
  const std::int64_t in = w.size(1), out = w.size(0), rows = x.shape().rows();
  namespace ck = cuda_kernels;
  ck::gemm_shape s{false, true, rows, out, in, in, in, out};
  ck::gemm<T>(s, x.data(), w.data(), y.data(), grad_write::overwrite, cuda_runtime::compute_stream(),
              ck::gemm_math::f32, bias ? ck::gemm_epilogue::bias : ck::gemm_epilogue::none,
              bias ? bias->data() : nullptr);
}

template <class T>
void linear_backward(const dtensor<T>& x, const dtensor<T>& w, const dtensor<T>& gy, dtensor<T>* gx, grad_write mx,
                     dtensor<T>* gw, grad_write mw, dtensor<T>* gb, grad_write mb) {
  const std::int64_t in = w.size(1), out = w.size(0), rows = x.shape().rows();
  namespace ck = cuda_kernels;
  auto* st = cuda_runtime::compute_stream();
  if (gx) ck::gemm<T>({false, false, rows, in, out, out, in, in}, gy.data(), w.data(), gx->data(), mx, st);
  if (gw) ck::gemm<T>({true, false, out, in, rows, out, in, in}, gy.data(), x.data(), gw->data(), mw, st);
  if (gb) {
    column_sum_kernel<<<grid_for(out, block), block, 0, stream()>>>(dev(gy.data()), dev(gb->data()), rows, out, mb);
    check_launch("linear bias gradient");
  }
}

template <class T>
std::int64_t cross_entropy_forward(const dtensor<T>& logits, const dtensor<std::int64_t>& target,
                                   const cpu::cross_entropy_options& opt, dtensor<T>& loss) {
  const std::int64_t vocab = logits.shape().back(), rows = logits.shape().rows();
  KILN_CHECK(target.numel() == rows, "cross_entropy: ", rows, " rows of logits ", logits.shape().str(), " but ",
             target.numel(), " targets ", target.shape().str());
  dtensor<float> per_row(shape{rows});
  dtensor<std::int64_t> count(shape{1});
  cuda_kernels::cross_entropy<T>(logits.data(), target.data(), per_row.data(), nullptr, 0.0f, rows, vocab,
                                 opt.ignore_index, cuda_runtime::compute_stream(), opt.label_smoothing);
  loss_reduce_kernel<<<1, block, 0, stream()>>>(per_row.data(), target.data(), rows, opt.ignore_index,
                                                opt.reduce == cpu::cross_entropy_options::reduction::mean,
                                                dev(loss.data()), count.data());
  check_launch("cross_entropy loss reduction");
  std::int64_t host_count = 0;
  cuda_runtime::copy(&host_count, count.data(), sizeof host_count, cuda_runtime::copy_kind::device_to_host,
                     cuda_runtime::compute_stream());
  cuda_runtime::synchronize(cuda_runtime::compute_stream());
  return host_count;
}

template <class T>
void cross_entropy_backward(const dtensor<T>& logits, const dtensor<std::int64_t>& target,
                            const cpu::cross_entropy_options& opt, std::int64_t count, const dtensor<T>& gloss,
                            dtensor<T>& gx, grad_write mode) {
  const std::int64_t vocab = logits.shape().back(), rows = logits.shape().rows();
  T g{};
  cuda_runtime::copy(&g, gloss.data(), sizeof g, cuda_runtime::copy_kind::device_to_host,
                     cuda_runtime::compute_stream());
  cuda_runtime::synchronize(cuda_runtime::compute_stream());
  const float gf = static_cast<float>(compute_t<T>(g));
  const bool mean = opt.reduce == cpu::cross_entropy_options::reduction::mean;
  const float grad_scale = mean ? (count ? gf / float(count) : 0.0f) : gf;
  dtensor<float> per_row(shape{rows});
  // The kernel overwrites; an accumulating gradient takes it through a scratch tensor.
  dtensor<T> scratch;
  dtensor<T>& dst = mode == grad_write::overwrite ? gx : (scratch = dtensor<T>(logits.shape()));
  cuda_kernels::cross_entropy<T>(logits.data(), target.data(), per_row.data(), dst.data(), grad_scale, rows, vocab,
                                 opt.ignore_index, cuda_runtime::compute_stream(), opt.label_smoothing);
  if (mode == grad_write::accumulate) scale(scratch, 1.0f, gx, grad_write::accumulate);
}

template <class T>
void strided_store(dtensor<T> dst, const dtensor<T>& src, grad_write mode) {
  KILN_CHECK(dst.shape() == src.shape(), "strided_store: shape ", src.shape().str(), " does not match ",
             dst.shape().str());
  KILN_CHECK(src.is_contiguous(), "strided_store: the source ", src.shape().str(), " must be contiguous");
  const std::int64_t n = src.numel();
  if (!n) return;
  if (dst.is_contiguous()) {
    scale(src, 1.0f, dst, mode);
    return;
  }
  KILN_CHECK(dst.rank() <= 8, "strided_store: rank ", dst.rank(), " exceeds the device limit of 8 dimensions");
  view_geometry g;
  g.rank = dst.rank();
  for (int d = 0; d < g.rank; ++d) {
    g.dims[d] = dst.shape()[d];
    g.strides[d] = dst.strides()[d];
  }
  strided_store_kernel<<<grid_for(n, block), block, 0, stream()>>>(dev(dst.data()), g, dev(src.data()), n, mode);
  check_launch("strided_store");
}

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

template <class T, class I>
void embedding_forward(const dtensor<I>& ids, const dtensor<T>& weight, dtensor<T>& y) {
  const std::int64_t n = ids.numel(), vocab = weight.size(0), cols = weight.size(1);
  if (!n || !cols) return;
  constexpr std::int64_t none = std::numeric_limits<std::int64_t>::max();
  dtensor<std::int64_t> bad(shape{1});
  bad.fill(none);
  embedding_forward_kernel<<<grid_for(n * cols, block), block, 0, stream()>>>(
      ids.data(), dev(weight.data()), dev(y.data()), n, vocab, cols, reinterpret_cast<long long*>(bad.data()));
  check_launch("embedding forward");
  std::int64_t first_bad = none;
  cuda_runtime::copy(&first_bad, bad.data(), sizeof first_bad, cuda_runtime::copy_kind::device_to_host,
                     cuda_runtime::compute_stream());
  cuda_runtime::synchronize(cuda_runtime::compute_stream());
  if (first_bad != none) {
    I id{};
    cuda_runtime::copy(&id, ids.data() + first_bad, sizeof id, cuda_runtime::copy_kind::device_to_host,
                       cuda_runtime::compute_stream());
    cuda_runtime::synchronize(cuda_runtime::compute_stream());
    KILN_CHECK(false, "embedding: id ", static_cast<std::int64_t>(id), " at position ", first_bad, " of ids ",
               ids.shape().str(), " is outside the table's ", vocab, " rows");
  }
}

template <class T, class I>
void embedding_backward(const dtensor<I>& ids, const dtensor<T>& gy, dtensor<T>& gw, grad_write mode) {
  const std::int64_t n = ids.numel(), vocab = gw.size(0), cols = gw.size(1);
  if (mode == grad_write::overwrite) gw.fill(T(0));
  if (!n || !cols) return;
  KILN_CHECK(n <= std::numeric_limits<int>::max(), "embedding backward on cuda: ", n,
             " ids exceed CUB's sort limit of 2^31 - 1 per call");
  dtensor<std::int64_t> keys(shape{n}), pos(shape{n}), sorted_keys(shape{n}), sorted_pos(shape{n});
  embedding_keys_kernel<<<grid_for(n, block), block, 0, stream()>>>(ids.data(), keys.data(), pos.data(), n);
  check_launch("embedding backward (keys)");
  // Only the bits that can differ among valid ids take part in the sort.
  int end_bit = 1;
  while (end_bit < 63 && (std::int64_t{1} << end_bit) < vocab) ++end_bit;
  std::size_t temp_bytes = 0;
  cuda_kernels::detail::check(
      cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys.data(), sorted_keys.data(), pos.data(),
                                      sorted_pos.data(), static_cast<int>(n), 0, end_bit, stream()),
      "embedding backward: cub::DeviceRadixSort (size query)");
  dtensor<u8> temp(shape{static_cast<std::int64_t>(std::max<std::size_t>(temp_bytes, 1))});
  cuda_kernels::detail::check(
      cub::DeviceRadixSort::SortPairs(temp.data(), temp_bytes, keys.data(), sorted_keys.data(), pos.data(),
                                      sorted_pos.data(), static_cast<int>(n), 0, end_bit, stream()),
      "embedding backward: cub::DeviceRadixSort");
  embedding_backward_kernel<<<grid_for(n * block, block), block, 0, stream()>>>(
      sorted_keys.data(), sorted_pos.data(), dev(gy.data()), dev(gw.data()), n, cols);
  check_launch("embedding backward");
}

template <class T, class Mask>
void attention_forward(const dtensor<T>& q, const dtensor<T>& k, const dtensor<T>& v, dtensor<T>& o,
                       dtensor<float>& lse, const cuda_kernels::attention_dims& d, Mask mask) {
  cuda_kernels::attention_forward<T, Mask>(q.data(), k.data(), v.data(), o.data(), lse.data(), d,
                                           cuda_runtime::compute_stream(), mask);
}

namespace {
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
}  // namespace

template <class T, class Mask>
void attention_backward(const dtensor<T>& q, const dtensor<T>& k, const dtensor<T>& v, const dtensor<T>& o,
                        const dtensor<T>& dout, const dtensor<float>& lse, const cuda_kernels::attention_dims& d,
                        dtensor<T>* dq, grad_write mq, dtensor<T>* dk, grad_write mk, dtensor<T>* dv, grad_write mv,
                        Mask mask) {
  if (d.batch * d.q_heads * d.q_len == 0) {  // no queries: dK = dV = 0 (the kernels would not run)
    for (auto [g, m] : {std::pair{dk, mk}, std::pair{dv, mv}})
      if (g && m == grad_write::overwrite) g->fill(T(0));
    return;
  }
  // The kernels write all three; a gradient not wanted lands in scratch.
  dtensor<T> none_q, none_k, none_v;
  mode_target<T> tq(dq ? dq : &(none_q = dtensor<T>(q.shape())), dq ? mq : grad_write::overwrite, q.shape());
  mode_target<T> tk(dk ? dk : &(none_k = dtensor<T>(k.shape())), dk ? mk : grad_write::overwrite, k.shape());
  mode_target<T> tv(dv ? dv : &(none_v = dtensor<T>(v.shape())), dv ? mv : grad_write::overwrite, v.shape());
  dtensor<float> delta(shape{d.batch * d.q_heads * d.q_len});
  cuda_kernels::attention_backward<T, Mask>(q.data(), k.data(), v.data(), o.data(), dout.data(), lse.data(),
                                            delta.data(), tq.ptr(), tk.ptr(), tv.ptr(), d,
                                            cuda_runtime::compute_stream(), mask);
  tq.finish();
  tk.finish();
  tv.finish();
}

template <class T>
void rope(const dtensor<T>& x, dtensor<T>& y, std::int64_t first, float theta, bool backward, grad_write mode) {
  mode_target<T> t(&y, mode, x.shape());
  cuda_kernels::rope<T>(x.data(), t.ptr(), x.size(0), x.size(1), x.size(2), x.size(3), first, theta, backward,
                        cuda_runtime::compute_stream());
  t.finish();
}

template <class T>
void swiglu_forward(const dtensor<T>& gate, const dtensor<T>& up, dtensor<T>& y) {
  cuda_kernels::swiglu_forward<T>(gate.data(), up.data(), y.data(), gate.numel(), cuda_runtime::compute_stream());
}
template <class T>
void swiglu_backward(const dtensor<T>& gate, const dtensor<T>& up, const dtensor<T>& gy, dtensor<T>* ggate,
                     grad_write mg, dtensor<T>* gup, grad_write mu) {
  dtensor<T> none_g, none_u;
  mode_target<T> tg(ggate ? ggate : &(none_g = dtensor<T>(gate.shape())), ggate ? mg : grad_write::overwrite,
                    gate.shape());
  mode_target<T> tu(gup ? gup : &(none_u = dtensor<T>(up.shape())), gup ? mu : grad_write::overwrite, up.shape());
  cuda_kernels::swiglu_backward<T>(gate.data(), up.data(), gy.data(), tg.ptr(), tu.ptr(), gate.numel(),
                                   cuda_runtime::compute_stream());
  tg.finish();
  tu.finish();
}

template <class T>
void add_sum_squares(const dtensor<T>& x, dtensor<double>& acc) {
  const std::int64_t n = x.numel();
  if (!n) return;
  whole_sum<double, true>(dev(x.data()), n, add_to{acc.data()});
  check_launch("gradient sum of squares");
}
template <class T>
void clamp(dtensor<T>& x, float lo, float hi) {
  const std::int64_t n = x.numel();
  if (!n) return;
  clamp_kernel<<<grid_for(n, block), block, 0, stream()>>>(dev(x.data()), n, lo, hi);
  check_launch("clamp");
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

template <class T>
void dropout_apply(const dtensor<T>& x, float p, philox_stream rng, dtensor<T>& y, grad_write mode) {
  mode_target<T> t(&y, mode, x.shape());
  cuda_kernels::dropout<T>(x.data(), t.ptr(), x.numel(), p, rng, cuda_runtime::compute_stream());
  t.finish();
}

// ---- explicit instantiations -------------------------------------------------------------
#define KILN_GPU_UNARY(F, T)                                            \
  template void unary_forward<F, T>(F, const dtensor<T>&, dtensor<T>&); \
  template void unary_backward<F, T>(F, const dtensor<T>&, const dtensor<T>&, dtensor<T>&, grad_write);
#define KILN_GPU_BINARY(OP, T)                                                                                       \
  template void binary_forward<cpu::binary_op::OP, T>(const dtensor<T>&, const dtensor<T>&, dtensor<T>&);            \
  template void binary_backward<cpu::binary_op::OP, T>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, int, \
                                                       dtensor<T>&, grad_write);
#define KILN_GPU_TYPE(T)                                                                                             \
  KILN_GPU_UNARY(fn::relu, T)                                                                                        \
  KILN_GPU_UNARY(fn::gelu_exact, T)                                                                                  \
  KILN_GPU_UNARY(fn::gelu_tanh, T)                                                                                   \
  KILN_GPU_UNARY(fn::silu, T)                                                                                        \
  KILN_GPU_BINARY(add, T)                                                                                            \
  KILN_GPU_BINARY(sub, T)                                                                                            \
  KILN_GPU_BINARY(mul, T)                                                                                            \
  KILN_GPU_BINARY(div, T)                                                                                            \
  template void scale<T>(const dtensor<T>&, float, dtensor<T>&, grad_write);                                         \
  template void linear_forward<T>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>*, dtensor<T>&);             \
  template void linear_backward<T>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, dtensor<T>*, grad_write, \
                                   dtensor<T>*, grad_write, dtensor<T>*, grad_write);                                \
  template std::int64_t cross_entropy_forward<T>(const dtensor<T>&, const dtensor<std::int64_t>&,                    \
                                                 const cpu::cross_entropy_options&, dtensor<T>&);                    \
  template void norm_forward<T>(const dtensor<T>&, const T*, const T*, double, bool, dtensor<T>&, dtensor<float>&);  \
  template void norm_backward<T>(const dtensor<T>&, const T*, const dtensor<T>&, const dtensor<float>&, bool, T*,    \
                                 grad_write, T*, grad_write, T*, grad_write);                                        \
  template void cross_entropy_backward<T>(const dtensor<T>&, const dtensor<std::int64_t>&,                           \
                                          const cpu::cross_entropy_options&, std::int64_t, const dtensor<T>&,        \
                                          dtensor<T>&, grad_write);
#define KILN_GPU_MASK(T, M)                                                                                          \
  template void attention_forward<T, M>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, dtensor<T>&,        \
                                        dtensor<float>&, const cuda_kernels::attention_dims&, M);                    \
  template void attention_backward<T, M>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, \
                                         const dtensor<T>&, const dtensor<float>&,                                   \
                                         const cuda_kernels::attention_dims&, dtensor<T>*, grad_write, dtensor<T>*,  \
                                         grad_write, dtensor<T>*, grad_write, M);
#define KILN_GPU_VIEWS(T)                                                                                            \
  template void strided_store<T>(dtensor<T>, const dtensor<T>&, grad_write);                                         \
  template void sum_dim<T>(const dtensor<T>&, cpu::reduce_geometry, float, dtensor<T>&);                             \
  template void sum_dim_backward<T>(const dtensor<T>&, cpu::reduce_geometry, float, dtensor<T>&, grad_write);        \
  template void embedding_forward<T, i64>(const dtensor<i64>&, const dtensor<T>&, dtensor<T>&);                      \
  template void embedding_forward<T, i32>(const dtensor<i32>&, const dtensor<T>&, dtensor<T>&);                      \
  template void embedding_backward<T, i64>(const dtensor<i64>&, const dtensor<T>&, dtensor<T>&, grad_write);         \
  template void embedding_backward<T, i32>(const dtensor<i32>&, const dtensor<T>&, dtensor<T>&, grad_write);         \
  template void rope<T>(const dtensor<T>&, dtensor<T>&, std::int64_t, float, bool, grad_write);                      \
  template void swiglu_forward<T>(const dtensor<T>&, const dtensor<T>&, dtensor<T>&);                                \
  template void swiglu_backward<T>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, dtensor<T>*, grad_write, \
                                   dtensor<T>*, grad_write);                                                         \
  template void dropout_apply<T>(const dtensor<T>&, float, philox_stream, dtensor<T>&, grad_write);                  \
  template void max_dim<T>(const dtensor<T>&, cpu::reduce_geometry, dtensor<T>&, dtensor<std::int64_t>&);            \
  template void max_dim_backward<T>(const dtensor<T>&, cpu::reduce_geometry, const dtensor<std::int64_t>&,           \
                                    dtensor<T>&, grad_write);                                                        \
  template void add_sum_squares<T>(const dtensor<T>&, dtensor<double>&);                                             \
  template void clamp<T>(dtensor<T>&, float, float);                                                                 \
  template void softmax_forward<T>(const dtensor<T>&, dtensor<T>&, bool);                                            \
  template void softmax_backward<T>(const dtensor<T>&, const dtensor<T>&, dtensor<T>&, bool, grad_write);            \
  KILN_GPU_MASK(T, ops::mask::none)                                                                                  \
  KILN_GPU_MASK(T, ops::mask::causal)                                                                                \
  KILN_GPU_MASK(T, ops::mask::local_n)                                                                               \
  KILN_GPU_MASK(T, ops::mask::strided_n)
KILN_GPU_TYPE(f32)
KILN_GPU_TYPE(bf16)
KILN_GPU_TYPE(f16)
KILN_GPU_VIEWS(f32)
KILN_GPU_VIEWS(bf16)
KILN_GPU_VIEWS(f16)

}  // namespace kiln::ops::gpu
