// kiln/precision/fp32.hpp — full single precision: parameters, activations and
// optimizer math in f32 (the policy interface is specified in precision/policy.hpp).
//
// The trainer calls backward(loss, weight, model) (weight: the micro-batch's share when
// gradients are accumulated — the seed of backward), unscale(model, factor) once per
// optimizer step before clipping and on_before_optimizer_step (factor normalises
// accumulated gradients), and step(optimizer, model). With check_finite (the default) a
// non-finite loss or gradient stops the run with an error naming the first offending
// parameter; the check is one vectorised pass over the gradients per optimizer step.
#pragma once

#include "kiln/optim/clip.hpp"
#include "kiln/precision/policy.hpp"

namespace kiln::precision {

namespace detail {
// The policies whose parameters are what the optimizer steps (fp32, bf16_true, f16_true).
template <floating_element T>
struct direct {
  using param_type = T;
  bool check_finite = true;

  template <class O>
  using optimizer_t = O;
  template <class M>
  void setup(M&) {}
  template <class O>
  O adapt(O&& o) {
    return std::move(o);
  }
  template <class M>
  M& master_parameters(M& model) {
    return model;
  }
  bool overflowed() const { return false; }
};
}  // namespace detail

struct fp32 : detail::direct<f32> {
  static constexpr const char* name = "fp32";

  // fp32 also runs f64 modules (exact references in tests): only other types are refused.
  template <class Module>
  static constexpr void check_module() {
    using E = module_element_t<Module>;
    static_assert(std::is_void_v<E> || std::is_same_v<E, f32> || std::is_same_v<E, f64>,
                  "kiln::trainer<Module, Strategy, precision::fp32, ...>: the module's element type is a 16-bit type; "
                  "train it under precision::bf16_mixed / f16_mixed<> / bf16_true / f16_true, or instantiate it at "
                  "f32 (kiln::precision::param_t<kiln::precision::fp32>)");
    static_assert(requirement_allows<Module, f32>() || requirement_allows<Module, f64>(),
                  "kiln::trainer<Module, Strategy, precision::fp32, ...>: the module's precision_requirement (declared "
                  "by the module or its kernel policy) does not allow f32; choose a policy that computes in an "
                  "allowed type (e.g. precision::bf16_mixed) or a kernel policy that supports f32");
  }
  template <class T, class D, class M>
  void backward(var<T, D> loss, double weight, M& model) {
    if (check_finite) detail::check_loss_finite(loss, model, name);
    detail::seeded_backward(loss, weight);
  }
  template <class M>
  void unscale(M& model, double factor) {
    if (factor != 1.0) optim::scale_gradients(model, factor);
  }
  template <class O, class M>
  bool step(O& optimizer, M& model) {
    if (check_finite) detail::check_gradients_finite(model, name);
    optimizer.step();
    return true;
  }
};

}  // namespace kiln::precision
