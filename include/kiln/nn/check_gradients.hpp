// kiln/nn/check_gradients.hpp — kiln::check_gradients for a whole module.
//
// check_gradients(module, f, inputs...) checks the gradients of f(module, inputs...)
// with respect to every trainable f64 parameter of the module (cited by name in the
// report) and every input.
#pragma once

#include "kiln/nn/module.hpp"
#include "kiln/ops/check_gradients.hpp"

namespace kiln {

template <nn::module M, class F, class... Vars>
requires(std::same_as<Vars, var<f64>>&&...) gradient_check_result
    check_gradients(M& module, F&& f, const Vars&... inputs) {
  std::vector<var<f64>> wrt;
  for (auto& np : nn::named_parameters<f64>(module))
    if (np.param.requires_grad()) wrt.push_back(np.param);
  (wrt.push_back(inputs), ...);
  return check_gradients_of([&] { return f(module, inputs...); }, std::move(wrt));
}

}  // namespace kiln
