// kiln/nn/mlp.hpp — multi-layer perceptron: linear, Activation, linear, ..., linear.
//
// Parameter names follow torch.nn.Sequential of the same network, where each
// activation occupies an index: a 784-256-256-10 MLP has "0.weight", "2.weight" and
// "4.weight", so a PyTorch state_dict maps onto it name for name.
#pragma once

#include <initializer_list>
#include <string>
#include <vector>

#include "kiln/nn/activation.hpp"
#include "kiln/nn/linear.hpp"

namespace kiln::nn {

template <class Activation = relu, floating_element T = f32, device Dev = cpu>
struct mlp {
  using device_type = Dev;
  std::vector<linear<T, Dev>> layers;
  [[no_unique_address]] Activation activation{};

  mlp() = default;
  mlp(std::int64_t in_features, std::initializer_list<std::int64_t> hidden, std::int64_t out_features, bool bias = true)
      : mlp(in_features, std::vector<std::int64_t>(hidden), out_features, bias) {}
  mlp(std::int64_t in_features, const std::vector<std::int64_t>& hidden, std::int64_t out_features, bool bias = true) {
    std::int64_t prev = in_features;
    for (auto h : hidden) {
      layers.emplace_back(prev, h, bias);
      prev = h;
    }
    layers.emplace_back(prev, out_features, bias);
  }

  var<T, Dev> operator()(var<T, Dev> x) const {
    for (std::size_t i = 0; i < layers.size(); ++i) {
      x = layers[i](x);
      if (i + 1 < layers.size()) x = activation(x);
    }
    return x;
  }

  template <class F>
  void for_each_child(F&& f) {
    for (std::size_t i = 0; i < layers.size(); ++i) f(std::to_string(2 * i), layers[i]);
  }
};

}  // namespace kiln::nn
