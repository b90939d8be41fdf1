#include "../helpers.hpp"

namespace test_tape {

using namespace kiln;

TEST_CASE("tape: backward replays and clears; the arena is reused") {
  auto& tp = autograd::tape::current();
  tp.clear();
  var<f32> w(tensor<f32>::from({2}, {1, 2}), true);
  var<f32> x(tensor<f32>::from({2}, {3, 4}));
  auto loss = sum(mul(w, x));
  CHECK(tp.size() == 2);
  loss.backward();
  CHECK(tp.size() == 0);
  CHECK(w.grad().to_vector() == std::vector<f32>{3, 4});
  CHECK_FALSE(x.has_grad());  // inputs that do not require grad get none
  const auto arena = tp.arena_bytes();
  for (int i = 0; i < 3; ++i) {
    w.zero_grad();
    sum(mul(w, x)).backward();
  }
  CHECK(tp.arena_bytes() == arena);
}

TEST_CASE("gradient write modes: accumulate across backwards until zero_grad") {
  var<f64> w(tensor<f64>::from({1}, {2.0}), true);
  var<f64> c(tensor<f64>::from({1}, {5.0}));
  sum(mul(w, c)).backward();
  CHECK(w.grad()(0) == 5.0);
  sum(mul(w, c)).backward();  // no zero_grad: accumulates (micro-batch accumulation)
  CHECK(w.grad()(0) == 10.0);
  w.zero_grad();
  CHECK_FALSE(w.has_grad());
  sum(mul(w, c)).backward();  // first write after zero_grad overwrites (no memset needed)
  CHECK(w.grad()(0) == 5.0);
}

TEST_CASE("no_grad records nothing and results need no gradient") {
  auto& tp = autograd::tape::current();
  tp.clear();
  var<f32> w(tensor<f32>::ones({3}), true);
  {
    no_grad ng;
    auto y = relu(w);
    CHECK_FALSE(y.requires_grad());
    CHECK(tp.size() == 0);
    {
      enable_grad eg;
      CHECK(relu(w).requires_grad());
    }
  }
  tp.clear();
  CHECK_THROWS_WITH_AS(var<f32>(tensor<f32>::ones({1})).backward(), doctest::Contains("does not require a gradient"),
                       kiln::error);
  CHECK_THROWS_WITH_AS(relu(w).backward(), doctest::Contains("called on a tensor of shape [3]"), kiln::error);
  tp.clear();
}

TEST_CASE("branches not on the loss path are skipped; shared inputs accumulate") {
  var<f64> x(tensor<f64>::from({2}, {1, -2}), true);
  auto unused = relu(x);                           // recorded but not part of the loss
  auto loss = sum(add(mul(x, x), scale(x, 3.0)));  // d/dx = 2x + 3
  loss.backward();
  CHECK(x.grad().to_vector() == std::vector<f64>{5, -1});
  CHECK_FALSE(unused.has_grad());
}

TEST_CASE("backward consumes its own graph and leaves a neighbouring graph intact") {
  var<f64> a(tensor<f64>::from({2}, {1, 2}), true), b(tensor<f64>::from({2}, {3, 4}), true);
  auto ya = mul(a, a);  // graph 1 (still referenced by ya)
  auto yb = mul(b, b);  // graph 2, differentiated later
  sum(ya).backward();
  CHECK(a.grad().to_vector() == std::vector<f64>{2, 4});
  CHECK_FALSE(b.has_grad());
  sum(yb).backward();
  CHECK(b.grad().to_vector() == std::vector<f64>{6, 8});
  // Unreferenced leftovers are dropped; the tape empties once nothing refers to them.
  { auto dangling = relu(a); }
  sum(mul(a, b)).backward();
  CHECK(autograd::tape::current().size() == 0);
}

namespace {
// Records the order in which the tape reports leaves ready, and whether each one's
// gradient had been written when it was reported.
struct ready_log {
  std::vector<const void*> order;
  std::vector<bool> had_grad_of_first;  // per report: did the first layer's weight have a gradient yet
  const var<f32>* first = nullptr;
  static void ready(void* self, const void* leaf) {
    auto& r = *static_cast<ready_log*>(self);
    r.order.push_back(leaf);
    r.had_grad_of_first.push_back(r.first->has_grad());
  }
};
}  // namespace

TEST_CASE("tape: a listener hears each parameter once its last gradient write is done, last layer first") {
  auto& tp = autograd::tape::current();
  tp.clear();
  var<f32> w1(tensor<f32>::from({3, 2}, {0.1f, -0.2f, 0.3f, 0.4f, -0.5f, 0.6f}), true);
  var<f32> b1(tensor<f32>::from({3}, {0.01f, 0.02f, 0.03f}), true);
  var<f32> w2(tensor<f32>::from({1, 3}, {0.7f, -0.8f, 0.9f}), true);
  var<f32> x(tensor<f32>::from({4, 2}, {1, 2, 3, 4, 5, 6, 7, 8}));
  ready_log log;
  log.first = &w1;
  tp.listen({&ready_log::ready, &log});
  // w2 is read twice: its first reader (the earlier node) writes its gradient last.
  auto h = ops::relu(ops::linear(x, w1, std::optional<var<f32>>(b1)));
  auto y = add(ops::linear(h, w2), ops::linear(h, w2));
  sum(y).backward();
  tp.stop_listening();
  REQUIRE(log.order.size() == 3);
  CHECK(log.order[0] == w2.id());  // reported while the first layer's backward was still to run
  CHECK_FALSE(log.had_grad_of_first[0]);
  CHECK(std::find(log.order.begin(), log.order.end(), w1.id()) != log.order.end());
  CHECK(std::find(log.order.begin(), log.order.end(), b1.id()) != log.order.end());
  CHECK(log.had_grad_of_first[2]);
  // w2's gradient is complete when reported: both readers' contributions.
  var<f32> w2b(w2.value().clone(), true);
  auto yb = add(ops::linear(ops::relu(ops::linear(x, w1, std::optional<var<f32>>(b1))), w2b),
                ops::linear(ops::relu(ops::linear(x, w1, std::optional<var<f32>>(b1))), w2b));
  sum(yb).backward();
  CHECK(w2.grad().to_vector() == w2b.grad().to_vector());
  // Without a listener nothing is noted.
  CHECK_FALSE(tp.listening());
}

TEST_CASE("tape: parameters read inside a recomputed segment are reported after the segment's node ran") {
  auto& tp = autograd::tape::current();
  tp.clear();
  var<f32> w1(tensor<f32>::from({2, 2}, {0.5f, -0.1f, 0.2f, 0.3f}), true);
  var<f32> w2(tensor<f32>::from({1, 2}, {0.4f, 0.6f}), true);
  var<f32> x(tensor<f32>::from({3, 2}, {1, 2, 3, 4, 5, 6}));
  ready_log log;
  log.first = &w1;
  tp.listen({&ready_log::ready, &log});
  auto h = autograd::recompute([&](const var<f32>& in) { return ops::relu(ops::linear(in, w1)); }, x);
  sum(ops::linear(h, w2)).backward();
  tp.stop_listening();
  REQUIRE(log.order.size() == 2);
  CHECK(log.order[0] == w2.id());
  CHECK(log.order[1] == w1.id());
  CHECK(log.had_grad_of_first[1]);  // w1's gradient, written by the recomputation, is there
}

TEST_CASE("tape: a sealed parameter's gradient cannot be written, and the error names it") {
  var<f32> w(tensor<f32>::from({2}, {1, 2}), true);
  var<f32> x(tensor<f32>::from({2}, {3, 4}));
  const std::string name = "fc1.weight";
  w.seal(&name);
  auto loss = sum(mul(w, x));
  CHECK_THROWS_WITH_AS(loss.backward(), doctest::Contains("parameter 'fc1.weight'"), error);
  w.seal(nullptr);
  sum(mul(w, x)).backward();
  CHECK(w.grad().to_vector() == std::vector<f32>{3, 4});
}

}  // namespace test_tape
