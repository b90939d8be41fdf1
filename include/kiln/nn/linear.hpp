// kiln/nn/linear.hpp — y = x · Wᵀ + b with PyTorch's layout and default initialisation.
#pragma once

#include <cmath>
#include <optional>

#include "kiln/nn/init.hpp"
#include "kiln/ops/matmul.hpp"

namespace kiln::nn {

template <floating_element T = f32, device Dev = cpu>
struct linear {
  using device_type = Dev;
  var<T, Dev> weight;               // [out_features, in_features]
  std::optional<var<T, Dev>> bias;  // [out_features]

  linear() = default;
  // Weight and bias ~ U(-1/sqrt(in), 1/sqrt(in)), as torch.nn.Linear (drawn on the host,
  // so every device starts from the same values).
  linear(std::int64_t in_features, std::int64_t out_features, bool with_bias = true) {
    KILN_CHECK(in_features > 0 && out_features > 0, "nn::linear: features must be positive, got in=", in_features,
               " out=", out_features);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_features));
    weight = var<T, Dev>(to_device<Dev>(init::uniform<T>(shape{out_features, in_features}, bound)), true);
    if (with_bias) bias = var<T, Dev>(to_device<Dev>(init::uniform<T>(shape{out_features}, bound)), true);
  }
  std::int64_t in_features() const { return weight.size(1); }
  std::int64_t out_features() const { return weight.size(0); }

  var<T, Dev> operator()(const var<T, Dev>& x) const { return ops::linear(x, weight, bias); }

  template <class F>
  void for_each_child(F&& f) {
    f("weight", weight);
    if (bias) f("bias", *bias);
  }
};

}  // namespace kiln::nn
