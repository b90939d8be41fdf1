// kiln/ops/norm.hpp — differentiable layer_norm and rms_norm over the last dimension.
#pragma once

#include <memory>
#include <optional>
#include <type_traits>
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
  const std::int64_t rows = xv.shape().rows();
  // mean and rstd per row, kept for backward: compute_t<T> on the host, f32 on the device
  // (kernels/norm.cu through kernels/ops_layers.cu).
  using stats_t = std::conditional_t<Dev::is_host, std::vector<compute_t<T>>, tensor<float, Dev>>;
  auto stats = [&] {
    if constexpr (Dev::is_host)
      return std::make_shared<stats_t>(static_cast<std::size_t>(2 * rows));
    else
      return std::make_shared<stats_t>(shape{2 * rows});
  }();
  const T* wp = w ? w->value().data() : nullptr;
  tensor<T, Dev> y(xv.shape());
  if constexpr (Dev::is_host)
    cpu::norm_forward(xv, wp, b ? b->value().data() : nullptr, eps, rms, y, stats->data(), stats->data() + rows);
  else
    gpu::norm_forward(xv, wp, b ? b->value().data() : nullptr, eps, rms, y, *stats);
  auto backward = [x, w, b, xv, stats, rows, rms](const tensor<T, Dev>& gy) mutable {
    const bool bx = x.requires_grad(), bw = w && w->requires_grad(), bb = b && b->requires_grad();
    const grad_write mx = bx ? x.begin_grad_write() : grad_write::overwrite;
    const grad_write mw = bw ? w->begin_grad_write() : grad_write::overwrite;
    const grad_write mb = bb ? b->begin_grad_write() : grad_write::overwrite;
    T* gx = bx ? x.grad().data() : nullptr;
    T* gw = bw ? w->grad().data() : nullptr;
    T* gb = bb ? b->grad().data() : nullptr;
    const T* wp = w ? w->value().data() : nullptr;
    if constexpr (Dev::is_host)
      cpu::norm_backward(xv, wp, gy, stats->data(), stats->data() + rows, rms, gx, mx, gw, mw, gb, mb);
    else
      gpu::norm_backward(xv, wp, gy, *stats, rms, gx, mx, gw, mw, gb, mb);
  };
  if (w && b) return autograd::record(std::move(y), std::move(backward), x, *w, *b);
  if (w) return autograd::record(std::move(y), std::move(backward), x, *w);
  if (b) return autograd::record(std::move(y), std::move(backward), x, *b);
  return autograd::record(std::move(y), std::move(backward), x);
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
