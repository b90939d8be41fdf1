// kiln/ops/shape_ops.hpp — differentiable reshape, transpose, slice and concat.
//
// reshape, transpose and slice return views of the input's storage where the layout
// allows (no copy); consumers that need contiguous data copy on use. Their backward
// writes the incoming gradient through the same view into the input's gradient.
#pragma once

#include <vector>

#include "kiln/autograd/var.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/cpu/reduce.hpp"

namespace kiln::ops {

namespace detail {
// dst (=|+=) src through dst's strides, on either device (src contiguous).
template <floating_element T, device Dev>
void store_view(tensor<T, Dev> dst, const tensor<T, Dev>& src, grad_write mode) {
  if constexpr (Dev::is_host)
    cpu::strided_store(dst, src, mode);
  else
    gpu::strided_store(dst, src, mode);
}

// Backward of an op whose output is x's elements in the same order under another shape
// (reshape, unflatten): x's gradient buffer is contiguous, so viewing it in the output's
// shape is free.
template <floating_element T, device Dev>
auto same_order_backward(const var<T, Dev>& x) {
  return [x](const tensor<T, Dev>& gy) mutable {
    const grad_write m = x.begin_grad_write();
    store_view(x.grad().reshape(gy.shape()), gy.contiguous(), m);
  };
}
}  // namespace detail

template <floating_element T, device Dev>
var<T, Dev> reshape(const var<T, Dev>& x, shape s) {
  return autograd::record(x.value().reshape(s), detail::same_order_backward(x), x);
}

template <floating_element T, device Dev>
var<T, Dev> transpose(const var<T, Dev>& x, int d0, int d1) {
  tensor<T, Dev> y = x.value().transpose(d0, d1);
  return autograd::record(
      std::move(y),
      [x, d0, d1](const tensor<T, Dev>& gy) mutable {
        const grad_write m = x.begin_grad_write();
        detail::store_view(x.grad().transpose(d0, d1), gy.contiguous(), m);
      },
      x);
}

// Splits dimension `dim` into `sizes` (a view, whatever the input's strides).
template <floating_element T, device Dev>
var<T, Dev> unflatten(const var<T, Dev>& x, int dim, std::initializer_list<std::int64_t> sizes) {
  return autograd::record(x.value().unflatten(dim, sizes), detail::same_order_backward(x), x);
}

// Elements [start, end) of `dim` with step (a view).
template <floating_element T, device Dev>
var<T, Dev> slice(const var<T, Dev>& x, int dim, std::int64_t start, std::int64_t end, std::int64_t step = 1) {
  tensor<T, Dev> y = x.value().slice(dim, start, end, step);
  return autograd::record(
      std::move(y),
      [x, dim, start, end, step](const tensor<T, Dev>& gy) mutable {
        const grad_write m = x.begin_grad_write();
        if (m == grad_write::overwrite) x.grad().fill(T(0));
        detail::store_view(x.grad().slice(dim, start, end, step), gy.contiguous(), grad_write::accumulate);
      },
      x);
}

// Joins tensors along `dim`; all other dimensions must agree.
template <floating_element T, device Dev>
var<T, Dev> concat(const std::vector<var<T, Dev>>& xs, int dim) {
  KILN_CHECK(!xs.empty(), "concat: no inputs");
  const shape& s0 = xs[0].shape();
  if (dim < 0) dim += s0.rank();
  KILN_CHECK(0 <= dim && dim < s0.rank(), "concat: dimension ", dim, " out of range for ", s0.str());
  shape out = s0;
  out[dim] = 0;
  bool needs_grad = false;
  for (const auto& x : xs) {
    KILN_CHECK(x.rank() == s0.rank(), "concat: ranks differ, ", s0.str(), " vs ", x.shape().str());
    for (int i = 0; i < s0.rank(); ++i)
      KILN_CHECK(i == dim || x.size(i) == s0[i], "concat: shapes ", s0.str(), " and ", x.shape().str(),
                 " differ outside dimension ", dim);
    out[dim] += x.size(dim);
    needs_grad = needs_grad || x.requires_grad();
  }
  tensor<T, Dev> y(out);
  std::vector<std::int64_t> starts;
  std::int64_t at = 0;
  for (const auto& x : xs) {
    starts.push_back(at);
    auto dst = y.slice(dim, at, at + x.size(dim));
    dst.copy_from(x.value());
    at += x.size(dim);
  }
  for (const auto& x : xs) autograd::any_requires_grad(x);  // the tape learns which parameters the node reads
  if (!autograd::grad_enabled() || !needs_grad) return var<T, Dev>(std::move(y));
  var<T, Dev> result = var<T, Dev>::make_result(std::move(y));
  autograd::record_node(result, [xs, starts, dim](const tensor<T, Dev>& gy) mutable {
    for (std::size_t i = 0; i < xs.size(); ++i) {
      auto& x = xs[i];
      if (!x.requires_grad()) continue;
      const grad_write m = x.begin_grad_write();
      auto part = gy.slice(dim, starts[i], starts[i] + x.size(dim));
      detail::store_view(x.grad(), part.contiguous(), m);
    }
  });
  return result;
}

}  // namespace kiln::ops
