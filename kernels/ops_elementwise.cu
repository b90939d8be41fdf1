// kernels/ops_elementwise.cu — the device side of kiln's element-wise ops (spec in
// kiln/cuda/ops.hpp): the activations' functors, broadcasting binary ops and their
// reductions, scaling, stores through strided views, clamping, and RoPE, SwiGLU and
// dropout over kernels/elementwise.cu.
#define KILN_WITH_CUDA 1

#include "ops_common.cuh"

namespace kiln::ops::gpu {
using namespace detail;

namespace {

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

template <class D>
__global__ void clamp_kernel(D* __restrict__ x, std::int64_t n, float lo, float hi) {
  KILN_GRID_STRIDE(i, n) {
    const float v = to_f32(x[i]);  // fmaxf would drop a NaN: keep it, as std::clamp does
    x[i] = from_f32<D>(isnan(v) ? v : fminf(fmaxf(v, lo), hi));
  }
}

}  // namespace

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
void clamp(dtensor<T>& x, float lo, float hi) {
  const std::int64_t n = x.numel();
  if (!n) return;
  clamp_kernel<<<grid_for(n, block), block, 0, stream()>>>(dev(x.data()), n, lo, hi);
  check_launch("clamp");
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
#define KILN_GPU_ELEMENTWISE(T)                                                                                      \
  KILN_GPU_UNARY(fn::relu, T)                                                                                        \
  KILN_GPU_UNARY(fn::gelu_exact, T)                                                                                  \
  KILN_GPU_UNARY(fn::gelu_tanh, T)                                                                                   \
  KILN_GPU_UNARY(fn::silu, T)                                                                                        \
  KILN_GPU_BINARY(add, T)                                                                                            \
  KILN_GPU_BINARY(sub, T)                                                                                            \
  KILN_GPU_BINARY(mul, T)                                                                                            \
  KILN_GPU_BINARY(div, T)                                                                                            \
  template void scale<T>(const dtensor<T>&, float, dtensor<T>&, grad_write);                                         \
  template void strided_store<T>(dtensor<T>, const dtensor<T>&, grad_write);                                         \
  template void rope<T>(const dtensor<T>&, dtensor<T>&, std::int64_t, float, bool, grad_write);                      \
  template void swiglu_forward<T>(const dtensor<T>&, const dtensor<T>&, dtensor<T>&);                                \
  template void swiglu_backward<T>(const dtensor<T>&, const dtensor<T>&, const dtensor<T>&, dtensor<T>*, grad_write, \
                                   dtensor<T>*, grad_write);                                                         \
  template void clamp<T>(dtensor<T>&, float, float);                                                                 \
  template void dropout_apply<T>(const dtensor<T>&, float, philox_stream, dtensor<T>&, grad_write);
KILN_GPU_ELEMENTWISE(f32)
KILN_GPU_ELEMENTWISE(bf16)
KILN_GPU_ELEMENTWISE(f16)

}  // namespace kiln::ops::gpu
