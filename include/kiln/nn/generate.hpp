// kiln/nn/generate.hpp — autoregressive decoding with a KV cache.
//
// Spec: generate(model, prompt, options, on_token) runs the prompt once through the
// model (filling a KV cache), then produces one token per step from the last position's
// logits, feeding only the new token back (O(T) work per step, not O(T²)). The model is
// put in eval mode for the call and restored after; nothing is recorded for backward.
// Logit processing, in this order (transformers' order and semantics):
//   1. repetition_penalty r (CTRL, Keskar et al. 2019): for every token already in the
//      prompt or the output, a positive logit is divided by r, a negative one multiplied;
//   2. greedy (temperature == 0 or options.greedy): argmax, ties to the lowest id;
//   3. otherwise logits / temperature, then top_k (keep the k largest; 0 = off), then
//      top_p (keep the smallest set of most probable tokens whose probability reaches p;
//      the most probable token always stays), then one draw by inverse CDF from the
//      counter RNG: draw i uses uniform_f64 at index i of the stream (seed, 0), so a
//      seed fixes the output whatever else the program does.
// Stopping: after max_new_tokens, after emitting a token in stop_tokens (it is
// included, as transformers includes EOS), when on_token returns false, or when the
// context (model.max_positions()) is full. on_token(id) is called for each new token
// as soon as it is chosen (streaming); it may return void or bool (false stops).
// Device: a model on cuda (nn::gpt2<..., cuda>) decodes there; the prompt and each new
// token are copied over, and the last position's logits (V values) come back per token,
// where the same choose_token runs, so a CPU and a GPU model choose alike.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <span>
#include <type_traits>
#include <vector>

#include "kiln/core/transfer.hpp"
#include "kiln/nn/transformer.hpp"

namespace kiln::nn {

struct generation_options {
  std::int64_t max_new_tokens = 64;
  bool greedy = false;  // also implied by temperature == 0
  float temperature = 1.0f;
  std::int64_t top_k = 0;  // 0: no top-k filter
  float top_p = 1.0f;      // 1: no nucleus filter
  float repetition_penalty = 1.0f;
  std::vector<std::int64_t> stop_tokens;
  std::uint64_t seed = 0;
};

enum class stop_reason { max_new_tokens, stop_token, callback, context_full };

struct generation_result {
  std::vector<std::int64_t> tokens;  // the new tokens only
  stop_reason reason = stop_reason::max_new_tokens;
};

namespace detail {
// Chooses the next token from one row of logits (modified in place).
inline std::int64_t choose_token(std::vector<float>& logits, const std::vector<std::int64_t>& seen,
                                 const generation_options& o, std::uint64_t draw) {
  const auto V = static_cast<std::int64_t>(logits.size());
  if (o.repetition_penalty != 1.0f) {
    std::vector<bool> done(static_cast<std::size_t>(V));
    for (auto t : seen) {
      if (t < 0 || t >= V || done[static_cast<std::size_t>(t)]) continue;
      done[static_cast<std::size_t>(t)] = true;
      float& l = logits[static_cast<std::size_t>(t)];
      l = l > 0 ? l / o.repetition_penalty : l * o.repetition_penalty;
    }
  }
  if (o.greedy || o.temperature == 0.0f)
    return static_cast<std::int64_t>(std::max_element(logits.begin(), logits.end()) - logits.begin());
  std::vector<std::int64_t> order(static_cast<std::size_t>(V));
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](std::int64_t a, std::int64_t b) {
    return logits[static_cast<std::size_t>(a)] > logits[static_cast<std::size_t>(b)];
  });
  std::size_t keep = order.size();
  if (o.top_k > 0) keep = std::min<std::size_t>(keep, static_cast<std::size_t>(o.top_k));
  // Softmax of the kept logits at the temperature, in double.
  const double mx = logits[static_cast<std::size_t>(order[0])] / double(o.temperature);
  std::vector<double> p(keep);
  double z = 0;
  for (std::size_t i = 0; i < keep; ++i)
    z += p[i] = std::exp(logits[static_cast<std::size_t>(order[i])] / double(o.temperature) - mx);
  for (auto& x : p) x /= z;
  if (o.top_p < 1.0f) {
    double cum = 0;
    std::size_t n = 0;
    while (n < keep) {
      cum += p[n++];
      if (cum >= double(o.top_p)) break;
    }
    keep = std::max<std::size_t>(n, 1);
    double z2 = 0;
    for (std::size_t i = 0; i < keep; ++i) z2 += p[i];
    for (std::size_t i = 0; i < keep; ++i) p[i] /= z2;
  }
  const double u = philox_stream{o.seed, 0}.uniform_f64(draw);
  double cum = 0;
  for (std::size_t i = 0; i < keep; ++i) {
    cum += p[i];
    if (u < cum) return order[i];
  }
  return order[keep - 1];
}
}  // namespace detail

template <causal_lm M, class OnToken = decltype([](std::int64_t) {})>
generation_result generate(M& model, std::span<const std::int64_t> prompt, const generation_options& o = {},
                           OnToken on_token = {}) {
  KILN_CHECK(!prompt.empty(), "generate: the prompt is empty (give at least one token, e.g. a BOS token)");
  KILN_CHECK(o.max_new_tokens >= 0, "generate: max_new_tokens ", o.max_new_tokens, " is negative");
  KILN_CHECK(o.temperature >= 0.0f && o.top_p > 0.0f && o.top_p <= 1.0f && o.top_k >= 0 && o.repetition_penalty > 0.0f,
             "generate: temperature ", o.temperature, " must be >= 0, top_p ", o.top_p, " in (0, 1], top_k ", o.top_k,
             " >= 0, repetition_penalty ", o.repetition_penalty, " > 0");
  const std::int64_t V = model.vocab_size(), P = static_cast<std::int64_t>(prompt.size());
  for (auto t : prompt)
    KILN_CHECK(0 <= t && t < V, "generate: prompt token ", t, " is outside the vocabulary [0, ", V, ")");
  KILN_CHECK(P <= model.max_positions(), "generate: the prompt (", P, " tokens) exceeds the model's context of ",
             model.max_positions());
  generation_result r;
  bool was_training = false;
  visit_modules(model, [&](const std::string&, auto& m) {
    if constexpr (requires { m.training; }) was_training = was_training || m.training;
  });
  eval(model);
  no_grad ng;
  const std::int64_t capacity = std::min(model.max_positions(), P + std::max<std::int64_t>(o.max_new_tokens, 1));
  auto cache = model.make_cache(1, capacity);
  std::vector<std::int64_t> seen(prompt.begin(), prompt.end());
  using Dev = model_device_t<M>;
  tensor<i64> ids(shape{1, P});
  std::copy(prompt.begin(), prompt.end(), ids.data());
  auto logits = model.forward(to_device<Dev>(ids), &cache).value();
  std::vector<float> row(static_cast<std::size_t>(V));
  for (std::int64_t step = 0;; ++step) {
    if (step >= o.max_new_tokens) {
      r.reason = stop_reason::max_new_tokens;
      break;
    }
    // The last position's row: V values, read back once per token from a device.
    const auto last_row = to_host(logits.slice(1, logits.size(1) - 1, logits.size(1)).contiguous());
    for (std::int64_t v = 0; v < V; ++v) row[static_cast<std::size_t>(v)] = static_cast<float>(last_row.data()[v]);
    const std::int64_t tok = detail::choose_token(row, seen, o, static_cast<std::uint64_t>(step));
    r.tokens.push_back(tok);
    seen.push_back(tok);
    bool go_on = true;
    if constexpr (std::is_same_v<std::invoke_result_t<OnToken&, std::int64_t>, bool>)
      go_on = on_token(tok);
    else
      on_token(tok);
    if (std::find(o.stop_tokens.begin(), o.stop_tokens.end(), tok) != o.stop_tokens.end()) {
      r.reason = stop_reason::stop_token;
      break;
    }
    if (!go_on) {
      r.reason = stop_reason::callback;
      break;
    }
    if (step + 1 >= o.max_new_tokens) {
      r.reason = stop_reason::max_new_tokens;
      break;
    }
    if (cache.length >= cache.capacity()) {
      r.reason = stop_reason::context_full;
      break;
    }
    tensor<i64> next(shape{1, 1});
    next.data()[0] = tok;
    logits = model.forward(to_device<Dev>(next), &cache).value();
  }
  if (was_training) train(model);
  return r;
}

}  // namespace kiln::nn
