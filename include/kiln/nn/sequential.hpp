// kiln/nn/sequential.hpp — static composition of modules, children named "0", "1", ...
#pragma once

#include <string>
#include <tuple>
#include <utility>

#include "kiln/nn/module.hpp"

namespace kiln::nn {

template <class... Modules>
struct sequential {
  std::tuple<Modules...> layers;

  sequential() = default;
  explicit sequential(Modules... ms) : layers(std::move(ms)...) {}

  template <std::size_t I>
  auto& get() {
    return std::get<I>(layers);
  }

  template <class X>
  auto operator()(const X& x) {
    return std::apply([&](auto&... m) { return chain(x, m...); }, layers);
  }

  template <class F>
  void for_each_child(F&& f) {
    [&]<std::size_t... I>(std::index_sequence<I...>) { (f(std::to_string(I), std::get<I>(layers)), ...); }
    (std::index_sequence_for<Modules...>{});
  }

 private:
  template <class X>
  static auto chain(const X& x) {
    return x;
  }
  template <class X, class M, class... Rest>
  static auto chain(const X& x, M& m, Rest&... rest) {
    return chain(m(x), rest...);
  }
};

}  // namespace kiln::nn
