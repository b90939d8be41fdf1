// kiln/nn/peft.hpp — LoRA adapters in PEFT's files: adapter_config.json and
// adapter_model.safetensors.
//
// Spec (writing): save_peft_adapter(model, config, dir) writes, each atomically,
//   - dir/adapter_config.json: PEFT's LoraConfig (peft_type "LORA", task_type "CAUSAL_LM",
//     r, lora_alpha, lora_dropout, use_rslora, target_modules, modules_to_save, bias
//     "none", base_model_name_or_path, and PEFT's other fields at their defaults);
//   - dir/adapter_model.safetensors: every adapter under PEFT's names, "base_model.model."
//     + kiln's name ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"),
//     and the parameters of modules_to_save likewise, in the model's element type, with
//     "format": "pt" metadata,
// so that peft.PeftModel.from_pretrained(transformers_model, dir) loads it.
// Spec (reading): load_peft_adapter(model, dir) reads both files, checks everything
// before it changes anything — the config's fields (a LoRA adapter without DoRA, per-layer
// rank or alpha patterns, layer subsets or trained biases), that every target names a
// linear layer of the model, that the file holds exactly the tensors those layers need,
// each [r, in] or [out, r] for that layer — then attaches the adapters (attach_lora) and
// copies the values (F32, F16, BF16 or F64, converted to the model's type). Errors name
// the file, the field or tensor, and what was expected. Returns the config.
// Models: any whose blocks use the adapter policy nn::adapter::lora (llama, gpt2);
// fan_in_fan_out is written true for GPT-2's Conv1D layers, as PEFT expects.
#pragma once

#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "kiln/io/atomic_file.hpp"
#include "kiln/io/json.hpp"
#include "kiln/io/safetensors.hpp"
#include "kiln/nn/hf_config.hpp"
#include "kiln/nn/lora.hpp"

namespace kiln::io {

inline constexpr std::string_view peft_prefix = "base_model.model.";
// PEFT's name of a kiln parameter ("model.norm.weight"), and of a layer's adapter matrix
// (layer "model.layers.0.self_attn.q_proj", part "lora_A").
inline std::string peft_name(std::string_view kiln_name) { return std::string(peft_prefix) + std::string(kiln_name); }
inline std::string peft_name(std::string_view layer, std::string_view part) {
  return peft_name(std::string(layer) + "." + std::string(part) + ".weight");
}

// fan_in_fan_out: whether the adapted layers are stored [in, out] in the model's HF files
// (GPT-2's Conv1D); PEFT uses it when it merges. The adapters' own shapes do not change.
inline json peft_config_json(const nn::lora_config& c, bool fan_in_fan_out = false) {
  auto strings = [](const std::vector<std::string>& v) {
    json a = json::array();
    for (const auto& s : v) a.push_back(json(s));
    return a;
  };
  json j = json::object();
  j.set("peft_type", "LORA");
  j.set("task_type", "CAUSAL_LM");
  j.set("base_model_name_or_path", c.base_model_name_or_path.empty() ? json() : json(c.base_model_name_or_path));
  j.set("r", c.r);
  j.set("lora_alpha", c.alpha);
  j.set("lora_dropout", double(c.dropout));
  j.set("use_rslora", c.use_rslora);
  j.set("target_modules", c.all_linear() ? json("all-linear") : strings(c.target_modules));
  j.set("modules_to_save", c.modules_to_save.empty() ? json() : strings(c.modules_to_save));
  j.set("bias", "none");
  j.set("fan_in_fan_out", fan_in_fan_out);
  j.set("init_lora_weights", true);
  j.set("inference_mode", true);
  j.set("use_dora", false);
  j.set("rank_pattern", json::object());
  j.set("alpha_pattern", json::object());
  j.set("layers_to_transform", json());
  j.set("layers_pattern", json());
  j.set("revision", json());
  return j;
}

inline nn::lora_config peft_config_from_json(const json& j, const std::string& file) {
  nn::hf_fields f(j, file);
  nn::lora_config c;
  const std::string type = f.string("peft_type", "LORA");
  f.require(type == "LORA", "peft_type", "kiln reads LoRA adapters (\"LORA\"), got \"" + type + "\"");
  c.r = f.integer("r", 8);
  c.alpha = f.number("lora_alpha", 8.0);
  c.dropout = static_cast<float>(f.number("lora_dropout", 0.0));
  c.use_rslora = f.boolean("use_rslora", false);
  f.require(!f.boolean("use_dora", false), "use_dora", "DoRA adapters are not supported; expected false");
  f.require(f.string("bias", "none") == "none", "bias",
            "adapters that train biases are not supported; expected \"none\"");
  f.boolean("fan_in_fan_out", false);  // checked as a boolean; the adapters' shapes are the same either way
  for (const char* key : {"rank_pattern", "alpha_pattern"})
    if (const json* p = f.get(key, false))
      f.require(p->is_object() && p->size() == 0, key, "per-layer ranks and alphas are not supported; expected {}");
  for (const char* key : {"layers_to_transform", "layers_pattern"})
    f.require(!f.has(key), key, "adapting a subset of the layers is not supported; expected null");
  auto string_list = [&](const char* key) {
    std::vector<std::string> out;
    const json* v = f.get(key, false);
    if (!v) return out;
    if (v->is_string()) {
      out.push_back(v->as_string());
      return out;
    }
    f.require(v->is_array(), key, "expected a list of module names");
    for (const auto& e : v->as_array()) {
      f.require(e.is_string(), key, "expected a list of module names (strings)");
      out.push_back(e.as_string());
    }
    return out;
  };
  c.target_modules = string_list("target_modules");
  if (const json* t = f.get("target_modules", false); t && t->is_string())
    f.require(t->as_string() == "all-linear", "target_modules",
              "a single string must be \"all-linear\" (kiln does not match regular expressions); got \"" +
                  t->as_string() + "\"");
  c.modules_to_save = string_list("modules_to_save");
  c.base_model_name_or_path = f.string("base_model_name_or_path", "");
  c.validate(file);
  return c;
}

// Writes the adapter (see the spec). Returns the two paths.
template <class M>
std::vector<std::filesystem::path> save_peft_adapter(M& model, const nn::lora_config& c,
                                                     const std::filesystem::path& dir) {
  const auto counts = nn::count_lora(model);
  KILN_CHECK(counts.adapted > 0, "save_peft_adapter: the model has no LoRA adapters (attach_lora first)");
  KILN_CHECK(counts.merged == 0,
             "save_peft_adapter: the adapters are merged into the base weights (unmerge_lora first)");
  std::filesystem::create_directories(dir);
  safetensors_writer w;
  nn::visit_lora_layers(model, [&](const std::string& name, auto& layer) {
    if (!layer.lora) return;
    w.add(peft_name(name, "lora_A"), layer.lora->A.value());
    w.add(peft_name(name, "lora_B"), layer.lora->B.value());
  });
  nn::visit_modules(model, [&](const std::string& name, auto& sub) {
    for (const auto& s : c.modules_to_save)
      if (nn::name_matches(name, s))
        nn::visit_parameters(
            sub, [&](const std::string& p, auto& v) { w.add(peft_name(nn::detail::join(name, p)), v.value()); });
  });
  bool fan_in_fan_out = false;
  if constexpr (requires { M::hf_transposed(std::string_view{}); })
    nn::visit_lora_layers(model, [&](const std::string& name, auto& layer) {
      if (layer.lora) fan_in_fan_out = fan_in_fan_out || M::hf_transposed(name + ".weight");
    });
  w.set_metadata("format", "pt");
  const auto weights = dir / "adapter_model.safetensors", config = dir / "adapter_config.json";
  w.write(weights);
  write_atomically(config, peft_config_json(c, fan_in_fan_out).dump() + "\n");
  return {config, weights};
}

// Reads a PEFT LoRA adapter into `model` (see the spec). Nothing changes if it throws.
template <class M>
nn::lora_config load_peft_adapter(M& model, const std::filesystem::path& dir) {
  using T = typename M::value_type;
  const auto config_path = dir / "adapter_config.json", weights_path = dir / "adapter_model.safetensors";
  KILN_CHECK(std::filesystem::is_regular_file(config_path), "load_peft_adapter: ", config_path.string(),
             " does not exist (a PEFT adapter folder holds adapter_config.json and adapter_model.safetensors)");
  KILN_CHECK(std::filesystem::is_regular_file(weights_path), "load_peft_adapter: ", weights_path.string(),
             " does not exist");
  const std::string cfile = config_path.string();
  const nn::lora_config c = peft_config_from_json(json::parse(read_text_file(config_path), cfile), cfile);
  const auto targets = nn::lora_targets(model, c, cfile);

  auto f = safetensors_file::open(weights_path);
  std::map<std::string, shape> want;  // file name → shape
  std::map<std::string, std::string> kiln_name;
  nn::visit_lora_layers(model, [&](const std::string& name, auto& layer) {
    KILN_CHECK(!layer.lora, "load_peft_adapter: layer '", name, "' already has an adapter");
    for (const auto& t : targets)
      if (t == name) {
        want[peft_name(name, "lora_A")] = shape{c.r, layer.in_features()};
        want[peft_name(name, "lora_B")] = shape{layer.out_features(), c.r};
      }
  });
  nn::visit_modules(model, [&](const std::string& name, auto& sub) {
    for (const auto& s : c.modules_to_save)
      if (nn::name_matches(name, s))
        nn::visit_parameters(sub, [&](const std::string& p, auto& v) {
          const std::string full = nn::detail::join(name, p);
          want[peft_name(full)] = v.shape();
          kiln_name[peft_name(full)] = full;
        });
  });
  std::vector<std::string> problems;
  for (const auto& [name, s] : want) {
    const tensor_entry* e = f.find(name);
    if (!e)
      problems.push_back("missing tensor '" + name + "' " + s.str());
    else if (!(safetensors_view::shape_of(*e) == s))
      problems.push_back("tensor '" + name + "' has shape " + safetensors_view::shape_of(*e).str() +
                         ", the model and adapter_config.json (r = " + std::to_string(c.r) + ") expect " + s.str());
  }
  for (const auto& e : f.tensors())
    if (!want.count(e.name)) problems.push_back("unexpected tensor '" + e.name + "'");
  if (!problems.empty()) {
    std::string msg;
    for (std::size_t i = 0; i < problems.size() && i < 8; ++i) msg += (i ? "; " : "") + problems[i];
    if (problems.size() > 8) msg += "; and " + std::to_string(problems.size() - 8) + " more";
    kiln::detail::fail(weights_path.string(), ": the adapter does not fit the model: ", msg);
  }
  // Converted before anything changes, so a bad dtype leaves the model as it was.
  std::map<std::string, tensor<T>> values;
  for (const auto& [name, s] : want) values.emplace(name, f.template load_as<T>(name));

  nn::attach_lora(model, c);
  nn::visit_lora_layers(model, [&](const std::string& name, auto& layer) {
    if (!layer.lora) return;
    copy_from_host(layer.lora->A.value(), values.at(peft_name(name, "lora_A")));
    copy_from_host(layer.lora->B.value(), values.at(peft_name(name, "lora_B")));
  });
  nn::visit_parameters(model, [&](const std::string& name, auto& p) {
    auto it = values.find(peft_name(name));
    if (it != values.end() && kiln_name.count(it->first)) copy_from_host(p.value(), it->second);
  });
  return c;
}

}  // namespace kiln::io
