// Must not compile: bf16_mixed keeps its f32 master weights on the strategy's device (cpu
// here), but this module's parameters, and so its optimizer, live on cuda; the message
// says to name the module's device in the strategy.
#include "kiln/kiln.hpp"
#include "kiln/train/trainer.hpp"

struct net {
  kiln::nn::linear<kiln::bf16, kiln::cuda> fc{4, 2};
  template <class F>
  void for_each_child(F&& f) {
    f("fc", fc);
  }
  kiln::var<float, kiln::cuda> training_step(auto&, const kiln::tensor<float, kiln::cuda>& x) {
    return kiln::ops::sum(kiln::ops::cast<float>(fc(kiln::var<kiln::bf16, kiln::cuda>(x.to<kiln::bf16>()))));
  }
  auto configure_optimizers() { return kiln::optim::adamw<kiln::bf16, kiln::cuda>(*this); }
};

int main() {
  kiln::trainer<net, kiln::strategy::single_device<kiln::cpu>, kiln::precision::bf16_mixed> t;
  (void)t;
}
