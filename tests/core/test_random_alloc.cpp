#include "../helpers.hpp"

namespace test_random_alloc {

using namespace kiln;

TEST_CASE("philox4x32-10 matches the Random123 known-answer vectors") {
  auto r = philox4x32_10({{0, 0, 0, 0}}, 0, 0);
  CHECK(r.v[0] == 0x6627e8d5u);
  CHECK(r.v[1] == 0xe169c58du);
  CHECK(r.v[2] == 0xbc57ac4cu);
  CHECK(r.v[3] == 0x9b00dbd8u);
  r = philox4x32_10({{0xffffffffu, 0xffffffffu, 0xffffffffu, 0xffffffffu}}, 0xffffffffu, 0xffffffffu);
  CHECK(r.v[0] == 0x408f276du);
  CHECK(r.v[1] == 0x41c83b0eu);
  CHECK(r.v[2] == 0xa20bc7c6u);
  CHECK(r.v[3] == 0x6d5451fdu);
  r = philox4x32_10({{0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u}}, 0xa4093822u, 0x299f31d0u);
  CHECK(r.v[0] == 0xd16cfe09u);
  CHECK(r.v[1] == 0x94fdccebu);
  CHECK(r.v[2] == 0x5001e420u);
  CHECK(r.v[3] == 0x24126ea1u);
}

TEST_CASE("philox streams are addressable by (seed, offset)") {
  const philox_stream s{42, 0};
  // Element i of a stream at offset k is element k + i of the stream at 0.
  const philox_stream later{42, 13};
  for (std::uint64_t i = 0; i < 64; ++i) CHECK(later.bits(i) == s.bits(13 + i));
  philox_generator g(42);
  auto a = g.take(10), b = g.take(10);
  CHECK(a.offset == 0);
  CHECK(b.offset == 10);
  CHECK(g.offset() == 20);
  philox_generator resumed(42, 10);  // restoring (seed, offset) resumes the sequence
  CHECK(resumed.take(10).bits(3) == b.bits(3));
  CHECK(philox_stream{43, 0}.bits(0) != s.bits(0));
  // Uniforms lie in [0, 1) and have the right mean; normals have mean 0, variance 1.
  double mu = 0, m2 = 0, nm = 0, nv = 0;
  const int n = 20000;
  for (int i = 0; i < n; ++i) {
    const float u = s.uniform(static_cast<std::uint64_t>(i));
    CHECK_UNARY(u >= 0.0f && u < 1.0f);
    mu += u;
    m2 += u * u;
    const double z = s.normal(static_cast<std::uint64_t>(i));
    nm += z;
    nv += z * z;
  }
  mu /= n;
  CHECK(mu == doctest::Approx(0.5).epsilon(0.02));
  CHECK(m2 / n - mu * mu == doctest::Approx(1.0 / 12).epsilon(0.03));
  CHECK(std::abs(nm / n) < 0.03);
  CHECK(nv / n == doctest::Approx(1.0).epsilon(0.03));
}

TEST_CASE("caching allocator reuses blocks and tracks peak usage") {
  auto& a = caching_allocator<cpu>::instance();
  a.empty_cache();
  const auto before = a.stats();
  {
    tensor<f32> t({1000});  // 4000 B -> 4096 B block
    CHECK(reinterpret_cast<std::uintptr_t>(t.data()) % 64 == 0);
    CHECK(a.stats().in_use == before.in_use + 4096);
  }
  CHECK(a.stats().in_use == before.in_use);
  CHECK(a.stats().cached >= 4096);
  const auto sys = a.stats().system_allocs;
  const auto hits = a.stats().cache_hits;
  { tensor<f32> t({1010}); }  // same size class: served from the cache
  CHECK(a.stats().system_allocs == sys);
  CHECK(a.stats().cache_hits == hits + 1);
  a.reset_peak();
  {
    tensor<f64> big({1 << 18});  // 2 MiB
    CHECK(a.stats().peak_in_use >= before.in_use + (2u << 20));
  }
  CHECK(a.stats().peak_in_use >= (2u << 20));
  a.empty_cache();
  CHECK(a.stats().cached == 0);
  CHECK(detail::round_block_size(1) == 512);
  CHECK(detail::round_block_size((1u << 20) + 1) == (1u << 20) + (1u << 18));  // 1.25 MiB class
}

TEST_CASE("cuda tensors without a CUDA build fail with a clear error") {
  if constexpr (!cuda_enabled) {
    CHECK_THROWS_WITH_AS((tensor<f32, cuda>({4})), doctest::Contains("built without CUDA"), kiln::error);
  }
}

}  // namespace test_random_alloc
