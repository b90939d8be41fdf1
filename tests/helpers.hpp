// Shared helpers for the doctest suites.
#pragma once

#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "kiln/kiln.hpp"

namespace kiln::test {

// A random f64 input in [-1, 1) (or shifted), seeded and reproducible.
inline var<f64> rand_var(const shape& s, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  tensor<f64> t(s);
  const philox_stream st{seed, 0};
  for (std::int64_t i = 0; i < t.numel(); ++i)
    t.data()[i] = lo + (hi - lo) * st.uniform_f64(static_cast<std::uint64_t>(i));
  return var<f64>(t, true);
}

template <class T>
inline tensor<T> rand_tensor(const shape& s, std::uint64_t seed, double lo = -1.0, double hi = 1.0) {
  tensor<T> t(s);
  const philox_stream st{seed, 0};
  for (std::int64_t i = 0; i < t.numel(); ++i)
    t.data()[i] = static_cast<T>(lo + (hi - lo) * st.uniform_f64(static_cast<std::uint64_t>(i)));
  return t;
}

// A fresh, empty directory under the system's temp dir, unique to this process.
// Token ids [b, t] in [0, vocab), a function of the seed.
inline tensor<i64> random_ids(std::int64_t b, std::int64_t t, std::int64_t vocab, std::uint64_t seed) {
  tensor<i64> ids(shape{b, t});
  const philox_stream s{seed, 0};
  for (std::int64_t i = 0; i < ids.numel(); ++i) ids.data()[i] = s.bits(static_cast<std::uint64_t>(i)) % vocab;
  return ids;
}

inline std::filesystem::path temp_dir(const std::string& tag, const std::string& name) {
  auto p = std::filesystem::temp_directory_path() / ("kiln_" + tag + "_" + std::to_string(::getpid()) + "_" + name);
  std::filesystem::remove_all(p);
  std::filesystem::create_directories(p);
  return p;
}

// Every parameter's values as floats, by name (device parameters through a host copy).
template <class M>
std::map<std::string, std::vector<float>> weights(M& m) {
  std::map<std::string, std::vector<float>> out;
  nn::visit_parameters(m, [&](const std::string& n, auto& p) {
    for (auto v : to_host(p.value()).contiguous().to_vector()) out[n].push_back(static_cast<float>(v));
  });
  return out;
}
// The same names with the same bits.
inline bool same_bits(const std::map<std::string, std::vector<float>>& a,
                      const std::map<std::string, std::vector<float>>& b) {
  if (a.size() != b.size()) return false;
  for (auto& [k, v] : a) {
    auto it = b.find(k);
    if (it == b.end() || it->second.size() != v.size()) return false;
    if (std::memcmp(v.data(), it->second.data(), v.size() * sizeof(float)) != 0) return false;
  }
  return true;
}

// Runs the checker and reports the worst element on failure.
#define KILN_CHECK_GRADIENTS(...)                                     \
  do {                                                                \
    const auto kiln_gc_result = ::kiln::check_gradients(__VA_ARGS__); \
    INFO(kiln_gc_result.report);                                      \
    CHECK(kiln_gc_result.ok);                                         \
    CHECK(kiln_gc_result.elements_checked > 0);                       \
  } while (0)

}  // namespace kiln::test
