// kiln/ops/cast.hpp — differentiable element-type conversion.
#pragma once

#include "kiln/autograd/var.hpp"

namespace kiln::ops {

// Converts x to element type U; the gradient is converted back to T (on a device: the
// runtime's conversion kernel, rounded to nearest even as on the host).
template <floating_element U, floating_element T, device Dev>
var<U, Dev> cast(const var<T, Dev>& x) {
  if constexpr (std::is_same_v<U, T>) {
    return x;
  } else {
    tensor<U, Dev> y = x.value().template to<U>();
    return autograd::record(
        std::move(y),
        [x](const tensor<U, Dev>& gy) mutable {
          const grad_write m = x.begin_grad_write();
          if constexpr (!Dev::is_host) {  // the conversion kernel, then a copy or an add
            const tensor<T, Dev> g = gy.template to<T>();
            if (m == grad_write::overwrite)
              x.grad().copy_from(g);
            else
              gpu::scale(g, 1.0f, x.grad(), grad_write::accumulate);
          } else {
            T* g = x.grad().data();
            for (std::int64_t i = 0; i < gy.numel(); ++i)
              store_grad(g[i], static_cast<compute_t<T>>(static_cast<compute_t<U>>(gy.data()[i])), m);
          }
        },
        x);
  }
}

}  // namespace kiln::ops
