// kiln/nn/activation.hpp — activation modules; also the activation policies of nn::mlp.
#pragma once

#include "kiln/ops/activation.hpp"

namespace kiln::nn {

#define KILN_ACTIVATION_MODULE(NAME, CALL)               \
  struct NAME {                                          \
    template <floating_element T, device Dev>            \
    var<T, Dev> operator()(const var<T, Dev>& x) const { \
      return CALL;                                       \
    }                                                    \
    template <class F>                                   \
    void for_each_child(F&&) {}                          \
  };

KILN_ACTIVATION_MODULE(relu, ops::relu(x))
KILN_ACTIVATION_MODULE(gelu, ops::gelu(x))
KILN_ACTIVATION_MODULE(gelu_tanh, ops::gelu(x, ops::gelu_approximation::tanh))
KILN_ACTIVATION_MODULE(silu, ops::silu(x))
#undef KILN_ACTIVATION_MODULE

}  // namespace kiln::nn
