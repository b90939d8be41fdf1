// Attention and RoPE: values against the naive formulation (kept here, and only here, as
// the reference), gradient checks, masks, GQA, dropout, KV-cache offsets, bf16.
#include <cmath>
#include <limits>

#include "../helpers.hpp"

namespace test_attention {

using namespace kiln;
using kiln::test::rand_tensor;
using kiln::test::rand_var;

namespace {

// softmax(scale·q·kᵀ + mask)·v with the full probability matrix, in f64, with the same
// dropout mask as the kernel (the counter RNG addressed by (b, h, i, j)).
template <class Mask>
tensor<f64> naive_attention(const tensor<f64>& q, const tensor<f64>& k, const tensor<f64>& v, std::int64_t q_offset,
                            float p = 0.0f, philox_stream rng = {}) {
  const std::int64_t B = q.size(0), T = q.size(1), Hq = q.size(2), D = q.size(3), S = k.size(1), Hkv = k.size(2);
  const double scale = 1.0 / std::sqrt(double(D));
  tensor<f64> o = tensor<f64>::zeros(q.shape());
  std::vector<double> s(static_cast<std::size_t>(S));
  for (std::int64_t b = 0; b < B; ++b)
    for (std::int64_t h = 0; h < Hq; ++h) {
      const std::int64_t kh = h / (Hq / Hkv);
      for (std::int64_t i = 0; i < T; ++i) {
        double mx = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < S; ++j) {
          double dot = 0;
          for (std::int64_t c = 0; c < D; ++c) dot += q(b, i, h, c) * k(b, j, kh, c);
          s[j] = Mask::allowed(q_offset + i, j) ? dot * scale : -std::numeric_limits<double>::infinity();
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (auto& x : s) sum += (x = std::exp(x - mx));
        for (std::int64_t j = 0; j < S; ++j) {
          double w = s[j] / sum;
          if (p > 0.0f) {
            const auto idx = static_cast<std::uint64_t>(((b * Hq + h) * T + i) * S + j);
            w = rng.uniform(idx) < p ? 0.0 : w / (1.0 - double(float(p)));
          }
          for (std::int64_t c = 0; c < D; ++c) o(b, i, h, c) += w * v(b, j, kh, c);
        }
      }
    }
  return o;
}

template <class Mask>
void check_against_naive(std::int64_t B, std::int64_t T, std::int64_t S, std::int64_t Hq, std::int64_t Hkv,
                         std::int64_t D, std::uint64_t seed) {
  CAPTURE(Mask::name());
  CAPTURE(T);
  CAPTURE(S);
  auto q = rand_tensor<f64>({B, T, Hq, D}, seed), k = rand_tensor<f64>({B, S, Hkv, D}, seed + 1),
       v = rand_tensor<f64>({B, S, Hkv, D}, seed + 2);
  no_grad ng;
  auto got = attention<Mask>(var<f64>(q), var<f64>(k), var<f64>(v)).value();
  auto want = naive_attention<Mask>(q, k, v, S - T);
  double worst = 0;
  for (std::int64_t i = 0; i < got.numel(); ++i) worst = std::max(worst, std::abs(got.flat(i) - want.flat(i)));
  CHECK(worst < 1e-12);
  // f32 against the f64 reference.
  auto got32 = attention<Mask>(var<f32>(q.to<f32>()), var<f32>(k.to<f32>()), var<f32>(v.to<f32>())).value();
  double worst32 = 0;
  for (std::int64_t i = 0; i < got.numel(); ++i)
    worst32 = std::max(worst32, std::abs(double(got32.flat(i)) - want.flat(i)));
  CHECK(worst32 < 1e-5);
}

}  // namespace

TEST_CASE("tile_gemm: register-blocked tile products equal the plain triple loop") {
  // Every path of the kernel: 8-, 4- and 1-row blocks, two-vector and one-vector column
  // strips, scalar tail columns, a read as a tile or its transpose, overwrite and accumulate.
  auto run = []<class C>(C, std::int64_t m, std::int64_t n, std::int64_t kk, bool transposed_a, bool accumulate,
                         std::uint64_t seed) {
    CAPTURE(m);
    CAPTURE(n);
    CAPTURE(kk);
    CAPTURE(transposed_a);
    CAPTURE(accumulate);
    const std::int64_t lda = transposed_a ? m + 3 : kk + 2, ldb = n + 5, ldc = n + 1;
    const std::int64_t ars = transposed_a ? 1 : lda, acs = transposed_a ? lda : 1;
    auto a = rand_tensor<f64>({transposed_a ? kk : m, lda}, seed), b = rand_tensor<f64>({kk, ldb}, seed + 1),
         c0 = rand_tensor<f64>({m, ldc}, seed + 2);
    std::vector<C> av(a.numel()), bv(b.numel()), cv(c0.numel());
    for (std::int64_t i = 0; i < a.numel(); ++i) av[i] = C(a.flat(i));
    for (std::int64_t i = 0; i < b.numel(); ++i) bv[i] = C(b.flat(i));
    for (std::int64_t i = 0; i < c0.numel(); ++i) cv[i] = C(c0.flat(i));
    ops::cpu::tile_gemm(m, n, kk, av.data(), ars, acs, bv.data(), ldb, cv.data(), ldc, accumulate);
    double worst = 0;
    for (std::int64_t i = 0; i < m; ++i) {
      for (std::int64_t j = 0; j < n; ++j) {
        double want = accumulate ? double(C(c0.flat(i * ldc + j))) : 0.0;
        for (std::int64_t k = 0; k < kk; ++k) want += double(av[i * ars + k * acs]) * double(bv[k * ldb + j]);
        worst = std::max(worst, std::abs(double(cv[i * ldc + j]) - want));
      }
      for (std::int64_t j = n; j < ldc; ++j)  // the padding past n is never written
        CHECK(cv[i * ldc + j] == C(c0.flat(i * ldc + j)));
    }
    CHECK(worst < (std::is_same_v<C, float> ? 1e-4 : 1e-12));
  };
  std::uint64_t seed = 40;
  for (std::int64_t m : {1, 3, 4, 8, 13, 32})
    for (std::int64_t n : {1, 7, 8, 16, 17, 32, 33, 64})
      for (std::int64_t kk : {0, 1, 5, 32})
        for (bool t : {false, true})
          for (bool acc : {false, true}) {
            run(float{}, m, n, kk, t, acc, seed);
            run(double{}, m, n, kk, t, acc, seed);
            seed += 3;
          }
}

TEST_CASE("attention: a NaN in a query makes that query's output NaN and leaves the others alone") {
  const std::int64_t B = 1, T = 40, H = 2, D = 32;
  auto q = rand_tensor<f32>({B, T, H, D}, 71), k = rand_tensor<f32>({B, T, H, D}, 72),
       v = rand_tensor<f32>({B, T, H, D}, 73);
  auto clean = attention<mask::causal>(var<f32>(q.clone()), var<f32>(k), var<f32>(v)).value();
  q(0, 35, 1, 4) = std::numeric_limits<float>::quiet_NaN();
  auto qv = var<f32>(q, true), kv = var<f32>(k, true), vv = var<f32>(v, true);
  auto out = attention<mask::causal>(qv, kv, vv);
  for (std::int64_t i = 0; i < T; ++i)
    for (std::int64_t h = 0; h < H; ++h)
      for (std::int64_t c = 0; c < D; ++c) {
        if (i == 35 && h == 1)
          CHECK(std::isnan(out.value()(0, i, h, c)));
        else
          CHECK(out.value()(0, i, h, c) == clean(0, i, h, c));
      }
  sum(out).backward();
  CHECK(std::isnan(qv.grad()(0, 35, 1, 0)));
  CHECK(std::isfinite(qv.grad()(0, 34, 1, 0)));
  CHECK(std::isfinite(qv.grad()(0, 35, 0, 0)));
}

TEST_CASE("attention: values match the naive formulation for every mask, GQA and tile edges") {
  check_against_naive<mask::none>(2, 5, 5, 2, 2, 4, 1);
  check_against_naive<mask::causal>(2, 5, 5, 4, 2, 4, 2);
  check_against_naive<mask::causal>(1, 70, 70, 2, 1, 8, 3);    // crosses the 32-row / 32-key tiles (three of them)
  check_against_naive<mask::causal>(1, 130, 130, 1, 1, 4, 4);  // five tiles, the last partial
  check_against_naive<mask::local<3>>(2, 9, 9, 2, 2, 4, 5);
  check_against_naive<mask::local<50>>(1, 140, 140, 2, 2, 4, 6);  // window spans tile borders
  check_against_naive<mask::strided<3>>(2, 11, 11, 2, 1, 4, 7);
  check_against_naive<mask::strided<16>>(1, 100, 100, 1, 1, 4, 8);
  // KV-cache shapes: the queries are the last positions of a longer key sequence.
  check_against_naive<mask::causal>(2, 1, 9, 4, 2, 4, 9);
  check_against_naive<mask::causal>(1, 3, 80, 2, 2, 4, 10);
  check_against_naive<mask::local<4>>(1, 2, 12, 2, 2, 4, 11);
  // Head dimensions of real models (32, 64, 128), over several tiles.
  check_against_naive<mask::causal>(2, 40, 40, 4, 2, 32, 12);
  check_against_naive<mask::none>(1, 33, 47, 2, 2, 64, 13);
  check_against_naive<mask::local<20>>(1, 50, 50, 2, 1, 128, 14);
}

TEST_CASE("attention: gradients (f64 central differences) for every mask and GQA") {
  auto q = rand_var({2, 5, 4, 3}, 21), k = rand_var({2, 5, 2, 3}, 22), v = rand_var({2, 5, 2, 3}, 23);
  KILN_CHECK_GRADIENTS([](auto& a, auto& b, auto& c) { return attention<mask::causal>(a, b, c); }, q, k, v);
  KILN_CHECK_GRADIENTS([](auto& a, auto& b, auto& c) { return attention<mask::none>(a, b, c); }, q, k, v);
  KILN_CHECK_GRADIENTS([](auto& a, auto& b, auto& c) { return attention<mask::local<2>>(a, b, c); }, q, k, v);
  KILN_CHECK_GRADIENTS([](auto& a, auto& b, auto& c) { return attention<mask::strided<2>>(a, b, c); }, q, k, v);
  // Multi-query, a query block shorter than the keys (cache offset), and an explicit scale.
  auto q1 = rand_var({1, 2, 3, 4}, 24), k1 = rand_var({1, 6, 1, 4}, 25), v1 = rand_var({1, 6, 1, 4}, 26);
  KILN_CHECK_GRADIENTS([](auto& a, auto& b, auto& c) { return attention<mask::causal>(a, b, c, {.scale = 0.3}); }, q1,
                       k1, v1);
  // Dropout on the probabilities: the mask is regenerated in backward from the stream.
  const philox_stream rng{77, 3};
  KILN_CHECK_GRADIENTS(
      [rng](auto& a, auto& b, auto& c) { return attention<mask::causal>(a, b, c, {.dropout_p = 0.25f, .rng = rng}); },
      q, k, v);
}

TEST_CASE("attention: gradients at the head dimensions of real models (32, 64, 128), dropout and GQA") {
  const philox_stream rng{78, 1};
  for (std::int64_t D : {32, 64, 128}) {
    CAPTURE(D);
    auto q = rand_var({1, 3, 2, D}, 101), k = rand_var({1, 4, 1, D}, 102), v = rand_var({1, 4, 1, D}, 103);
    KILN_CHECK_GRADIENTS([](auto& a, auto& b, auto& c) { return attention<mask::causal>(a, b, c); }, q, k, v);
    KILN_CHECK_GRADIENTS(
        [rng](auto& a, auto& b, auto& c) { return attention<mask::none>(a, b, c, {.dropout_p = 0.3f, .rng = rng}); }, q,
        k, v);
  }
}

TEST_CASE("attention: gradients through views of one packed QKV tensor (tiles beyond 64)") {
  // q, k, v are column slices of a [B, T, 3·H·D] projection, read in place; their three
  // backward writes land in one gradient buffer.
  auto qkv = rand_var({1, 67, 3 * 2 * 2}, 31);
  KILN_CHECK_GRADIENTS(
      [](auto& x) {
        auto q = unflatten(slice(x, 2, 0, 4), 2, {2, 2});
        auto k = unflatten(slice(x, 2, 4, 8), 2, {2, 2});
        auto v = unflatten(slice(x, 2, 8, 12), 2, {2, 2});
        return attention<mask::causal>(q, k, v);
      },
      qkv);
}

TEST_CASE("attention_packed: equals attention on the three slices, values and gradients (GQA, dropout)") {
  // [B, T, (Hq + 2·Hkv)·D] with Hq = 4, Hkv = 2, D = 3; T = 45 crosses the 32-query tiles.
  const std::int64_t B = 2, T = 45, Hq = 4, Hkv = 2, D = 3, W = (Hq + 2 * Hkv) * D;
  auto sliced = [&](const var<f64>& x, attention_options o) {
    auto q = unflatten(slice(x, 2, 0, Hq * D), 2, {Hq, D});
    auto k = unflatten(slice(x, 2, Hq * D, (Hq + Hkv) * D), 2, {Hkv, D});
    auto v = unflatten(slice(x, 2, (Hq + Hkv) * D, W), 2, {Hkv, D});
    return reshape(attention<mask::causal>(q, k, v, o), shape{B, T, Hq * D});
  };
  for (float p : {0.0f, 0.2f}) {
    CAPTURE(p);
    const attention_options o{.dropout_p = p, .rng = philox_stream{7, 3}};
    auto x1 = rand_var({B, T, W}, 91), x2 = var<f64>(x1.value().clone(), true);
    auto seed = rand_tensor<f64>({B, T, Hq * D}, 92);
    auto want = sliced(x1, o);
    auto got = attention_packed<mask::causal>(x2, Hq, Hkv, o);
    REQUIRE(got.shape() == want.shape());
    double worst = 0;
    for (std::int64_t i = 0; i < got.numel(); ++i)
      worst = std::max(worst, std::abs(got.value().flat(i) - want.value().flat(i)));
    CHECK(worst < 1e-13);
    want.backward(seed);
    got.backward(seed);
    double worst_grad = 0;
    for (std::int64_t i = 0; i < x1.numel(); ++i)
      worst_grad = std::max(worst_grad, std::abs(x1.grad().flat(i) - x2.grad().flat(i)));
    CHECK(worst_grad < 1e-13);
  }
  // Accumulation into an existing gradient, and the gradient check of the op itself.
  KILN_CHECK_GRADIENTS(
      [](auto& x) { return add(attention_packed<mask::causal>(x, 2, 1), attention_packed<mask::none>(x, 2, 1)); },
      rand_var({1, 37, (2 + 2) * 2}, 93));
  CHECK_THROWS_WITH_AS(attention_packed<mask::causal>(rand_var({1, 4, 10}, 94), 2, 1),
                       doctest::Contains("is not (Hq + 2·Hkv)·D"), error);
  CHECK_THROWS_WITH_AS(attention_packed<mask::causal>(rand_var({1, 4, 12}, 95), 3, 2),
                       doctest::Contains("grouped-query attention"), error);
}

TEST_CASE("attention: dropout matches the reference mask, is reproducible and keeps about 1-p") {
  auto q = rand_tensor<f64>({2, 6, 2, 4}, 41), k = rand_tensor<f64>({2, 6, 2, 4}, 42),
       v = rand_tensor<f64>({2, 6, 2, 4}, 43);
  const philox_stream rng{2026, 11};
  no_grad ng;
  auto got = attention<mask::causal>(var<f64>(q), var<f64>(k), var<f64>(v), {.dropout_p = 0.3f, .rng = rng}).value();
  auto want = naive_attention<mask::causal>(q, k, v, 0, 0.3f, rng);
  for (std::int64_t i = 0; i < got.numel(); ++i) CHECK(got.flat(i) == doctest::Approx(want.flat(i)).epsilon(1e-12));
  auto again = attention<mask::causal>(var<f64>(q), var<f64>(k), var<f64>(v), {.dropout_p = 0.3f, .rng = rng}).value();
  CHECK(again.to_vector() == got.to_vector());
  auto other =
      attention<mask::causal>(var<f64>(q), var<f64>(k), var<f64>(v), {.dropout_p = 0.3f, .rng = rng.advanced(1)})
          .value();
  CHECK(other.to_vector() != got.to_vector());
  std::int64_t kept = 0, n = 200000;
  for (std::int64_t i = 0; i < n; ++i) kept += rng.uniform(static_cast<std::uint64_t>(i)) >= 0.3f;
  CHECK(double(kept) / double(n) == doctest::Approx(0.7).epsilon(0.01));
}

TEST_CASE("attention: bf16 and f16 compute in f32 and track the f32 result") {
  auto q = rand_tensor<f32>({1, 9, 2, 8}, 51), k = rand_tensor<f32>({1, 9, 1, 8}, 52),
       v = rand_tensor<f32>({1, 9, 1, 8}, 53);
  var<f32> ref = attention<mask::causal>(var<f32>(q), var<f32>(k), var<f32>(v));
  var<bf16> qb(q.to<bf16>(), true), kb(k.to<bf16>(), true), vb(v.to<bf16>(), true);
  var<bf16> out = attention<mask::causal>(qb, kb, vb);
  for (std::int64_t i = 0; i < out.numel(); ++i)
    CHECK(float(out.value().flat(i)) == doctest::Approx(ref.value().flat(i)).epsilon(0.02).scale(1.0));
  sum(cast<f32>(out)).backward();
  REQUIRE(qb.has_grad());
  REQUIRE(kb.has_grad());
  REQUIRE(vb.has_grad());
  var<f16> qh(q.to<f16>()), kh(k.to<f16>()), vh(v.to<f16>());
  no_grad ng;
  auto oh = attention<mask::causal>(qh, kh, vh).value();
  for (std::int64_t i = 0; i < oh.numel(); ++i)
    CHECK(float(oh.flat(i)) == doctest::Approx(ref.value().flat(i)).epsilon(0.005).scale(1.0));
}

TEST_CASE("attention: keeps O(T) state, not the T×S probability matrix") {
  const std::int64_t T = 1024, D = 16;
  auto q = var<f32>(rand_tensor<f32>({1, T, 1, D}, 61), true), k = var<f32>(rand_tensor<f32>({1, T, 1, D}, 62), true),
       v = var<f32>(rand_tensor<f32>({1, T, 1, D}, 63), true);
  auto& alloc = caching_allocator<cpu>::instance();
  const auto before = alloc.stats().in_use;
  alloc.reset_peak();
  auto o = attention<mask::causal>(q, k, v);
  const auto held = alloc.stats().in_use - before;  // what the graph keeps for backward
  sum(o).backward();
  const auto peak = alloc.stats().peak_in_use - before;
  INFO("held ", held, " bytes, peak ", peak, " bytes; the probability matrix alone is ", T * T * 4, " bytes");
  CHECK(held < std::size_t(T * T * 4 / 16));
  CHECK(peak < std::size_t(T * T * 4 / 8));
}

TEST_CASE("attention: shape errors name the operands") {
  auto q = var<f32>(tensor<f32>::zeros({1, 4, 3, 2})), k = var<f32>(tensor<f32>::zeros({1, 4, 2, 2}));
  CHECK_THROWS_WITH_AS(attention(q, k, k), doctest::Contains("3 query heads cannot share 2 key/value heads"), error);
  auto bad = var<f32>(tensor<f32>::zeros({1, 4, 3}));
  CHECK_THROWS_WITH_AS(attention(bad, k, k), doctest::Contains("expects q [B, T, Hq, D]"), error);
  auto k3 = var<f32>(tensor<f32>::zeros({1, 4, 3, 2})), v4 = var<f32>(tensor<f32>::zeros({1, 5, 3, 2}));
  CHECK_THROWS_WITH_AS(attention(q, k3, v4), doctest::Contains("differ"), error);
  CHECK_THROWS_WITH_AS(attention(q, k3, k3, {.dropout_p = 1.0f}), doctest::Contains("dropout_p 1 is outside [0, 1)"),
                       error);
}

TEST_CASE("attention masks: ranges agree with allowed()") {
  auto check = []<class M>(M) {
    for (std::int64_t i = 0; i < 40; ++i) {
      std::int64_t lo = 1000, hi = -1;
      for (std::int64_t j = 0; j < 40; ++j)
        if (M::allowed(i, j)) {
          lo = std::min(lo, j);
          hi = std::max(hi, j);
        }
      CAPTURE(M::name());
      CAPTURE(i);
      CHECK(M::allowed(i, i));
      CHECK(M::first_key(i) <= lo);
      CHECK(M::end_key(i, 40) >= hi + 1);
    }
    for (std::int64_t i0 = 0; i0 < 30; i0 += 3)
      for (std::int64_t j0 = 0; j0 < 30; j0 += 2)
        if (M::dense(i0, i0 + 4, j0, j0 + 3))
          for (std::int64_t i = i0; i <= i0 + 4; ++i)
            for (std::int64_t j = j0; j <= j0 + 3; ++j) CHECK(M::allowed(i, j));
  };
  check(mask::causal{});
  check(mask::local<1>{});
  check(mask::local<5>{});
  check(mask::strided<4>{});
  check(mask::none{});
  CHECK(mask::strided<4>::allowed(9, 1));   // 8 back: a multiple of the stride
  CHECK(!mask::strided<4>::allowed(9, 2));  // 7 back: outside the band, not a multiple
  CHECK(!mask::local<3>::allowed(9, 6));
}

TEST_CASE("rope: rotate-half values, gradient, and positions that continue across calls") {
  // One pair (D = 2): the vector turns by position · theta^0 = position radians.
  auto x = var<f64>(tensor<f64>::from({1, 3, 1, 2}, {1, 0, 1, 0, 0, 1}));
  no_grad ng;
  auto y = rope(x, 0, 10000.0).value();
  CHECK(y(0, 0, 0, 0) == doctest::Approx(1.0));
  CHECK(y(0, 1, 0, 0) == doctest::Approx(std::cos(1.0f)));
  CHECK(y(0, 1, 0, 1) == doctest::Approx(std::sin(1.0f)));
  CHECK(y(0, 2, 0, 0) == doctest::Approx(-std::sin(2.0f)));
  // D = 4: the second pair (dims 1 and 3) turns at theta^(-1/2).
  auto x4 = var<f64>(tensor<f64>::from({1, 1, 1, 4}, {0, 1, 0, 0}));
  auto y4 = rope(x4, 5, 100.0).value();
  CHECK(y4(0, 0, 0, 1) == doctest::Approx(std::cos(5.0 * 0.1)).epsilon(1e-6));
  CHECK(y4(0, 0, 0, 3) == doctest::Approx(std::sin(5.0 * 0.1)).epsilon(1e-6));
  // A decode step at position 7 equals row 7 of the whole sequence.
  auto seq = rand_tensor<f64>({2, 9, 3, 6}, 71);
  auto whole = rope(var<f64>(seq), 0, 500000.0).value();
  auto step = rope(var<f64>(seq.slice(1, 7, 8).contiguous()), 7, 500000.0).value();
  for (std::int64_t b = 0; b < 2; ++b)
    for (std::int64_t h = 0; h < 3; ++h)
      for (std::int64_t c = 0; c < 6; ++c) CHECK(step(b, 0, h, c) == whole(b, 7, h, c));
}

TEST_CASE("rope: gradient") {
  auto x = rand_var({2, 4, 3, 6}, 81);
  KILN_CHECK_GRADIENTS([](auto& v) { return rope(v, 3, 10000.0); }, x);
  CHECK_THROWS_WITH_AS(rope(var<f64>(tensor<f64>::zeros({1, 2, 1, 3}))), doctest::Contains("even D"), error);
}

TEST_CASE("attention masks: the cuda kernels' value forms (local_n, strided_n) equal the policy types") {
  auto same = [](auto policy, auto value, std::int64_t s) {
    using P = decltype(policy);
    for (std::int64_t i = 0; i < s; ++i) {
      CAPTURE(i);
      CHECK(value.first_key(i) == P::first_key(i));
      CHECK(value.end_key(i, s) == P::end_key(i, s));
      for (std::int64_t j = 0; j < s; ++j)
        if (value.allowed(i, j) != P::allowed(i, j)) FAIL_CHECK(P::name(), " at (", i, ", ", j, ")");
    }
  };
  using namespace kiln::ops::mask;
  static_assert(std::is_same_v<device_form<local<7>>::type, local_n>);
  static_assert(std::is_same_v<device_form<causal>::type, causal>);
  same(local<1>{}, device_form<local<1>>::make(), 40);
  same(local<7>{}, device_form<local<7>>::make(), 90);
  same(strided<5>{}, device_form<strided<5>>::make(), 90);
  same(strided<8>{}, device_form<strided<8>>::make(), 90);
  CHECK(device_form<local<7>>::make().window == 7);
  CHECK(device_form<strided<8>>::make().stride == 8);
}

}  // namespace test_attention
