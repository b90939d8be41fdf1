#include "../helpers.hpp"

namespace test_tensor {

using namespace kiln;

TEST_CASE("tensor: construction, element access, fill") {
  auto t = tensor<f32>::from({2, 3}, {1, 2, 3, 4, 5, 6});
  CHECK(t.shape() == shape{2, 3});
  CHECK(t.numel() == 6);
  CHECK(t.is_contiguous());
  CHECK(t(1, 2) == 6.0f);
  t(0, 1) = 9.0f;
  CHECK(t.data()[1] == 9.0f);
  CHECK(tensor<f64>::zeros({4}).to_vector() == std::vector<f64>(4, 0.0));
  CHECK(tensor<i64>::full({2}, 7).to_vector() == std::vector<i64>{7, 7});
  CHECK_THROWS_WITH_AS(t(2, 0), doctest::Contains("index 2 out of bounds for dim 0 of shape [2, 3]"), kiln::error);
  CHECK_THROWS_WITH_AS(tensor<f32>::from({2, 2}, {1, 2, 3}), doctest::Contains("3 values given for shape [2, 2]"),
                       kiln::error);
}

TEST_CASE("tensor: views share storage and do not copy") {
  auto t = tensor<f32>::from({2, 3}, {0, 1, 2, 3, 4, 5});
  auto tr = t.transpose(0, 1);
  CHECK(tr.shares_storage_with(t));
  CHECK_FALSE(tr.is_contiguous());
  CHECK(tr.shape() == shape{3, 2});
  CHECK(tr(2, 1) == 5.0f);
  CHECK(tr.contiguous().to_vector() == std::vector<f32>{0, 3, 1, 4, 2, 5});

  auto r = t.reshape({3, -1});
  CHECK(r.shares_storage_with(t));  // contiguous reshape is a view
  CHECK(r.shape() == shape{3, 2});
  auto rt = tr.reshape({6});  // non-contiguous reshape copies
  CHECK_FALSE(rt.shares_storage_with(t));
  CHECK(rt.to_vector() == std::vector<f32>{0, 3, 1, 4, 2, 5});

  auto s = t.slice(1, 1, 3);
  CHECK(s.shares_storage_with(t));
  CHECK(s.shape() == shape{2, 2});
  CHECK(s.to_vector() == std::vector<f32>{1, 2, 4, 5});
  s(0, 0) = 42;  // writes through
  CHECK(t(0, 1) == 42.0f);
  auto stepped = t.slice(1, 0, 3, 2);
  CHECK(stepped.to_vector() == std::vector<f32>{0, 2, 3, 5});
  CHECK(t.select(0, 1).to_vector() == std::vector<f32>{3, 4, 5});
  CHECK(t.unsqueeze(0).shape() == shape{1, 2, 3});
  CHECK(t.permute({1, 0}).to_vector() == tr.to_vector());
  CHECK(t.clone().shares_storage_with(t) == false);
}

TEST_CASE("tensor: errors name the op and both shapes") {
  auto t = tensor<f32>::zeros({2, 3});
  CHECK_THROWS_WITH_AS(t.reshape({4, 2}), doctest::Contains("reshape: shape [2, 3] (6 elements) cannot become [4, 2]"),
                       kiln::error);
  CHECK_THROWS_WITH_AS(t.slice(1, 2, 5),
                       doctest::Contains("slice: range [2, 5) out of bounds for dim 1 of shape [2, 3]"), kiln::error);
  CHECK_THROWS_WITH_AS(t.transpose(0, 3), doctest::Contains("transpose: dimension 3 out of range for shape [2, 3]"),
                       kiln::error);
  auto u = tensor<f32>::zeros({3, 3});
  CHECK_THROWS_WITH_AS(t.copy_from(u), doctest::Contains("shape [3, 3] does not match destination [2, 3]"),
                       kiln::error);
  var<f32> a(tensor<f32>::zeros({2, 3})), b(tensor<f32>::zeros({4, 5}));
  CHECK_THROWS_WITH_AS(matmul(a, b), doctest::Contains("matmul: inner dimensions differ, [2, 3] · [4, 5]"),
                       kiln::error);
  CHECK_THROWS_WITH_AS(add(a, b), doctest::Contains("add: shapes [2, 3] and [4, 5] cannot be broadcast"), kiln::error);
}

TEST_CASE("error: context lines stack from inner to outer") {
  kiln::error e("tensor 'w' has shape [2], expected [3]");
  e.with_context("while loading checkpoint 'a.ckpt'");
  CHECK(std::string(e.what()) == "kiln: tensor 'w' has shape [2], expected [3]\n  while loading checkpoint 'a.ckpt'");
}

TEST_CASE("dtypes: half types store and convert; tags and sizes") {
  CHECK(dtype_of<f32> == dtype::f32);
  CHECK(dtype_size(dtype::bf16) == 2);
  CHECK(dtype_name(dtype::f16) == "F16");
  auto t = tensor<f32>::from({3}, {1.0f, 0.5f, -2.25f});
  auto b = t.to<bf16>();
  auto h = t.to<f16>();
  CHECK(static_cast<float>(b(2)) == -2.25f);
  CHECK(static_cast<float>(h(1)) == 0.5f);
  CHECK(b.to<f32>().to_vector() == t.to_vector());
  // bf16 keeps 8 bits of mantissa: 1 + 2^-9 rounds to 1.
  CHECK(static_cast<float>(bf16(1.0f + 1.0f / 512)) == 1.0f);
  static_assert(floating_element<bf16> && floating_element<f16> && !floating_element<i64>);
  static_assert(device<cpu> && device<cuda>);
}

TEST_CASE("ops run in bf16 and f16 (computing in float)") {
  var<bf16> x(tensor<f32>::from({2, 2}, {1, 2, 3, 4}).to<bf16>(), true);
  auto y = sum(relu(matmul(x, x)));
  CHECK(static_cast<float>(y.value()()) == 54.0f);
  y.backward();
  CHECK(static_cast<float>(x.grad()(0, 0)) == 7.0f);  // d/dx00 of Σ(x·x) = row0·1 + col0·1 = (1+2) + (1+3)
  var<f16> h(tensor<f32>::from({3}, {-1, 0.5f, 2}).to<f16>());
  CHECK(static_cast<float>(softmax(h).value()(2)) == doctest::Approx(0.7856).epsilon(2e-3));
}

}  // namespace test_tensor
