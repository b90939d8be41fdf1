// Must not compile: zero<3> shards the parameters the optimizer steps, and bf16_mixed
// steps separate f32 masters; the message names the policies that work with it.
#include "kiln/kiln.hpp"
#include "kiln/strategy/zero.hpp"
#include "kiln/train/trainer.hpp"

struct net {
  kiln::nn::linear<kiln::bf16> fc{4, 2};
  template <class F>
  void for_each_child(F&& f) {
    f("fc", fc);
  }
  kiln::var<float> training_step(auto&, const kiln::tensor<float>& x) {
    return kiln::ops::sum(kiln::ops::cast<float>(fc(kiln::var<kiln::bf16>(x.to<kiln::bf16>()))));
  }
  auto configure_optimizers() { return kiln::optim::adamw<kiln::bf16>(*this); }
};

int main() {
  kiln::trainer<net, kiln::strategy::zero<3, kiln::comm::local>, kiln::precision::bf16_mixed> t;
  (void)t;
}
