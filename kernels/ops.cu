// kernels/ops.cu — the device side of kiln's ops (spec in kiln/cuda/ops.hpp): element-wise
// functors, broadcasting binary ops and their reductions, scaling, linear on cuBLASLt,
// and the fused cross-entropy's loss reduction.
#define KILN_WITH_CUDA 1

#include <algorithm>
#include <cstdint>
#include <vector>

#include "common.cuh"
#include "kiln/cuda/blas.hpp"
#include "kiln/cuda/kernels.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/cuda/runtime.hpp"

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
  KILN_CHECK(opt.label_smoothing == 0.0f, "cross_entropy on cuda: label_smoothing ", opt.label_smoothing,
             " is not supported on the device yet (use 0, or compute the loss on the cpu)");
  const std::int64_t vocab = logits.shape().back(), rows = logits.shape().rows();
  KILN_CHECK(target.numel() == rows, "cross_entropy: ", rows, " rows of logits ", logits.shape().str(), " but ",
             target.numel(), " targets ", target.shape().str());
  dtensor<float> per_row(shape{rows});
  dtensor<std::int64_t> count(shape{1});
  cuda_kernels::cross_entropy<T>(logits.data(), target.data(), per_row.data(), nullptr, 0.0f, rows, vocab,
                                 opt.ignore_index, cuda_runtime::compute_stream());
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
                                 opt.ignore_index, cuda_runtime::compute_stream());
  if (mode == grad_write::accumulate) scale(scratch, 1.0f, gx, grad_write::accumulate);
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
KILN_GPU_TYPE(f32)
KILN_GPU_TYPE(bf16)
KILN_GPU_TYPE(f16)

}  // namespace kiln::ops::gpu
