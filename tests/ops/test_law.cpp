#include "../helpers.hpp"

namespace test_law {

using namespace kiln;

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

}  // namespace test_law
