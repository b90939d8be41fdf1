// kiln/nn/llama.hpp — Llama (Touvron et al. 2023) with Hugging Face's parameter names.
//
// Spec: llama<Mask, Recompute, T, Dev, Adapter> is a decoder-only transformer: token embedding,
// num_hidden_layers pre-norm blocks (RMSNorm → attention with separate q/k/v/o
// projections, RoPE on q and k in the rotate-half layout, grouped-query attention with
// num_key_value_heads → residual; RMSNorm → SwiGLU MLP: down(silu(gate(x)) · up(x)) →
// residual), a final RMSNorm and an LM head (`lm_head.weight`, or the embedding when
// tie_word_embeddings). Names are transformers' LlamaForCausalLM names
// ("model.layers.0.self_attn.q_proj.weight"); every weight is [out, in] as in HF, so
// loading needs no transposes. RoPE: θ = rope_theta, inv_freq_c = θ^(−2c/head_dim)
// (rope_scaling other than none/"default" is refused with a clear error).
// Adapter (kiln/nn/lora.hpp): adapter::lora makes the seven projections of every block
// lora_linear layers, which attach_lora fits with low-rank adapters; the LM head stays plain.
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

struct llama_config {
  std::int64_t vocab_size = 32000, hidden_size = 4096, intermediate_size = 11008, num_hidden_layers = 32;
  std::int64_t num_attention_heads = 32, num_key_value_heads = 0;  // 0: = num_attention_heads
  std::int64_t head_dim_ = 0;                                      // 0: hidden_size / num_attention_heads
  std::int64_t max_position_embeddings = 2048;
  double rms_norm_eps = 1e-6, rope_theta = 10000.0;
  bool tie_word_embeddings = false, attention_bias = false, mlp_bias = false;
  float attention_dropout = 0.0f;

  std::int64_t kv_heads() const { return num_key_value_heads > 0 ? num_key_value_heads : num_attention_heads; }
  std::int64_t head_dim() const { return head_dim_ > 0 ? head_dim_ : hidden_size / num_attention_heads; }
  void validate() const {
    KILN_CHECK(vocab_size > 0 && hidden_size > 0 && intermediate_size > 0 && num_hidden_layers > 0 &&
                   num_attention_heads > 0 && max_position_embeddings > 0,
               "llama_config: sizes must be positive");
    KILN_CHECK(head_dim_ > 0 || hidden_size % num_attention_heads == 0, "llama_config: hidden_size ", hidden_size,
               " is not a multiple of num_attention_heads ", num_attention_heads);
    KILN_CHECK(num_attention_heads % kv_heads() == 0, "llama_config: num_attention_heads ", num_attention_heads,
               " is not a multiple of num_key_value_heads ", kv_heads());
    KILN_CHECK(head_dim() % 2 == 0, "llama_config: head_dim ", head_dim(), " must be even for RoPE");
  }

  static llama_config from_hf(const io::json& j, const std::string& file = "config.json") {
    hf_fields f(j, file);
    const std::string type = f.string("model_type", "llama");
    f.require(type == "llama", "model_type", "expected \"llama\", got \"" + type + "\"");
    llama_config c;
    c.vocab_size = f.integer("vocab_size", 32000);
    c.hidden_size = f.integer("hidden_size", 4096);
    c.intermediate_size = f.integer("intermediate_size", 11008);
    c.num_hidden_layers = f.integer("num_hidden_layers", 32);
    c.num_attention_heads = f.integer("num_attention_heads", 32);
    c.num_key_value_heads = f.integer("num_key_value_heads", 0);
    c.head_dim_ = f.integer("head_dim", 0);
    c.max_position_embeddings = f.integer("max_position_embeddings", 2048);
    c.rms_norm_eps = f.number("rms_norm_eps", 1e-6);
    c.rope_theta = f.number("rope_theta", 10000.0);
    c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
    c.attention_bias = f.boolean("attention_bias", false);
    c.mlp_bias = f.boolean("mlp_bias", false);
    c.attention_dropout = static_cast<float>(f.number("attention_dropout", 0.0));
    f.require(f.integer("pretraining_tp", 1) == 1, "pretraining_tp", "kiln supports only 1");
    const std::string act = f.string("hidden_act", "silu");
    f.require(act == "silu", "hidden_act", "kiln's llama supports \"silu\" (SwiGLU), got \"" + act + "\"");
    // Newer transformers keep RoPE settings in "rope_parameters"; older ones in
    // "rope_theta" + "rope_scaling".
    for (const char* key : {"rope_scaling", "rope_parameters"}) {
      if (const io::json* rs = f.get(key, false)) {
        hf_fields r(*rs, file + " field \"" + key + "\"");
        const std::string kind = r.string("rope_type", r.string("type", "default"));
        f.require(kind == "default", key, "kiln supports plain RoPE (rope_type \"default\"), got \"" + kind + "\"");
        c.rope_theta = r.number("rope_theta", c.rope_theta);
      }
    }
    try {
      c.validate();
    } catch (error& e) {
      throw e.with_context("while reading " + file);
    }
    return c;
  }
  io::json to_hf() const {
    io::json j = io::json::object();
    j.set("architectures", io::json(io::json::array_type{"LlamaForCausalLM"}));
    j.set("model_type", "llama");
    j.set("vocab_size", vocab_size);
    j.set("hidden_size", hidden_size);
    j.set("intermediate_size", intermediate_size);
    j.set("num_hidden_layers", num_hidden_layers);
    j.set("num_attention_heads", num_attention_heads);
    j.set("num_key_value_heads", kv_heads());
    j.set("head_dim", head_dim());
    j.set("max_position_embeddings", max_position_embeddings);
    j.set("rms_norm_eps", rms_norm_eps);
    j.set("rope_theta", rope_theta);
    j.set("rope_scaling", io::json());
    j.set("hidden_act", "silu");
    j.set("tie_word_embeddings", tie_word_embeddings);
    j.set("attention_bias", attention_bias);
    j.set("mlp_bias", mlp_bias);
    j.set("attention_dropout", double(attention_dropout));
    j.set("dtype", "float32");
    return j;
  }
};

template <ops::attention_mask Mask, floating_element T, device Dev = cpu, adapter_policy Adapter = adapter::none>
struct llama_attention {
  adapted_linear<Adapter, T, Dev> q_proj, k_proj, v_proj, o_proj;
  dropout attn_dropout;
  std::int64_t n_head = 0, n_kv = 0, head_dim = 0;
  double rope_theta = 10000.0;

  llama_attention() = default;
  explicit llama_attention(const llama_config& c)
      : q_proj(c.hidden_size, c.num_attention_heads * c.head_dim(), c.attention_bias),
        k_proj(c.hidden_size, c.kv_heads() * c.head_dim(), c.attention_bias),
        v_proj(c.hidden_size, c.kv_heads() * c.head_dim(), c.attention_bias),
        o_proj(c.num_attention_heads * c.head_dim(), c.hidden_size, c.attention_bias),
        attn_dropout(c.attention_dropout),
        n_head(c.num_attention_heads),
        n_kv(c.kv_heads()),
        head_dim(c.head_dim()),
        rope_theta(c.rope_theta) {}

  var<T, Dev> operator()(const var<T, Dev>& x, kv_cache<T, Dev>* cache = nullptr, std::size_t layer = 0) {
    const std::int64_t B = x.size(0), Tn = x.size(1), first = cache ? cache->length : 0;
    auto q = ops::rope(ops::unflatten(q_proj(x), 2, {n_head, head_dim}), first, rope_theta);
    auto k = ops::rope(ops::unflatten(k_proj(x), 2, {n_kv, head_dim}), first, rope_theta);
    auto v = ops::unflatten(v_proj(x), 2, {n_kv, head_dim});
    if (cache) std::tie(k, v) = cache->append(layer, k.value(), v.value());
    const auto o = attention_options_for(attn_dropout, first, B * n_head * Tn * k.size(1));
    auto a = ops::attention<Mask>(q, k, v, o);
    return o_proj(ops::reshape(a, shape{B, Tn, n_head * head_dim}));
  }
  template <class F>
  void for_each_child(F&& f) {
    f("q_proj", q_proj);
    f("k_proj", k_proj);
    f("v_proj", v_proj);
    f("o_proj", o_proj);
    f("attn_dropout", attn_dropout);
  }
};

template <floating_element T, device Dev = cpu, adapter_policy Adapter = adapter::none>
struct llama_mlp {
  adapted_linear<Adapter, T, Dev> gate_proj, up_proj, down_proj;
  llama_mlp() = default;
  explicit llama_mlp(const llama_config& c)
      : gate_proj(c.hidden_size, c.intermediate_size, c.mlp_bias),
        up_proj(c.hidden_size, c.intermediate_size, c.mlp_bias),
        down_proj(c.intermediate_size, c.hidden_size, c.mlp_bias) {}
  var<T, Dev> operator()(const var<T, Dev>& x) { return down_proj(ops::swiglu(gate_proj(x), up_proj(x))); }
  template <class F>
  void for_each_child(F&& f) {
    f("gate_proj", gate_proj);
    f("up_proj", up_proj);
    f("down_proj", down_proj);
  }
};

template <ops::attention_mask Mask, recompute_policy Recompute, floating_element T, device Dev = cpu,
          adapter_policy Adapter = adapter::none>
struct llama_block {
  rms_norm<T, Dev> input_layernorm, post_attention_layernorm;
  llama_attention<Mask, T, Dev, Adapter> self_attn;
  llama_mlp<T, Dev, Adapter> mlp;

  llama_block() = default;
  explicit llama_block(const llama_config& c)
      : input_layernorm(c.hidden_size, c.rms_norm_eps),
        post_attention_layernorm(c.hidden_size, c.rms_norm_eps),
        self_attn(c),
        mlp(c) {}

  var<T, Dev> operator()(const var<T, Dev>& x, kv_cache<T, Dev>* cache = nullptr, std::size_t layer = 0) {
    return pre_norm_block<Recompute>(*this, x, cache, layer, input_layernorm, self_attn, post_attention_layernorm, mlp);
  }
  template <class F>
  void for_each_child(F&& f) {
    f("self_attn", self_attn);
    f("mlp", mlp);
    f("input_layernorm", input_layernorm);
    f("post_attention_layernorm", post_attention_layernorm);
  }
};

template <ops::attention_mask Mask = ops::mask::causal, recompute_policy Recompute = recompute::none,
          floating_element T = f32, device Dev = cpu, adapter_policy Adapter = adapter::none>
struct llama {
  using config_type = llama_config;
  using value_type = T;
  using device_type = Dev;
  using block_type = llama_block<Mask, Recompute, T, Dev, Adapter>;
  using adapter_type = Adapter;

  struct body {
    embedding<T, Dev> embed_tokens;
    module_list<unit<block_type>> layers;  // each block a sharding unit (zero<3>)
    rms_norm<T, Dev> norm;
    template <class F>
    void for_each_child(F&& f) {
      f("embed_tokens", embed_tokens);
      f("layers", layers);
      f("norm", norm);
    }
  };

  llama_config config;
  body model;
  std::optional<linear<T, Dev>> lm_head;  // absent when tied to model.embed_tokens

  llama() = default;
  // HF's initialisation: N(0, 0.02) weights, zero biases, unit RMSNorm weights.
  explicit llama(const llama_config& c) : config(c) {
    c.validate();
    model.embed_tokens = embedding<T, Dev>(c.vocab_size, c.hidden_size);
    for (std::int64_t l = 0; l < c.num_hidden_layers; ++l) model.layers.items.emplace_back(c);
    model.norm = rms_norm<T, Dev>(c.hidden_size, c.rms_norm_eps);
    if (!c.tie_word_embeddings) lm_head = linear<T, Dev>(c.hidden_size, c.vocab_size, false);
    visit_parameters(*this, [&](const std::string& name, var<T, Dev>& p) {
      if (name.ends_with(".bias"))
        p.value().fill(T(0));
      else if (name.ends_with("norm.weight"))
        p.value().fill(T(1));
      else
        p.value() = to_device<Dev>(init::normal<T>(p.shape(), 0.02));
    });
  }

  std::int64_t vocab_size() const { return config.vocab_size; }
  std::int64_t max_positions() const { return config.max_position_embeddings; }
  kv_cache<T, Dev> make_cache(std::int64_t batch, std::int64_t capacity) const {
    return kv_cache<T, Dev>(config.num_hidden_layers, batch, capacity, config.kv_heads(), config.head_dim());
  }

  var<T, Dev> operator()(const tensor<i64, Dev>& ids) { return forward(ids, nullptr); }
  var<T, Dev> forward(const tensor<i64, Dev>& ids, kv_cache<T, Dev>* cache) {
    KILN_CHECK(ids.rank() == 2, "llama: expects token ids [B, T], got ", ids.shape().str());
    auto x = model.embed_tokens(ids);
    for (std::size_t l = 0; l < model.layers.size(); ++l) x = model.layers[l](x, cache, l);
    x = model.norm(x);
    if (cache) cache->length += ids.size(1);
    return lm_head ? (*lm_head)(x) : ops::linear(x, model.embed_tokens.weight);
  }

  static bool hf_transposed(std::string_view) { return false; }
  bool hf_ignored(std::string_view name) const {
    return name.ends_with(".rotary_emb.inv_freq") || (config.tie_word_embeddings && name == "lm_head.weight");
  }
  io::json hf_config() const { return config.to_hf(); }

  template <class F>
  void for_each_child(F&& f) {
    f("model", model);
    if (lm_head) f("lm_head", *lm_head);
  }
};

}  // namespace kiln::nn
