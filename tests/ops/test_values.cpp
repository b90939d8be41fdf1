// Forward values against hand-computed or closed-form references.
#include <cmath>

#include "../helpers.hpp"

using namespace kiln;

TEST_CASE("activations at known points (shared functors)") {
  var<f64> x(tensor<f64>::from({4}, {-1.0, 0.0, 0.5, 2.0}));
  auto g = gelu(x).value().to_vector();
  CHECK(g[0] == doctest::Approx(-0.15865525393145707));
  CHECK(g[3] == doctest::Approx(1.9544997361036416));
  auto gt = gelu(x, gelu_approximation::tanh).value().to_vector();
  CHECK(gt[3] == doctest::Approx(1.9545976940871754));
  auto s = silu(x).value().to_vector();
  CHECK(s[2] == doctest::Approx(0.5 / (1 + std::exp(-0.5))));
  CHECK(relu(x).value().to_vector() == std::vector<f64>{0, 0, 0.5, 2});
  var<f64> u(tensor<f64>::from({4}, {1, 2, 3, 4}));
  CHECK(swiglu(x, u).value()(3) == doctest::Approx(4 * 2 / (1 + std::exp(-2.0))));
  static_assert(ops::fn::relu{}(-3.0) == 0.0);  // constexpr-evaluable
}

TEST_CASE("softmax, log_softmax and cross-entropy agree with their definitions") {
  var<f64> x(tensor<f64>::from({2, 3}, {1, 2, 3, 1000, 1000, 1000}));  // row 2 tests overflow safety
  auto p = softmax(x).value();
  const double z = std::exp(1) + std::exp(2) + std::exp(3);
  CHECK(p(0, 2) == doctest::Approx(std::exp(3) / z));
  CHECK(p(1, 0) == doctest::Approx(1.0 / 3));
  auto lp = log_softmax(x).value();
  CHECK(lp(0, 0) == doctest::Approx(1 - std::log(z)));
  auto t = tensor<i64>::from({2}, {2, 0});
  const double ce = (-(3 - std::log(z)) + std::log(3.0)) / 2;
  CHECK(cross_entropy(x, t).value()() == doctest::Approx(ce));
  // Label smoothing eps: (1-eps)·nll + eps·mean_j(-log p_j).
  const double eps = 0.1;
  const double smooth0 = (1 - eps) * -(3 - std::log(z)) + eps * -((1 + 2 + 3) / 3.0 - std::log(z));
  const double smooth1 = std::log(3.0);
  CHECK(cross_entropy(x, t, {.label_smoothing = 0.1f}).value()() == doctest::Approx((smooth0 + smooth1) / 2));
  // ignore_index rows neither contribute nor count.
  auto ti = tensor<i64>::from({2}, {2, -100});
  CHECK(cross_entropy(x, ti).value()() == doctest::Approx(-(3 - std::log(z))));
  auto all_ignored = tensor<i64>::from({2}, {-100, -100});
  CHECK(cross_entropy(x, all_ignored).value()() == 0.0);
  CHECK_THROWS_WITH_AS(cross_entropy(x, tensor<i64>::from({2}, {3, 0})),
                       doctest::Contains("target 3 at row 0 is outside [0, 3)"), kiln::error);
  CHECK_THROWS_WITH_AS(cross_entropy(x, tensor<i64>::from({3}, {0, 0, 0})),
                       doctest::Contains("2 rows of logits [2, 3] but 3 targets"), kiln::error);
}

TEST_CASE("reductions, mse, embedding, concat, cast") {
  var<f64> x(tensor<f64>::from({2, 3}, {1, 5, 3, 4, 2, 6}));
  CHECK(sum(x).value()() == 21);
  CHECK(mean(x).value()() == 3.5);
  CHECK(sum(x, 0).value().to_vector() == std::vector<f64>{5, 7, 9});
  CHECK(mean(x, 1, true).value().shape() == shape{2, 1});
  CHECK(max(x, 1).value().to_vector() == std::vector<f64>{5, 6});
  CHECK(max(x).value()() == 6);
  var<f64> y(tensor<f64>::from({2, 3}, {1, 5, 3, 4, 2, 0}));
  CHECK(mse(x, y).value()() == doctest::Approx(36.0 / 6));
  var<f64> table(tensor<f64>::from({3, 2}, {0, 1, 10, 11, 20, 21}));
  auto e = embedding(tensor<i32>::from({2}, {2, 0}), table);
  CHECK(e.value().to_vector() == std::vector<f64>{20, 21, 0, 1});
  CHECK_THROWS_WITH_AS(embedding(tensor<i32>::from({1}, {3}), table),
                       doctest::Contains("index 3 at position 0 is outside the table of 3 rows"), kiln::error);
  auto c = concat(std::vector{x, y}, 0);
  CHECK(c.shape() == shape{4, 3});
  CHECK(c.value()(3, 0) == 4);
  auto f = cast<f32>(x);
  CHECK(f.value()(0, 1) == 5.0f);
  var<f64> xs(tensor<f64>::from({2}, {1, 2}), true);
  sum(cast<f32>(xs)).backward();
  CHECK(xs.grad().to_vector() == std::vector<f64>{1, 1});
}

TEST_CASE("matmul and bmm agree with a naive triple loop; f32 within tolerance of f64") {
  auto a = test::rand_tensor<f64>({5, 7}, 1), b = test::rand_tensor<f64>({7, 3}, 2);
  auto c = matmul(var<f64>(a), var<f64>(b)).value();
  auto c32 = matmul(var<f32>(a.to<f32>()), var<f32>(b.to<f32>())).value();
  for (int i = 0; i < 5; ++i)
    for (int j = 0; j < 3; ++j) {
      double ref = 0;
      for (int k = 0; k < 7; ++k) ref += a(i, k) * b(k, j);
      CHECK(c(i, j) == doctest::Approx(ref).epsilon(1e-12));
      CHECK(c32(i, j) == doctest::Approx(ref).epsilon(1e-5));
    }
  auto ba = test::rand_tensor<f64>({3, 2, 4}, 3), bb = test::rand_tensor<f64>({3, 4, 5}, 4);
  auto bc = bmm(var<f64>(ba), var<f64>(bb)).value();
  for (int n = 0; n < 3; ++n) {
    auto ref = matmul(var<f64>(ba.select(0, n).contiguous()), var<f64>(bb.select(0, n).contiguous())).value();
    CHECK(bc.select(0, n).contiguous().to_vector() == ref.to_vector());
  }
}

// Law test: every op gives the same forward values and gradients in f32, bf16 and f16
// as in f64, within a per-dtype tolerance (ensmallen-style type-parameterised test).
namespace {
template <class T>
struct tolerance;
template <>
struct tolerance<f32> {
  static constexpr double value = 2e-5;
};
template <>
struct tolerance<bf16> {
  static constexpr double value = 3e-2;
};
template <>
struct tolerance<f16> {
  static constexpr double value = 4e-3;
};

template <class T, class Op>
void compare_with_f64(const char* name, Op op, std::vector<tensor<f64>> inputs) {
  CAPTURE(name);
  std::vector<var<f64>> x64;
  std::vector<var<T>> xt;
  for (auto& t : inputs) {
    x64.emplace_back(t, true);
    xt.emplace_back(t.template to<T>(), true);
  }
  auto y64 = op(x64), yt = op(xt);
  REQUIRE(y64.shape() == yt.shape());
  const double tol = tolerance<T>::value;
  auto scale_of = [](const tensor<f64>& t) {
    double m = 1e-3;
    for (double v : t.to_vector()) m = std::max(m, std::abs(v));
    return m;
  };
  const auto yref = y64.value();
  const double ys = scale_of(yref);
  for (std::int64_t i = 0; i < yref.numel(); ++i)
    CHECK(std::abs(static_cast<double>(static_cast<float>(yt.value().flat(i))) - yref.flat(i)) <= tol * ys);
  // Backward through sum(y * r) with the same r in both precisions.
  auto r = test::rand_tensor<f64>(yref.shape(), 77);
  sum(mul(y64, var<f64>(r))).backward();
  sum(mul(yt, var<T>(r.template to<T>()))).backward();
  for (std::size_t k = 0; k < inputs.size(); ++k) {
    const auto& g64 = x64[k].grad();
    const double gs = scale_of(g64);
    for (std::int64_t i = 0; i < g64.numel(); ++i)
      CHECK(std::abs(static_cast<double>(static_cast<float>(xt[k].grad().flat(i))) - g64.flat(i)) <= tol * gs);
  }
}

template <class T>
void all_ops_against_f64() {
  auto a = test::rand_tensor<f64>({6, 8}, 1), b = test::rand_tensor<f64>({8, 5}, 2), c = test::rand_tensor<f64>({8}, 3);
  auto pos = test::rand_tensor<f64>({6, 8}, 4, 0.5, 2.0);
  const auto target = tensor<i64>::from({6}, {0, 7, 3, -100, 2, 5});
  compare_with_f64<T>("matmul", [](auto& v) { return matmul(v[0], v[1]); }, {a, b});
  compare_with_f64<T>("linear", [](auto& v) { return linear(v[0], v[1], std::optional{v[2]}); },
                      {a, test::rand_tensor<f64>({5, 8}, 5), test::rand_tensor<f64>({5}, 6)});
  compare_with_f64<T>("add", [](auto& v) { return add(v[0], v[1]); }, {a, c});
  compare_with_f64<T>("div", [](auto& v) { return div(v[0], v[1]); }, {a, pos});
  compare_with_f64<T>("gelu", [](auto& v) { return gelu(v[0]); }, {a});
  compare_with_f64<T>("silu", [](auto& v) { return silu(v[0]); }, {a});
  compare_with_f64<T>("swiglu", [](auto& v) { return swiglu(v[0], v[1]); }, {a, pos});
  compare_with_f64<T>("softmax", [](auto& v) { return softmax(v[0]); }, {a});
  compare_with_f64<T>("log_softmax", [](auto& v) { return log_softmax(v[0]); }, {a});
  compare_with_f64<T>("cross_entropy", [&](auto& v) { return cross_entropy(v[0], target, {.label_smoothing = 0.1f}); },
                      {a});
  compare_with_f64<T>("layer_norm", [](auto& v) { return layer_norm(v[0], std::optional{v[1]}, std::optional{v[2]}); },
                      {a, c, test::rand_tensor<f64>({8}, 7)});
  compare_with_f64<T>("rms_norm", [](auto& v) { return rms_norm(v[0], std::optional{v[1]}); }, {a, c});
  compare_with_f64<T>("mean", [](auto& v) { return mean(v[0], 0); }, {a});
  compare_with_f64<T>("embedding", [](auto& v) { return embedding(tensor<i64>::from({3}, {4, 0, 4}), v[0]); }, {a});
}
}  // namespace

TEST_CASE("law: f32 agrees with f64 on every op") { all_ops_against_f64<f32>(); }
TEST_CASE("law: bf16 agrees with f64 on every op") { all_ops_against_f64<bf16>(); }
TEST_CASE("law: f16 agrees with f64 on every op") { all_ops_against_f64<f16>(); }
