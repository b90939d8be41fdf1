// Writes what tests/nn/hf_python_check.sh hands to transformers: each fixture model after
// a few AdamW steps (so the weights are kiln's, not the fixture's), exported with
// io::save_hf, and kiln's logits for the fixture's input_ids.
//   hf_export_fixture FIXTURES_DIR OUT_DIR
#include <cstdio>

#include "kiln/kiln.hpp"

using namespace kiln;

template <class M>
void export_case(const std::filesystem::path& fixtures, const std::filesystem::path& out, const std::string& name) {
  auto model = io::load_hf<M>(fixtures / name);
  auto expected = io::safetensors_file::open(fixtures / name / "expected.safetensors");
  auto ids = expected.load<i64>("input_ids");
  optim::adamw<f32> opt(model, {.lr = 1e-2});
  for (int step = 0; step < 3; ++step) {
    const std::int64_t B = ids.size(0), T = ids.size(1);
    auto x = ids.slice(1, 0, T - 1).contiguous(), y = ids.slice(1, 1, T).contiguous();
    auto loss = cross_entropy(reshape(model(x), shape{B * (T - 1), model.vocab_size()}), y.reshape(shape{B * (T - 1)}));
    opt.zero_grad();
    loss.backward();
    opt.step();
  }
  io::save_hf(model, out / name);
  nn::eval(model);
  no_grad ng;
  io::safetensors_writer w;
  w.add("input_ids", ids);
  w.add("logits", model(ids).value());
  w.write(out / name / "expected.safetensors");
  std::printf("%s\n", (out / name).c_str());
}

int main(int argc, char** argv) try {
  KILN_CHECK(argc == 3, "usage: hf_export_fixture FIXTURES_DIR OUT_DIR");
  const std::filesystem::path fixtures = argv[1], out = argv[2];
  export_case<nn::gpt2<>>(fixtures, out, "gpt2_tiny");
  export_case<nn::llama<>>(fixtures, out, "llama_tiny");
  export_case<nn::llama<>>(fixtures, out, "llama_tiny_tied_sharded");
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
