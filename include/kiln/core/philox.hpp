// kiln/core/philox.hpp — counter-based random numbers (Philox4x32-10, Salmon et al. 2011).
//
// Spec: philox4x32(counter, key) is a pure function, so a random stream is fully
// described by (seed, offset): element i of the stream is a function of
// (seed, offset + i) alone. That makes streams reproducible on any device and from any
// position — dropout regenerates its mask in backward instead of storing it, a resumed
// run continues the stream from a saved offset, and a CUDA thread computes its own
// element without coordination. All functions are KILN_HOST_DEVICE.
#pragma once

#include <cmath>
#include <cstdint>

#include "kiln/core/config.hpp"

namespace kiln {

struct philox_block {
  std::uint32_t v[4];
};

KILN_HOST_DEVICE constexpr philox_block philox4x32_10(philox_block ctr, std::uint32_t k0, std::uint32_t k1) {
  constexpr std::uint32_t m0 = 0xD2511F53u, m1 = 0xCD9E8D57u;
  constexpr std::uint32_t w0 = 0x9E3779B9u, w1 = 0xBB67AE85u;
  for (int round = 0; round < 10; ++round) {
    const std::uint64_t p0 = std::uint64_t{m0} * ctr.v[0];
    const std::uint64_t p1 = std::uint64_t{m1} * ctr.v[2];
    const philox_block next{{static_cast<std::uint32_t>(p1 >> 32) ^ ctr.v[1] ^ k0, static_cast<std::uint32_t>(p1),
                             static_cast<std::uint32_t>(p0 >> 32) ^ ctr.v[3] ^ k1, static_cast<std::uint32_t>(p0)}};
    ctr = next;
    k0 += w0;
    k1 += w1;
  }
  return ctr;
}

// A stream of random numbers addressed by index. Copyable, 16 bytes, no hidden state:
// `offset` is where element 0 of this stream sits in the (seed) sequence.
struct philox_stream {
  std::uint64_t seed = 0;
  std::uint64_t offset = 0;

  // 32 random bits for element i: block (offset+i)/4, lane (offset+i)%4.
  KILN_HOST_DEVICE constexpr std::uint32_t bits(std::uint64_t i) const {
    const std::uint64_t n = offset + i;
    const std::uint64_t block = n >> 2;
    const philox_block out = philox4x32_10(
        philox_block{{static_cast<std::uint32_t>(block), static_cast<std::uint32_t>(block >> 32), 0u, 0u}},
        static_cast<std::uint32_t>(seed), static_cast<std::uint32_t>(seed >> 32));
    return out.v[n & 3];
  }
  // Uniform in [0, 1) with 24 random bits.
  KILN_HOST_DEVICE constexpr float uniform(std::uint64_t i) const {
    return static_cast<float>(bits(i) >> 8) * (1.0f / 16777216.0f);
  }
  // Uniform in [0, 1) with 53 random bits (two draws: elements 2i and 2i+1).
  KILN_HOST_DEVICE constexpr double uniform_f64(std::uint64_t i) const {
    const std::uint64_t hi = bits(2 * i) >> 5, lo = bits(2 * i + 1) >> 6;  // 27 + 26 bits
    return static_cast<double>((hi << 26) | lo) * (1.0 / 9007199254740992.0);
  }
  // Standard normal via Box-Muller on elements 2i, 2i+1.
  KILN_HOST_DEVICE float normal(std::uint64_t i) const {
    const float u1 = (static_cast<float>(bits(2 * i) >> 8) + 1.0f) * (1.0f / 16777216.0f);  // (0, 1]
    const float u2 = uniform(2 * i + 1);
    return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.283185307179586f * u2);
  }
  // A stream starting n elements further on.
  KILN_HOST_DEVICE constexpr philox_stream advanced(std::uint64_t n) const { return {seed, offset + n}; }
};

// A generator: a stream plus a cursor. Each draw of n numbers consumes [offset, offset+n)
// and advances; (seed, offset) is the whole state, so saving and restoring it resumes
// the sequence exactly.
class philox_generator {
 public:
  explicit philox_generator(std::uint64_t seed = 0, std::uint64_t offset = 0) : s_{seed, offset} {}
  // Reserves n elements and returns the stream that addresses them.
  philox_stream take(std::uint64_t n) {
    const philox_stream s = s_;
    s_.offset += n;
    return s;
  }
  std::uint64_t seed() const { return s_.seed; }
  std::uint64_t offset() const { return s_.offset; }
  void set_state(std::uint64_t seed, std::uint64_t offset) { s_ = {seed, offset}; }

 private:
  philox_stream s_;
};

}  // namespace kiln

namespace kiln {

// The process-wide generator used for parameter initialisation and module-owned
// streams (dropout). manual_seed() makes model construction reproducible.
inline philox_generator& default_generator() {
  static philox_generator g{0x6b696c6eULL};  // "kiln"
  return g;
}
inline void manual_seed(std::uint64_t seed) { default_generator().set_state(seed, 0); }

}  // namespace kiln
