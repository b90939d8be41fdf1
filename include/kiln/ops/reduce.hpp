// kiln/ops/reduce.hpp — differentiable sum, mean, max and the MSE loss.
#pragma once

#include <memory>
#include <vector>

#include "kiln/autograd/var.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/arithmetic.hpp"
#include "kiln/ops/cpu/reduce.hpp"

namespace kiln::ops {

namespace detail {
inline shape reduced_shape(const shape& s, int dim, bool keepdim) {
  shape out;
  for (int i = 0; i < s.rank(); ++i) {
    if (i != dim)
      out.push_back(s[i]);
    else if (keepdim)
      out.push_back(1);
  }
  return out;
}

template <floating_element T, device Dev>
var<T, Dev> sum_scaled(const var<T, Dev>& x, int dim, bool keepdim, bool mean, bool all) {
  auto xv = x.value().contiguous();
  cpu::reduce_geometry g;
  shape out_shape;
  if (all) {
    g = {1, xv.numel(), 1};
  } else {
    dim = xv.norm_dim(dim, mean ? "mean" : "sum");
    g = cpu::geometry_of(xv.shape(), dim);
    out_shape = reduced_shape(xv.shape(), dim, keepdim);
  }
  using C = compute_t<T>;
  const C s = mean ? (g.n ? C(1) / C(g.n) : C(0)) : C(1);
  tensor<T, Dev> y(out_shape);
  if constexpr (Dev::is_host)
    cpu::sum_dim(xv, g, s, y);
  else
    gpu::sum_dim(xv, g, static_cast<float>(s), y);
  return autograd::record(
      std::move(y),
      [x, g, s](const tensor<T, Dev>& gy) mutable {
        const grad_write m = x.begin_grad_write();
        if constexpr (Dev::is_host)
          cpu::sum_dim_backward(gy, g, s, x.grad(), m);
        else
          gpu::sum_dim_backward(gy.contiguous(), g, static_cast<float>(s), x.grad(), m);
      },
      x);
}
}  // namespace detail

// Sum of all elements (a scalar).
template <floating_element T, device Dev>
var<T, Dev> sum(const var<T, Dev>& x) {
  return detail::sum_scaled(x, 0, false, false, true);
}
// Sum over one dimension.
template <floating_element T, device Dev>
var<T, Dev> sum(const var<T, Dev>& x, int dim, bool keepdim = false) {
  return detail::sum_scaled(x, dim, keepdim, false, false);
}
template <floating_element T, device Dev>
var<T, Dev> mean(const var<T, Dev>& x) {
  return detail::sum_scaled(x, 0, false, true, true);
}
template <floating_element T, device Dev>
var<T, Dev> mean(const var<T, Dev>& x, int dim, bool keepdim = false) {
  return detail::sum_scaled(x, dim, keepdim, true, false);
}

namespace detail {
// max over geometry g of a contiguous value; one node routing the gradient to the argmax.
template <floating_element T, device Dev>
var<T, Dev> max_over(const var<T, Dev>& x, const tensor<T, Dev>& xv, cpu::reduce_geometry g, const shape& out_shape) {
  if constexpr (!Dev::is_host) {
    tensor<std::int64_t, Dev> arg(shape{g.outer * g.inner});
    tensor<T, Dev> y(out_shape);
    gpu::max_dim(xv, g, y, arg);
    return autograd::record(
        std::move(y),
        [x, g, arg](const tensor<T, Dev>& gy) mutable {
          const grad_write m = x.begin_grad_write();
          gpu::max_dim_backward(gy.contiguous(), g, arg, x.grad(), m);
        },
        x);
  } else {
    auto arg = std::make_shared<std::vector<std::int64_t>>(static_cast<std::size_t>(g.outer * g.inner));
    tensor<T, Dev> y(out_shape);
    cpu::max_dim(xv, g, y, arg->data());
    return autograd::record(
        std::move(y),
        [x, g, arg](const tensor<T, Dev>& gy) mutable {
          const grad_write m = x.begin_grad_write();
          cpu::max_dim_backward(gy, g, arg->data(), x.grad(), m);
        },
        x);
  }
}
}  // namespace detail

// Maximum over one dimension; the gradient flows to the first maximal element.
template <floating_element T, device Dev>
var<T, Dev> max(const var<T, Dev>& x, int dim, bool keepdim = false) {
  auto xv = x.value().contiguous();
  dim = xv.norm_dim(dim, "max");
  KILN_CHECK(xv.size(dim) > 0, "max: dimension ", dim, " of ", xv.shape().str(), " is empty");
  return detail::max_over(x, xv, cpu::geometry_of(xv.shape(), dim), detail::reduced_shape(xv.shape(), dim, keepdim));
}
// Maximum of all elements.
template <floating_element T, device Dev>
var<T, Dev> max(const var<T, Dev>& x) {
  KILN_CHECK(x.numel() > 0, "max: empty tensor");
  auto xv = x.value().contiguous();
  return detail::max_over(x, xv, cpu::reduce_geometry{1, xv.numel(), 1}, shape{});
}

// Mean squared error: mean((a - b)²), one node.
template <floating_element T, device Dev>
var<T, Dev> mse(const var<T, Dev>& a, const var<T, Dev>& b) {
  check_same_shape(a.shape(), b.shape(), "mse");
  if constexpr (!Dev::is_host) {
    // On the device, from the ported ops: mean((a − b)²), three nodes instead of one.
    const auto d = sub(a, b);
    return mean(mul(d, d));
  } else {
    using C = compute_t<T>;
    auto av = a.value().contiguous(), bv = b.value().contiguous();
    const std::int64_t n = av.numel();
    C acc = 0;
    for (std::int64_t i = 0; i < n; ++i) {
      const C d = C(av.data()[i]) - C(bv.data()[i]);
      acc += d * d;
    }
    tensor<T, Dev> y = tensor<T, Dev>::full(shape{}, static_cast<T>(n ? acc / C(n) : C(0)));
    return autograd::record(
        std::move(y),
        [a, b, av, bv, n](const tensor<T, Dev>& gy) mutable {
          const C s = n ? C(2) * C(gy.data()[0]) / C(n) : C(0);
          for (int side = 0; side < 2; ++side) {
            auto& v = side == 0 ? a : b;
            if (!v.requires_grad()) continue;
            const grad_write m = v.begin_grad_write();
            T* g = v.grad().data();
            const C sign = side == 0 ? C(1) : C(-1);
            for (std::int64_t i = 0; i < n; ++i) store_grad(g[i], sign * s * (C(av.data()[i]) - C(bv.data()[i])), m);
          }
        },
        a, b);
  }
}

}  // namespace kiln::ops
