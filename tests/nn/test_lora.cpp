// LoRA adapters (kiln/nn/lora.hpp) and PEFT's adapter files (kiln/nn/peft.hpp).
#include <cmath>
#include <fstream>

#include "../helpers.hpp"
#include "kiln/data/data_loader.hpp"
#include "kiln/data/text.hpp"
#include "kiln/nn/generate.hpp"
#include "kiln/nn/gpt2.hpp"
#include "kiln/nn/hf_model.hpp"
#include "kiln/nn/llama.hpp"
#include "kiln/nn/peft.hpp"
#include "kiln/optim/adamw.hpp"
#include "kiln/train/trainer.hpp"

namespace test_lora {

using namespace kiln;
using kiln::test::random_ids;

namespace {

template <class T = f32>
using lora_llama = nn::llama<ops::mask::causal, nn::recompute::none, T, cpu, nn::adapter::lora>;
using qlora_llama = nn::llama<ops::mask::causal, nn::recompute::none, f32, cpu, nn::adapter::qlora>;

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

// ---- QLoRA: NF4 base weights ----

TEST_CASE("nf4: codes, packing and double-quantised scales follow bitsandbytes' layout") {
  namespace nf4 = ops::nf4;
  // The dynamic map: 256 ascending entries from -0.99297 to 1, 0 among them.
  const auto& c8 = nf4::code8();
  CHECK(std::is_sorted(c8.begin(), c8.end()));
  CHECK(c8[0] == doctest::Approx(-0.99296875).epsilon(1e-6));
  CHECK(c8[254] == doctest::Approx(0.99296875).epsilon(1e-6));
  CHECK(c8[255] == 1.0f);
  CHECK(std::count(c8.begin(), c8.end(), 0.0f) == 1);

  // A block holding the 16 codes themselves, times 2.5, four times over: each element's
  // code is its own index, the first of a pair in the high nibble.
  std::vector<float> w(64);
  for (std::size_t i = 0; i < 64; ++i) w[i] = 2.5f * nf4::code4[i % 16];
  const auto q = nf4::quantize(w.data(), shape{4, 16});
  for (std::int64_t i = 0; i < 64; ++i) CHECK(q.code_at(i) == i % 16);
  CHECK(q.codes[0] == 0x01);
  CHECK(q.codes[7] == 0xef);
  REQUIRE(q.blocks() == 1);
  CHECK(q.scale(0) == doctest::Approx(2.5).epsilon(1e-6));  // one block: absmax − offset = 0

  // Random weights whose size is no multiple of the blocks: every element decodes within
  // half a code gap of its block's true absmax, and the scales within one 8-bit step.
  const auto r = test::rand_tensor<f32>(shape{300, 71}, 11, -1.0, 1.0);
  std::vector<float> scaled(static_cast<std::size_t>(r.numel()));
  for (std::int64_t i = 0; i < r.numel(); ++i)
    scaled[static_cast<std::size_t>(i)] = r.data()[i] * (1.0f + static_cast<float>(i / 64 % 7));  // scales vary
  const auto big = nf4::quantize(scaled.data(), shape{300, 71});
  CHECK(big.blocks() == (300 * 71 + 63) / 64);
  CHECK(big.scale_absmax.size() == 2);
  std::vector<float> back(scaled.size());
  nf4::dequantize_rows(big, 0, 300, back.data());
  float max_gap = 0.0f;
  for (std::size_t i = 1; i < 16; ++i) max_gap = std::max(max_gap, nf4::code4[i] - nf4::code4[i - 1]);
  double worst_scale = 0.0;
  for (std::int64_t b = 0; b < big.blocks(); ++b) {
    float m = 0.0f;
    for (std::int64_t i = b * 64; i < std::min<std::int64_t>(r.numel(), (b + 1) * 64); ++i)
      m = std::max(m, std::abs(scaled[static_cast<std::size_t>(i)]));
    worst_scale = std::max(worst_scale, double(std::abs(big.scale(b) - m)) / big.scale_absmax[b / 256]);
    for (std::int64_t i = b * 64; i < std::min<std::int64_t>(r.numel(), (b + 1) * 64); ++i)
      CHECK(std::abs(back[static_cast<std::size_t>(i)] - scaled[static_cast<std::size_t>(i)]) <=
            0.5f * max_gap * m + std::abs(big.scale(b) - m) + 1e-6f);
  }
  CHECK(worst_scale <= 0.0071);  // half the widest step of the map (0.9 / 64 / 2), or -1 to its first entry
  // 4.127 bits an element: under 0.3x of bf16's bytes.
  CHECK(big.bytes() == (300 * 71 + 1) / 2 + big.blocks() + 4 * 2 + 4);
  CHECK(double(big.bytes()) <= 0.3 * 2.0 * double(r.numel()));
}

TEST_CASE("qlora: the NF4 node equals the dense node over the decoded weight, gradients included") {
  using test::rand_var;
  namespace nf4 = ops::nf4;
  // 70 rows of 2112: three tiles of rows in the forward and in g·W.
  const std::int64_t out = 70, in = 2112, r = 3;
  const auto wf = test::rand_tensor<f32>(shape{out, in}, 21, -0.5, 0.5);
  const auto q = std::make_shared<const nf4::nf4_weight>(nf4::quantize(wf.data(), wf.shape()));
  CHECK(ops::detail::nf4_base<f32>{q}.tile_rows() < out / 2);
  tensor<f32> wd(shape{out, in});
  nf4::dequantize_rows(*q, 0, out, wd.data());
  auto f32_var = [](std::uint64_t seed, const shape& s, bool grad = true) {
    return var<f32>(test::rand_tensor<f32>(s, seed, -1.0, 1.0), grad);
  };
  for (const bool with_bias : {false, true}) {
    CAPTURE(with_bias);
    auto x1 = f32_var(1, {2, 3, in}), a1 = f32_var(2, {r, in}), b1 = f32_var(3, {out, r});
    auto x2 = var<f32>(x1.value().clone(), true), a2 = var<f32>(a1.value().clone(), true),
         b2 = var<f32>(b1.value().clone(), true);
    const std::optional<var<f32>> ob = with_bias ? std::optional{f32_var(4, {out}, false)} : std::nullopt;
    var<f32> w(wd.clone(), false);
    auto y1 = ops::qlora_linear(x1, q, ob, x1, a1, b1, 0.5);
    auto y2 = ops::lora_linear(x2, w, ob, x2, a2, b2, 0.5);
    CHECK(max_rel_diff(y1.value().contiguous(), y2.value().contiguous()) < 1e-5);
    sum(y1 * y1).backward();
    sum(y2 * y2).backward();
    CHECK(max_rel_diff(x1.grad(), x2.grad()) < 1e-5);
    CHECK(max_rel_diff(a1.grad(), a2.grad()) < 1e-5);
    CHECK(max_rel_diff(b1.grad(), b2.grad()) < 1e-5);
    // Without an adapter: the base alone.
    auto y3 = ops::nf4_linear(x1, q, ob), y4 = ops::linear(x2, w, ob);
    CHECK(max_rel_diff(y3.value().contiguous(), y4.value().contiguous()) < 1e-5);
  }
  // In f64, against finite differences (x, A and B; the NF4 base is frozen by construction).
  const auto wq64 = test::rand_tensor<f64>(shape{5, 7}, 8, -1.0, 1.0);
  const auto q64 = std::make_shared<const nf4::nf4_weight>(nf4::quantize(wq64.data(), wq64.shape()));
  auto x = rand_var({2, 3, 7}, 1), a = rand_var({2, 7}, 3), b = rand_var({5, 2}, 4);
  const std::optional<var<f64>> bias = rand_var({5}, 5).set_requires_grad(false);
  KILN_CHECK_GRADIENTS([&](auto& x_, auto& a_, auto& b_) { return ops::qlora_linear(x_, q64, bias, x_, a_, b_, 0.7); },
                       x, a, b);
  KILN_CHECK_GRADIENTS([&](auto& x_) { return ops::nf4_linear(x_, q64, bias); }, x);
}

TEST_CASE("qlora: quantised on load, trains its adapters, and merges from the original 16-bit weights") {
  manual_seed(7);
  const auto dir = test::temp_dir("lora", "qlora");
  const auto ids = random_ids(2, 9, 41, 8);
  auto c = tiny(64);
  c.intermediate_size = 96;
  nn::llama<> dense(c);
  io::save_hf(dense, dir / "base");

  auto qm = io::load_hf<qlora_llama>(dir / "base");
  const auto counts = nn::count_lora(qm);
  CHECK(counts.quantized == 2 * 7);
  CHECK(counts.quantized_elements == 2 * (2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 96));  // q o, k v, the MLP
  CHECK(double(counts.quantized_bytes) <= 0.3 * 2.0 * double(counts.quantized_elements));
  bool dense_name = false;
  nn::visit_parameters(
      qm, [&](const std::string& name, auto&) { dense_name = dense_name || name.ends_with("q_proj.weight"); });
  CHECK_FALSE(dense_name);
  // The same model with the decoded NF4 weights as dense ones gives the same logits.
  auto decoded = io::load_hf<lora_llama<>>(dir / "base");
  nn::visit_lora_layers(qm, [&](const std::string& name, auto& ql) {
    nn::visit_lora_layers(decoded, [&](const std::string& n2, auto& dl) {
      if (n2 == name) ops::nf4::dequantize_rows(*ql.qweight, 0, ql.out_features(), dl.weight.value().data());
    });
  });
  CHECK(max_rel_diff(qm(ids).value().contiguous(), decoded(ids).value().contiguous()) < 1e-5);

  // Adapters train; the NF4 base cannot be merged; the 16-bit base takes the adapter.
  auto lc = config(4);
  lc.target_modules = {"all-linear"};
  nn::attach_lora(qm, lc);
  const double before = lm_loss(qm, ids).value().flat(0);
  train_steps(qm, ids, 5);
  const auto adapted = qm(ids).value().contiguous();
  CHECK(lm_loss(qm, ids).value().flat(0) < before - 0.05);
  CHECK(nn::count_parameters(qm).trainable == nn::count_lora(qm).adapter_parameters);
  CHECK_THROWS_WITH_AS(nn::merge_lora(qm), doctest::Contains("merge from the original 16-bit weights"), error);
  io::save_peft_adapter(qm, lc, dir / "adapter");
  auto full = io::load_hf<lora_llama<>>(dir / "base");
  io::load_peft_adapter(full, dir / "adapter");
  const auto unmerged = full(ids).value().contiguous();
  nn::merge_lora(full);
  CHECK(max_rel_diff(full(ids).value().contiguous(), unmerged) < 1e-5);
  // The adapted NF4 model and the adapted 16-bit one differ by the quantisation only.
  CHECK(max_rel_diff(adapted, unmerged) < 0.1);
  // generate (KV cache) runs the NF4 node as the forward does: the decoded dense model
  // with the same adapter picks the same greedy tokens.
  io::load_peft_adapter(decoded, dir / "adapter");
  const std::vector<std::int64_t> prompt{3, 1, 4};
  const auto from_nf4 = nn::generate(qm, prompt, {.max_new_tokens = 6, .greedy = true});
  const auto from_dense = nn::generate(decoded, prompt, {.max_new_tokens = 6, .greedy = true});
  CHECK(from_nf4.tokens == from_dense.tokens);
  std::filesystem::remove_all(dir);
}

// ---- adapter runs under the trainer: checkpoints hold the adapters only ----

namespace {
template <class Net>
struct adapter_lm_t {
  Net net;
  std::map<std::int64_t, float> losses;  // micro-batch → loss
  template <class F>
  void for_each_child(F&& f) {
    f("net", net);
  }
  var<float> training_step(auto& ctx, const data::lm_batch& b) {
    const std::int64_t n = b.x.numel();
    auto logits = ops::cast<float>(net(b.x));
    auto loss = cross_entropy(reshape(logits, shape{n, net.vocab_size()}), b.y.reshape(shape{n}));
    losses[ctx.micro_batches()] = loss.value().flat(0);
    return loss;
  }
  auto configure_optimizers() { return optim::adamw<typename Net::value_type>(*this, {.lr = 5e-2}); }
};
using adapter_lm = adapter_lm_t<lora_llama<>>;
struct adapter_data {
  data::data_loader<data::lm_blocks> train{
      data::lm_blocks(data::token_stream([] {
                        std::vector<std::int32_t> t(400);
                        for (std::size_t i = 0; i < t.size(); ++i) t[i] = static_cast<std::int32_t>((i * 7) % 5 + 3);
                        return t;
                      }()),
                      {.block_size = 8, .sampling = data::lm_sampling::random, .seed = 2, .samples = 48}),
      {.batch_size = 4, .shuffle = true, .seed = 3, .num_workers = 1}};
  auto& train_loader() { return train; }
};
struct save_each_step {
  using hooks = hook_list<hook::on_train_batch_end>;
  std::filesystem::path dir;
  void on_train_batch_end(auto& ctx, const auto&) {
    ctx.save_checkpoint(dir / ("mb-" + std::to_string(ctx.micro_batches()) + ".ckpt"));
  }
};
using adapter_run = trainer<adapter_lm, strategy::single_device<cpu>, precision::fp32, save_each_step>;

// The base from `dir`, the adapter attached as the run attaches it.
adapter_lm adapter_model(const std::filesystem::path& base) {
  adapter_lm m{io::load_hf<lora_llama<>>(base), {}};
  auto lc = config(4);
  lc.dropout = 0.1f;  // a module-owned RNG stream the resume restores
  nn::attach_lora(m.net, lc);
  return m;
}
train::trainer_options adapter_options(const std::filesystem::path& root) {
  return {.max_epochs = 2,
          .seed = 4,
          .default_root_dir = root.string(),
          .enable_progress_bar = false,
          .enable_model_summary = false};
}
}  // namespace

TEST_CASE("lora: an adapter run's checkpoint holds the adapters and their optimizer state, and resumes bit-exact") {
  const auto dir = test::temp_dir("lora", "ckpt");
  manual_seed(9);
  lora_llama<> base(tiny());
  io::save_hf(base, dir / "base");
  manual_seed(10);
  lora_llama<> other_base(tiny());
  io::save_hf(other_base, dir / "other_base");

  adapter_lm ref = adapter_model(dir / "base");
  adapter_data ref_data;
  adapter_run(adapter_options(dir / "ref"), save_each_step{dir / "all"}).fit(ref, ref_data);
  REQUIRE(ref.losses.size() == 24);
  const auto ref_weights = test::weights(ref);

  // The file: 14 adapted layers' A and B, and AdamW's two moments of each — no base weight.
  auto f = io::safetensors_file::open(dir / "all" / "mb-10.ckpt");
  std::int64_t model_tensors = 0, base_tensors = 0;
  for (const auto& e : f.tensors())
    if (e.name.starts_with("model/")) {
      ++model_tensors;
      base_tensors += !(e.name.ends_with(".lora_A.weight") || e.name.ends_with(".lora_B.weight"));
    }
  CHECK(model_tensors == 2 * 14);
  CHECK(base_tensors == 0);
  auto state = io::json::parse(*f.metadata("kiln.state"));
  std::int64_t frozen = 0;
  nn::visit_parameters(ref, [&](const std::string&, auto& p) { frozen += p.requires_grad() ? 0 : 1; });
  CHECK(frozen > 0);
  CHECK(state.at("model").at("frozen").at("count").as_int() == frozen);

  // Resumed on the same base (built afresh, other adapter init): the same losses and weights.
  for (const std::int64_t mb : {3, 12, 17}) {
    CAPTURE(mb);
    manual_seed(100 + mb);
    adapter_lm m = adapter_model(dir / "base");
    adapter_data d;
    adapter_run(adapter_options(dir / "resumed"), save_each_step{dir / "again"})
        .fit(m, d, (dir / "all" / ("mb-" + std::to_string(mb) + ".ckpt")).string());
    CHECK(m.losses.size() == static_cast<std::size_t>(24 - mb));
    bool same = true;
    for (auto& [i, v] : m.losses) same = same && std::memcmp(&v, &ref.losses.at(i), 4) == 0;
    CHECK(same);
    CHECK(test::same_bits(test::weights(m), ref_weights));
  }
  // Another base under the same adapter names is refused before anything changes.
  adapter_lm other = adapter_model(dir / "other_base");
  const auto before = test::weights(other);
  adapter_data od;
  CHECK_THROWS_WITH_AS(adapter_run(adapter_options(dir / "other"), save_each_step{dir / "other_ckpt"})
                           .fit(other, od, (dir / "all" / "mb-3.ckpt").string()),
                       doctest::Contains("the model's frozen weights are not the run's"), error);
  CHECK(test::same_bits(test::weights(other), before));
  std::filesystem::remove_all(dir);
}

// Adapters under the precision policies (and an NF4 base under fp32): the loss falls, the
// adapters move, every frozen parameter keeps its bits.
template <class Net, class Precision>
void fit_adapters_under(const std::filesystem::path& root) {
  CAPTURE(type_name<Precision>());
  manual_seed(11);
  adapter_lm_t<Net> m{Net(tiny()), {}};
  auto lc = config(4);
  nn::attach_lora(m.net, lc);
  std::map<std::string, std::vector<double>> frozen_before;
  nn::visit_parameters(m, [&](const std::string& name, auto& p) {
    if (!p.requires_grad())
      for (std::int64_t i = 0; i < p.numel(); ++i) frozen_before[name].push_back(double(p.value().flat(i)));
  });
  REQUIRE(!frozen_before.empty());
  adapter_data d;
  trainer<adapter_lm_t<Net>, strategy::single_device<cpu>, Precision> t(adapter_options(root));
  // The plan: gradients for the adapters alone; the weights include the NF4 bases.
  std::int64_t grads = 0, nf4 = 0;
  nn::visit_parameters(m, [&](const std::string&, auto& p) {
    if (p.requires_grad()) grads += train::detail::block_bytes(p.numel() * std::int64_t(sizeof(*p.value().data())));
  });
  nn::visit_lora_layers(m, [&](const std::string&, auto& l) {
    if (l.qweight) nf4 += train::detail::block_bytes(l.qweight->bytes());
  });
  const auto plan = t.plan(m, d);
  CHECK(plan.devices.at(0).gradients == grads);
  CHECK(plan.devices.at(0).parameters > nf4);
  CHECK((nf4 > 0) == std::is_same_v<Net, qlora_llama>);
  t.fit(m, d);
  REQUIRE(m.losses.size() == 24);
  double first = 0, last = 0;
  auto head = m.losses.begin();
  auto tail = m.losses.rbegin();
  for (int i = 0; i < 4; ++i) first += (head++)->second, last += (tail++)->second;
  CHECK(last < first - 0.2);
  bool frozen_same = true;
  nn::visit_parameters(m, [&](const std::string& name, auto& p) {
    if (p.requires_grad()) return;
    for (std::int64_t i = 0; i < p.numel(); ++i)
      frozen_same = frozen_same && double(p.value().flat(i)) == frozen_before.at(name)[static_cast<std::size_t>(i)];
  });
  CHECK(frozen_same);
}

TEST_CASE("lora: adapters train under fp32 (NF4 base), bf16_mixed, f16_mixed and bf16_true, the base untouched") {
  const auto dir = test::temp_dir("lora", "precision");
  fit_adapters_under<qlora_llama, precision::fp32>(dir / "qlora");
  fit_adapters_under<lora_llama<bf16>, precision::bf16_mixed>(dir / "bf16_mixed");
  fit_adapters_under<lora_llama<f16>, precision::f16_mixed<>>(dir / "f16_mixed");
  fit_adapters_under<lora_llama<bf16>, precision::bf16_true>(dir / "bf16_true");
  std::filesystem::remove_all(dir);
}

TEST_CASE("lora: recomputed blocks (full and selective) give the adapters the gradients of stored ones") {
  const auto ids = random_ids(2, 9, 41, 12);
  auto grads = [&]<class R>(R) {
    manual_seed(13);
    nn::llama<ops::mask::causal, R, f32, cpu, nn::adapter::lora> m(tiny());
    auto lc = config(4);
    lc.dropout = 0.2f;  // the recomputed forward must replay the adapters' dropout masks
    nn::attach_lora(m, lc);
    nn::visit_lora_layers(m, [](const std::string&, auto& l) {
      if (l.lora) l.lora->B.value() = test::rand_tensor<f32>(l.lora->B.shape(), 7, -0.5, 0.5);
    });
    lm_loss(m, ids).backward();
    std::vector<float> g;
    nn::visit_parameters(m, [&](const std::string&, auto& p) {
      if (p.has_grad())
        for (std::int64_t i = 0; i < p.numel(); ++i) g.push_back(p.grad().flat(i));
    });
    return g;
  };
  const auto stored = grads(nn::recompute::none{});
  REQUIRE(stored.size() == 2 * (2 * 128 + 2 * 96 + 3 * 160));  // the adapters' A and B, nothing else
  CHECK(grads(nn::recompute::full{}) == stored);
  CHECK(grads(nn::recompute::selective{}) == stored);
}

}  // namespace test_lora
