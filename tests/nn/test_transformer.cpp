// GPT-2 and Llama templates: KV cache, activation checkpointing, gradients, generation.
#include <cmath>

#include "../helpers.hpp"
#include "kiln/nn/generate.hpp"
#include "kiln/nn/gpt2.hpp"
#include "kiln/nn/llama.hpp"

namespace test_transformer {

using namespace kiln;
using kiln::test::random_ids;

namespace {

nn::gpt2_config tiny_gpt2(float pdrop = 0.0f) {
  nn::gpt2_config c;
  c.vocab_size = 37;
  c.n_positions = 24;
  c.n_embd = 16;
  c.n_layer = 2;
  c.n_head = 4;
  c.embd_pdrop = c.attn_pdrop = c.resid_pdrop = pdrop;
  return c;
}

nn::llama_config tiny_llama(bool tied = false) {
  nn::llama_config c;
  c.vocab_size = 41;
  c.hidden_size = 16;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 32;
  c.rope_theta = 10000.0;
  c.tie_word_embeddings = tied;
  return c;
}

template <class M>
var<typename M::value_type> lm_loss(M& model, const tensor<i64>& ids) {
  const std::int64_t B = ids.size(0), T = ids.size(1);
  auto x = ids.slice(1, 0, T - 1).contiguous(), y = ids.slice(1, 1, T).contiguous();
  auto logits = model(x);
  return cross_entropy(reshape(logits, shape{B * (T - 1), model.vocab_size()}), y.reshape(shape{B * (T - 1)}));
}

template <class M>
double max_abs_diff(const tensor<M>& a, const tensor<M>& b) {
  REQUIRE(a.shape() == b.shape());
  double w = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) w = std::max(w, std::abs(double(a.flat(i)) - double(b.flat(i))));
  return w;
}

// Full forward over all positions vs. a prompt then single-token steps through the cache.
template <class M>
void check_cache_matches_full(M& model, std::int64_t prompt) {
  nn::eval(model);
  no_grad ng;
  auto ids = random_ids(2, 10, model.vocab_size(), 5);
  auto full = model(ids).value();
  auto cache = model.make_cache(2, 10);
  auto first = model.forward(ids.slice(1, 0, prompt).contiguous(), &cache).value();
  CHECK(max_abs_diff(first, full.slice(1, 0, prompt).contiguous()) < 1e-5);
  for (std::int64_t t = prompt; t < 10; ++t) {
    auto step = model.forward(ids.slice(1, t, t + 1).contiguous(), &cache).value();
    CAPTURE(t);
    CHECK(max_abs_diff(step, full.slice(1, t, t + 1).contiguous()) < 1e-5);
  }
  CHECK(cache.length == 10);
  CHECK_THROWS_WITH_AS(model.forward(ids.slice(1, 0, 1).contiguous(), &cache), doctest::Contains("exceed the capacity"),
                       error);
}

}  // namespace

TEST_CASE("gpt2 and llama: parameter names are Hugging Face's") {
  manual_seed(1);
  nn::gpt2<> g(tiny_gpt2());
  auto gn = nn::named_parameters<f32>(g);
  CHECK(gn.front().name == "transformer.wte.weight");
  CHECK(gn[1].name == "transformer.wpe.weight");
  CHECK(gn[2].name == "transformer.h.0.ln_1.weight");
  CHECK(gn[4].name == "transformer.h.0.attn.c_attn.weight");
  CHECK(gn.back().name == "transformer.ln_f.bias");
  CHECK(nn::count_parameters(g).total ==
        37 * 16 + 24 * 16 + 2 * (4 * 16 + 16 * 48 + 48 + 16 * 16 + 16 + 16 * 64 + 64 + 64 * 16 + 16) + 32);
  nn::llama<> l(tiny_llama());
  auto ln = nn::named_parameters<f32>(l);
  CHECK(ln.front().name == "model.embed_tokens.weight");
  CHECK(ln[1].name == "model.layers.0.self_attn.q_proj.weight");
  CHECK(ln[2].name == "model.layers.0.self_attn.k_proj.weight");
  CHECK(ln[2].param.shape() == shape{8, 16});  // 2 KV heads × head_dim 4
  CHECK(ln.back().name == "lm_head.weight");
}

TEST_CASE("gpt2 and llama: KV-cached decoding gives the full forward's logits") {
  manual_seed(2);
  nn::gpt2<> g(tiny_gpt2());
  check_cache_matches_full(g, 4);
  nn::llama<> l(tiny_llama());
  check_cache_matches_full(l, 3);
  nn::llama<> tied(tiny_llama(true));
  check_cache_matches_full(tied, 1);
}

TEST_CASE("gpt2 and llama: gradients of the whole model pass the f64 check") {
  manual_seed(3);
  auto gc = tiny_gpt2();
  gc.n_embd = 8;
  gc.n_head = 2;
  gc.n_layer = 1;
  nn::gpt2<ops::mask::causal, nn::recompute::none, f64> g(gc);
  auto ids = random_ids(2, 6, gc.vocab_size, 11);
  auto& wte = g.transformer.wte.weight;
  auto& c_attn = g.transformer.h[0].attn.c_attn.weight;
  auto& ln = *g.transformer.h[0].ln_2.weight;
  KILN_CHECK_GRADIENTS([&](auto&, auto&, auto&) { return lm_loss(g, ids); }, wte, c_attn, ln);
  auto lc = tiny_llama(true);
  lc.hidden_size = 8;
  lc.intermediate_size = 12;
  lc.num_hidden_layers = 1;
  nn::llama<ops::mask::causal, nn::recompute::full, f64> l(lc);
  auto lids = random_ids(1, 7, lc.vocab_size, 12);
  auto& q = l.model.layers[0].self_attn.q_proj.weight;
  auto& k = l.model.layers[0].self_attn.k_proj.weight;
  auto& up = l.model.layers[0].mlp.up_proj.weight;
  KILN_CHECK_GRADIENTS([&](auto&, auto&, auto&, auto&) { return lm_loss(l, lids); }, l.model.embed_tokens.weight, q, k,
                       up);
}

namespace {
template <class R>
struct recompute_run {
  double loss = 0;
  std::vector<std::vector<float>> grads;
  std::size_t held = 0;  // bytes the graph keeps between forward and backward
};

template <class R>
recompute_run<R> run_with(const nn::gpt2_config& c, const tensor<i64>& ids) {
  manual_seed(42);
  nn::gpt2<ops::mask::causal, R> m(c);
  auto& alloc = caching_allocator<cpu>::instance();
  const auto before = alloc.stats().in_use;
  auto loss = lm_loss(m, ids);
  recompute_run<R> r;
  r.held = alloc.stats().in_use - before;
  r.loss = loss.value().flat(0);
  loss.backward();
  for (auto& p : nn::named_parameters<f32>(m)) r.grads.push_back(p.param.grad().to_vector());
  return r;
}
}  // namespace

TEST_CASE("activation checkpointing: identical loss and gradients (dropout replayed), less memory held") {
  auto c = tiny_gpt2(0.1f);
  c.n_embd = 32;
  c.n_head = 4;
  c.n_layer = 3;
  c.n_positions = 64;
  auto ids = random_ids(4, 64, c.vocab_size, 21);
  auto none = run_with<nn::recompute::none>(c, ids);
  auto sel = run_with<nn::recompute::selective>(c, ids);
  auto full = run_with<nn::recompute::full>(c, ids);
  CHECK(sel.loss == none.loss);
  CHECK(full.loss == none.loss);
  REQUIRE(sel.grads.size() == none.grads.size());
  double worst_sel = 0, worst_full = 0;
  for (std::size_t i = 0; i < none.grads.size(); ++i)
    for (std::size_t j = 0; j < none.grads[i].size(); ++j) {
      worst_sel = std::max(worst_sel, double(std::abs(sel.grads[i][j] - none.grads[i][j])));
      worst_full = std::max(worst_full, double(std::abs(full.grads[i][j] - none.grads[i][j])));
    }
  CHECK(worst_sel < 1e-6);
  CHECK(worst_full < 1e-6);
  MESSAGE("bytes held for backward: none ", none.held, ", selective ", sel.held, ", full ", full.held);
  CHECK(sel.held < none.held / 2);
  CHECK(full.held < sel.held);
}

TEST_CASE("generate: greedy, seeded sampling, filters, stop tokens, streaming, budget") {
  manual_seed(7);
  nn::gpt2<> g(tiny_gpt2());
  const std::vector<std::int64_t> prompt{3, 1, 4};
  auto greedy = nn::generate(g, prompt, {.max_new_tokens = 8, .greedy = true});
  CHECK(greedy.tokens.size() == 8);
  CHECK(greedy.reason == nn::stop_reason::max_new_tokens);
  // Greedy equals the argmax of a full forward at each step (no cache involved).
  {
    std::vector<std::int64_t> seq = prompt;
    nn::eval(g);
    no_grad ng;
    for (int s = 0; s < 8; ++s) {
      tensor<i64> ids(shape{1, static_cast<std::int64_t>(seq.size())});
      std::copy(seq.begin(), seq.end(), ids.data());
      auto lg = g(ids).value();
      const std::int64_t last = lg.size(1) - 1;
      std::int64_t best = 0;
      for (std::int64_t v = 1; v < 37; ++v)
        if (lg(0, last, v) > lg(0, last, best)) best = v;
      CHECK(best == greedy.tokens[static_cast<std::size_t>(s)]);
      seq.push_back(best);
    }
    nn::train(g);
  }
  nn::generation_options o{.max_new_tokens = 12, .temperature = 1.3f, .seed = 99};
  std::vector<std::int64_t> streamed;
  auto a = nn::generate(g, prompt, o, [&](std::int64_t t) { streamed.push_back(t); });
  auto b = nn::generate(g, prompt, o);
  CHECK(a.tokens == b.tokens);
  CHECK(streamed == a.tokens);
  o.seed = 100;
  CHECK(nn::generate(g, prompt, o).tokens != a.tokens);
  CHECK(nn::generate(g, prompt, {.max_new_tokens = 8, .top_k = 1, .seed = 5}).tokens == greedy.tokens);
  CHECK(nn::generate(g, prompt, {.max_new_tokens = 8, .top_p = 1e-6f, .seed = 5}).tokens == greedy.tokens);
  // Stop tokens end the output and are included; a callback can stop it too.
  auto stop_at = greedy.tokens[2];
  auto s = nn::generate(g, prompt, {.max_new_tokens = 8, .greedy = true, .stop_tokens = {stop_at}});
  CHECK(s.reason == nn::stop_reason::stop_token);
  CHECK(s.tokens.back() == stop_at);
  CHECK(s.tokens.size() <= 3);
  int calls = 0;
  auto cb = nn::generate(g, prompt, {.max_new_tokens = 8, .greedy = true}, [&](std::int64_t) { return ++calls < 4; });
  CHECK(cb.reason == nn::stop_reason::callback);
  CHECK(cb.tokens.size() == 4);
  // The context (n_positions = 24) bounds the output.
  auto ctx = nn::generate(g, prompt, {.max_new_tokens = 100, .greedy = true});
  CHECK(ctx.reason == nn::stop_reason::context_full);
  CHECK(ctx.tokens.size() == 24 - 3 + 1);
  CHECK(g.transformer.h[0].attn.attn_dropout.training);  // mode restored
  CHECK_THROWS_WITH_AS(nn::generate(g, std::vector<std::int64_t>{40}, {}), doctest::Contains("outside the vocabulary"),
                       error);
  CHECK_THROWS_WITH_AS(nn::generate(g, prompt, {.top_p = 0.0f}), doctest::Contains("top_p 0 in (0, 1]"), error);
}

TEST_CASE("generate: logit processing follows transformers' semantics") {
  using nn::detail::choose_token;
  std::vector<float> l{2.0f, -1.0f, 1.5f, 0.5f};
  // Repetition penalty: positive logits divided, negative multiplied (token 0: 2 → 0.8 < 1.5).
  auto pen = l;
  CHECK(choose_token(pen, {0, 1}, {.greedy = true, .repetition_penalty = 2.5f}, 0) == 2);
  CHECK(pen[0] == doctest::Approx(0.8f));
  CHECK(pen[1] == doctest::Approx(-2.5f));
  // Probabilities are ≈ {0.532, 0.026, 0.323, 0.119}: top_p 0.6 keeps tokens 0 and 2,
  // top_p 0.5 keeps token 0 alone.
  std::vector<std::int64_t> hits(4);
  for (std::uint64_t d = 0; d < 2000; ++d) {
    auto x = l;
    ++hits[static_cast<std::size_t>(choose_token(x, {}, {.top_p = 0.6f, .seed = 3}, d))];
    auto y = l;
    CHECK(choose_token(y, {}, {.top_p = 0.5f, .seed = 3}, d) == 0);
  }
  CHECK(hits[1] == 0);
  CHECK(hits[3] == 0);
  CHECK(hits[0] > hits[2]);
  CHECK(hits[2] > 0);
  // top_k 3 never draws the smallest logit; temperature sharpens towards the argmax.
  std::vector<std::int64_t> k3(4), cold(4);
  for (std::uint64_t d = 0; d < 2000; ++d) {
    auto x = l, y = l;
    ++k3[static_cast<std::size_t>(choose_token(x, {}, {.top_k = 3, .seed = 4}, d))];
    ++cold[static_cast<std::size_t>(choose_token(y, {}, {.temperature = 0.05f, .seed = 4}, d))];
  }
  CHECK(k3[1] == 0);
  CHECK(k3[3] > 0);
  CHECK(cold[0] > 1990);
}

TEST_CASE("configs: read from config.json with errors that name the field") {
  auto g = nn::gpt2_config::from_hf(io::json::parse(
      R"({"model_type":"gpt2","vocab_size":50,"n_positions":16,"n_embd":8,"n_layer":1,"n_head":2,"n_inner":null})"));
  CHECK(g.vocab_size == 50);
  CHECK(g.inner() == 32);
  CHECK(g.embd_pdrop == doctest::Approx(0.1f));  // HF's default when absent
  auto back = nn::gpt2_config::from_hf(g.to_hf());
  CHECK(back.n_embd == 8);
  CHECK(back.tie_word_embeddings);
  CHECK_THROWS_WITH_AS(nn::gpt2_config::from_hf(io::json::parse(R"({"model_type":"llama"})"), "m/config.json"),
                       doctest::Contains("m/config.json: field \"model_type\": expected \"gpt2\""), error);
  CHECK_THROWS_WITH_AS(nn::gpt2_config::from_hf(io::json::parse(R"({"n_embd":"big"})"), "c.json"),
                       doctest::Contains("c.json: field \"n_embd\" must be an integer"), error);
  CHECK_THROWS_WITH_AS(nn::gpt2_config::from_hf(io::json::parse(R"({"n_embd":10,"n_head":3})"), "c.json"),
                       doctest::Contains("not a multiple of n_head"), error);
  auto l = nn::llama_config::from_hf(io::json::parse(
      R"({"model_type":"llama","hidden_size":8,"num_attention_heads":2,"num_key_value_heads":1,"rope_parameters":{"rope_type":"default","rope_theta":500000.0}})"));
  CHECK(l.rope_theta == 500000.0);
  CHECK(l.kv_heads() == 1);
  CHECK_THROWS_WITH_AS(
      nn::llama_config::from_hf(io::json::parse(R"({"rope_scaling":{"rope_type":"yarn","factor":4.0}})"), "x.json"),
      doctest::Contains("x.json: field \"rope_scaling\": kiln supports plain RoPE"), error);
  CHECK_THROWS_WITH_AS(nn::llama_config::from_hf(io::json::parse(R"({"hidden_act":"gelu"})"), "x.json"),
                       doctest::Contains("field \"hidden_act\""), error);
  CHECK_THROWS_WITH_AS(
      nn::llama_config::from_hf(io::json::parse(R"({"num_attention_heads":4,"num_key_value_heads":3,"hidden_size":8})"),
                                "x.json"),
      doctest::Contains("not a multiple of num_key_value_heads"), error);
}

TEST_CASE("sparse masks plug into the model templates") {
  manual_seed(9);
  nn::gpt2<ops::mask::local<4>> local(tiny_gpt2());
  nn::llama<ops::mask::strided<3>> strided(tiny_llama());
  auto ids = random_ids(2, 12, 37, 31);
  auto l1 = lm_loss(local, ids);
  l1.backward();
  auto l2 = lm_loss(strided, ids);
  l2.backward();
  CHECK(std::isfinite(l1.value().flat(0)));
  CHECK(std::isfinite(l2.value().flat(0)));
  check_cache_matches_full(local, 5);  // windowed attention through the cache too
}

}  // namespace test_transformer
