// kiln/nn/weights.hpp — a module's weights in safetensors files and kiln checkpoints.
//
// Spec: add_module() puts a module's parameters under a prefix in a checkpoint or
// safetensors writer; check_module() compares a file against a module — missing and
// unexpected keys (errors when strict), shape and dtype mismatches (always errors) —
// without changing anything; copy_module() then copies, and cannot fail. load_weights()
// is check then copy, so a failed load leaves the module as it was; it reads a plain
// safetensors file or the "model/" section of a kiln checkpoint (kiln/io/checkpoint.hpp).
// save_weights()/export_weights() write plain HF-style `model.safetensors` (metadata
// {"format": "pt"}), plus `config.json` when the module has an HF architecture (a member
// `hf_config()` returning io::json).
// These walk the module (nn::visit_parameters), so they sit in nn/, above the file
// formats; their names stay in kiln::io, beside the formats they read and write.
#pragma once

#include <concepts>
#include <filesystem>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/core/transfer.hpp"
#include "kiln/io/atomic_file.hpp"
#include "kiln/io/checkpoint.hpp"
#include "kiln/io/json.hpp"
#include "kiln/io/safetensors.hpp"
#include "kiln/nn/hf_model.hpp"
#include "kiln/nn/module.hpp"

namespace kiln::io {

// Which parameters a walk takes: all, or the trainable ones only (an adapter run's
// checkpoints: the frozen base is not written, kiln/train/checkpointing.hpp).
enum class parameters { all, trainable };

template <class M>
void add_module(checkpoint_writer& w, const std::string& prefix, M& module, parameters which = parameters::all) {
  nn::visit_parameters(module, [&](const std::string& name, auto& p) {
    if (which == parameters::all || p.requires_grad()) w.add(prefix + name, p.value());
  });
}
template <class M>
void add_module(safetensors_writer& w, const std::string& prefix, M& module) {
  nn::visit_parameters(module, [&](const std::string& name, auto& p) { w.add(prefix + name, p.value()); });
}

struct load_report {
  std::vector<std::string> missing;     // parameters of the module absent from the file
  std::vector<std::string> unexpected;  // tensors in the file (under the prefix) the module lacks
  std::size_t loaded = 0;
  bool clean() const { return missing.empty() && unexpected.empty(); }
  std::string str() const {
    auto list = [](const std::vector<std::string>& v) {
      std::string s;
      for (std::size_t i = 0; i < v.size() && i < 8; ++i) s += (i ? ", " : "") + v[i];
      if (v.size() > 8) s += ", ... (" + std::to_string(v.size()) + " in all)";
      return s;
    };
    std::string s = std::to_string(loaded) + " tensors loaded";
    if (!missing.empty()) s += "; missing: " + list(missing);
    if (!unexpected.empty()) s += "; unexpected: " + list(unexpected);
    return s;
  }
};

// Compares `file` (tensors under `prefix`) with the module's parameters; throws on a
// shape or dtype mismatch, and on missing/unexpected keys when strict. Changes nothing.
template <class M>
load_report check_module(const safetensors_view& file, const std::string& prefix, M& module, bool strict,
                         parameters which = parameters::all) {
  load_report r;
  std::vector<std::string> names;
  nn::visit_parameters(module, [&](const std::string& name, auto& p) {
    using T = typename std::remove_cvref_t<decltype(p)>::value_type;
    if (which == parameters::trainable && !p.requires_grad()) return;
    names.push_back(prefix + name);
    const tensor_entry* e = file.find(prefix + name);
    if (!e) {
      r.missing.push_back(prefix + name);
      return;
    }
    KILN_CHECK(e->dtype == dtype_name(dtype_of<T>), file.name(), ": tensor '", e->name, "' has dtype ", e->dtype,
               " but the model's parameter '", name, "' is ", dtype_name(dtype_of<T>));
    const kiln::shape s = safetensors_view::shape_of(*e);
    KILN_CHECK(s == p.shape(), file.name(), ": tensor '", e->name, "' has shape ", s.str(),
               " but the model's parameter '", name, "' has shape ", p.shape().str());
    ++r.loaded;
  });
  for (auto& e : file.tensors()) {
    if (!e.name.starts_with(prefix)) continue;
    bool known = false;
    for (auto& n : names) known = known || n == e.name;
    if (!known) r.unexpected.push_back(e.name);
  }
  if (strict && !r.clean())
    detail::fail(file.name(), ": the weights do not match the model (strict load): ", r.str(),
                 "; pass strict = false to load the matching tensors only");
  return r;
}

// Copies every parameter present in `file` (after check_module passed).
template <class M>
void copy_module(const safetensors_view& file, const std::string& prefix, M& module) {
  nn::visit_parameters(module, [&](const std::string& name, auto& p) {
    const tensor_entry* e = file.find(prefix + name);
    if (!e) return;
    auto b = file.bytes(*e);
    auto& v = p.value();
    KILN_CHECK(v.is_contiguous(), "load: parameter '", name, "' is not contiguous");
    copy_bytes_from_host(v, b.data(), b.size());
  });
}

struct load_options {
  bool strict = true;
  std::string prefix;  // tensors' name prefix in the file ("" for plain weights, "model/" in checkpoints)
};

// Loads weights from a safetensors file or a kiln checkpoint (its "model/" section).
template <class M>
load_report load_weights(M& module, const std::filesystem::path& path, load_options o = {}) {
  KILN_CHECK(std::filesystem::exists(path), "load_weights: ", path.string(), " does not exist");
  auto f = safetensors_file::open(path);
  const auto fmt = f.metadata("format");
  if (fmt && *fmt == checkpoint_format && o.prefix.empty()) {
    checkpoint_reader r = checkpoint_reader::open(path);  // verifies checksums
    auto rep = check_module(r.file(), "model/", module, o.strict);
    copy_module(r.file(), "model/", module);
    return rep;
  }
  auto rep = check_module(f, o.prefix, module, o.strict);
  copy_module(f, o.prefix, module);
  return rep;
}

// Writes a module's parameters as plain safetensors (HF's "format": "pt" metadata).
template <class M>
void save_weights(M& module, const std::filesystem::path& path,
                  const std::vector<std::pair<std::string, std::string>>& metadata = {}) {
  safetensors_writer w;
  add_module(w, "", module);
  w.set_metadata("format", "pt");
  for (auto& [k, v] : metadata) w.set_metadata(k, v);
  w.write(path);
}

// Writes `dir`/model.safetensors (+ `dir`/config.json for modules with an HF architecture).
// Returns the paths written.
// Models that store some weights in another layout in HF files (GPT-2's Conv1D) declare
// hf_transposed(name); they are written by io::save_hf (kiln/nn/hf_model.hpp) instead.
template <class M>
std::vector<std::filesystem::path> export_weights(M& module, const std::filesystem::path& dir) {
  if constexpr (requires { M::hf_transposed(std::string_view{}); }) return save_hf(module, dir);
  std::vector<std::filesystem::path> out{dir / "model.safetensors"};
  save_weights(module, out[0]);
  if constexpr (requires(M & m) {
                  { m.hf_config() } -> std::convertible_to<json>;
                }) {
    out.push_back(dir / "config.json");
    write_atomically(out[1], json(module.hf_config()).dump() + "\n");
  }
  return out;
}

}  // namespace kiln::io
