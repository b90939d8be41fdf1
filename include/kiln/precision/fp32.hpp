// kiln/precision/fp32.hpp — full single precision: parameters, activations and
// optimizer math in f32.
//
// Spec: a *precision* policy owns how the loss is turned into gradients and how those
// reach the optimizer. The trainer calls backward(loss, weight) (weight: the micro-batch's
// share when gradients are accumulated — the seed of backward), unscale(model, factor)
// once per optimizer step before clipping and on_before_optimizer_step (factor
// normalises accumulated gradients; mixed precision divides its loss scale here too),
// and step(optimizer) which returns false when the step was skipped (a loss scaler's
// overflow). fp32 needs none of the extras.
#pragma once

#include "kiln/autograd/var.hpp"
#include "kiln/optim/clip.hpp"

namespace kiln::precision {

struct fp32 {
  static constexpr const char* name = "fp32";

  template <class T, class D>
  void backward(var<T, D> loss, double weight) {
    if (weight == 1.0)
      loss.backward();
    else
      loss.backward(tensor<T, D>::full(loss.shape(), static_cast<T>(weight)));
  }
  template <class M>
  void unscale(M& model, double factor) {
    if (factor != 1.0) optim::scale_gradients(model, factor);
  }
  template <class O>
  bool step(O& optimizer) {
    optimizer.step();
    return true;
  }
};

}  // namespace kiln::precision
