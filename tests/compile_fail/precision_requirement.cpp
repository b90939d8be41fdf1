// Must not compile: the module's kernel policy declares that it needs bf16, and the
// trainer computes in f16; the message names the policy to pick instead.
#include "kiln/kiln.hpp"
#include "kiln/train/trainer.hpp"

struct bf16_only_kernel {  // a kernel policy that only exists for bf16 (as fp8/bf16 GEMM paths do)
  using precision_requirement = kiln::precision::needs<kiln::bf16>;
};

template <class T>
struct net {
  using precision_requirement = bf16_only_kernel::precision_requirement;  // forwarded by the module
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

int main() { kiln::trainer<net<kiln::f16>, kiln::strategy::single_device<kiln::cpu>, kiln::precision::f16_mixed<>> t; }
