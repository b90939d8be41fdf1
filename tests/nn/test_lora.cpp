// LoRA adapters (kiln/nn/lora.hpp) and PEFT's adapter files (kiln/nn/peft.hpp).
#include <cmath>
#include <fstream>

#include "../helpers.hpp"
#include "kiln/nn/gpt2.hpp"
#include "kiln/nn/hf_model.hpp"
#include "kiln/nn/llama.hpp"
#include "kiln/nn/peft.hpp"
#include "kiln/optim/adamw.hpp"

namespace test_lora {

using namespace kiln;
using kiln::test::random_ids;

namespace {

template <class T = f32>
using lora_llama = nn::llama<ops::mask::causal, nn::recompute::none, T, cpu, nn::adapter::lora>;

nn::llama_config tiny(std::int64_t hidden = 16) {
  nn::llama_config c;
  c.vocab_size = 41;
  c.hidden_size = hidden;
  c.intermediate_size = 24;
  c.num_hidden_layers = 2;
  c.num_attention_heads = 4;
  c.num_key_value_heads = 2;
  c.max_position_embeddings = 32;
  return c;
}

template <class M>
var<typename M::value_type> lm_loss(M& model, const tensor<i64>& ids) {
  const std::int64_t B = ids.size(0), T = ids.size(1);
  auto x = ids.slice(1, 0, T - 1).contiguous(), y = ids.slice(1, 1, T).contiguous();
  return cross_entropy(reshape(model(x), shape{B * (T - 1), model.vocab_size()}), y.reshape(shape{B * (T - 1)}));
}

template <class T>
double max_rel_diff(const tensor<T>& a, const tensor<T>& b) {
  double worst = 0, scale = 0;
  for (std::int64_t i = 0; i < a.numel(); ++i) scale = std::max(scale, std::abs(double(b.data()[i])));
  for (std::int64_t i = 0; i < a.numel(); ++i)
    worst = std::max(worst, std::abs(double(a.data()[i]) - double(b.data()[i])));
  return worst / std::max(scale, 1e-30);
}

// A few AdamW steps on the trainable parameters (the adapters after attach_lora).
template <class M>
void train_steps(M& model, const tensor<i64>& ids, int steps) {
  optim::adamw<typename M::value_type> opt(model, {.lr = 5e-2});
  for (int s = 0; s < steps; ++s) {
    auto loss = lm_loss(model, ids);
    loss.backward();
    opt.step();
    opt.zero_grad();
  }
}

nn::lora_config config(std::int64_t r = 4) {
  nn::lora_config c;
  c.r = r;
  c.alpha = 8;
  c.target_modules = {"all-linear"};
  return c;
}

}  // namespace

TEST_CASE("lora: a fresh adapter changes nothing, and only the adapters train") {
  manual_seed(1);
  lora_llama<> m(tiny());
  const auto ids = random_ids(2, 9, 41, 3);
  const auto before = m(ids).value().contiguous();
  const auto base = test::weights(m);
  const auto chosen = nn::attach_lora(m, config());
  CHECK(chosen.size() == 2 * 7);  // q, k, v, o, gate, up, down in each block
  CHECK(chosen[0] == "model.layers.0.self_attn.q_proj");
  // B = 0: the output is bit for bit the base model's.
  const auto after = m(ids).value().contiguous();
  CHECK(std::memcmp(before.data(), after.data(), before.numel() * sizeof(float)) == 0);

  // Trainable: r·(in + out) per projection, nothing else.
  const auto& c = m.config;
  const std::int64_t H = c.hidden_size, I = c.intermediate_size, KV = c.kv_heads() * c.head_dim(), r = 4;
  const std::int64_t per_block = r * (H + H) + r * (H + KV) * 2 + r * (H + H) + r * (H + I) * 2 + r * (I + H);
  CHECK(nn::count_parameters(m).trainable == 2 * per_block);
  CHECK(nn::count_lora(m).adapter_parameters == 2 * per_block);
  for (auto& np : nn::named_parameters<f32>(m))
    CHECK_MESSAGE(np.param.requires_grad() == (np.name.find(".lora_") != std::string::npos), np.name);

  // Training moves the adapters and leaves every base weight's bits alone.
  const double loss0 = lm_loss(m, ids).value().flat(0);
  train_steps(m, ids, 5);
  CHECK(lm_loss(m, ids).value().flat(0) < loss0);
  auto now = test::weights(m);
  for (auto& [name, v] : base) CHECK_MESSAGE(now.at(name) == v, name);
  CHECK(now.at("model.layers.1.mlp.down_proj.lora_B.weight") !=
        std::vector<float>(now.at("model.layers.1.mlp.down_proj.lora_B.weight").size(), 0.0f));
}

TEST_CASE("lora: the fused node gives the composition's values and passes the gradient check") {
  using test::rand_var;
  const double s = 0.7;
  for (const bool distinct_input : {false, true})
    for (const bool with_bias : {false, true}) {
      CAPTURE(distinct_input);
      CAPTURE(with_bias);
      auto x = rand_var({2, 3, 5}, 1), w = rand_var({4, 5}, 2), a = rand_var({3, 5}, 3), b = rand_var({4, 3}, 4);
      auto bias = rand_var({4}, 5), xd = rand_var({2, 3, 5}, 6);
      const std::optional<var<f64>> ob = with_bias ? std::optional{bias} : std::nullopt;
      const auto& xa = distinct_input ? xd : x;
      const auto fused = ops::lora_linear(x, w, ob, xa, a, b, s).value();
      const auto composed = (ops::linear(x, w, ob) + ops::scale(ops::linear(ops::linear(xa, a), b), s)).value();
      CHECK(max_rel_diff(fused, composed) < 1e-14);
      // Every input trainable: the base's gradients too.
      if (distinct_input)
        KILN_CHECK_GRADIENTS([&](auto& x_, auto& w_, auto& xa_, auto& a_,
                                 auto& b_) { return ops::lora_linear(x_, w_, ob, xa_, a_, b_, s); },
                             x, w, xd, a, b);
      else
        KILN_CHECK_GRADIENTS(
            [&](auto& x_, auto& w_, auto& a_, auto& b_) { return ops::lora_linear(x_, w_, ob, x_, a_, b_, s); }, x, w,
            a, b);
      // The LoRA case: W frozen, only x, A and B need gradients.
      w.set_requires_grad(false);
      bias.set_requires_grad(false);
      KILN_CHECK_GRADIENTS([&](auto& x_, auto& a_, auto& b_) { return ops::lora_linear(x_, w, ob, x_, a_, b_, s); }, x,
                           a, b);
    }
}

TEST_CASE("lora: gradients of an adapted model pass the f64 check, dropout and rsLoRA included") {
  manual_seed(2);
  auto c = tiny(8);
  c.intermediate_size = 12;
  c.num_hidden_layers = 1;
  lora_llama<f64> m(c);
  auto lc = config(3);
  lc.use_rslora = true;
  lc.target_modules = {"q_proj", "up_proj", "o_proj"};
  CHECK(nn::attach_lora(m, lc).size() == 3);
  CHECK(m.model.layers[0].self_attn.q_proj.lora->scaling == doctest::Approx(8.0 / std::sqrt(3.0)));
  // Non-zero B, so the A path carries a gradient too.
  nn::visit_lora_layers(m, [](const std::string&, auto& l) {
    if (l.lora) l.lora->B.value() = test::rand_tensor<f64>(l.lora->B.shape(), 7, -0.5, 0.5);
  });
  const auto ids = random_ids(1, 6, c.vocab_size, 4);
  auto& q = m.model.layers[0].self_attn.q_proj.lora;
  auto& up = m.model.layers[0].mlp.up_proj.lora;
  KILN_CHECK_GRADIENTS([&](auto&, auto&, auto&, auto&) { return lm_loss(m, ids); }, q->A, q->B, up->A, up->B);
}

TEST_CASE("lora: merge folds the adapters into the weights, unmerge takes them out, neither twice") {
  manual_seed(3);
  lora_llama<> m(tiny());
  const auto ids = random_ids(2, 9, 41, 5);
  nn::attach_lora(m, config());
  train_steps(m, ids, 4);
  const auto adapted = m(ids).value().contiguous();
  const auto base_q = test::weights(m).at("model.layers.0.self_attn.q_proj.weight");

  CHECK_THROWS_WITH_AS(nn::unmerge_lora(m), doctest::Contains("only a merged model can be unmerged"), error);
  nn::merge_lora(m);
  CHECK(nn::count_lora(m).merged == 14);
  const auto merged = m(ids).value().contiguous();
  CHECK(max_rel_diff(merged, adapted) < 1e-5);
  CHECK(test::weights(m).at("model.layers.0.self_attn.q_proj.weight") != base_q);
  CHECK_THROWS_WITH_AS(nn::merge_lora(m), doctest::Contains("merging again would add the adapters twice"), error);

  nn::unmerge_lora(m);
  CHECK(max_rel_diff(m(ids).value().contiguous(), adapted) < 1e-5);
  const auto q_back = test::weights(m).at("model.layers.0.self_attn.q_proj.weight");
  for (std::size_t i = 0; i < q_back.size(); ++i) CHECK(q_back[i] == doctest::Approx(base_q[i]).epsilon(1e-5));

  lora_llama<> plain(tiny());
  CHECK_THROWS_WITH_AS(nn::merge_lora(plain), doctest::Contains("no LoRA adapters to merge"), error);
}

TEST_CASE("lora: PEFT files round trip, and a merged model saves as a plain HF folder") {
  manual_seed(4);
  const auto dir = test::temp_dir("lora", "roundtrip");
  const auto ids = random_ids(2, 9, 41, 6);
  lora_llama<> m(tiny());
  auto lc = config(4);
  lc.target_modules = {"q_proj", "v_proj", "down_proj"};
  lc.base_model_name_or_path = "tiny-llama";
  nn::attach_lora(m, lc);
  train_steps(m, ids, 3);
  const auto adapted = m(ids).value().contiguous();

  // An unmerged adapted model is not a plain HF model.
  CHECK_THROWS_WITH_AS(io::save_hf(m, dir / "hf"), doctest::Contains("are not merged"), error);
  io::save_peft_adapter(m, lc, dir / "adapter");
  auto cfg = io::json::parse(io::read_text_file(dir / "adapter" / "adapter_config.json"));
  CHECK(cfg.at("peft_type").as_string() == "LORA");
  CHECK(cfg.at("r").as_int() == 4);
  CHECK(cfg.at("target_modules").size() == 3);
  auto st = io::safetensors_file::open(dir / "adapter" / "adapter_model.safetensors");
  CHECK(st.tensors().size() == 2 * 3 * 2);
  CHECK(st.contains("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
  CHECK(io::safetensors_view::shape_of(st.at("base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight")) ==
        shape{4, 16});

  // The same base weights plus the adapter file give the same logits, bit for bit.
  lora_llama<> base(tiny());
  nn::visit_parameters(base, [&](const std::string& name, auto& p) {
    nn::visit_parameters(m, [&](const std::string& n2, auto& q) {
      if (n2 == name) p.value() = q.value().clone();
    });
  });
  const auto back = io::load_peft_adapter(base, dir / "adapter");
  CHECK(back.target_modules == lc.target_modules);
  CHECK(back.base_model_name_or_path == "tiny-llama");
  CHECK(nn::count_lora(base).adapted == 6);
  const auto loaded = base(ids).value().contiguous();
  CHECK(std::memcmp(loaded.data(), adapted.data(), adapted.numel() * sizeof(float)) == 0);

  // Merged and saved, it is a plain llama: no adapter tensors, the adapted model's logits.
  nn::merge_lora(m);
  io::save_hf(m, dir / "merged");
  auto merged = io::load_hf<nn::llama<>>(dir / "merged");
  CHECK(max_rel_diff(merged(ids).value().contiguous(), adapted) < 1e-5);
  std::filesystem::remove_all(dir);
}

TEST_CASE("lora: GPT-2 (Conv1D layers in HF files) adapts, saves with fan_in_fan_out and merges into [in, out]") {
  manual_seed(6);
  nn::gpt2_config c;
  c.vocab_size = 37;
  c.n_positions = 24;
  c.n_embd = 16;
  c.n_layer = 2;
  c.n_head = 4;
  c.embd_pdrop = c.attn_pdrop = c.resid_pdrop = 0.0f;
  using gpt_t = nn::gpt2<ops::mask::causal, nn::recompute::none, f32, cpu, nn::adapter::lora>;
  gpt_t m(c);
  const auto dir = test::temp_dir("lora", "gpt2");
  const auto ids = random_ids(2, 9, 37, 8);
  io::save_hf(m, dir / "base");
  auto lc = config(4);
  lc.target_modules = {"c_attn", "c_fc"};
  CHECK(nn::attach_lora(m, lc) == std::vector<std::string>{"transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc",
                                                           "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_fc"});
  train_steps(m, ids, 3);
  const auto adapted = m(ids).value().contiguous();
  io::save_peft_adapter(m, lc, dir / "adapter");
  auto cfg = io::json::parse(io::read_text_file(dir / "adapter" / "adapter_config.json"));
  CHECK(cfg.at("fan_in_fan_out").as_bool());
  auto st = io::safetensors_file::open(dir / "adapter" / "adapter_model.safetensors");
  CHECK(io::safetensors_view::shape_of(st.at("base_model.model.transformer.h.0.attn.c_attn.lora_B.weight")) ==
        shape{3 * 16, 4});

  auto back = io::load_hf<gpt_t>(dir / "base");
  io::load_peft_adapter(back, dir / "adapter");
  const auto loaded = back(ids).value().contiguous();
  CHECK(std::memcmp(loaded.data(), adapted.data(), adapted.numel() * sizeof(float)) == 0);
  nn::merge_lora(back);
  io::save_hf(back, dir / "merged");  // Conv1D weights written back as [in, out]
  auto merged = io::load_hf<nn::gpt2<>>(dir / "merged");
  CHECK(max_rel_diff(merged(ids).value().contiguous(), adapted) < 1e-5);
  std::filesystem::remove_all(dir);
}

TEST_CASE("lora: adapters that do not fit are refused before anything changes") {
  manual_seed(5);
  const auto dir = test::temp_dir("lora", "bad");
  lora_llama<> m(tiny());
  auto lc = config(4);
  lc.target_modules = {"q_proj", "v_proj"};
  nn::attach_lora(m, lc);
  io::save_peft_adapter(m, lc, dir / "good");

  auto expect_refused = [&](const std::filesystem::path& adapter, const std::string& message) {
    lora_llama<> fresh(tiny());
    const auto before = test::weights(fresh);
    CHECK_THROWS_WITH_AS(io::load_peft_adapter(fresh, adapter), doctest::Contains(message.c_str()), error);
    CHECK(nn::count_lora(fresh).adapted == 0);
    CHECK(test::same_bits(test::weights(fresh), before));
    CHECK(nn::count_parameters(fresh).trainable == nn::count_parameters(fresh).total);
  };
  auto with_config = [&](const std::string& name, auto edit) {
    std::filesystem::create_directories(dir / name);
    std::filesystem::copy_file(dir / "good" / "adapter_model.safetensors", dir / name / "adapter_model.safetensors");
    auto j = io::json::parse(io::read_text_file(dir / "good" / "adapter_config.json"));
    edit(j);
    std::ofstream(dir / name / "adapter_config.json") << j.dump();
    return dir / name;
  };
  expect_refused(dir / "absent", "adapter_config.json does not exist");
  expect_refused(with_config("module",
                             [](io::json& j) {
                               j.set("target_modules", io::json(io::json::array_type{"q_proj", "qkv"}));
                             }),
                 "target_modules names \"qkv\", which is no linear layer of the model");
  expect_refused(with_config("rank", [](io::json& j) { j.set("r", 8); }), "(r = 8) expect [8, 16]");
  expect_refused(with_config("dora", [](io::json& j) { j.set("use_dora", true); }), "field \"use_dora\"");
  expect_refused(with_config("regex", [](io::json& j) { j.set("target_modules", ".*proj"); }),
                 "kiln does not match regular expressions");
  expect_refused(
      with_config("fewer", [](io::json& j) { j.set("target_modules", io::json(io::json::array_type{"q_proj"})); }),
      "unexpected tensor 'base_model.model.model.layers.0.self_attn.v_proj.lora_A.weight'");
  // Another base: the same names, other shapes.
  lora_llama<> wider(tiny(24));
  CHECK_THROWS_WITH_AS(io::load_peft_adapter(wider, dir / "good"),
                       doctest::Contains("has shape [4, 16], the model and adapter_config.json (r = 4) expect [4, 24]"),
                       error);
  CHECK(nn::count_lora(wider).adapted == 0);
  std::filesystem::remove_all(dir);
}

}  // namespace test_lora
