// kiln/nn/hf_model.hpp — a model from a Hugging Face model folder, and back.
//
// Spec (reading): load_hf<Model>(dir) opens dir as an io::hf_directory (kiln/io/hf.hpp),
// builds Model(Model::config_type::from_hf(config)) and fills every parameter
// (load_hf_weights):
//   - names are the model's own (kiln models use HF names); Model::hf_transposed(name)
//     marks weights stored transposed (GPT-2's Conv1D [in, out]);
//   - F32, F16, BF16 and F64 tensors are converted to the model's element type;
//   - a missing parameter, a shape that differs, or a tensor the model does not know
//     (unless Model::hf_ignored(name): buffers, a tied head) is an error naming the
//     file, the tensor, and both shapes. Nothing is half-loaded: all checks run first;
//   - a model with NF4-base layers (adapter::qlora) quantises them once loaded.
// Spec (writing): save_hf(model, dir) writes config.json (model.hf_config()) and
// model.safetensors in HF names and layouts (Conv1D weights transposed back, the tied
// head omitted, "format": "pt" metadata), atomically, so transformers'
// from_pretrained(dir) loads what kiln trained. A model with LoRA adapters is saved once
// they are merged (nn::merge_lora), as its merged base weights; unmerged, it is refused
// (save the adapter with io::save_peft_adapter, kiln/nn/peft.hpp).
// These walk the model (nn::visit_parameters), so they sit in nn/, above the file
// formats; their names stay in kiln::io, beside hf_directory.
#pragma once

#include <filesystem>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "kiln/core/transfer.hpp"
#include "kiln/io/atomic_file.hpp"
#include "kiln/io/hf.hpp"
#include "kiln/io/safetensors.hpp"
#include "kiln/nn/lora.hpp"
#include "kiln/nn/module.hpp"

namespace kiln::io {

// Fills `model`'s parameters from an HF folder (see the spec above).
template <class M>
void load_hf_weights(M& model, const hf_directory& d) {
  using T = typename M::value_type;
  using Dev = typename M::device_type;
  struct pending {
    var<T, Dev>* param;
    std::string name;
    bool transposed;
  };
  std::vector<pending> todo;
  std::vector<std::string> problems;
  std::map<std::string, bool> used;
  nn::visit_parameters(model, [&](const std::string& name, auto& p) {
    const tensor_entry* e = d.find(name);
    if (!e) {
      problems.push_back("missing tensor '" + name + "' " + p.shape().str());
      return;
    }
    used[name] = true;
    const bool tr = M::hf_transposed(name);
    shape want = p.shape();
    if (tr && want.rank() == 2) std::swap(want[0], want[1]);
    shape got;
    for (auto x : e->shape) got.push_back(x);
    if (!(got == want)) {
      problems.push_back("tensor '" + name + "' in " + d.file_of(name).name() + " has shape " + got.str() +
                         ", the model expects " + want.str() + (tr ? " (Conv1D layout [in, out])" : ""));
      return;
    }
    todo.push_back({&p, name, tr});
  });
  for (auto& n : d.names())
    if (!used.count(n) && !model.hf_ignored(n)) problems.push_back("unexpected tensor '" + n + "'");
  if (!problems.empty()) {
    std::string msg;
    for (std::size_t i = 0; i < problems.size() && i < 12; ++i) msg += (i ? "; " : "") + problems[i];
    if (problems.size() > 12) msg += "; and " + std::to_string(problems.size() - 12) + " more";
    kiln::detail::fail(d.path().string(), ": the weights do not match the model: ", msg);
  }
  for (auto& t : todo) {
    tensor<T> v = d.template load<T>(t.name);
    if (t.transposed) v = v.transpose(0, 1).contiguous();
    copy_from_host(t.param->value(), v);
  }
  nn::quantize_nf4(model);  // adapter::qlora: the block projections become NF4 here
}

// Builds a model from an HF folder: its config.json, then its weights.
template <class M>
M load_hf(const std::filesystem::path& dir) {
  auto d = hf_directory::open(dir);
  M model(M::config_type::from_hf(d.config(), d.config_file()));
  load_hf_weights(model, d);
  return model;
}

// Writes dir/config.json and dir/model.safetensors in HF names and layouts. Returns the paths.
template <class M>
std::vector<std::filesystem::path> save_hf(M& model, const std::filesystem::path& dir) {
  const auto lora = nn::count_lora(model);
  KILN_CHECK(lora.quantized == 0, "save_hf: ", lora.quantized,
             " base weights are NF4 (adapter::qlora); an HF folder holds the original weights: save the adapter "
             "(io::save_peft_adapter) and merge it into the 16-bit base loaded with adapter::lora");
  KILN_CHECK(lora.merged == lora.adapted, "save_hf: ", lora.adapted - lora.merged, " of ", lora.adapted,
             " LoRA adapters are not merged: merge them into the base weights first (nn::merge_lora), or save the "
             "adapter alone (io::save_peft_adapter)");
  std::filesystem::create_directories(dir);
  std::set<std::string> folded;  // the adapters' own parameters, folded into the weights
  nn::visit_lora_layers(model, [&](const std::string& name, auto& layer) {
    if (layer.lora) folded.insert({name + ".lora_A.weight", name + ".lora_B.weight"});
  });
  safetensors_writer w;
  nn::visit_parameters(model, [&](const std::string& name, auto& p) {
    if (folded.count(name)) return;
    const auto& v = p.value();
    if (M::hf_transposed(name))
      w.add(name, v.transpose(0, 1).contiguous());
    else
      w.add(name, v);
  });
  w.set_metadata("format", "pt");
  const auto weights = dir / "model.safetensors", config = dir / "config.json";
  w.write(weights);
  write_atomically(config, model.hf_config().dump() + "\n");
  return {config, weights};
}

}  // namespace kiln::io
