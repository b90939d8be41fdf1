// kiln/precision/true_half.hpp — bf16_true and f16_true: the whole run in a 16-bit type.
//
// Parameters, activations, gradients and optimizer state are all bf16 (or f16); there is
// no f32 master copy and no loss scaling (Lightning's "bf16-true"/"16-true"). Memory per
// trainable parameter with AdamW: 2 + 2 + 4 (two moments) = 8 bytes, half of fp32's.
// An update smaller than half a bf16 ulp of its weight (relative 2^-9) is lost under
// round-to-nearest; bf16_true{.stochastic_rounding = true} makes the optimizer round
// updated weights stochastically (optim::param_rounding), which keeps them unbiased.
// Optimizer math itself runs in f32 registers. A non-finite loss or gradient is an error
// naming the first offending parameter (check_finite). f16_true has no loss scale: use
// it only where gradients stay within f16's range; f16_mixed is the safe f16 policy.
#pragma once

#include "kiln/optim/clip.hpp"
#include "kiln/optim/optimizer.hpp"
#include "kiln/precision/fp32.hpp"

namespace kiln::precision {

namespace detail {
template <floating_element T, class Derived>
struct true_half : direct<T> {
  template <class Module>
  static constexpr void check_module() {
    check_module_common<Module, Derived>();
  }
  template <class L, class D, class M>
  void backward(var<L, D> loss, double weight, M& model) {
    if (this->check_finite) check_loss_finite(loss, model, Derived::name);
    seeded_backward(loss, weight);
  }
  template <class M>
  void unscale(M& model, double factor) {
    if (factor != 1.0) optim::scale_gradients(model, factor);
  }
  template <class O, class M>
  bool step(O& optimizer, M& model) {
    if (this->check_finite) check_gradients_finite(model, Derived::name);
    optimizer.step();
    return true;
  }
};
}  // namespace detail

struct bf16_true : detail::true_half<bf16, bf16_true> {
  static constexpr const char* name = "bf16_true";
  bool stochastic_rounding = false;
  std::uint64_t rounding_seed = 0x5eed;

  template <class O>
  O adapt(O&& o) {
    if (stochastic_rounding) {
      if constexpr (requires { o.set_rounding(optim::param_rounding{}); })
        o.set_rounding({true, rounding_seed});
      else
        throw error(
            "precision::bf16_true: stochastic_rounding is set but the optimizer cannot round stochastically (it has "
            "no set_rounding(param_rounding)); use optim::adamw or turn stochastic_rounding off");
    }
    return std::move(o);
  }
};

struct f16_true : detail::true_half<f16, f16_true> {
  static constexpr const char* name = "f16_true";
};

}  // namespace kiln::precision
