// Must not compile: the strategy declares the overlaps_backward capability but has no
// listen_for_backward(model), the member that capability requires; the message names it.
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

// Every required member, and a capability without its member.
struct overlapping {
  static constexpr bool overlaps_backward = true;
  using device_type = kiln::cpu;
  int rank() const { return 0; }
  int world_size() const { return 1; }
  bool is_global_zero() const { return true; }
  template <class M>
  void setup(M&) {}
  template <class M>
  void reduce_gradients(M&) {}
  double reduce(double v, kiln::train::reduce) { return v; }
  void barrier() {}
};

int main() {
  kiln::trainer<net, overlapping, kiln::precision::fp32> t;
  (void)t;
}
