// kiln/ops/softmax.hpp — differentiable softmax, log_softmax and fused cross-entropy.
#pragma once

#include <memory>

#include "kiln/autograd/var.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/cpu/softmax.hpp"

namespace kiln::ops {

using cross_entropy_options = cpu::cross_entropy_options;

namespace detail {
template <floating_element T, device Dev>
var<T, Dev> softmax_impl(const var<T, Dev>& x, bool log) {
  auto xv = x.value().contiguous();
  tensor<T, Dev> y(xv.shape());
  if constexpr (Dev::is_host)
    cpu::softmax_forward(xv, y, log);
  else
    gpu::softmax_forward(xv, y, log);
  return autograd::record(
      y,
      [x, y, log](const tensor<T, Dev>& gy) mutable {
        const grad_write m = x.begin_grad_write();
        if constexpr (Dev::is_host)
          cpu::softmax_backward(y, gy, x.grad(), log, m);
        else
          gpu::softmax_backward(y, gy.contiguous(), x.grad(), log, m);
      },
      x);
}
}  // namespace detail

// Softmax over the last dimension.
template <floating_element T, device Dev>
var<T, Dev> softmax(const var<T, Dev>& x) {
  return detail::softmax_impl(x, false);
}
// Log-softmax over the last dimension.
template <floating_element T, device Dev>
var<T, Dev> log_softmax(const var<T, Dev>& x) {
  return detail::softmax_impl(x, true);
}

// Fused softmax + negative log-likelihood: logits [..., C], target [...] (class ids).
// Rows whose target equals ignore_index contribute nothing and are not counted by the
// mean. label_smoothing ε mixes the one-hot target with the uniform distribution
// (PyTorch semantics). If every row is ignored the mean is 0 with a zero gradient.
template <floating_element T, device Dev, index_element I>
var<T, Dev> cross_entropy(const var<T, Dev>& logits, const tensor<I, Dev>& target, cross_entropy_options opt = {}) {
  KILN_CHECK(opt.label_smoothing >= 0.0f && opt.label_smoothing <= 1.0f, "cross_entropy: label_smoothing ",
             opt.label_smoothing, " is outside [0, 1]");
  if constexpr (!Dev::is_host) {
    // The device path (kernels/ops_layers.cu): i64 targets, the loss reduced on the device.
    static_assert(std::is_same_v<I, i64>, "kiln::cross_entropy on cuda: targets must be i64");
    auto xv = logits.value().contiguous();
    auto tv = target.contiguous();
    tensor<T, Dev> y(shape{});
    const std::int64_t count = gpu::cross_entropy_forward(xv, tv, opt, y);
    return autograd::record(
        std::move(y),
        [logits, xv, tv, opt, count](const tensor<T, Dev>& gy) mutable {
          const grad_write m = logits.begin_grad_write();
          gpu::cross_entropy_backward(xv, tv, opt, count, gy, logits.grad(), m);
        },
        logits);
  } else {
    using C = compute_t<T>;
    auto xv = logits.value().contiguous();
    auto tv = target.contiguous();
    auto lse = std::make_shared<std::vector<C>>(static_cast<std::size_t>(xv.shape().rows()));
    C loss = 0;
    const std::int64_t count = cpu::cross_entropy_forward(xv, tv, opt, lse->data(), loss);
    tensor<T, Dev> y = tensor<T, Dev>::full(shape{}, static_cast<T>(loss));
    return autograd::record(
        std::move(y),
        [logits, xv, tv, opt, lse, count](const tensor<T, Dev>& gy) mutable {
          const grad_write m = logits.begin_grad_write();
          cpu::cross_entropy_backward(xv, tv, opt, lse->data(), count, C(gy.data()[0]), logits.grad(), m);
        },
        logits);
  }
}

}  // namespace kiln::ops
