// kiln/nn/norm.hpp — layer_norm and rms_norm modules (weight 1, bias 0 at start).
#pragma once

#include <optional>

#include "kiln/ops/norm.hpp"

namespace kiln::nn {

template <floating_element T = f32, device Dev = cpu>
struct layer_norm {
  using device_type = Dev;
  std::optional<var<T, Dev>> weight, bias;
  double eps = 1e-5;

  layer_norm() = default;
  explicit layer_norm(std::int64_t dim, double eps_ = 1e-5, bool affine = true, bool with_bias = true) : eps(eps_) {
    if (affine) {
      weight = var<T, Dev>(tensor<T, Dev>::ones(shape{dim}), true);
      if (with_bias) bias = var<T, Dev>(tensor<T, Dev>::zeros(shape{dim}), true);
    }
  }
  var<T, Dev> operator()(const var<T, Dev>& x) const { return ops::layer_norm(x, weight, bias, eps); }
  template <class F>
  void for_each_child(F&& f) {
    if (weight) f("weight", *weight);
    if (bias) f("bias", *bias);
  }
};

template <floating_element T = f32, device Dev = cpu>
struct rms_norm {
  using device_type = Dev;
  std::optional<var<T, Dev>> weight;
  double eps = 1e-6;

  rms_norm() = default;
  explicit rms_norm(std::int64_t dim, double eps_ = 1e-6, bool affine = true) : eps(eps_) {
    if (affine) weight = var<T, Dev>(tensor<T, Dev>::ones(shape{dim}), true);
  }
  var<T, Dev> operator()(const var<T, Dev>& x) const { return ops::rms_norm(x, weight, eps); }
  template <class F>
  void for_each_child(F&& f) {
    if (weight) f("weight", *weight);
  }
};

}  // namespace kiln::nn
