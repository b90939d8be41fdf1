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
#pragma once

#include <optional>

#include "kiln/ops/matmul.hpp"

namespace kiln::ops {

template <floating_element T, device Dev>
var<T, Dev> lora_linear(const var<T, Dev>& x, const var<T, Dev>& w, const std::optional<var<T, Dev>>& bias,
                        const var<T, Dev>& xa, const var<T, Dev>& a, const var<T, Dev>& b, double s) {
  const std::int64_t in = w.size(1), out = w.size(0), r = a.size(0);
  KILN_CHECK(w.rank() == 2 && x.rank() >= 1 && x.shape().back() == in, "lora_linear: input ", x.shape().str(),
             " does not match weight ", w.shape().str());
  KILN_CHECK(xa.shape() == x.shape(), "lora_linear: the adapter's input ", xa.shape().str(), " is not shaped as x ",
             x.shape().str());
  KILN_CHECK(a.rank() == 2 && a.size(1) == in && b.rank() == 2 && b.size(0) == out && b.size(1) == r,
             "lora_linear: adapters A ", a.shape().str(), " and B ", b.shape().str(), " do not fit weight ",
             w.shape().str(), " (expected A [r, ", in, "], B [", out, ", r])");
  KILN_CHECK(!bias || (bias->rank() == 1 && bias->size(0) == out), "lora_linear: bias does not match weight ",
             w.shape().str());
  KILN_CHECK(w.value().is_contiguous() && a.value().is_contiguous() && b.value().is_contiguous(),
             "lora_linear: weight and adapters must be contiguous");
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
  detail::linear_forward_on(xv, w.value(), bias ? &bias->value() : nullptr, y);
  detail::gemm_on<T, Dev>(false, true, n, r, in, xav.data(), in, a.value().data(), in, h.data(), r,
                          grad_write::overwrite);
  scale(h, s, h);
  detail::gemm_on<T, Dev>(false, true, n, out, r, h.data(), r, b.value().data(), r, y.data(), out,
                          grad_write::accumulate);

  auto backward = [x, w, bias, xa, a, b, s, xv, xav, h, shared_input, n, in, out, r,
                   scale](const tensor<T, Dev>& gy_in) mutable {
    auto gy = gy_in.contiguous();
    const bool bx = x.requires_grad(), bw = w.requires_grad(), bb = bias && bias->requires_grad();
    const bool bxa = !shared_input && xa.requires_grad();
    const grad_write mx = bx ? x.begin_grad_write() : grad_write::overwrite;
    if (bx || bw || bb) {
      const grad_write mw = bw ? w.begin_grad_write() : grad_write::overwrite;
      const grad_write mb = bb ? bias->begin_grad_write() : grad_write::overwrite;
      detail::linear_backward_on(xv, w.value(), gy, bx ? &x.grad() : nullptr, mx, bw ? &w.grad() : nullptr, mw,
                                 bb ? &bias->grad() : nullptr, mb);
    }
    if (b.requires_grad())
      detail::gemm_on<T, Dev>(true, false, out, r, n, gy.data(), out, h.data(), r, b.grad().data(), r,
                              b.begin_grad_write());
    const bool need_u = a.requires_grad() || (bx && shared_input) || bxa;
    if (!need_u) return;
    tensor<T, Dev> u(shape{n, r});
    detail::gemm_on<T, Dev>(false, false, n, r, out, gy.data(), out, b.value().data(), r, u.data(), r,
                            grad_write::overwrite);
    scale(u, s, u);
    if (a.requires_grad())
      detail::gemm_on<T, Dev>(true, false, r, in, n, u.data(), r, xav.data(), in, a.grad().data(), in,
                              a.begin_grad_write());
    if (bx && shared_input)  // the base wrote x's gradient above: add the adapter's
      detail::gemm_on<T, Dev>(false, false, n, in, r, u.data(), r, a.value().data(), in, x.grad().data(), in,
                              grad_write::accumulate);
    if (bxa)
      detail::gemm_on<T, Dev>(false, false, n, in, r, u.data(), r, a.value().data(), in, xa.grad().data(), in,
                              xa.begin_grad_write());
  };
  if (bias) {
    if (shared_input) return autograd::record(std::move(y), std::move(backward), x, w, *bias, a, b);
    return autograd::record(std::move(y), std::move(backward), x, w, *bias, xa, a, b);
  }
  if (shared_input) return autograd::record(std::move(y), std::move(backward), x, w, a, b);
  return autograd::record(std::move(y), std::move(backward), x, w, xa, a, b);
}

}  // namespace kiln::ops
