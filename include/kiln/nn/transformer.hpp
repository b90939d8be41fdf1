// kiln/nn/transformer.hpp — what decoder-only transformer models share: a list of
// blocks, the KV cache, activation-checkpointing policies, and the causal-LM concept.
//
// Spec (activation checkpointing): a block's Recompute policy says what its backward
// recomputes instead of storing (kiln/autograd/recompute.hpp does the work):
//   recompute::none       every intermediate is kept (fastest, most memory);
//   recompute::selective  the attention and MLP sub-layers are recomputed: the block keeps
//                         its input, the residual stream and the norms' inputs (4·C values
//                         per token instead of ~20·C), about one extra forward of the
//                         sub-layers per step;
//   recompute::full       the whole block is recomputed from its input (C per token).
// Dropout inside a recomputed segment replays the same masks (its streams are rewound).
// Spec (KV cache): kv_cache<T, Dev> holds, per layer, keys and values [B, capacity, Hkv, D];
// a forward with a cache writes the new positions at [length, length + T) and attends to
// [0, length + T); the model advances `length` once all layers have run.
// Spec (causal_lm): a model with forward(ids, cache*) → logits [B, T, V], ids on the
// model's device (model_device_t: its device_type, else cpu), make_cache(batch,
// capacity), vocab_size() and max_positions() (kiln/nn/generate.hpp).
#pragma once

#include <concepts>
#include <type_traits>
#include <vector>

#include "kiln/autograd/recompute.hpp"
#include "kiln/nn/dropout.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/nn/unit.hpp"
#include "kiln/ops/arithmetic.hpp"
#include "kiln/ops/attention.hpp"

namespace kiln::nn {

namespace recompute {
struct none {
  static constexpr const char* name = "none";
};
struct selective {
  static constexpr const char* name = "selective";
};
struct full {
  static constexpr const char* name = "full";
};
}  // namespace recompute

template <class R>
concept recompute_policy =
    std::same_as<R, recompute::none> || std::same_as<R, recompute::selective> || std::same_as<R, recompute::full>;

// Blocks named "0", "1", ... (HF's ModuleList).
template <class M>
struct module_list {
  std::vector<M> items;
  std::size_t size() const { return items.size(); }
  M& operator[](std::size_t i) { return items[i]; }
  const M& operator[](std::size_t i) const { return items[i]; }
  auto begin() { return items.begin(); }
  auto end() { return items.end(); }
  template <class F>
  void for_each_child(F&& f) {
    for (std::size_t i = 0; i < items.size(); ++i) f(std::to_string(i), items[i]);
  }
};

template <floating_element T = f32, device Dev = cpu>
struct kv_cache {
  std::vector<tensor<T, Dev>> keys, values;  // per layer [B, capacity, Hkv, D]
  std::int64_t length = 0;

  kv_cache() = default;
  kv_cache(std::int64_t layers, std::int64_t batch, std::int64_t capacity, std::int64_t kv_heads,
           std::int64_t head_dim) {
    KILN_CHECK(layers > 0 && batch > 0 && capacity > 0, "kv_cache: layers, batch and capacity must be positive");
    for (std::int64_t l = 0; l < layers; ++l) {
      keys.emplace_back(shape{batch, capacity, kv_heads, head_dim});
      values.emplace_back(shape{batch, capacity, kv_heads, head_dim});
    }
  }
  std::int64_t capacity() const { return keys.empty() ? 0 : keys[0].size(1); }
  std::int64_t batch() const { return keys.empty() ? 0 : keys[0].size(0); }
  std::size_t bytes() const { return 2 * keys.size() * (keys.empty() ? 0 : keys[0].nbytes()); }
  void reset() { length = 0; }

  // Stores layer l's keys/values for positions [length, length + T) and returns views of
  // positions [0, length + T) (no copy; the attention kernel reads the strided cache).
  std::pair<var<T, Dev>, var<T, Dev>> append(std::size_t l, const tensor<T, Dev>& k, const tensor<T, Dev>& v) {
    const std::int64_t t = k.size(1);
    KILN_CHECK(length + t <= capacity(), "kv_cache: ", length, " cached + ", t, " new positions exceed the capacity ",
               capacity(), "; make the cache larger");
    KILN_CHECK(k.size(0) == batch(), "kv_cache: batch ", k.size(0), " does not match the cache's ", batch());
    keys[l].slice(1, length, length + t).copy_from(k);
    values[l].slice(1, length, length + t).copy_from(v);
    return {var<T, Dev>(keys[l].slice(1, 0, length + t)), var<T, Dev>(values[l].slice(1, 0, length + t))};
  }
};

// Options for an attention call: queries at q_offset, and — while `drop` is in training
// mode with p > 0 — dropout on the probabilities from drop's own stream, which reserves
// one element per score (B·Hq·T·S), so replays and resumes draw the same masks.
inline ops::attention_options attention_options_for(dropout& drop, std::int64_t q_offset, std::int64_t scores) {
  ops::attention_options o;
  o.q_offset = q_offset;
  if (drop.training && drop.p > 0.0f) {
    o.dropout_p = drop.p;
    o.rng = drop.generator.take(static_cast<std::uint64_t>(scores));
  }
  return o;
}

// Runs a segment under the policy's recomputation rule (never with a cache: decoding
// runs without gradients).
template <bool Recompute, floating_element T, device Dev, class Owner, class F>
var<T, Dev> maybe_recompute(Owner& owner, const var<T, Dev>& x, F f) {
  if constexpr (Recompute) {
    if (autograd::grad_enabled()) return autograd::recompute(std::move(f), x, random_streams(owner));
  }
  (void)owner;
  return f(x);
}

// The pre-norm block both models use: h = x + attn(norm1(x)), out = h + mlp(norm2(h)),
// under the Recompute policy (full: the whole block; selective: attn and mlp apart).
template <recompute_policy R, floating_element T, device Dev, class Block, class N1, class A, class N2, class M>
var<T, Dev> pre_norm_block(Block& self, const var<T, Dev>& x, kv_cache<T, Dev>* cache, std::size_t layer, N1& norm1,
                           A& attn, N2& norm2, M& mlp) {
  constexpr bool sel = std::is_same_v<R, recompute::selective>;
  auto body = [n1 = &norm1, a = &attn, n2 = &norm2, m = &mlp, cache, layer](const var<T, Dev>& in) {
    var<T, Dev> att = cache ? (*a)((*n1)(in), cache, layer)
                            : maybe_recompute<sel>(*a, (*n1)(in), [a](const var<T, Dev>& y) { return (*a)(y); });
    auto h = ops::add(in, att);
    var<T, Dev> out = maybe_recompute<sel>(*m, (*n2)(h), [m](const var<T, Dev>& y) { return (*m)(y); });
    return ops::add(h, out);
  };
  if (cache) return body(x);
  return maybe_recompute<std::is_same_v<R, recompute::full>>(self, x, body);
}

// The device a model's parameters live on: M::device_type, cpu when it does not say.
template <class M>
constexpr auto model_device_probe() {
  if constexpr (requires { typename M::device_type; })
    return std::type_identity<typename M::device_type>{};
  else
    return std::type_identity<cpu>{};
}
template <class M>
using model_device_t = typename decltype(model_device_probe<M>())::type;

template <class M>
concept causal_lm = requires(M& m, const tensor<i64, model_device_t<M>>& ids) {
  {m.forward(ids, nullptr)};
  {m.make_cache(std::int64_t{1}, std::int64_t{1})};
  { m.vocab_size() } -> std::convertible_to<std::int64_t>;
  { m.max_positions() } -> std::convertible_to<std::int64_t>;
};

// Positions first, first + 1, ..., first + n - 1.
inline tensor<i64> position_ids(std::int64_t first, std::int64_t n) {
  tensor<i64> p(shape{n});
  for (std::int64_t i = 0; i < n; ++i) p.data()[i] = first + i;
  return p;
}

}  // namespace kiln::nn
