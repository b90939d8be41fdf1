#include "../helpers.hpp"

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
