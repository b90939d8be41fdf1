// Must not compile: under f16_mixed the loss is multiplied by the loss scale (2^16 by
// default), which f16 cannot hold; the message says to compute the loss in f32.
#include "kiln/kiln.hpp"
#include "kiln/train/trainer.hpp"

struct net {
  kiln::nn::linear<kiln::f16> fc{4, 2};
  template <class F>
  void for_each_child(F&& f) {
    f("fc", fc);
  }
  kiln::var<kiln::f16> training_step(auto&, const kiln::tensor<float>& x) {
    return kiln::ops::sum(fc(kiln::var<kiln::f16>(x.to<kiln::f16>())));  // the loss stays in f16
  }
  auto configure_optimizers() { return kiln::optim::adamw<kiln::f16>(*this); }
};

struct loader {
  std::vector<kiln::tensor<float>> b{kiln::tensor<float>::zeros({2, 4})};
  std::int64_t size() const { return 1; }
  auto epoch(std::int64_t, std::int64_t) const { return b; }
};

int main() {
  kiln::trainer<net, kiln::strategy::single_device<kiln::cpu>, kiln::precision::f16_mixed<>> t;
  net n;
  loader l;
  t.fit(n, l);
}
