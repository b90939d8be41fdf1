// kiln/ops/cpu/elementwise.hpp — CPU kernels for element-wise ops.
//
// Unary activations apply an ops::fn functor; binary arithmetic broadcasts NumPy-style
// and its backward sums the gradient back to each input's shape. Contiguous inputs
// only (the differentiable layer calls contiguous()). Bandwidth bound: one read and one
// write per element forward, two reads and one write backward.
#pragma once

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/ops/kernel/functors.hpp"
#include "kiln/ops/kernel/grad_write.hpp"

namespace kiln::ops::cpu {

inline constexpr std::int64_t elementwise_grain = 1 << 15;

template <class F, class T>
void unary_forward(F f, const tensor<T>& x, tensor<T>& y) {
  using C = compute_t<T>;
  const T* xp = x.data();
  T* yp = y.data();
  // Captures by value: loads through captured references keep the loop from vectorising.
  cpu_runtime::parallel_for(x.numel(), elementwise_grain, [=](std::int64_t b, std::int64_t e) {
    const T* __restrict xs = xp;
    T* __restrict ys = yp;
    for (std::int64_t i = b; i < e; ++i) ys[i] = static_cast<T>(f(static_cast<C>(xs[i])));
  });
}

template <class F, class T>
void unary_backward(F f, const tensor<T>& x, const tensor<T>& gy, tensor<T>& gx, grad_write mode) {
  using C = compute_t<T>;
  const T *xp = x.data(), *gp = gy.data();
  T* gxp = gx.data();
  cpu_runtime::parallel_for(x.numel(), elementwise_grain, [=](std::int64_t b, std::int64_t e) {
    const T* __restrict xs = xp, * __restrict gs = gp;
    T* __restrict out = gxp;
    if (mode == grad_write::overwrite)
      for (std::int64_t i = b; i < e; ++i)
        out[i] = static_cast<T>(f.grad(static_cast<C>(xs[i]), static_cast<C>(gs[i])));
    else
      for (std::int64_t i = b; i < e; ++i)
        store_grad(gxp[i], f.grad(static_cast<C>(xp[i]), static_cast<C>(gp[i])), mode);
  });
}

// Strides (in elements, for a contiguous tensor of shape `in`) aligned to the rank of
// `out`, with 0 on broadcast dimensions.
inline shape broadcast_strides(const shape& in, const shape& out) {
  const shape cs = in.contiguous_strides();
  shape s;
  const int lead = out.rank() - in.rank();
  for (int i = 0; i < out.rank(); ++i) {
    const int k = i - lead;
    s.push_back(k < 0 || in[k] == 1 ? 0 : cs[k]);
  }
  return s;
}

// Calls f(out_index, a_offset, b_offset) for every element of `out`, walking a
// multi-index so that broadcast operands are read in place.
template <class F>
void for_each_broadcast(const shape& out, const shape& a, const shape& b, F&& f) {
  const shape sa = broadcast_strides(a, out), sb = broadcast_strides(b, out);
  const int r = out.rank();
  const std::int64_t n = out.numel();
  if (r == 0) {
    if (n) f(0, 0, 0);
    return;
  }
  const std::int64_t inner = out[r - 1], ia = sa[r - 1], ib = sb[r - 1];
  const std::int64_t rows = n / std::max<std::int64_t>(inner, 1);
  cpu_runtime::parallel_for(rows, std::max<std::int64_t>(1, elementwise_grain / std::max<std::int64_t>(inner, 1)),
                            [&](std::int64_t rb, std::int64_t re) {
                              for (std::int64_t row = rb; row < re; ++row) {
                                std::int64_t rem = row, oa = 0, ob = 0;
                                for (int d = r - 2; d >= 0; --d) {
                                  const std::int64_t idx = rem % out[d];
                                  rem /= out[d];
                                  oa += idx * sa[d];
                                  ob += idx * sb[d];
                                }
                                const std::int64_t base = row * inner;
                                for (std::int64_t j = 0; j < inner; ++j) f(base + j, oa + j * ia, ob + j * ib);
                              }
                            });
}

enum class binary_op { add, sub, mul, div };

template <binary_op Op, class C>
KILN_HOST_DEVICE inline C apply_binary(C a, C b) {
  if constexpr (Op == binary_op::add) return a + b;
  if constexpr (Op == binary_op::sub) return a - b;
  if constexpr (Op == binary_op::mul) return a * b;
  if constexpr (Op == binary_op::div) return a / b;
}

template <binary_op Op, class T>
void binary_forward(const tensor<T>& a, const tensor<T>& b, tensor<T>& out) {
  using C = compute_t<T>;
  const T *ap = a.data(), *bp = b.data();
  T* op = out.data();
  if (a.shape() == b.shape()) {
    cpu_runtime::parallel_for(a.numel(), elementwise_grain, [&](std::int64_t s, std::int64_t e) {
      for (std::int64_t i = s; i < e; ++i) op[i] = static_cast<T>(apply_binary<Op>(C(ap[i]), C(bp[i])));
    });
    return;
  }
  for_each_broadcast(out.shape(), a.shape(), b.shape(), [&](std::int64_t o, std::int64_t ia, std::int64_t ib) {
    op[o] = static_cast<T>(apply_binary<Op>(C(ap[ia]), C(bp[ib])));
  });
}

// Sums `full` (shape `from`) down to `to` (a broadcast source of `from`) and writes it.
template <class T>
void sum_to_shape(const tensor<T>& full, tensor<T>& dst, grad_write mode) {
  using C = compute_t<T>;
  const T* s = full.data();
  T* d = dst.data();
  if (full.shape() == dst.shape()) {
    cpu_runtime::parallel_for(full.numel(), elementwise_grain, [=](std::int64_t b, std::int64_t e) {
      for (std::int64_t i = b; i < e; ++i) store_grad(d[i], C(s[i]), mode);
    });
    return;
  }
  // Broadcast over leading dimensions only (a position embedding [T, C] under [B, T, C]):
  // full is [rows, inner] and dst is [inner]; each thread owns a column range and adds
  // the rows in order, so the sums do not depend on the thread count.
  const int lead = full.rank() - dst.rank();
  bool trailing = lead >= 0;
  for (int i = 0; trailing && i < dst.rank(); ++i) trailing = dst.shape()[i] == full.shape()[lead + i];
  if (trailing) {
    const std::int64_t inner = dst.numel(), rows = inner > 0 ? full.numel() / inner : 0;
    cpu_runtime::parallel_for(inner, 1024, [=](std::int64_t cb, std::int64_t ce) {
      std::vector<C> acc(static_cast<std::size_t>(ce - cb), C(0));
      C* a = acc.data();
      for (std::int64_t r = 0; r < rows; ++r) {
        const T* row = s + r * inner + cb;
        for (std::int64_t j = 0; j < ce - cb; ++j) a[j] += C(row[j]);
      }
      for (std::int64_t j = cb; j < ce; ++j) store_grad(d[j], a[j - cb], mode);
    });
    return;
  }
  std::vector<C> acc(static_cast<std::size_t>(dst.numel()), C(0));
  const shape st = broadcast_strides(dst.shape(), full.shape());
  const int r = full.rank();
  for (std::int64_t i = 0; i < full.numel(); ++i) {
    std::int64_t rem = i, off = 0;
    for (int k = r - 1; k >= 0; --k) {
      off += (rem % full.shape()[k]) * st[k];
      rem /= full.shape()[k];
    }
    acc[static_cast<std::size_t>(off)] += C(s[i]);
  }
  for (std::int64_t i = 0; i < dst.numel(); ++i) store_grad(d[i], acc[static_cast<std::size_t>(i)], mode);
}

// Gradient of a (which == 0) or b (which == 1) of `a Op b`, written into g with `mode`.
template <binary_op Op, class T>
void binary_backward(const tensor<T>& a, const tensor<T>& b, const tensor<T>& gy, int which, tensor<T>& g,
                     grad_write mode) {
  using C = compute_t<T>;
  auto partial = [which](C av, C bv, C gv) -> C {
    if constexpr (Op == binary_op::add) return gv;
    if constexpr (Op == binary_op::sub) return which == 0 ? gv : -gv;
    if constexpr (Op == binary_op::mul) return which == 0 ? gv * bv : gv * av;
    if constexpr (Op == binary_op::div) return which == 0 ? gv / bv : -gv * av / (bv * bv);
  };
  const T *ap = a.data(), *bp = b.data(), *gp = gy.data();
  const shape& target = which == 0 ? a.shape() : b.shape();
  if (a.shape() == gy.shape() && b.shape() == gy.shape()) {  // no broadcast: one flat pass
    T* gpo = g.data();
    cpu_runtime::parallel_for(gy.numel(), elementwise_grain, [=](std::int64_t s, std::int64_t e) {
      for (std::int64_t i = s; i < e; ++i) store_grad(gpo[i], partial(C(ap[i]), C(bp[i]), C(gp[i])), mode);
    });
    return;
  }
  if (target == gy.shape()) {
    T* gpo = g.data();
    for_each_broadcast(gy.shape(), a.shape(), b.shape(), [&](std::int64_t o, std::int64_t ia, std::int64_t ib) {
      store_grad(gpo[o], partial(C(ap[ia]), C(bp[ib]), C(gp[o])), mode);
    });
    return;
  }
  tensor<T> full(gy.shape());
  T* fp = full.data();
  for_each_broadcast(gy.shape(), a.shape(), b.shape(), [&](std::int64_t o, std::int64_t ia, std::int64_t ib) {
    fp[o] = static_cast<T>(partial(C(ap[ia]), C(bp[ib]), C(gp[o])));
  });
  sum_to_shape(full, g, mode);
}

// y = x * s (scalar), used by mean and loss normalisation.
template <class T>
void scale(const tensor<T>& x, compute_t<T> s, tensor<T>& y, grad_write mode) {
  using C = compute_t<T>;
  const T* xp = x.data();
  T* yp = y.data();
  cpu_runtime::parallel_for(x.numel(), elementwise_grain, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) store_grad(yp[i], C(xp[i]) * s, mode);
  });
}

// SwiGLU: y = silu(gate) * up (LLaMA's MLP gate).
template <class T>
void swiglu_forward(const tensor<T>& gate, const tensor<T>& up, tensor<T>& y) {
  using C = compute_t<T>;
  const T *g = gate.data(), *u = up.data();
  T* o = y.data();
  cpu_runtime::parallel_for(y.numel(), elementwise_grain, [=](std::int64_t b, std::int64_t e) {
    const T* __restrict gs = g, * __restrict us = u;
    T* __restrict os = o;
    for (std::int64_t i = b; i < e; ++i) os[i] = static_cast<T>(fn::silu{}(C(gs[i])) * C(us[i]));
  });
}
template <class T>
void swiglu_backward(const tensor<T>& gate, const tensor<T>& up, const tensor<T>& gy, tensor<T>* ggate,
                     grad_write mgate, tensor<T>* gup, grad_write mup) {
  using C = compute_t<T>;
  const T *g = gate.data(), *u = up.data(), *d = gy.data();
  T* gg = ggate ? ggate->data() : nullptr;
  T* gu = gup ? gup->data() : nullptr;
  cpu_runtime::parallel_for(gy.numel(), elementwise_grain, [=](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      const C gv = C(g[i]), dv = C(d[i]);
      if (gg) store_grad(gg[i], fn::silu{}.grad(gv, dv * C(u[i])), mgate);
      if (gu) store_grad(gu[i], fn::silu{}(gv)*dv, mup);
    }
  });
}

// Inverted dropout with a counter-based mask: element i is kept iff
// uniform(stream, i) >= p, and scaled by 1/(1-p). Backward regenerates the mask.
template <class T>
void dropout_apply(const tensor<T>& x, float p, philox_stream rng, tensor<T>& y, grad_write mode) {
  using C = compute_t<T>;
  const C scale = p < 1.0f ? C(1) / (C(1) - C(p)) : C(0);
  const T* xp = x.data();
  T* yp = y.data();
  cpu_runtime::parallel_for(x.numel(), elementwise_grain, [&](std::int64_t b, std::int64_t e) {
    for (std::int64_t i = b; i < e; ++i) {
      const bool keep = rng.uniform(static_cast<std::uint64_t>(i)) >= p;
      store_grad(yp[i], keep ? C(xp[i]) * scale : C(0), mode);
    }
  });
}

}  // namespace kiln::ops::cpu
