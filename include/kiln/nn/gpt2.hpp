// kiln/nn/gpt2.hpp — GPT-2 (Radford et al. 2019) with Hugging Face's parameter names.
//
// Spec: gpt2<Mask, Recompute, T, Dev, Adapter> is a decoder-only transformer: token + learned position
// embeddings, n_layer pre-norm blocks (LayerNorm → fused-QKV attention → residual;
// LayerNorm → Linear(C, 4C) → GELU-tanh → Linear(4C, C) → residual), a final LayerNorm
// and an LM head tied to the token embedding (or its own `lm_head.weight`).
// Parameter names are transformers' GPT2LMHeadModel names ("transformer.h.0.attn.c_attn.weight").
// Layout: kiln's linear weights are [out, in]; GPT-2's Conv1D stores [in, out], so the
// four Conv1D weights are transposed when a checkpoint is read or written in HF format
// (hf_transposed(name) lists them; kiln's own checkpoints keep kiln's layout).
// Mask is any ops::attention_mask (causal for GPT-2 itself; local/strided for sparse
// variants); Recompute an nn::recompute policy. The config reads and writes config.json.
// Adapter (kiln/nn/lora.hpp): adapter::lora makes c_attn, c_proj (attention), c_fc and
// c_proj (MLP) lora_linear layers; their adapters are PEFT's for GPT-2 (fan_in_fan_out).
#pragma once

#include <string>

#include "kiln/nn/dropout.hpp"
#include "kiln/nn/embedding.hpp"
#include "kiln/nn/hf_config.hpp"
#include "kiln/nn/linear.hpp"
#include "kiln/nn/lora.hpp"
#include "kiln/nn/norm.hpp"
#include "kiln/nn/transformer.hpp"
#include "kiln/ops.hpp"

namespace kiln::nn {

struct gpt2_config {
  std::int64_t vocab_size = 50257, n_positions = 1024, n_embd = 768, n_layer = 12, n_head = 12;
  std::int64_t n_inner = 0;  // 0: 4 · n_embd
  double layer_norm_epsilon = 1e-5;
  float embd_pdrop = 0.0f, attn_pdrop = 0.0f, resid_pdrop = 0.0f;
  bool tie_word_embeddings = true;
  std::string activation_function = "gelu_new";  // or "gelu" (exact erf form)

  std::int64_t inner() const { return n_inner > 0 ? n_inner : 4 * n_embd; }
  std::int64_t head_dim() const { return n_embd / n_head; }
  void validate() const {
    KILN_CHECK(vocab_size > 0 && n_positions > 0 && n_embd > 0 && n_layer > 0 && n_head > 0,
               "gpt2_config: sizes must be positive");
    KILN_CHECK(n_embd % n_head == 0, "gpt2_config: n_embd ", n_embd, " is not a multiple of n_head ", n_head);
    KILN_CHECK(activation_function == "gelu_new" || activation_function == "gelu" ||
                   activation_function == "gelu_pytorch_tanh",
               "gpt2_config: activation_function \"", activation_function,
               "\" is not supported (gelu_new, gelu_pytorch_tanh or gelu)");
  }

  static gpt2_config from_hf(const io::json& j, const std::string& file = "config.json") {
    hf_fields f(j, file);
    const std::string type = f.string("model_type", "gpt2");
    f.require(type == "gpt2", "model_type", "expected \"gpt2\", got \"" + type + "\"");
    gpt2_config c;
    c.vocab_size = f.integer("vocab_size", 50257);
    c.n_positions = f.integer("n_positions", 1024);
    c.n_embd = f.integer("n_embd", 768);
    c.n_layer = f.integer("n_layer", 12);
    c.n_head = f.integer("n_head", 12);
    c.n_inner = f.integer("n_inner", 0);
    c.layer_norm_epsilon = f.number("layer_norm_epsilon", 1e-5);
    c.embd_pdrop = static_cast<float>(f.number("embd_pdrop", 0.1));
    c.attn_pdrop = static_cast<float>(f.number("attn_pdrop", 0.1));
    c.resid_pdrop = static_cast<float>(f.number("resid_pdrop", 0.1));
    c.tie_word_embeddings = f.boolean("tie_word_embeddings", true);
    c.activation_function = f.string("activation_function", "gelu_new");
    f.require(f.boolean("scale_attn_weights", true), "scale_attn_weights", "kiln supports only true");
    f.require(!f.boolean("scale_attn_by_inverse_layer_idx", false), "scale_attn_by_inverse_layer_idx",
              "kiln supports only false");
    f.require(!f.boolean("reorder_and_upcast_attn", false), "reorder_and_upcast_attn", "kiln supports only false");
    f.require(!f.boolean("add_cross_attention", false), "add_cross_attention", "kiln supports only false");
    try {
      c.validate();
    } catch (error& e) {
      throw e.with_context("while reading " + file);
    }
    return c;
  }
  io::json to_hf() const {
    io::json j = io::json::object();
    j.set("architectures", io::json(io::json::array_type{"GPT2LMHeadModel"}));
    j.set("model_type", "gpt2");
    j.set("vocab_size", vocab_size);
    j.set("n_positions", n_positions);
    j.set("n_ctx", n_positions);
    j.set("n_embd", n_embd);
    j.set("n_layer", n_layer);
    j.set("n_head", n_head);
    j.set("n_inner", n_inner > 0 ? io::json(n_inner) : io::json());
    j.set("activation_function", activation_function);
    j.set("layer_norm_epsilon", layer_norm_epsilon);
    j.set("embd_pdrop", double(embd_pdrop));
    j.set("attn_pdrop", double(attn_pdrop));
    j.set("resid_pdrop", double(resid_pdrop));
    j.set("tie_word_embeddings", tie_word_embeddings);
    j.set("dtype", "float32");
    return j;
  }
};

template <ops::attention_mask Mask, floating_element T, device Dev = cpu, adapter_policy Adapter = adapter::none>
struct gpt2_attention {
  adapted_linear<Adapter, T, Dev> c_attn, c_proj;
  dropout attn_dropout, resid_dropout;
  std::int64_t n_head = 0;

  gpt2_attention() = default;
  explicit gpt2_attention(const gpt2_config& c)
      : c_attn(c.n_embd, 3 * c.n_embd),
        c_proj(c.n_embd, c.n_embd),
        attn_dropout(c.attn_pdrop),
        resid_dropout(c.resid_pdrop),
        n_head(c.n_head) {}

  var<T, Dev> operator()(const var<T, Dev>& x, kv_cache<T, Dev>* cache = nullptr, std::size_t layer = 0) {
    const std::int64_t B = x.size(0), Tn = x.size(1), C = x.size(2), D = C / n_head;
    auto qkv = c_attn(x);
    if (!cache) {  // training and whole-sequence passes: one node over the packed projection
      const auto o = attention_options_for(attn_dropout, 0, B * n_head * Tn * Tn);
      return resid_dropout(c_proj(ops::attention_packed<Mask>(qkv, n_head, n_head, o)));
    }
    auto q = ops::unflatten(ops::slice(qkv, 2, 0, C), 2, {n_head, D});
    auto k = ops::unflatten(ops::slice(qkv, 2, C, 2 * C), 2, {n_head, D});
    auto v = ops::unflatten(ops::slice(qkv, 2, 2 * C, 3 * C), 2, {n_head, D});
    std::tie(k, v) = cache->append(layer, k.value(), v.value());
    const auto o = attention_options_for(attn_dropout, cache->length, B * n_head * Tn * k.size(1));
    auto a = ops::attention<Mask>(q, k, v, o);
    return resid_dropout(c_proj(ops::reshape(a, shape{B, Tn, C})));
  }
  template <class F>
  void for_each_child(F&& f) {
    f("c_attn", c_attn);
    f("c_proj", c_proj);
    f("attn_dropout", attn_dropout);
    f("resid_dropout", resid_dropout);
  }
};

template <floating_element T, device Dev = cpu, adapter_policy Adapter = adapter::none>
struct gpt2_mlp {
  adapted_linear<Adapter, T, Dev> c_fc, c_proj;
  dropout drop;
  bool exact_gelu = false;

  gpt2_mlp() = default;
  explicit gpt2_mlp(const gpt2_config& c)
      : c_fc(c.n_embd, c.inner()),
        c_proj(c.inner(), c.n_embd),
        drop(c.resid_pdrop),
        exact_gelu(c.activation_function == "gelu") {}
  var<T, Dev> operator()(const var<T, Dev>& x) {
    auto h = ops::gelu(c_fc(x), exact_gelu ? ops::gelu_approximation::none : ops::gelu_approximation::tanh);
    return drop(c_proj(h));
  }
  template <class F>
  void for_each_child(F&& f) {
    f("c_fc", c_fc);
    f("c_proj", c_proj);
    f("dropout", drop);
  }
};

template <ops::attention_mask Mask, recompute_policy Recompute, floating_element T, device Dev = cpu,
          adapter_policy Adapter = adapter::none>
struct gpt2_block {
  layer_norm<T, Dev> ln_1, ln_2;
  gpt2_attention<Mask, T, Dev, Adapter> attn;
  gpt2_mlp<T, Dev, Adapter> mlp;

  gpt2_block() = default;
  explicit gpt2_block(const gpt2_config& c)
      : ln_1(c.n_embd, c.layer_norm_epsilon), ln_2(c.n_embd, c.layer_norm_epsilon), attn(c), mlp(c) {}

  var<T, Dev> operator()(const var<T, Dev>& x, kv_cache<T, Dev>* cache = nullptr, std::size_t layer = 0) {
    return pre_norm_block<Recompute>(*this, x, cache, layer, ln_1, attn, ln_2, mlp);
  }
  template <class F>
  void for_each_child(F&& f) {
    f("ln_1", ln_1);
    f("attn", attn);
    f("ln_2", ln_2);
    f("mlp", mlp);
  }
};

template <ops::attention_mask Mask = ops::mask::causal, recompute_policy Recompute = recompute::none,
          floating_element T = f32, device Dev = cpu, adapter_policy Adapter = adapter::none>
struct gpt2 {
  using config_type = gpt2_config;
  using value_type = T;
  using device_type = Dev;
  using block_type = gpt2_block<Mask, Recompute, T, Dev, Adapter>;
  using adapter_type = Adapter;

  struct body {
    embedding<T, Dev> wte, wpe;
    dropout drop;
    module_list<unit<block_type>> h;  // each block a sharding unit (zero<3> gathers one at a time)
    layer_norm<T, Dev> ln_f;
    template <class F>
    void for_each_child(F&& f) {
      f("wte", wte);
      f("wpe", wpe);
      f("drop", drop);
      f("h", h);
      f("ln_f", ln_f);
    }
  };

  gpt2_config config;
  body transformer;
  std::optional<linear<T, Dev>> lm_head;  // only when the embeddings are not tied

  gpt2() = default;
  // GPT-2's initialisation: N(0, 0.02) for weights, N(0, 0.02/sqrt(2·n_layer)) for the
  // residual projections, zero biases, unit LayerNorm weights.
  explicit gpt2(const gpt2_config& c) : config(c) {
    c.validate();
    transformer.wte = embedding<T, Dev>(c.vocab_size, c.n_embd);
    transformer.wpe = embedding<T, Dev>(c.n_positions, c.n_embd);
    transformer.drop = dropout(c.embd_pdrop);
    for (std::int64_t l = 0; l < c.n_layer; ++l) transformer.h.items.emplace_back(c);
    transformer.ln_f = layer_norm<T, Dev>(c.n_embd, c.layer_norm_epsilon);
    if (!c.tie_word_embeddings) lm_head = linear<T, Dev>(c.n_embd, c.vocab_size, false);
    const double std = 0.02, proj_std = 0.02 / std::sqrt(2.0 * double(c.n_layer));
    visit_parameters(*this, [&](const std::string& name, var<T, Dev>& p) {
      if (name.ends_with(".bias"))
        p.value().fill(T(0));
      else if (name.find("ln_") != std::string::npos)
        p.value().fill(T(1));
      else
        p.value() = to_device<Dev>(init::normal<T>(p.shape(), name.ends_with("c_proj.weight") ? proj_std : std));
    });
  }

  std::int64_t vocab_size() const { return config.vocab_size; }
  std::int64_t max_positions() const { return config.n_positions; }
  kv_cache<T, Dev> make_cache(std::int64_t batch, std::int64_t capacity) const {
    return kv_cache<T, Dev>(config.n_layer, batch, capacity, config.n_head, config.head_dim());
  }

  // ids [B, T] → logits [B, T, vocab].
  var<T, Dev> operator()(const tensor<i64, Dev>& ids) { return forward(ids, nullptr); }
  var<T, Dev> forward(const tensor<i64, Dev>& ids, kv_cache<T, Dev>* cache) {
    KILN_CHECK(ids.rank() == 2, "gpt2: expects token ids [B, T], got ", ids.shape().str());
    const std::int64_t first = cache ? cache->length : 0, Tn = ids.size(1);
    KILN_CHECK(first + Tn <= config.n_positions, "gpt2: ", first + Tn, " positions exceed n_positions ",
               config.n_positions);
    auto x = transformer.drop(ops::add(transformer.wte(ids), transformer.wpe(to_device<Dev>(position_ids(first, Tn)))));
    for (std::size_t l = 0; l < transformer.h.size(); ++l) x = transformer.h[l](x, cache, l);
    x = transformer.ln_f(x);
    if (cache) cache->length += Tn;
    return lm_head ? (*lm_head)(x) : ops::linear(x, transformer.wte.weight);
  }

  // HF layout: GPT-2's Conv1D weights are stored [in, out].
  static bool hf_transposed(std::string_view name) {
    return name.ends_with(".attn.c_attn.weight") || name.ends_with(".attn.c_proj.weight") ||
           name.ends_with(".mlp.c_fc.weight") || name.ends_with(".mlp.c_proj.weight");
  }
  // Tensors an HF file may hold that are not parameters (old causal-mask buffers, the
  // tied head).
  bool hf_ignored(std::string_view name) const {
    return name.ends_with(".attn.bias") || name.ends_with(".attn.masked_bias") ||
           (config.tie_word_embeddings && name == "lm_head.weight");
  }
  io::json hf_config() const { return config.to_hf(); }

  template <class F>
  void for_each_child(F&& f) {
    f("transformer", transformer);
    if (lm_head) f("lm_head", *lm_head);
  }
};

}  // namespace kiln::nn
