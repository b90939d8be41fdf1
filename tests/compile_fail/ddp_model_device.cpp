// Must not compile: the module's parameters live on cuda, but the strategy is ddp over
// its default device, the cpu; the message says to name the module's device in the
// strategy (ddp<Comm, kiln::cuda>).
#include "kiln/kiln.hpp"
#include "kiln/strategy/ddp.hpp"

struct net {
  kiln::nn::linear<float, kiln::cuda> fc{4, 2};
  template <class F>
  void for_each_child(F&& f) {
    f("fc", fc);
  }
  kiln::var<float, kiln::cuda> training_step(auto&, const kiln::tensor<float, kiln::cuda>& x) {
    return kiln::ops::sum(fc(kiln::var<float, kiln::cuda>(x)));
  }
  auto configure_optimizers() { return kiln::optim::adamw<float, kiln::cuda>(*this); }
};

int main() {
  kiln::strategy::ddp<kiln::comm::local> s;  // what trainer<net, ddp<comm::local>, ...> holds
  net m;
  s.setup(m);  // the trainer's first call: rank 0's weights to every rank
}
