// Optimizer math against an independent scalar reference written from the papers /
// the PyTorch documentation (double precision, one element at a time).
#include <cmath>

#include "../helpers.hpp"

namespace test_optim {

using namespace kiln;

namespace {
struct adamw_ref {
  double lr, b1, b2, eps, wd;
  std::vector<double> m, v;
  int t = 0;
  void step(std::vector<double>& p, const std::vector<double>& g) {
    if (m.empty()) m.assign(p.size(), 0), v.assign(p.size(), 0);
    ++t;
    for (std::size_t i = 0; i < p.size(); ++i) {
      p[i] -= lr * wd * p[i];
      m[i] = b1 * m[i] + (1 - b1) * g[i];
      v[i] = b2 * v[i] + (1 - b2) * g[i] * g[i];
      const double mhat = m[i] / (1 - std::pow(b1, t)), vhat = v[i] / (1 - std::pow(b2, t));
      p[i] -= lr * mhat / (std::sqrt(vhat) + eps);
    }
  }
};

// Sets a parameter's gradient directly (as backward would) for optimizer-only tests.
template <class T>
void set_grad(const var<T>& p, const std::vector<double>& g) {
  p.begin_grad_write();
  for (std::size_t i = 0; i < g.size(); ++i) p.grad().data()[i] = static_cast<T>(g[i]);
}
std::vector<double> gradient_at(int step, std::size_t n, std::uint64_t seed) {
  std::vector<double> g(n);
  const philox_stream s{seed, static_cast<std::uint64_t>(step) * n};
  for (std::size_t i = 0; i < n; ++i) g[i] = s.normal(i);
  return g;
}
}  // namespace

TEST_CASE("adamw matches the reference over steps, across chunk boundaries and groups") {
  // One tensor larger than a chunk (multi-tensor chunking), one small, in two groups.
  const std::int64_t big = optim::adamw<f64>::chunk_elements + 37;
  var<f64> w(test::rand_tensor<f64>({big}, 1), true), b(test::rand_tensor<f64>({5}, 2), true);
  optim::param_group<f64> g1{{{"w", w}}, std::nullopt, 0.1}, g2{{{"b", b}}, 0.01, 0.0};
  optim::adamw<f64> opt({g1, g2}, {.lr = 1e-3, .beta1 = 0.9, .beta2 = 0.99, .eps = 1e-8, .weight_decay = 0.5});
  adamw_ref rw{1e-3, 0.9, 0.99, 1e-8, 0.1}, rb{0.01, 0.9, 0.99, 1e-8, 0.0};
  auto pw = w.value().to_vector(), pb = b.value().to_vector();
  for (int step = 0; step < 5; ++step) {
    const auto gw = gradient_at(step, pw.size(), 11), gb = gradient_at(step, pb.size(), 12);
    opt.zero_grad();
    set_grad(w, gw);
    set_grad(b, gb);
    opt.step();
    rw.step(pw, gw);
    rb.step(pb, gb);
  }
  auto kw = w.value().to_vector(), kb = b.value().to_vector();
  double worst = 0;
  for (std::size_t i = 0; i < pw.size(); ++i) worst = std::max(worst, std::abs(kw[i] - pw[i]));
  for (std::size_t i = 0; i < pb.size(); ++i) worst = std::max(worst, std::abs(kb[i] - pb[i]));
  // f64 parameters with f64 knobs: agreement to rounding error.
  CHECK(worst < 1e-13);
  CHECK(opt.step_count(0) == 5);
}

TEST_CASE("adamw skips parameters without a gradient; decay groups split by rank") {
  manual_seed(2);
  nn::mlp<nn::relu> net(4, {3}, 2);
  auto groups = optim::decay_groups(net, 0.1);
  REQUIRE(groups.size() == 2);
  CHECK(groups[0].params.size() == 2);  // the two weight matrices
  CHECK(groups[1].params.size() == 2);  // the two biases
  CHECK(*groups[1].weight_decay == 0.0);
  optim::adamw<f32> opt(net, {.lr = 0.1});
  const auto before = net.layers[1].weight.value().to_vector();
  set_grad(net.layers[0].weight, std::vector<double>(12, 1.0));
  opt.step();
  CHECK(net.layers[1].weight.value().to_vector() == before);  // no grad: untouched
}

TEST_CASE("adamw state round-trips by name and rejects a mismatch before changing anything") {
  var<f32> w(tensor<f32>::ones({3}), true);
  optim::adamw<f32> opt({{{{"layer.weight", w}}}}, {.lr = 0.1});
  set_grad(w, {1, 2, 3});
  opt.step();
  auto st = opt.state();
  CHECK(st.find("layer.weight.exp_avg") != nullptr);
  CHECK(st.counters.at("group0.step") == 1);
  // Copy the state (the handles alias live buffers), perturb the optimizer, restore.
  optim::optimizer_state<f32> saved;
  for (auto& [n, t] : st.tensors) saved.tensors.emplace_back(n, t.clone());
  saved.counters = st.counters;
  set_grad(w, {1, 1, 1});
  opt.step();
  opt.load_state(saved);
  CHECK(opt.step_count(0) == 1);
  CHECK(opt.state().find("layer.weight.exp_avg")->to_vector() == saved.find("layer.weight.exp_avg")->to_vector());

  optim::optimizer_state<f32> bad = saved;
  bad.tensors[1].second = tensor<f32>::zeros({4});
  const auto exp_avg_before = opt.state().find("layer.weight.exp_avg")->to_vector();
  CHECK_THROWS_WITH_AS(opt.load_state(bad), doctest::Contains("'layer.weight.exp_avg_sq' has shape [4], expected [3]"),
                       kiln::error);
  CHECK(opt.state().find("layer.weight.exp_avg")->to_vector() == exp_avg_before);
  bad.tensors.pop_back();
  CHECK_THROWS_WITH_AS(opt.load_state(bad), doctest::Contains("missing state tensor 'layer.weight.exp_avg_sq'"),
                       kiln::error);
}

TEST_CASE("sgd: plain, momentum, nesterov and weight decay match the reference") {
  struct cfg {
    double momentum, dampening, wd;
    bool nesterov;
  };
  for (cfg c : {cfg{0, 0, 0, false}, cfg{0.9, 0, 0, false}, cfg{0.9, 0.1, 0.01, false}, cfg{0.9, 0, 0.05, true}}) {
    CAPTURE(c.momentum);
    CAPTURE(c.nesterov);
    var<f64> p(test::rand_tensor<f64>({7}, 3), true);
    optim::sgd<f64> opt(
        {{{{"p", p}}}},
        {.lr = 0.1, .momentum = c.momentum, .dampening = c.dampening, .weight_decay = c.wd, .nesterov = c.nesterov});
    auto ref = p.value().to_vector();
    std::vector<double> buf(ref.size());
    for (int step = 0; step < 4; ++step) {
      const auto g = gradient_at(step, ref.size(), 5);
      opt.zero_grad();
      set_grad(p, g);
      opt.step();
      for (std::size_t i = 0; i < ref.size(); ++i) {
        double d = g[i] + c.wd * ref[i];
        if (c.momentum != 0) {
          buf[i] = step == 0 ? d : c.momentum * buf[i] + (1 - c.dampening) * d;
          d = c.nesterov ? d + c.momentum * buf[i] : buf[i];
        }
        ref[i] -= 0.1 * d;
      }
    }
    const auto got = p.value().to_vector();
    for (std::size_t i = 0; i < ref.size(); ++i) CHECK(got[i] == doctest::Approx(ref[i]).epsilon(1e-6));
  }
  var<f64> p(tensor<f64>::ones({1}), true);
  CHECK_THROWS_WITH_AS(optim::sgd<f64>({{{{"p", p}}}}, {.lr = 0.1, .nesterov = true}),
                       doctest::Contains("nesterov requires momentum > 0"), kiln::error);
  static_assert(optim::optimizer<optim::sgd<f32>> && optim::optimizer<optim::adamw<f32>>);
}

TEST_CASE("training end to end: an MLP learns XOR-like data with adamw") {
  manual_seed(7);
  nn::mlp<nn::relu> net(2, {16}, 2);
  optim::adamw<f32> opt(net, {.lr = 0.05, .weight_decay = 0.0});
  auto x = tensor<f32>::from({4, 2}, {0, 0, 0, 1, 1, 0, 1, 1});
  auto y = tensor<i64>::from({4}, {0, 1, 1, 0});
  float first = 0, last = 0;
  for (int step = 0; step < 300; ++step) {
    auto loss = cross_entropy(net(var<f32>(x)), y);
    if (step == 0) first = loss.value()();
    last = loss.value()();
    opt.zero_grad();
    loss.backward();
    opt.step();
  }
  CHECK(first > 0.5f);
  CHECK(last < 0.05f);
}

namespace {
// A module whose parameter is declared on the GPU (never allocated: the optimizers'
// device check reads only its type and name), next to a cpu one.
struct half_on_gpu {
  var<float> bias;
  var<float, cuda> weight;
  template <class F>
  void for_each_child(F&& f) {
    f("bias", bias);
    f("weight", weight);
  }
};
struct on_gpu {
  var<float, cuda> weight;
  template <class F>
  void for_each_child(F&& f) {
    f("weight", weight);
  }
};
}  // namespace

TEST_CASE("an optimizer spelled for another device than the module's parameters is an error naming both") {
  on_gpu g;
  CHECK_THROWS_WITH_AS(optim::adamw<float>(g, {}),
                       doctest::Contains("optimizer over cpu parameters: the module's parameters live on cuda (e.g. "
                                         "'weight'); give the optimizer the module's device, e.g. "
                                         "optim::adamw<T, kiln::cuda>(module, ...)"),
                       kiln::error);
  CHECK_THROWS_WITH_AS(optim::sgd<float>(g, {}), doctest::Contains("live on cuda (e.g. 'weight')"), kiln::error);
  // A module with parameters on both: the cpu optimizer takes the cpu ones (a split the
  // user chose), without an error.
  half_on_gpu h;
  h.bias = var<float>(tensor<float>::ones({3}), true);
  optim::adamw<float> opt(h, {});
  std::vector<std::string> names;
  opt.for_each_parameter([&](const auto& np) { names.push_back(np.name); });
  CHECK(names == std::vector<std::string>{"bias"});
}

}  // namespace test_optim
