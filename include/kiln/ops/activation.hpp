// kiln/ops/activation.hpp — differentiable activations, SwiGLU and dropout.
#pragma once

#include "kiln/autograd/var.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/cpu/elementwise.hpp"

namespace kiln::ops {

// Applies the scalar functor F (ops::fn::relu, gelu_exact, gelu_tanh, silu) element-wise,
// on the CPU or, for cuda tensors, with the same functor in kernels/ops_elementwise.cu.
template <class F, floating_element T, device Dev>
var<T, Dev> unary(const var<T, Dev>& x, F f = {}) {
  auto xv = x.value().contiguous();
  tensor<T, Dev> y(xv.shape());
  if constexpr (Dev::is_host)
    cpu::unary_forward(f, xv, y);
  else
    gpu::unary_forward(f, xv, y);
  return autograd::record(
      std::move(y),
      [x, xv, f](const tensor<T, Dev>& gy) mutable {
        const grad_write m = x.begin_grad_write();
        if constexpr (Dev::is_host)
          cpu::unary_backward(f, xv, gy, x.grad(), m);
        else
          gpu::unary_backward(f, xv, gy, x.grad(), m);
      },
      x);
}

enum class gelu_approximation { none, tanh };

template <floating_element T, device Dev>
var<T, Dev> relu(const var<T, Dev>& x) {
  return unary<fn::relu>(x);
}
template <floating_element T, device Dev>
var<T, Dev> gelu(const var<T, Dev>& x, gelu_approximation a = gelu_approximation::none) {
  return a == gelu_approximation::tanh ? unary<fn::gelu_tanh>(x) : unary<fn::gelu_exact>(x);
}
template <floating_element T, device Dev>
var<T, Dev> silu(const var<T, Dev>& x) {
  return unary<fn::silu>(x);
}

// SwiGLU(gate, up) = silu(gate) * up, one node.
template <floating_element T, device Dev>
var<T, Dev> swiglu(const var<T, Dev>& gate, const var<T, Dev>& up) {
  check_same_shape(gate.shape(), up.shape(), "swiglu");
  auto g = gate.value().contiguous(), u = up.value().contiguous();
  tensor<T, Dev> y(g.shape());
  if constexpr (Dev::is_host)
    cpu::swiglu_forward(g, u, y);
  else
    gpu::swiglu_forward(g, u, y);
  return autograd::record(
      std::move(y),
      [gate, up, g, u](const tensor<T, Dev>& gy) mutable {
        grad_write mg = grad_write::overwrite, mu = grad_write::overwrite;
        if (gate.requires_grad()) mg = gate.begin_grad_write();
        if (up.requires_grad()) mu = up.begin_grad_write();
        auto* gg = gate.requires_grad() ? &gate.grad() : nullptr;
        auto* gu = up.requires_grad() ? &up.grad() : nullptr;
        if constexpr (Dev::is_host)
          cpu::swiglu_backward(g, u, gy, gg, mg, gu, mu);
        else
          gpu::swiglu_backward(g, u, gy.contiguous(), gg, mg, gu, mu);
      },
      gate, up);
}

// Inverted dropout with probability p. The mask is a pure function of `rng` (a
// philox_stream: seed and offset), so backward regenerates it instead of storing it and
// a replay with the same stream drops the same elements. Identity when !training or p == 0.
template <floating_element T, device Dev>
var<T, Dev> dropout(const var<T, Dev>& x, float p, philox_stream rng, bool training = true) {
  KILN_CHECK(0.0f <= p && p <= 1.0f, "dropout: probability ", p, " is outside [0, 1]");
  if (!training || p == 0.0f) return x;
  auto xv = x.value().contiguous();
  tensor<T, Dev> y(xv.shape());
  if constexpr (Dev::is_host)
    cpu::dropout_apply(xv, p, rng, y, grad_write::overwrite);
  else
    gpu::dropout_apply(xv, p, rng, y, grad_write::overwrite);
  return autograd::record(
      std::move(y),
      [x, p, rng](const tensor<T, Dev>& gy) mutable {
        const grad_write m = x.begin_grad_write();
        if constexpr (Dev::is_host)
          cpu::dropout_apply(gy, p, rng, x.grad(), m);
        else
          gpu::dropout_apply(gy.contiguous(), p, rng, x.grad(), m);
      },
      x);
}

}  // namespace kiln::ops
