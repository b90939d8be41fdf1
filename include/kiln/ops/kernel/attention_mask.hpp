// kiln/ops/kernel/attention_mask.hpp — which keys a query may attend to, as policy types.
//
// Spec: an *attention mask* (concept ops::attention_mask) is a regular, stateless type
// with
//   static constexpr bool allowed(i, j)        query at absolute position i may see key j;
//   static constexpr std::int64_t first_key(i) no key before it is allowed (>= 0);
//   static constexpr std::int64_t end_key(i, s) no key at or after it is allowed (<= s);
//   static constexpr bool dense(i0, i1, j0, j1) every (i, j) in [i0,i1]×[j0,j1] is allowed;
//   static std::string name()                  for messages and checkpoints.
// Positions are absolute: with a KV cache the first query of a call sits at q_offset.
// The kernels iterate keys only in [first_key, end_key) and skip the per-element test on
// dense tiles, so a sparse pattern costs work in proportion to the keys it keeps.
// Ensures: every mask except `none` allows the diagonal j == i, so no query row is ever
// empty (an empty row would make the softmax 0/0).
//
// The sparse patterns are DeepSpeed's / Child et al. (2019) "Sparse Transformers":
//   local<W>    causal sliding window: i - W < j <= i;
//   strided<L>  causal, j within the last L positions or (i - j) a multiple of L
//               (the "strided" pattern: a local band plus every L-th earlier key).
#pragma once

#include <algorithm>
#include <concepts>
#include <cstdint>
#include <string>

#include "kiln/core/config.hpp"

namespace kiln::ops {

namespace mask {

// Every query sees every key (encoders, cross-attention).
struct none {
  KILN_HOST_DEVICE static constexpr bool allowed(std::int64_t, std::int64_t) { return true; }
  KILN_HOST_DEVICE static constexpr std::int64_t first_key(std::int64_t) { return 0; }
  KILN_HOST_DEVICE static constexpr std::int64_t end_key(std::int64_t, std::int64_t s) { return s; }
  KILN_HOST_DEVICE static constexpr bool dense(std::int64_t, std::int64_t, std::int64_t, std::int64_t) { return true; }
  static std::string name() { return "none"; }
};

// Decoder self-attention: key j is visible from query i when j <= i.
struct causal {
  KILN_HOST_DEVICE static constexpr bool allowed(std::int64_t i, std::int64_t j) { return j <= i; }
  KILN_HOST_DEVICE static constexpr std::int64_t first_key(std::int64_t) { return 0; }
  KILN_HOST_DEVICE static constexpr std::int64_t end_key(std::int64_t i, std::int64_t s) {
    return i + 1 < s ? i + 1 : s;
  }
  KILN_HOST_DEVICE static constexpr bool dense(std::int64_t i0, std::int64_t, std::int64_t, std::int64_t j1) {
    return j1 <= i0;
  }
  static std::string name() { return "causal"; }
};

// Causal sliding window of Window keys (the query's own position included).
template <std::int64_t Window>
struct local {
  static_assert(Window >= 1, "kiln::ops::mask::local<Window>: the window must hold at least one key (Window >= 1)");
  static constexpr std::int64_t window = Window;
  KILN_HOST_DEVICE static constexpr bool allowed(std::int64_t i, std::int64_t j) { return j <= i && i - j < Window; }
  KILN_HOST_DEVICE static constexpr std::int64_t first_key(std::int64_t i) {
    return i - Window + 1 > 0 ? i - Window + 1 : 0;
  }
  KILN_HOST_DEVICE static constexpr std::int64_t end_key(std::int64_t i, std::int64_t s) {
    return i + 1 < s ? i + 1 : s;
  }
  KILN_HOST_DEVICE static constexpr bool dense(std::int64_t i0, std::int64_t i1, std::int64_t j0, std::int64_t j1) {
    return j1 <= i0 && i1 - j0 < Window;
  }
  static std::string name() { return "local<" + std::to_string(Window) + ">"; }
};

// Sparse Transformer "strided" pattern with stride Stride.
template <std::int64_t Stride>
struct strided {
  static_assert(Stride >= 1, "kiln::ops::mask::strided<Stride>: the stride must be at least 1");
  static constexpr std::int64_t stride = Stride;
  KILN_HOST_DEVICE static constexpr bool allowed(std::int64_t i, std::int64_t j) {
    return j <= i && (i - j < Stride || (i - j) % Stride == 0);
  }
  KILN_HOST_DEVICE static constexpr std::int64_t first_key(std::int64_t i) { return i < Stride ? 0 : i % Stride; }
  KILN_HOST_DEVICE static constexpr std::int64_t end_key(std::int64_t i, std::int64_t s) {
    return i + 1 < s ? i + 1 : s;
  }
  KILN_HOST_DEVICE static constexpr bool dense(std::int64_t i0, std::int64_t i1, std::int64_t j0, std::int64_t j1) {
    return j1 <= i0 && i1 - j0 < Stride;
  }
  static std::string name() { return "strided<" + std::to_string(Stride) + ">"; }
};

// The cuda kernels' forms of local<W> and strided<L>: the width as a value, so one kernel
// instantiation serves every width a program composes (kernels/attention.cu). The same
// formulas as the policy types above; device_form<M> maps a mask to the form the kernels
// take (none and causal are their own).
struct local_n {
  std::int64_t window;
  KILN_HOST_DEVICE constexpr bool allowed(std::int64_t i, std::int64_t j) const { return j <= i && i - j < window; }
  KILN_HOST_DEVICE constexpr std::int64_t first_key(std::int64_t i) const {
    return i - window + 1 > 0 ? i - window + 1 : 0;
  }
  KILN_HOST_DEVICE constexpr std::int64_t end_key(std::int64_t i, std::int64_t s) const {
    return i + 1 < s ? i + 1 : s;
  }
};
struct strided_n {
  std::int64_t stride;
  KILN_HOST_DEVICE constexpr bool allowed(std::int64_t i, std::int64_t j) const {
    return j <= i && (i - j < stride || (i - j) % stride == 0);
  }
  KILN_HOST_DEVICE constexpr std::int64_t first_key(std::int64_t i) const { return i < stride ? 0 : i % stride; }
  KILN_HOST_DEVICE constexpr std::int64_t end_key(std::int64_t i, std::int64_t s) const {
    return i + 1 < s ? i + 1 : s;
  }
};

template <class M>
struct device_form {
  using type = M;
  static constexpr M make() { return {}; }
};
template <std::int64_t W>
struct device_form<local<W>> {
  using type = local_n;
  static constexpr local_n make() { return {W}; }
};
template <std::int64_t L>
struct device_form<strided<L>> {
  using type = strided_n;
  static constexpr strided_n make() { return {L}; }
};

}  // namespace mask

template <class M>
concept attention_mask = requires(std::int64_t i, std::int64_t j) {
  { M::allowed(i, j) } -> std::same_as<bool>;
  { M::first_key(i) } -> std::convertible_to<std::int64_t>;
  { M::end_key(i, j) } -> std::convertible_to<std::int64_t>;
  { M::dense(i, i, j, j) } -> std::same_as<bool>;
  { M::name() } -> std::convertible_to<std::string>;
};

}  // namespace kiln::ops
