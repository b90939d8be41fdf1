// Every differentiable op passes kiln::check_gradients (central differences in f64).
#include "../helpers.hpp"

namespace test_gradients {

using namespace kiln;
using kiln::test::rand_var;

TEST_CASE("gradients: matmul, bmm, linear") {
  auto a = rand_var({3, 4}, 1), b = rand_var({4, 5}, 2);
  KILN_CHECK_GRADIENTS([](auto& x, auto& y) { return matmul(x, y); }, a, b);
  auto ba = rand_var({2, 3, 4}, 3), bb = rand_var({2, 4, 2}, 4), shared = rand_var({4, 2}, 5);
  KILN_CHECK_GRADIENTS([](auto& x, auto& y) { return bmm(x, y); }, ba, bb);
  KILN_CHECK_GRADIENTS([](auto& x, auto& y) { return bmm(x, y); }, ba, shared);
  auto x = rand_var({2, 3, 4}, 6), w = rand_var({5, 4}, 7), bias = rand_var({5}, 8);
  KILN_CHECK_GRADIENTS([](auto& x_, auto& w_, auto& b_) { return linear(x_, w_, std::optional{b_}); }, x, w, bias);
  KILN_CHECK_GRADIENTS([](auto& x_, auto& w_) { return linear(x_, w_); }, x, w);
}

TEST_CASE("gradients: broadcasting arithmetic") {
  auto a = rand_var({2, 3, 4}, 10), b = rand_var({3, 1}, 11), c = rand_var({4}, 12);
  auto pos = rand_var({3, 1}, 13, 0.5, 2.0);
  KILN_CHECK_GRADIENTS([](auto& x, auto& y) { return add(x, y); }, a, b);
  KILN_CHECK_GRADIENTS([](auto& x, auto& y) { return sub(x, y); }, a, c);
  KILN_CHECK_GRADIENTS([](auto& x, auto& y) { return mul(x, y); }, a, b);
  KILN_CHECK_GRADIENTS([](auto& x, auto& y) { return div(x, y); }, a, pos);
  KILN_CHECK_GRADIENTS([](auto& x, auto& y) { return bias_add(x, y); }, a, c);
  KILN_CHECK_GRADIENTS([](auto& x) { return scale(x, -2.5); }, a);
  // The same var on both sides: the second gradient write must accumulate.
  KILN_CHECK_GRADIENTS([](auto& x) { return mul(x, x); }, a);
  KILN_CHECK_GRADIENTS([](auto& x) { return x * x + x; }, c);
}

TEST_CASE("gradients: activations") {
  auto x = rand_var({4, 6}, 20, -2.0, 2.0);
  KILN_CHECK_GRADIENTS([](auto& v) { return relu(v); }, x);
  KILN_CHECK_GRADIENTS([](auto& v) { return gelu(v); }, x);
  KILN_CHECK_GRADIENTS([](auto& v) { return gelu(v, gelu_approximation::tanh); }, x);
  KILN_CHECK_GRADIENTS([](auto& v) { return silu(v); }, x);
  auto g = rand_var({4, 6}, 21, -2.0, 2.0), u = rand_var({4, 6}, 22);
  KILN_CHECK_GRADIENTS([](auto& a, auto& b) { return swiglu(a, b); }, g, u);
  const philox_stream rng{99, 7};
  KILN_CHECK_GRADIENTS([rng](auto& v) { return dropout(v, 0.3f, rng); }, x);
}

TEST_CASE("gradients: softmax family and losses") {
  auto x = rand_var({3, 7}, 30, -3.0, 3.0);
  KILN_CHECK_GRADIENTS([](auto& v) { return softmax(v); }, x);
  KILN_CHECK_GRADIENTS([](auto& v) { return log_softmax(v); }, x);
  const auto target = tensor<i64>::from({3}, {2, -100, 6});
  KILN_CHECK_GRADIENTS([&](auto& v) { return cross_entropy(v, target); }, x);
  KILN_CHECK_GRADIENTS([&](auto& v) { return cross_entropy(v, target, {.label_smoothing = 0.1f}); }, x);
  using red = cross_entropy_options::reduction;
  KILN_CHECK_GRADIENTS(
      [&](auto& v) {
        return cross_entropy(v, tensor<i64>::from({3}, {2, 6, 1}),
                             {.ignore_index = 6, .label_smoothing = 0.2f, .reduce = red::sum});
      },
      x);
  auto y = rand_var({3, 7}, 31);
  KILN_CHECK_GRADIENTS([](auto& a, auto& b) { return mse(a, b); }, x, y);
}

TEST_CASE("gradients: normalisation") {
  auto x = rand_var({5, 8}, 40, -2.0, 2.0), w = rand_var({8}, 41, 0.5, 1.5), b = rand_var({8}, 42);
  KILN_CHECK_GRADIENTS([](auto& v, auto& w_, auto& b_) { return layer_norm(v, std::optional{w_}, std::optional{b_}); },
                       x, w, b);
  KILN_CHECK_GRADIENTS([](auto& v) { return layer_norm(v, std::optional<var<f64>>{}, std::optional<var<f64>>{}); }, x);
  KILN_CHECK_GRADIENTS([](auto& v, auto& w_) { return rms_norm(v, std::optional{w_}); }, x, w);
}

TEST_CASE("gradients: reductions") {
  auto x = rand_var({3, 4, 5}, 50);
  KILN_CHECK_GRADIENTS([](auto& v) { return sum(v); }, x);
  KILN_CHECK_GRADIENTS([](auto& v) { return mean(v); }, x);
  for (int dim : {0, 1, 2, -1}) {
    CAPTURE(dim);
    KILN_CHECK_GRADIENTS([dim](auto& v) { return sum(v, dim); }, x);
    KILN_CHECK_GRADIENTS([dim](auto& v) { return mean(v, dim, true); }, x);
    KILN_CHECK_GRADIENTS([dim](auto& v) { return max(v, dim); }, x);
  }
  KILN_CHECK_GRADIENTS([](auto& v) { return max(v); }, x);
}

TEST_CASE("gradients: embedding and shape ops") {
  auto table = rand_var({6, 3}, 60);
  const auto ids = tensor<i64>::from({2, 3}, {0, 5, 2, 2, 1, 5});  // repeated ids accumulate
  KILN_CHECK_GRADIENTS([&](auto& w) { return embedding(ids, w); }, table);
  auto x = rand_var({2, 3, 4}, 61);
  KILN_CHECK_GRADIENTS([](auto& v) { return reshape(v, {6, -1}); }, x);
  KILN_CHECK_GRADIENTS([](auto& v) { return transpose(v, 0, 2); }, x);
  KILN_CHECK_GRADIENTS([](auto& v) { return slice(v, 1, 1, 3); }, x);
  KILN_CHECK_GRADIENTS([](auto& v) { return slice(v, 2, 0, 4, 2); }, x);
  auto y = rand_var({2, 2, 4}, 62);
  KILN_CHECK_GRADIENTS([](auto& a, auto& b) { return concat(std::vector{a, b, a}, 1); }, x, y);
  // Views feeding compute ops: transpose then matmul reads a strided input.
  auto m = rand_var({4, 3}, 63), n = rand_var({4, 2}, 64);
  KILN_CHECK_GRADIENTS([](auto& a, auto& b) { return matmul(transpose(a, 0, 1), b); }, m, n);
}

TEST_CASE("gradients: a composite (two-layer MLP with layer norm and a loss)") {
  auto x = rand_var({4, 5}, 70), w1 = rand_var({6, 5}, 71), b1 = rand_var({6}, 72), w2 = rand_var({3, 6}, 73);
  const auto target = tensor<i64>::from({4}, {0, 2, 1, 2});
  KILN_CHECK_GRADIENTS(
      [&](auto& x_, auto& w1_, auto& b1_, auto& w2_) {
        auto h = gelu(linear(x_, w1_, std::optional{b1_}));
        h = layer_norm(h, std::optional<var<f64>>{}, std::optional<var<f64>>{});
        return cross_entropy(linear(h, w2_), target);
      },
      x, w1, b1, w2);
}

TEST_CASE("check_gradients catches a wrong gradient") {
  // An op whose backward is deliberately wrong (twice the true derivative): the checker
  // must fail, or every passing test above proves nothing.
  auto wrong = [](const var<f64>& x) {
    tensor<f64> y = x.value().clone();
    return autograd::record(
        std::move(y),
        [x](const tensor<f64>& gy) mutable {
          const grad_write m = x.begin_grad_write();
          for (std::int64_t i = 0; i < gy.numel(); ++i) store_grad(x.grad().data()[i], 2.0 * gy.data()[i], m);
        },
        x);
  };
  auto x = rand_var({3}, 80);
  const auto r = check_gradients(wrong, x);
  CHECK_FALSE(r.ok);
  CHECK(r.report.find("mismatch at input 0") != std::string::npos);
}

}  // namespace test_gradients
