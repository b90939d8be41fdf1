// Must not compile: zero<2> shards gradients, and f16_mixed would test unreduced
// gradients for overflow; the message names both fixes.
#include "kiln/kiln.hpp"
#include "kiln/strategy/zero.hpp"
#include "kiln/train/trainer.hpp"

struct net {
  kiln::nn::linear<kiln::f16> fc{4, 2};
  template <class F>
  void for_each_child(F&& f) {
    f("fc", fc);
  }
  kiln::var<float> training_step(auto&, const kiln::tensor<float>& x) {
    return kiln::ops::sum(kiln::ops::cast<float>(fc(kiln::var<kiln::f16>(x.to<kiln::f16>()))));
  }
  auto configure_optimizers() { return kiln::optim::adamw<kiln::f16>(*this); }
};

int main() {
  kiln::trainer<net, kiln::strategy::zero<2, kiln::comm::local>, kiln::precision::f16_mixed<>> t;
  (void)t;
}
