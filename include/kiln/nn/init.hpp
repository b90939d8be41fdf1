// kiln/nn/init.hpp — parameter initialisers drawing from kiln's default generator.
#pragma once

#include "kiln/core/philox.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/core/transfer.hpp"

namespace kiln::nn::init {

// U(-bound, bound) for every element.
template <element T>
tensor<T> uniform(const shape& s, double bound, philox_generator& g = default_generator()) {
  tensor<T> t(s);
  const philox_stream st = g.take(2 * static_cast<std::uint64_t>(s.numel()));
  for (std::int64_t i = 0; i < t.numel(); ++i)
    t.data()[i] = static_cast<T>((2.0 * st.uniform_f64(static_cast<std::uint64_t>(i)) - 1.0) * bound);
  return t;
}

// N(0, std²) for every element.
template <element T>
tensor<T> normal(const shape& s, double stddev, philox_generator& g = default_generator()) {
  tensor<T> t(s);
  const philox_stream st = g.take(2 * static_cast<std::uint64_t>(s.numel()));
  for (std::int64_t i = 0; i < t.numel(); ++i)
    t.data()[i] = static_cast<T>(stddev * static_cast<double>(st.normal(static_cast<std::uint64_t>(i))));
  return t;
}

}  // namespace kiln::nn::init
