// Forward values against hand-computed or closed-form references.
#include <cmath>
#include <limits>

#include "../helpers.hpp"

namespace test_values {

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

TEST_CASE("f32 softmax and cross-entropy: the vectorised exp keeps NaN and fully masked rows NaN") {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  // Row 0 holds a NaN, row 1 only -inf, row 2 is ordinary (with one masked logit).
  auto xt = tensor<f32>::from({3, 4}, {0.5f, nan, -1.0f, 2.0f, -inf, -inf, -inf, -inf, 1.0f, 2.0f, -inf, 0.0f});
  auto p = softmax(var<f32>(xt)).value();
  for (int j = 0; j < 4; ++j) {
    CHECK(std::isnan(p(0, j)));
    CHECK(std::isnan(p(1, j)));
  }
  const double z = std::exp(1.0) + std::exp(2.0) + 1.0;
  CHECK(p(2, 1) == doctest::Approx(std::exp(2.0) / z).epsilon(1e-6));
  CHECK(p(2, 2) < 1e-30f);
  // Cross-entropy: a NaN logit makes that row's loss and every gradient of it NaN. A
  // masked (-inf) logit without label smoothing leaves the loss finite (it was NaN: 0 · inf).
  var<f32> x(tensor<f32>::from({2, 4}, {0.5f, nan, -1.0f, 2.0f, 1.0f, 2.0f, -inf, 0.0f}), true);
  auto t = tensor<i64>::from({2}, {0, 1});
  auto loss = cross_entropy(x, t);
  CHECK(std::isnan(loss.value()()));
  loss.backward();
  for (int j = 0; j < 4; ++j) CHECK(std::isnan(x.grad()(0, j)));
  auto clean = var<f32>(tensor<f32>::from({1, 4}, {1.0f, 2.0f, -inf, 0.0f}), true);
  auto l2 = cross_entropy(clean, tensor<i64>::from({1}, {1}));
  CHECK(l2.value()() == doctest::Approx(std::log(z) - 2.0).epsilon(1e-6));
  l2.backward();
  CHECK(clean.grad()(0, 1) == doctest::Approx(std::exp(2.0) / z - 1.0).epsilon(1e-6));
  CHECK(std::abs(clean.grad()(0, 2)) < 1e-37f);  // a masked logit: exp clamps at e^-87.3
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
    // Same math, but the batched path runs each GEMM single-threaded: summation order
    // (and so the last bits) may differ from the team-parallel matmul.
    const auto got = bc.select(0, n).contiguous().to_vector(), want = ref.to_vector();
    for (std::size_t i = 0; i < want.size(); ++i) CHECK(got[i] == doctest::Approx(want[i]).epsilon(1e-12));
  }
}

// The bf16 GEMM's contract on whichever path this CPU takes (oneDNN's matmul where the
// CPU has bf16 instructions, else widening around the f32 GEMM): every element within one
// bf16 rounding of the f64 product (plus the old C when accumulating), transposes and
// leading dimensions wider than the rows honoured, the padding between rows untouched.
TEST_CASE("gemm bf16: within one rounding of the f64 product, both transposes, =, +=, padded rows") {
  struct shape_case {
    bool ta, tb;
    std::int64_t m, n, k, pad;
    bool acc;
  };
  for (const shape_case c :
       {shape_case{false, false, 33, 17, 70, 0, false}, shape_case{false, true, 128, 96, 784, 3, false},
        shape_case{true, false, 64, 40, 300, 5, true}, shape_case{true, true, 7, 9, 11, 2, true}}) {
    CAPTURE(c.ta);
    CAPTURE(c.tb);
    CAPTURE(c.acc);
    const std::int64_t lda = (c.ta ? c.m : c.k) + c.pad, ldb = (c.tb ? c.k : c.n) + c.pad, ldc = c.n + c.pad;
    const philox_stream st{11, 0};
    auto fill = [&](std::size_t n, std::uint64_t off, float lo) {
      std::vector<bf16> v(n);
      for (std::size_t i = 0; i < n; ++i) v[i] = bf16(lo + (1.0f - lo) * st.uniform(off + i));
      return v;
    };
    const auto a = fill(static_cast<std::size_t>((c.ta ? c.k : c.m) * lda), 0, -1.0f),
               b = fill(static_cast<std::size_t>((c.tb ? c.n : c.k) * ldb), 1 << 20, -1.0f),
               c0 = fill(static_cast<std::size_t>(c.m * ldc), 2 << 20, 0.0f);
    auto out = c0;
    ops::cpu::gemm<bf16>(c.ta, c.tb, c.m, c.n, c.k, a.data(), lda, b.data(), ldb, out.data(), ldc,
                         c.acc ? grad_write::accumulate : grad_write::overwrite);
    double worst = 0;
    for (std::int64_t i = 0; i < c.m; ++i) {
      for (std::int64_t j = 0; j < c.n; ++j) {
        double r = c.acc ? double(float(c0[i * ldc + j])) : 0.0;
        for (std::int64_t p = 0; p < c.k; ++p)
          r += double(float(c.ta ? a[p * lda + i] : a[i * lda + p])) *
               double(float(c.tb ? b[j * ldb + p] : b[p * ldb + j]));
        // one rounding to bf16 (half an ulp: 2^-8 relative), over an f32 sum of k products
        const double bound = std::abs(r) * (1.0 / 256) + 1e-6 * double(c.k);
        worst = std::max(worst, std::abs(double(float(out[i * ldc + j])) - r) / bound);
      }
      for (std::int64_t j = c.n; j < ldc; ++j) REQUIRE(float(out[i * ldc + j]) == float(c0[i * ldc + j]));
    }
    CHECK(worst <= 1.0);
  }
#if defined(KILN_HAVE_DNNL)
  const std::string path = ops::cpu::detail::native_bf16_gemm() ? "oneDNN matmul" : "widened f32";
  MESSAGE("bf16 GEMM path on this CPU: " << path);
#endif
}

TEST_CASE("accuracy: arg-max, ties take the first class, top-k, bad targets") {
  auto logits = tensor<float>::from({3, 3}, {0.1f, 0.7f, 0.2f, 0.5f, 0.5f, 0.0f, 0.3f, 0.2f, 0.1f});
  auto y = tensor<i64>::from({3}, {1, 1, 2});
  CHECK(accuracy(logits, y) == doctest::Approx(1.0 / 3.0));  // row 1 ties 0 and 1: arg-max is 0
  CHECK(accuracy(logits, y, 2) == doctest::Approx(2.0 / 3.0));
  CHECK(accuracy(logits, y, 3) == doctest::Approx(1.0));
  auto bad = tensor<i64>::from({3}, {1, 3, 0});
  CHECK_THROWS_WITH_AS(accuracy(logits, bad), doctest::Contains("target[1] = 3 is outside [0, 3)"), error);
}

}  // namespace test_values
