// kiln/ops/lora.hpp — a LoRA-adapted linear layer as one autograd node.
//
// Spec: lora_linear(x, W, bias, xa, A, B, s) = x·Wᵀ + b + s·(xa·Aᵀ)·Bᵀ with x [..., in],
// W [out, in], A [r, in], B [out, r]; xa is the adapter's input — x itself, or
// dropout(x) in training (then its own var, same shape). One node:
//   forward: the base GEMM (and bias), h = s·(xa·Aᵀ) [n, r], kept for the backward (r
//   values a row), then y += h·Bᵀ. Neither W + s·B·A nor an [n, out] temporary is formed.
//   backward, with g = ∂L/∂y [n, out]:
//     ∂L/∂B  = gᵀ·h                  [out, r]
//     u      = s·g·B                 [n, r]
//     ∂L/∂A  = uᵀ·xa                 [r, in]
//     ∂L/∂x  = g·W  (+ u·A when xa is x: both read the same gradient buffer)
//     ∂L/∂xa = u·A  (when xa is another var)
//   W's and b's gradients are formed only when they require one: a frozen base (the LoRA
//   case) costs the backward one GEMM, g·W. Derivation: y is linear in each of h, B and A;
//   ∂y/∂h = Bᵀ row by row, so ∂L/∂(xa·Aᵀ) = s·g·B = u, and the two GEMMs of the low-rank
//   path transpose as any linear layer's do.
// Both devices: the GEMMs are ops::detail::gemm_on (oneDNN/Eigen, cuBLASLt).
//
// qlora_linear(x, Wq, bias, xa, A, B, s) is the same node over an NF4 base
// (kiln/ops/kernel/nf4.hpp), which is frozen by construction: the forward and the
// backward's g·W expand W a tile of rows at a time (64 Ki elements of T)
// into a buffer that is reused, each tile's GEMM writing its columns of y (or adding its
// rows' share of ∂L/∂x), so no full-size copy of W exists at any time. CPU only for now.
#pragma once

#include <algorithm>
#include <memory>
#include <optional>
#include <vector>

#include "kiln/ops/kernel/nf4.hpp"
#include "kiln/ops/matmul.hpp"

namespace kiln::ops {

namespace detail {
// The base layer of a LoRA node: a dense weight var (trainable or not)...
template <floating_element T, device Dev>
struct dense_base {
  var<T, Dev> w;
  std::int64_t in() const { return w.size(1); }
  std::int64_t out() const { return w.size(0); }
  std::string shape_str() const { return w.shape().str(); }
  bool trainable() const { return w.requires_grad(); }
  void check() const {
    KILN_CHECK(w.rank() == 2 && w.value().is_contiguous(), "lora_linear: the weight must be a contiguous matrix, got ",
               w.shape().str());
  }
  void forward(const tensor<T, Dev>& x, const tensor<T, Dev>* bias, tensor<T, Dev>& y) const {
    linear_forward_on(x, w.value(), bias, y);
  }
  // ∂L/∂x (when gx), ∂L/∂W (when W is trainable) and ∂L/∂b (when gb).
  void backward(const tensor<T, Dev>& x, const tensor<T, Dev>& gy, tensor<T, Dev>* gx, grad_write mx,
                tensor<T, Dev>* gb, grad_write mb) const {
    const bool bw = w.requires_grad();
    const grad_write mw = bw ? w.begin_grad_write() : grad_write::overwrite;
    linear_backward_on(x, w.value(), gy, gx, mx, bw ? &w.grad() : nullptr, mw, gb, mb);
  }
};

// ...or an NF4 matrix, frozen, expanded a tile of rows at a time.
template <floating_element T>
struct nf4_base {
  std::shared_ptr<const nf4::nf4_weight> q;
  std::int64_t in() const { return q->dims[1]; }
  std::int64_t out() const { return q->dims[0]; }
  std::string shape_str() const { return q->dims.str() + " (NF4)"; }
  static constexpr bool trainable() { return false; }
  void check() const {
    KILN_CHECK(q && q->dims.rank() == 2, "qlora_linear: the NF4 weight must be a quantised matrix");
  }
  std::int64_t tile_rows() const {
    return std::clamp<std::int64_t>((64 << 10) / std::max<std::int64_t>(1, in()), 16, out());
  }
  template <class F>
  void tiles(F&& f) const {
    const std::int64_t rows = tile_rows();
    std::vector<T> buf(static_cast<std::size_t>(rows * in()));
    for (std::int64_t r0 = 0; r0 < out(); r0 += rows) {
      const std::int64_t r1 = std::min(out(), r0 + rows);
      nf4::dequantize_rows(*q, r0, r1, buf.data());
      f(r0, r1, buf.data());
    }
  }
  void forward(const tensor<T, kiln::cpu>& x, const tensor<T, kiln::cpu>* bias, tensor<T, kiln::cpu>& y) const {
    const std::int64_t n = x.shape().rows(), k = in(), o = out();
    tiles([&](std::int64_t r0, std::int64_t r1, const T* wt) {
      cpu::gemm<T>(false, true, n, r1 - r0, k, x.data(), k, wt, k, y.data() + r0, o, grad_write::overwrite);
    });
    if (bias) {
      const T* bp = bias->data();
      T* yp = y.data();
      cpu_runtime::parallel_for(n, 64, [&](std::int64_t b, std::int64_t e) {
        for (std::int64_t r = b; r < e; ++r)
          for (std::int64_t j = 0; j < o; ++j)
            yp[r * o + j] = static_cast<T>(compute_t<T>(yp[r * o + j]) + compute_t<T>(bp[j]));
      });
    }
  }
  void backward(const tensor<T, kiln::cpu>& x, const tensor<T, kiln::cpu>& gy, tensor<T, kiln::cpu>* gx, grad_write mx,
                tensor<T, kiln::cpu>* gb, grad_write mb) const {
    const std::int64_t n = x.shape().rows(), k = in(), o = out();
    if (gx) {
      grad_write m = mx;
      tiles([&](std::int64_t r0, std::int64_t r1, const T* wt) {
        cpu::gemm<T>(false, false, n, k, r1 - r0, gy.data() + r0, o, wt, k, gx->data(), k, m);
        m = grad_write::accumulate;
      });
    }
    if (gb) cpu::bias_grad(gy, *gb, mb);
  }
};

// The node itself (see the spec), over either base.
template <floating_element T, device Dev, class Base>
var<T, Dev> lora_node(const var<T, Dev>& x, const Base& base, const std::optional<var<T, Dev>>& bias,
                      const var<T, Dev>& xa, const var<T, Dev>& a, const var<T, Dev>& b, double s) {
  base.check();
  const std::int64_t in = base.in(), out = base.out(), r = a.size(0);
  KILN_CHECK(x.rank() >= 1 && x.shape().back() == in, "lora_linear: input ", x.shape().str(), " does not match weight ",
             base.shape_str());
  KILN_CHECK(xa.shape() == x.shape(), "lora_linear: the adapter's input ", xa.shape().str(), " is not shaped as x ",
             x.shape().str());
  KILN_CHECK(a.rank() == 2 && a.size(1) == in && b.rank() == 2 && b.size(0) == out && b.size(1) == r,
             "lora_linear: adapters A ", a.shape().str(), " and B ", b.shape().str(), " do not fit weight ",
             base.shape_str(), " (expected A [r, ", in, "], B [", out, ", r])");
  KILN_CHECK(!bias || (bias->rank() == 1 && bias->size(0) == out), "lora_linear: bias does not match weight ",
             base.shape_str());
  KILN_CHECK(a.value().is_contiguous() && b.value().is_contiguous(), "lora_linear: the adapters must be contiguous");
  const bool shared_input = xa.id() == x.id();
  auto xv = x.value().contiguous();
  auto xav = shared_input ? xv : xa.value().contiguous();
  const std::int64_t n = xv.shape().rows();
  shape ys = xv.shape();
  ys[ys.rank() - 1] = out;
  tensor<T, Dev> y(ys), h(shape{n, r});
  auto scale = [](const tensor<T, Dev>& in_t, double f, tensor<T, Dev>& out_t) {
    if constexpr (Dev::is_host)
      cpu::scale(in_t, static_cast<compute_t<T>>(f), out_t, grad_write::overwrite);
    else
      gpu::scale(in_t, static_cast<float>(f), out_t, grad_write::overwrite);
  };
  base.forward(xv, bias ? &bias->value() : nullptr, y);
  gemm_on<T, Dev>(false, true, n, r, in, xav.data(), in, a.value().data(), in, h.data(), r, grad_write::overwrite);
  scale(h, s, h);
  gemm_on<T, Dev>(false, true, n, out, r, h.data(), r, b.value().data(), r, y.data(), out, grad_write::accumulate);

  auto backward = [x, base, bias, xa, a, b, s, xv, xav, h, shared_input, n, in, out, r,
                   scale](const tensor<T, Dev>& gy_in) mutable {
    auto gy = gy_in.contiguous();
    const bool bx = x.requires_grad(), bw = base.trainable(), bb = bias && bias->requires_grad();
    const bool bxa = !shared_input && xa.requires_grad();
    const grad_write mx = bx ? x.begin_grad_write() : grad_write::overwrite;
    if (bx || bw || bb) {
      const grad_write mb = bb ? bias->begin_grad_write() : grad_write::overwrite;
      base.backward(xv, gy, bx ? &x.grad() : nullptr, mx, bb ? &bias->grad() : nullptr, mb);
    }
    if (b.requires_grad())
      gemm_on<T, Dev>(true, false, out, r, n, gy.data(), out, h.data(), r, b.grad().data(), r, b.begin_grad_write());
    const bool need_u = a.requires_grad() || (bx && shared_input) || bxa;
    if (!need_u) return;
    tensor<T, Dev> u(shape{n, r});
    gemm_on<T, Dev>(false, false, n, r, out, gy.data(), out, b.value().data(), r, u.data(), r, grad_write::overwrite);
    scale(u, s, u);
    if (a.requires_grad())
      gemm_on<T, Dev>(true, false, r, in, n, u.data(), r, xav.data(), in, a.grad().data(), in, a.begin_grad_write());
    if (bx && shared_input)  // the base wrote x's gradient above: add the adapter's
      gemm_on<T, Dev>(false, false, n, in, r, u.data(), r, a.value().data(), in, x.grad().data(), in,
                      grad_write::accumulate);
    if (bxa)
      gemm_on<T, Dev>(false, false, n, in, r, u.data(), r, a.value().data(), in, xa.grad().data(), in,
                      xa.begin_grad_write());
  };
  auto rec = [&](const auto&... ins) { return autograd::record(std::move(y), std::move(backward), ins...); };
  auto with_base = [&](const auto&... ins) {
    if constexpr (std::is_same_v<Base, dense_base<T, Dev>>)
      return rec(x, base.w, ins...);
    else
      return rec(x, ins...);
  };
  if (bias) {
    if (shared_input) return with_base(*bias, a, b);
    return with_base(*bias, xa, a, b);
  }
  if (shared_input) return with_base(a, b);
  return with_base(xa, a, b);
}
}  // namespace detail

template <floating_element T, device Dev>
var<T, Dev> lora_linear(const var<T, Dev>& x, const var<T, Dev>& w, const std::optional<var<T, Dev>>& bias,
                        const var<T, Dev>& xa, const var<T, Dev>& a, const var<T, Dev>& b, double s) {
  return detail::lora_node(x, detail::dense_base<T, Dev>{w}, bias, xa, a, b, s);
}

// x·Wᵀ + b over a frozen NF4 base alone (a quantised layer without an adapter).
template <floating_element T, device Dev>
var<T, Dev> nf4_linear(const var<T, Dev>& x, const std::shared_ptr<const nf4::nf4_weight>& wq,
                       const std::optional<var<T, Dev>>& bias) {
  static_assert(Dev::is_host, "nf4_linear: the NF4 base GEMM runs on the CPU only in this release");
  const detail::nf4_base<T> base{wq};
  base.check();
  KILN_CHECK(x.rank() >= 1 && x.shape().back() == base.in(), "nf4_linear: input ", x.shape().str(),
             " does not match weight ", base.shape_str());
  auto xv = x.value().contiguous();
  shape ys = xv.shape();
  ys[ys.rank() - 1] = base.out();
  tensor<T, Dev> y(ys);
  base.forward(xv, bias ? &bias->value() : nullptr, y);
  auto backward = [x, base, bias, xv](const tensor<T, Dev>& gy_in) {
    auto gy = gy_in.contiguous();
    const bool bx = x.requires_grad(), bb = bias && bias->requires_grad();
    const grad_write mx = bx ? x.begin_grad_write() : grad_write::overwrite;
    const grad_write mb = bb ? bias->begin_grad_write() : grad_write::overwrite;
    base.backward(xv, gy, bx ? &x.grad() : nullptr, mx, bb ? &bias->grad() : nullptr, mb);
  };
  if (bias) return autograd::record(std::move(y), std::move(backward), x, *bias);
  return autograd::record(std::move(y), std::move(backward), x);
}

// The node over a frozen NF4 base (see the spec); the CPU's.
template <floating_element T, device Dev>
var<T, Dev> qlora_linear(const var<T, Dev>& x, const std::shared_ptr<const nf4::nf4_weight>& wq,
                         const std::optional<var<T, Dev>>& bias, const var<T, Dev>& xa, const var<T, Dev>& a,
                         const var<T, Dev>& b, double s) {
  static_assert(Dev::is_host, "qlora_linear: the NF4 base GEMM runs on the CPU only in this release");
  return detail::lora_node(x, detail::nf4_base<T>{wq}, bias, xa, a, b, s);
}

}  // namespace kiln::ops
