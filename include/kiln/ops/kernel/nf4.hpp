// kiln/ops/kernel/nf4.hpp — 4-bit NormalFloat weights (QLoRA, Dettmers et al. 2023) in
// bitsandbytes' layout, with double quantisation of the block scales.
//
// Spec: a weight of n elements, read in row-major order, is cut into blocks of 64.
//   - Each block's scale is its absmax m_b = max |w| (f32). Each element is stored as the
//     bucket of v = w·(1/m_b) (w / m_b in a last, partial block), clamped to [-1, 1],
//     among the midpoints of the 16 NF4 codes — the number of midpoints below v, as
//     bitsandbytes' quantize_4bit buckets it — two per byte, the first element of a pair
//     in the high nibble. The codes are bitsandbytes' (quantiles of N(0, 1) scaled to
//     [-1, 1], 0 exact).
//   - Double quantisation: the scales are centred on their mean (`offset`, summed in
//     f64), cut into blocks of 256, and each block stored as the index of the entry of
//     bitsandbytes' signed dynamic map nearest to (m_b − offset) / max_b |m_b − offset|
//     (a tie to the lower), scaled by that block's max (f32). The map is
//     create_dynamic_map(): 7 decades, the midpoints of linspace(0.1, 1) in each, 0 and
//     1. (bitsandbytes' CPU search puts its bucket boundaries up to 1e-5 from the
//     midpoints, so a scale that close to one may get the neighbouring code there; the
//     interop test allows exactly that.)
//   - Decoding: w ≈ code4[q] · (code8[s_b] · absmax2[b / 256] + offset).
// Storage per element: 4 bits + 8/64 + 32/(64·256) ≈ 4.127 bits, 0.258x of bf16's bytes.
// A test (tests/nn/bnb_check.py) checks codes and scales against
// bitsandbytes.functional.quantize_4bit(..., quant_type="nf4", compress_statistics=True).
// nf4_weight holds one quantised matrix on the host; dequantize_rows() expands a range of
// its rows into a caller's buffer, which is all the fused GEMM (ops::qlora_linear) needs:
// the weight is never expanded whole.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <vector>

#include "kiln/core/config.hpp"
#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/error.hpp"
#include "kiln/core/shape.hpp"

namespace kiln::ops::nf4 {

inline constexpr std::int64_t block = 64;         // elements per scale
inline constexpr std::int64_t scale_block = 256;  // scales per second-level scale

// bitsandbytes' NF4 code book (functional.py, get_4bit_type("nf4")), ascending.
inline constexpr std::array<float, 16> code4 = {-1.0f,
                                                -0.6961928009986877f,
                                                -0.5250730514526367f,
                                                -0.39491748809814453f,
                                                -0.28444138169288635f,
                                                -0.18477343022823334f,
                                                -0.09105003625154495f,
                                                0.0f,
                                                0.07958029955625534f,
                                                0.16093020141124725f,
                                                0.24611230194568634f,
                                                0.33791524171829224f,
                                                0.44070982933044434f,
                                                0.5626170039176941f,
                                                0.7229568362236023f,
                                                1.0f};

// bitsandbytes' signed 8-bit dynamic map, computed as create_dynamic_map(True, 7, 8)
// computes it: float32 linspace(0.1, 1, k) (torch's two-sided formula, fused multiply-add), float32 midpoints
// times the decade as float32 (a tensor times a Python scalar); then 0 and 1, sorted.
inline const std::array<float, 256>& code8() {
  static const std::array<float, 256> table = [] {
    std::vector<float> d;
    auto decade = [&](int i, std::int64_t items) {
      const float lo = 0.1f, hi = 1.0f;
      const float step = (hi - lo) / static_cast<float>(items - 1);
      std::vector<float> b(static_cast<std::size_t>(items));
      for (std::int64_t j = 0; j < items; ++j)
        b[static_cast<std::size_t>(j)] = j < items / 2 ? std::fma(step, static_cast<float>(j), lo)
                                                       : std::fma(-step, static_cast<float>(items - j - 1), hi);
      const float scale = static_cast<float>(std::pow(10.0, static_cast<double>(-(7 - 1) + i)));
      for (std::int64_t j = 0; j + 1 < items; ++j) {
        const float mean = (b[static_cast<std::size_t>(j)] + b[static_cast<std::size_t>(j + 1)]) / 2.0f;
        d.push_back(scale * mean);
        d.push_back(-scale * mean);
      }
    };
    for (int i = 0; i < 7; ++i) decade(i, (std::int64_t{1} << i) + 1);  // 2^(i + 7 - 7) + 1 items, signed
    d.push_back(0.0f);
    d.push_back(1.0f);
    while (d.size() < 256) d.push_back(0.0f);
    std::sort(d.begin(), d.end());
    std::array<float, 256> t{};
    std::copy(d.begin(), d.end(), t.begin());
    return t;
  }();
  return table;
}

// The NF4 bucket of v: how many of the codes' midpoints (float32) lie below it.
KILN_HOST_DEVICE inline std::uint8_t bucket4(float v) {
  int i = 0;
  for (int k = 0; k < 15; ++k) i += (code4[k] + code4[k + 1]) / 2.0f < v ? 1 : 0;
  return static_cast<std::uint8_t>(i);
}

// The index of the entry of `code` (ascending, n entries) nearest to v; ties to the lower.
KILN_HOST_DEVICE inline std::uint8_t nearest(const float* code, int n, float v) {
  int best = 0;
  float dist = std::fabs(v - code[0]);
  for (int i = 1; i < n; ++i) {
    const float d = std::fabs(v - code[i]);
    if (d < dist) {
      dist = d;
      best = i;
    }
  }
  return static_cast<std::uint8_t>(best);
}

// One quantised matrix [rows, cols] (see the spec).
struct nf4_weight {
  kiln::shape dims;
  std::vector<std::uint8_t> codes;        // ceil(n / 2) bytes, two elements each
  std::vector<std::uint8_t> scale_codes;  // one per block of 64
  std::vector<float> scale_absmax;        // one per 256 blocks
  float offset = 0.0f;                    // the mean of the block absmaxes

  std::int64_t numel() const { return dims.numel(); }
  std::int64_t blocks() const { return static_cast<std::int64_t>(scale_codes.size()); }
  // Bytes held: what the memory plan and the benchmark report.
  std::int64_t bytes() const {
    return static_cast<std::int64_t>(codes.size() + scale_codes.size() + 4 * scale_absmax.size() + 4);
  }
  // Block b's decoded absmax.
  float scale(std::int64_t b) const {
    return code8()[scale_codes[static_cast<std::size_t>(b)]] * scale_absmax[static_cast<std::size_t>(b / scale_block)] +
           offset;
  }
  std::uint8_t code_at(std::int64_t i) const {
    const std::uint8_t byte = codes[static_cast<std::size_t>(i / 2)];
    return (i % 2 == 0) ? static_cast<std::uint8_t>(byte >> 4) : static_cast<std::uint8_t>(byte & 0x0f);
  }
};

// Quantises n elements (any floating type convertible to float).
template <class T>
nf4_weight quantize(const T* w, const kiln::shape& dims) {
  nf4_weight q;
  q.dims = dims;
  const std::int64_t n = dims.numel();
  KILN_CHECK(n > 0, "nf4::quantize: the weight ", dims.str(), " is empty");
  const std::int64_t nb = (n + block - 1) / block;
  std::vector<float> absmax(static_cast<std::size_t>(nb));
  q.codes.assign(static_cast<std::size_t>((n + 1) / 2), 0);
  cpu_runtime::parallel_for(nb, 64, [&](std::int64_t b0, std::int64_t b1) {
    for (std::int64_t b = b0; b < b1; ++b) {
      const std::int64_t i0 = b * block, i1 = std::min(n, i0 + block);
      float m = 0.0f;
      for (std::int64_t i = i0; i < i1; ++i) m = std::max(m, std::fabs(static_cast<float>(w[i])));
      absmax[static_cast<std::size_t>(b)] = m;
      const float mm = std::max(m, 1e-38f), inv = 1.0f / mm;
      const bool partial = i1 - i0 < block;
      for (std::int64_t i = i0; i < i1; ++i) {
        const float x = static_cast<float>(w[i]);
        const std::uint8_t c = bucket4(std::clamp(partial ? x / mm : x * inv, -1.0f, 1.0f));
        auto& byte = q.codes[static_cast<std::size_t>(i / 2)];
        byte = static_cast<std::uint8_t>(i % 2 == 0 ? (byte & 0x0f) | (c << 4) : (byte & 0xf0) | c);
      }
    }
  });
  // Double quantisation of the scales.
  double sum = 0.0;
  for (float m : absmax) sum += m;
  q.offset = static_cast<float>(sum / static_cast<double>(nb));
  const std::int64_t ns = (nb + scale_block - 1) / scale_block;
  q.scale_codes.resize(static_cast<std::size_t>(nb));
  q.scale_absmax.resize(static_cast<std::size_t>(ns));
  const auto& c8 = code8();
  for (std::int64_t s = 0; s < ns; ++s) {
    const std::int64_t b0 = s * scale_block, b1 = std::min(nb, b0 + scale_block);
    float m = 0.0f;
    for (std::int64_t b = b0; b < b1; ++b) m = std::max(m, std::fabs(absmax[static_cast<std::size_t>(b)] - q.offset));
    q.scale_absmax[static_cast<std::size_t>(s)] = m;
    for (std::int64_t b = b0; b < b1; ++b) {
      const float v = m > 0.0f ? (absmax[static_cast<std::size_t>(b)] - q.offset) / m : 0.0f;
      q.scale_codes[static_cast<std::size_t>(b)] = nearest(c8.data(), 256, v);
    }
  }
  return q;
}

// Writes elements [i0, i1) of q, decoded, to out[0 .. i1 - i0).
template <class T>
void dequantize_range(const nf4_weight& q, std::int64_t i0, std::int64_t i1, T* out) {
  std::int64_t i = i0;
  while (i < i1) {
    const std::int64_t b = i / block, e = std::min(i1, (b + 1) * block);
    const float m = q.scale(b);
    for (; i < e; ++i) out[i - i0] = static_cast<T>(code4[q.code_at(i)] * m);
  }
}

// Rows [r0, r1) of the matrix q (dims [rows, cols]) into out (row-major, (r1 - r0) × cols),
// split across the CPU's threads.
template <class T>
void dequantize_rows(const nf4_weight& q, std::int64_t r0, std::int64_t r1, T* out) {
  const std::int64_t cols = q.dims[q.dims.rank() - 1];
  cpu_runtime::parallel_for(r1 - r0, 16, [&](std::int64_t a, std::int64_t b) {
    dequantize_range(q, (r0 + a) * cols, (r0 + b) * cols, out + a * cols);
  });
}

}  // namespace kiln::ops::nf4
