// Must not compile: optim::sgd steps parameters with host loops; over cuda parameters it
// would read device memory on the host. The message names the optimizer to use instead.
#include "kiln/kiln.hpp"

struct net {
  kiln::nn::linear<float, kiln::cuda> fc{4, 2};
  template <class F>
  void for_each_child(F&& f) {
    f("fc", fc);
  }
};

int main() {
  net m;
  kiln::optim::sgd<float, kiln::cuda> opt(m, {.lr = 0.1});
  opt.step();
}
