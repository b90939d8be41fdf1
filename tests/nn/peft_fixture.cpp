// The C++ side of the PEFT interop check (tests/nn/peft_python_check.sh).
//   peft_fixture write DIR: a tiny Llama (seeded) saved as an HF folder DIR/base, a LoRA
//     adapter on it trained for a few AdamW steps and saved with io::save_peft_adapter in
//     DIR/kiln_adapter, and DIR/kiln_logits.safetensors: input_ids and kiln's logits for
//     them with the adapter applied.
//     The same for a GPT-2 (Conv1D layers in HF files): DIR/gpt2_base, DIR/gpt2_adapter,
//     DIR/gpt2_logits.safetensors.
//   peft_fixture read DIR: DIR/base plus the adapter PEFT trained and saved in
//     DIR/peft_adapter, read with io::load_peft_adapter; writes kiln's logits for
//     DIR/peft_logits.safetensors' input_ids to DIR/kiln_logits_of_peft.safetensors.
//   peft_fixture nf4 IN OUT: for each tensor "<name>.w" in IN (written by
//     tests/nn/bnb_check.py), quantises it with kiln's NF4 (ops/kernel/nf4.hpp) and writes
//     what kiln stores to OUT: "<name>.codes", ".scale_codes", ".scale_absmax", ".offset",
//     and kiln's dynamic map as "code8". The script compares them with bitsandbytes'.
#include <algorithm>
#include <iostream>
#include <string>

#include "kiln/nn/gpt2.hpp"
#include "kiln/nn/hf_model.hpp"
#include "kiln/nn/llama.hpp"
#include "kiln/nn/peft.hpp"
#include "kiln/optim/adamw.hpp"

using namespace kiln;
using model_t = nn::llama<ops::mask::causal, nn::recompute::none, f32, cpu, nn::adapter::lora>;

namespace {

template <class M>
void write_logits(M& m, const tensor<i64>& ids, const std::filesystem::path& out) {
  nn::eval(m);
  io::safetensors_writer w;
  w.add("input_ids", ids);
  w.add("logits", m(ids).value().contiguous());
  w.write(out);
}

// A few AdamW steps of next-token prediction on ids.
template <class M>
void train(M& m, const tensor<i64>& ids, std::int64_t vocab) {
  const std::int64_t B = ids.size(0), T = ids.size(1) - 1;
  optim::adamw<f32> opt(m, {.lr = 2e-2});
  for (int s = 0; s < 4; ++s) {
    auto x = ids.slice(1, 0, T).contiguous(), y = ids.slice(1, 1, T + 1).contiguous();
    auto loss = cross_entropy(reshape(m(x), shape{B * T, vocab}), y.reshape(shape{B * T}));
    loss.backward();
    opt.step();
    opt.zero_grad();
  }
}

void write_gpt2(const std::filesystem::path& dir, const tensor<i64>& ids) {
  nn::gpt2_config c;
  c.vocab_size = 53;
  c.n_positions = 64;
  c.n_embd = 32;
  c.n_layer = 2;
  c.n_head = 4;
  c.embd_pdrop = c.attn_pdrop = c.resid_pdrop = 0.0f;
  nn::gpt2<ops::mask::causal, nn::recompute::none, f32, cpu, nn::adapter::lora> m(c);
  io::save_hf(m, dir / "gpt2_base");
  nn::lora_config lc;
  lc.r = 4;
  lc.alpha = 8;
  lc.target_modules = {"c_attn", "c_proj", "c_fc"};
  nn::attach_lora(m, lc);
  train(m, ids, c.vocab_size);
  io::save_peft_adapter(m, lc, dir / "gpt2_adapter");
  write_logits(m, ids, dir / "gpt2_logits.safetensors");
}

// Quantises each "<name>.w" of `in` with kiln's NF4 and writes what it stored to `out`.
void write_nf4(const std::filesystem::path& in, const std::filesystem::path& out) {
  auto f = io::safetensors_file::open(in);
  io::safetensors_writer w;
  auto bytes = [](const auto& v) {
    using V = typename std::remove_cvref_t<decltype(v)>::value_type;
    tensor<V> t(shape{static_cast<std::int64_t>(v.size())});
    std::copy(v.begin(), v.end(), t.data());
    return t;
  };
  for (const auto& e : f.tensors()) {
    if (!e.name.ends_with(".w")) continue;
    const std::string n = e.name.substr(0, e.name.size() - 2);
    const auto x = f.load<f32>(e.name);
    const auto q = ops::nf4::quantize(x.data(), x.shape());
    w.add(n + ".codes", bytes(q.codes));
    w.add(n + ".scale_codes", bytes(q.scale_codes));
    w.add(n + ".scale_absmax", bytes(q.scale_absmax));
    w.add(n + ".offset", bytes(std::vector<float>{q.offset}));
  }
  w.add("code8", bytes(ops::nf4::code8()));
  w.write(out);
}

}  // namespace

int main(int argc, char** argv) try {
  if (argc == 4 && std::string(argv[1]) == "nf4") {
    write_nf4(argv[2], argv[3]);
    return 0;
  }
  if (argc != 3) throw error("usage: peft_fixture write|read DIR, or peft_fixture nf4 IN OUT");
  const std::string mode = argv[1];
  const std::filesystem::path dir = argv[2];
  if (mode == "write") {
    manual_seed(7);
    nn::llama_config c;
    c.vocab_size = 53;
    c.hidden_size = 32;
    c.intermediate_size = 48;
    c.num_hidden_layers = 2;
    c.num_attention_heads = 4;
    c.num_key_value_heads = 2;
    c.max_position_embeddings = 64;
    model_t m(c);
    io::save_hf(m, dir / "base");
    nn::lora_config lc;
    lc.r = 4;
    lc.alpha = 16;
    lc.use_rslora = true;
    lc.target_modules = {"q_proj", "v_proj", "o_proj", "up_proj", "down_proj"};
    nn::attach_lora(m, lc);
    tensor<i64> ids(shape{2, 12});
    for (std::int64_t i = 0; i < ids.numel(); ++i) ids.data()[i] = (i * 17 + 3) % c.vocab_size;
    train(m, ids, c.vocab_size);
    io::save_peft_adapter(m, lc, dir / "kiln_adapter");
    write_logits(m, ids, dir / "kiln_logits.safetensors");
    write_gpt2(dir, ids);
  } else if (mode == "read") {
    auto m = io::load_hf<model_t>(dir / "base");
    const auto lc = io::load_peft_adapter(m, dir / "peft_adapter");
    std::cout << "kiln read PEFT's adapter: r = " << lc.r << ", " << nn::count_lora(m).adapted << " layers\n";
    auto f = io::safetensors_file::open(dir / "peft_logits.safetensors");
    write_logits(m, f.load<i64>("input_ids"), dir / "kiln_logits_of_peft.safetensors");
  } else {
    throw error("peft_fixture: unknown mode '" + mode + "' (write, read or nf4)");
  }
  return 0;
} catch (const std::exception& e) {
  std::cerr << e.what() << "\n";
  return 1;
}
