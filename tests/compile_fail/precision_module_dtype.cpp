// Must not compile: an f32 module under bf16_mixed, which trains bf16 parameters with f32
// master copies; the message names the remedy (instantiate the module at param_t<P>).
#include "kiln/kiln.hpp"
#include "kiln/train/trainer.hpp"

template <class T>
struct net {
  kiln::nn::linear<T> fc{4, 2};
  template <class F>
  void for_each_child(F&& f) {
    f("fc", fc);
  }
  kiln::var<float> training_step(auto&, const kiln::tensor<float>& x) {
    return kiln::ops::sum(kiln::ops::cast<float>(fc(kiln::var<T>(x.template to<T>()))));
  }
  auto configure_optimizers() { return kiln::optim::adamw<T>(*this); }
};

int main() { kiln::trainer<net<float>, kiln::strategy::single_device<kiln::cpu>, kiln::precision::bf16_mixed> t; }
