// kiln/nn/dropout.hpp — dropout with a module-owned counter-based stream.
//
// Each forward in training mode reserves numel() elements of the module's stream, so
// the masks of a run are a function of (seed, call sequence): restoring (seed, offset)
// from a checkpoint replays the same masks.
#pragma once

#include "kiln/core/philox.hpp"
#include "kiln/ops/activation.hpp"

namespace kiln::nn {

struct dropout {
  float p = 0.5f;
  bool training = true;
  philox_generator generator{default_generator().take(1).offset ^ 0x64726f70ULL};  // "drop"

  dropout() = default;
  explicit dropout(float p_) : p(p_) {
    KILN_CHECK(0.0f <= p && p <= 1.0f, "nn::dropout: probability ", p, " is outside [0, 1]");
  }
  template <floating_element T, device Dev>
  var<T, Dev> operator()(const var<T, Dev>& x) {
    if (!training || p == 0.0f) return x;
    return ops::dropout(x, p, generator.take(static_cast<std::uint64_t>(x.numel())), true);
  }
  template <class F>
  void for_each_child(F&&) {}
};

}  // namespace kiln::nn
