// Must not compile: the type in the Strategy slot is not a strategy (it has a device and
// ranks, but nothing to reduce gradients or metrics with); the message lists what a
// strategy needs.
#include "kiln/kiln.hpp"
#include "kiln/train/trainer.hpp"

struct net {
  kiln::nn::linear<float> fc{4, 2};
  template <class F>
  void for_each_child(F&& f) {
    f("fc", fc);
  }
  kiln::var<float> training_step(auto&, const kiln::tensor<float>& x) {
    return kiln::ops::sum(fc(kiln::var<float>(x)));
  }
  auto configure_optimizers() { return kiln::optim::adamw<float>(*this); }
};

struct half_a_strategy {
  using device_type = kiln::cpu;
  int rank() const { return 0; }
  int world_size() const { return 1; }
};

int main() {
  kiln::trainer<net, half_a_strategy, kiln::precision::fp32> t;
  (void)t;
}
