// kiln/ops/arithmetic.hpp — differentiable +, -, *, / with broadcasting, and bias_add.
#pragma once

#include <type_traits>

#include "kiln/autograd/var.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/cpu/elementwise.hpp"

namespace kiln::ops {

namespace detail {
template <cpu::binary_op Op, floating_element T, device Dev>
var<T, Dev> binary(const var<T, Dev>& a, const var<T, Dev>& b, const char* name) {
  const shape out_shape = broadcast_shapes(a.shape(), b.shape(), name);
  auto av = a.value().contiguous(), bv = b.value().contiguous();
  tensor<T, Dev> y(out_shape);
  if constexpr (Dev::is_host)
    cpu::binary_forward<Op>(av, bv, y);
  else
    gpu::binary_forward<Op>(av, bv, y);
  auto grad_of = [](const auto& av, const auto& bv, const auto& gy, int which, auto& g, grad_write m) {
    if constexpr (Dev::is_host)
      cpu::binary_backward<Op>(av, bv, gy, which, g, m);
    else
      gpu::binary_backward<Op>(av, bv, gy, which, g, m);
  };
  return autograd::record(
      std::move(y),
      [a, b, av, bv, grad_of](const tensor<T, Dev>& gy) mutable {
        if (a.requires_grad()) {
          const grad_write m = a.begin_grad_write();
          grad_of(av, bv, gy, 0, a.grad(), m);
        }
        if (b.requires_grad()) {
          const grad_write m = b.begin_grad_write();
          grad_of(av, bv, gy, 1, b.grad(), m);
        }
      },
      a, b);
}

template <class A, class B>
constexpr bool same_var_types = std::is_same_v<A, B>;
}  // namespace detail

template <floating_element T, device Dev>
var<T, Dev> add(const var<T, Dev>& a, const var<T, Dev>& b) {
  return detail::binary<cpu::binary_op::add>(a, b, "add");
}
template <floating_element T, device Dev>
var<T, Dev> sub(const var<T, Dev>& a, const var<T, Dev>& b) {
  return detail::binary<cpu::binary_op::sub>(a, b, "sub");
}
template <floating_element T, device Dev>
var<T, Dev> mul(const var<T, Dev>& a, const var<T, Dev>& b) {
  return detail::binary<cpu::binary_op::mul>(a, b, "mul");
}
template <floating_element T, device Dev>
var<T, Dev> div(const var<T, Dev>& a, const var<T, Dev>& b) {
  return detail::binary<cpu::binary_op::div>(a, b, "div");
}

// Mixed element types or devices: a compile error that names the remedy.
template <class TA, class DA, class TB, class DB>
requires(!std::is_same_v<TA, TB> || !std::is_same_v<DA, DB>) void add(const var<TA, DA>&, const var<TB, DB>&) {
  static_assert(std::is_same_v<TA, TB>,
                "kiln::add: operands have different element types; convert one first, "
                "e.g. kiln::cast<float>(x), so the precision you compute in is explicit");
  static_assert(std::is_same_v<DA, DB>, "kiln::add: operands live on different devices; move one with .to<Dev>()");
}
template <class TA, class DA, class TB, class DB>
requires(!std::is_same_v<TA, TB> || !std::is_same_v<DA, DB>) void mul(const var<TA, DA>&, const var<TB, DB>&) {
  static_assert(std::is_same_v<TA, TB>,
                "kiln::mul: operands have different element types; convert one first, "
                "e.g. kiln::cast<float>(x), so the precision you compute in is explicit");
  static_assert(std::is_same_v<DA, DB>, "kiln::mul: operands live on different devices; move one with .to<Dev>()");
}

// y = x * s for a compile-time-typed scalar s.
template <floating_element T, device Dev>
var<T, Dev> scale(const var<T, Dev>& x, double s) {
  auto xv = x.value().contiguous();
  tensor<T, Dev> y(xv.shape());
  auto apply = [s](const tensor<T, Dev>& in, tensor<T, Dev>& out, grad_write m) {
    if constexpr (Dev::is_host)
      cpu::scale(in, static_cast<compute_t<T>>(s), out, m);
    else
      gpu::scale(in, static_cast<float>(s), out, m);
  };
  apply(xv, y, grad_write::overwrite);
  return autograd::record(
      std::move(y),
      [x, apply](const tensor<T, Dev>& gy) mutable {
        const grad_write m = x.begin_grad_write();
        apply(gy, x.grad(), m);
      },
      x);
}

// y[..., j] = x[..., j] + bias[j]
template <floating_element T, device Dev>
var<T, Dev> bias_add(const var<T, Dev>& x, const var<T, Dev>& bias) {
  KILN_CHECK(bias.rank() == 1 && x.rank() >= 1 && bias.size(0) == x.shape().back(), "bias_add: bias of shape ",
             bias.shape().str(), " does not match the last dimension of input ", x.shape().str());
  return add(x, bias);
}

template <floating_element T, device Dev>
var<T, Dev> operator+(const var<T, Dev>& a, const var<T, Dev>& b) {
  return add(a, b);
}
template <floating_element T, device Dev>
var<T, Dev> operator-(const var<T, Dev>& a, const var<T, Dev>& b) {
  return sub(a, b);
}
template <floating_element T, device Dev>
var<T, Dev> operator*(const var<T, Dev>& a, const var<T, Dev>& b) {
  return mul(a, b);
}
template <floating_element T, device Dev>
var<T, Dev> operator/(const var<T, Dev>& a, const var<T, Dev>& b) {
  return div(a, b);
}
template <floating_element T, device Dev>
var<T, Dev> operator*(const var<T, Dev>& a, double s) {
  return scale(a, s);
}
template <floating_element T, device Dev>
var<T, Dev> operator*(double s, const var<T, Dev>& a) {
  return scale(a, s);
}
template <floating_element T, device Dev>
var<T, Dev> operator-(const var<T, Dev>& a) {
  return scale(a, -1.0);
}

}  // namespace kiln::ops
