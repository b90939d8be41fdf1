// Must not compile: the callback lists on_train_epoch_end but implements it with a
// signature the trainer cannot call (an int instead of the context). Lightning would
// silently never call it; kiln names the hook and the expected signature.
#include "kiln/kiln.hpp"
#include "kiln/train/trainer.hpp"

struct batch {
  kiln::tensor<float> x;
};
struct loader {
  std::vector<batch> b;
  std::int64_t size() const { return 1; }
  struct range {
    const std::vector<batch>* v;
    auto begin() const { return v->begin(); }
    auto end() const { return v->end(); }
  };
  range epoch(std::int64_t, std::int64_t) const { return {&b}; }
};
struct model {
  kiln::var<float> w;
  template <class F>
  void for_each_child(F&& f) {
    f("w", w);
  }
  kiln::var<float> training_step(auto&, const batch& b) { return kiln::sum(kiln::mul(w, kiln::var<float>(b.x))); }
  auto configure_optimizers() { return kiln::optim::sgd<float>(*this); }
};
struct wrong_callback {
  using hooks = kiln::hook_list<kiln::hook::on_train_epoch_end>;
  void on_train_epoch_end(int epoch);  // should take `auto& ctx`
};

int main() {
  model m;
  loader l;
  kiln::trainer<model, kiln::strategy::single_device<kiln::cpu>, kiln::precision::fp32, wrong_callback> t;
  t.fit(m, l);
}
