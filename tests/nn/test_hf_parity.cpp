// Hugging Face parity: logits of kiln's gpt2 and llama on the committed fixtures
// (tests/fixtures/hf, made by make_fixtures.py with transformers) match to 1e-4; greedy
// decoding with the KV cache reproduces transformers' generate(); save_hf writes back
// the same names, layouts and bytes; bad folders give errors naming file and tensor.
#include <cmath>
#include <cstdlib>
#include <fstream>

#include "../helpers.hpp"

namespace test_hf_parity {

using namespace kiln;

namespace {

std::filesystem::path fixtures() {
  const char* env = std::getenv("KILN_FIXTURES");
  return std::filesystem::path(env ? env : "tests/fixtures") / "hf";
}

template <class M>
void check_parity(const std::string& name) {
  CAPTURE(name);
  const auto dir = fixtures() / name;
  REQUIRE(std::filesystem::exists(dir / "config.json"));
  auto model = io::load_hf<M>(dir);
  auto expected = io::safetensors_file::open(dir / "expected.safetensors");
  auto ids = expected.load<i64>("input_ids");
  auto want = expected.load<f32>("logits");
  nn::eval(model);
  no_grad ng;
  auto got = model(ids).value();
  REQUIRE(got.shape() == want.shape());
  double worst = 0;
  for (std::int64_t i = 0; i < got.numel(); ++i) worst = std::max(worst, double(std::abs(got.flat(i) - want.flat(i))));
  MESSAGE(name, ": max |logits − transformers| = ", worst);
  CHECK(worst < 1e-4);

  // Greedy decoding through the KV cache equals transformers' generate(do_sample=False).
  auto prompt = expected.load<i64>("greedy_prompt");
  auto full = expected.load<i64>("greedy_ids");
  std::vector<std::int64_t> p(prompt.data(), prompt.data() + prompt.numel());
  const std::int64_t n_new = full.numel() - prompt.numel();
  auto out = nn::generate(model, p, {.max_new_tokens = n_new, .greedy = true});
  std::vector<std::int64_t> want_new(full.data() + prompt.numel(), full.data() + full.numel());
  CHECK(out.tokens == want_new);

  // Saving writes the HF names and layouts back: every tensor of the fixture, same bytes.
  const auto back = test::temp_dir("hf", name);
  io::save_hf(model, back);
  auto src = io::hf_directory::open(dir);
  auto dst = io::hf_directory::open(back);
  for (const auto& t : dst.names()) {
    CAPTURE(t);
    REQUIRE(src.find(t) != nullptr);
    CHECK(src.find(t)->shape == dst.find(t)->shape);
    auto a = src.load<f32>(t), b = dst.load<f32>(t);
    CHECK(a.to_vector() == b.to_vector());
  }
  for (const auto& t : src.names()) CHECK((dst.find(t) != nullptr || model.hf_ignored(t)));
  // ... and kiln reads its own export back to the same logits.
  auto again = io::load_hf<M>(back);
  nn::eval(again);
  CHECK(again(ids).value().to_vector() == got.to_vector());
  std::filesystem::remove_all(back);
}

void write_file(const std::filesystem::path& p, const std::string& s) { std::ofstream(p, std::ios::binary) << s; }

}  // namespace

TEST_CASE("HF parity: GPT-2 (Conv1D layout, tied head)") { check_parity<nn::gpt2<>>("gpt2_tiny"); }

TEST_CASE("HF parity: Llama (GQA, RoPE, untied head)") { check_parity<nn::llama<>>("llama_tiny"); }

TEST_CASE("HF parity: Llama from sharded safetensors (MQA, tied head, rope_theta 5e5)") {
  REQUIRE(std::filesystem::exists(fixtures() / "llama_tiny_tied_sharded" / "model.safetensors.index.json"));
  check_parity<nn::llama<>>("llama_tiny_tied_sharded");
}

TEST_CASE("HF folders: errors name the file, the tensor and what was expected") {
  const auto src = fixtures() / "llama_tiny";
  const auto dir = test::temp_dir("hf", "bad");
  auto copy_fixture = [&] {
    std::filesystem::remove_all(dir);
    std::filesystem::create_directories(dir);
    std::filesystem::copy(src / "config.json", dir / "config.json");
    std::filesystem::copy(src / "model.safetensors", dir / "model.safetensors");
  };
  // The wrong architecture for the config.
  copy_fixture();
  CHECK_THROWS_WITH_AS(io::load_hf<nn::gpt2<>>(dir), doctest::Contains("field \"model_type\": expected \"gpt2\""),
                       error);
  // A config whose sizes disagree with the weights: every mismatch is listed, nothing loaded.
  auto cfg = io::json::parse(io::read_text_file(src / "config.json"));
  cfg.set("intermediate_size", 48);
  write_file(dir / "config.json", cfg.dump());
  CHECK_THROWS_WITH_AS(io::load_hf<nn::llama<>>(dir),
                       doctest::Contains("tensor 'model.layers.0.mlp.gate_proj.weight' in "), error);
  // A tensor the model does not know.
  copy_fixture();
  {
    auto f = io::safetensors_file::open(src / "model.safetensors");
    io::safetensors_writer w;
    for (auto& e : f.tensors()) w.add(e.name, f.load<f32>(e.name));
    w.add("model.layers.0.self_attn.extra.weight", tensor<f32>::zeros({2}));
    w.add_raw("model.layers.0.x", "I32", {1},
              std::span<const std::byte>(reinterpret_cast<const std::byte*>("\0\0\0\0"), 4));
    w.write(dir / "model.safetensors");
  }
  CHECK_THROWS_WITH_AS(io::load_hf<nn::llama<>>(dir),
                       doctest::Contains("unexpected tensor 'model.layers.0.self_attn.extra.weight'"), error);
  // No weights at all; no config.
  std::filesystem::remove(dir / "model.safetensors");
  CHECK_THROWS_WITH_AS(io::load_hf<nn::llama<>>(dir),
                       doctest::Contains("neither model.safetensors nor model.safetensors.index.json"), error);
  std::filesystem::remove(dir / "config.json");
  CHECK_THROWS_WITH_AS(io::load_hf<nn::llama<>>(dir), doctest::Contains("config.json: missing"), error);
  // Sharded indexes: a shard outside the folder, a missing shard, a tensor not in its shard.
  const auto sharded = fixtures() / "llama_tiny_tied_sharded";
  std::filesystem::remove_all(dir);
  std::filesystem::copy(sharded, dir);
  auto index = io::json::parse(io::read_text_file(dir / "model.safetensors.index.json"));
  auto with_shard = [&](const std::string& tensor, const std::string& shard) {
    auto j = index;
    io::json wm = j.at("weight_map");
    wm.set(tensor, shard);
    j.set("weight_map", wm);
    write_file(dir / "model.safetensors.index.json", j.dump());
  };
  with_shard("model.norm.weight", "../../etc/passwd");
  CHECK_THROWS_WITH_AS(io::load_hf<nn::llama<>>(dir), doctest::Contains("is not a plain file name"), error);
  with_shard("model.norm.weight", "model-99999-of-99999.safetensors");
  CHECK_THROWS_WITH_AS(
      io::load_hf<nn::llama<>>(dir),
      doctest::Contains("shard \"model-99999-of-99999.safetensors\" (for tensor 'model.norm.weight') does not exist"),
      error);
  std::string other;
  for (auto& [t, s] : index.at("weight_map").as_object())
    if (s.as_string() != index.at("weight_map").at("model.norm.weight").as_string()) other = s.as_string();
  REQUIRE(!other.empty());
  with_shard("model.norm.weight", other);
  CHECK_THROWS_WITH_AS(io::load_hf<nn::llama<>>(dir), doctest::Contains("'model.norm.weight' is listed in shard"),
                       error);
  std::filesystem::remove_all(dir);
}

}  // namespace test_hf_parity
