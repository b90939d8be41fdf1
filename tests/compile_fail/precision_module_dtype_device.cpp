// Must not compile: a module template over an element type and a device, instantiated at
// f32 on cuda, under bf16_mixed (bf16 parameters); the element type is read from the
// two-parameter template, and the message names the remedy.
#include "kiln/kiln.hpp"
#include "kiln/train/trainer.hpp"

template <class T, class Dev>
struct net {
  kiln::nn::linear<T, Dev> fc{4, 2};
  template <class F>
  void for_each_child(F&& f) {
    f("fc", fc);
  }
  kiln::var<float, Dev> training_step(auto&, const kiln::tensor<float, Dev>& x) {
    return kiln::ops::sum(kiln::ops::cast<float>(fc(kiln::var<T, Dev>(x.template to<T>()))));
  }
  auto configure_optimizers() { return kiln::optim::adamw<T, Dev>(*this); }
};

int main() {
  kiln::trainer<net<float, kiln::cuda>, kiln::strategy::single_device<kiln::cuda>, kiln::precision::bf16_mixed> t;
}
