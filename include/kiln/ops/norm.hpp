// kiln/ops/norm.hpp — differentiable layer_norm and rms_norm over the last dimension.
#pragma once

#include <memory>
#include <optional>
#include <vector>

#include "kiln/autograd/var.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/cpu/norm.hpp"

namespace kiln::ops {

namespace detail {
template <floating_element T, device Dev>
var<T, Dev> norm_impl(const var<T, Dev>& x, const std::optional<var<T, Dev>>& w, const std::optional<var<T, Dev>>& b,
                      double eps, bool rms, const char* name) {
  const std::int64_t d = x.shape().back();
  KILN_CHECK(!w || (w->rank() == 1 && w->size(0) == d), name, ": weight ", w ? w->shape().str() : "",
             " does not match the last dimension of input ", x.shape().str());
  KILN_CHECK(!b || (b->rank() == 1 && b->size(0) == d), name, ": bias ", b ? b->shape().str() : "",
             " does not match the last dimension of input ", x.shape().str());
  auto xv = x.value().contiguous();
  if constexpr (!Dev::is_host) {  // kernels/ops.cu over kernels/norm.cu; f32 stats on the device
    const std::int64_t rows = xv.shape().rows();
    auto stats = std::make_shared<tensor<float, Dev>>(shape{2 * rows});
    tensor<T, Dev> y(xv.shape());
    gpu::norm_forward(xv, w ? w->value().data() : nullptr, b ? b->value().data() : nullptr, eps, rms, y, *stats);
    auto backward = [x, w, b, xv, stats, rms](const tensor<T, Dev>& gy) mutable {
      const bool bx = x.requires_grad(), bw = w && w->requires_grad(), bb = b && b->requires_grad();
      const grad_write mx = bx ? x.begin_grad_write() : grad_write::overwrite;
      const grad_write mw = bw ? w->begin_grad_write() : grad_write::overwrite;
      const grad_write mb = bb ? b->begin_grad_write() : grad_write::overwrite;
      gpu::norm_backward(xv, w ? w->value().data() : nullptr, gy, *stats, rms, bx ? x.grad().data() : nullptr, mx,
                         bw ? w->grad().data() : nullptr, mw, bb ? b->grad().data() : nullptr, mb);
    };
    if (w && b) return autograd::record(std::move(y), std::move(backward), x, *w, *b);
    if (w) return autograd::record(std::move(y), std::move(backward), x, *w);
    if (b) return autograd::record(std::move(y), std::move(backward), x, *b);
    return autograd::record(std::move(y), std::move(backward), x);
  } else {
    using C = compute_t<T>;
    const auto rows = static_cast<std::size_t>(xv.shape().rows());
    auto stats = std::make_shared<std::vector<C>>(2 * rows);
    tensor<T, Dev> y(xv.shape());
    cpu::norm_forward(xv, w ? w->value().data() : nullptr, b ? b->value().data() : nullptr, eps, rms, y, stats->data(),
                      stats->data() + rows);
    auto backward = [x, w, b, xv, stats, rows, rms](const tensor<T, Dev>& gy) mutable {
      const bool bx = x.requires_grad(), bw = w && w->requires_grad(), bb = b && b->requires_grad();
      const grad_write mx = bx ? x.begin_grad_write() : grad_write::overwrite;
      const grad_write mw = bw ? w->begin_grad_write() : grad_write::overwrite;
      const grad_write mb = bb ? b->begin_grad_write() : grad_write::overwrite;
      cpu::norm_backward(xv, w ? w->value().data() : nullptr, gy, stats->data(), stats->data() + rows, rms,
                         bx ? x.grad().data() : nullptr, mx, bw ? w->grad().data() : nullptr, mw,
                         bb ? b->grad().data() : nullptr, mb);
    };
    if (w && b) return autograd::record(std::move(y), std::move(backward), x, *w, *b);
    if (w) return autograd::record(std::move(y), std::move(backward), x, *w);
    if (b) return autograd::record(std::move(y), std::move(backward), x, *b);
    return autograd::record(std::move(y), std::move(backward), x);
  }
}
}  // namespace detail

template <floating_element T, device Dev>
var<T, Dev> layer_norm(const var<T, Dev>& x, const std::optional<var<T, Dev>>& weight,
                       const std::optional<var<T, Dev>>& bias, double eps = 1e-5) {
  return detail::norm_impl(x, weight, bias, eps, false, "layer_norm");
}

template <floating_element T, device Dev>
var<T, Dev> rms_norm(const var<T, Dev>& x, const std::optional<var<T, Dev>>& weight, double eps = 1e-6) {
  return detail::norm_impl(x, weight, std::optional<var<T, Dev>>{}, eps, true, "rms_norm");
}

}  // namespace kiln::ops
