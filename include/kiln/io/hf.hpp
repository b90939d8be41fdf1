// kiln/io/hf.hpp — Hugging Face model directories: config.json + model.safetensors, or
// shards listed in model.safetensors.index.json.
//
// Spec (reading): hf_directory::open(dir) reads config.json and either model.safetensors
// or the index's weight_map (tensor name → shard file; shard names must be plain file
// names inside dir, and every listed tensor must be in its shard). load_hf<Model>(dir)
// builds Model(Model::config_type::from_hf(config)) and fills every parameter:
//   - names are the model's own (kiln models use HF names); Model::hf_transposed(name)
//     marks weights stored transposed (GPT-2's Conv1D [in, out]);
//   - F32, F16, BF16 and F64 tensors are converted to the model's element type;
//   - a missing parameter, a shape that differs, or a tensor the model does not know
//     (unless Model::hf_ignored(name): buffers, a tied head) is an error naming the
//     file, the tensor, and both shapes. Nothing is half-loaded: all checks run first.
// Spec (writing): save_hf(model, dir) writes config.json (model.hf_config()) and
// model.safetensors in HF names and layouts (Conv1D weights transposed back, the tied
// head omitted, "format": "pt" metadata), atomically, so transformers'
// from_pretrained(dir) loads what kiln trained.
#pragma once

#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "kiln/io/atomic_file.hpp"
#include "kiln/io/json.hpp"
#include "kiln/io/safetensors.hpp"
#include "kiln/nn/module.hpp"

namespace kiln::io {

inline std::string read_text_file(const std::filesystem::path& p) {
  std::ifstream in(p, std::ios::binary);
  KILN_CHECK(in.good(), p.string(), ": cannot open for reading");
  std::ostringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

class hf_directory {
 public:
  static hf_directory open(const std::filesystem::path& dir) {
    KILN_CHECK(std::filesystem::is_directory(dir), dir.string(),
               ": not a directory (expected a Hugging Face model folder with config.json and model.safetensors)");
    hf_directory d;
    d.dir_ = dir;
    const auto cfg = dir / "config.json";
    KILN_CHECK(std::filesystem::exists(cfg), cfg.string(), ": missing (a Hugging Face model folder needs config.json)");
    d.config_file_ = cfg.string();
    d.config_ = json::parse(read_text_file(cfg), d.config_file_);
    const auto single = dir / "model.safetensors", index = dir / "model.safetensors.index.json";
    if (std::filesystem::exists(single)) {
      d.shards_.push_back(safetensors_file::open(single));
      for (auto& e : d.shards_[0].tensors()) d.where_[e.name] = 0;
    } else {
      KILN_CHECK(std::filesystem::exists(index), dir.string(),
                 ": neither model.safetensors nor model.safetensors.index.json is present");
      d.open_index(index);
    }
    return d;
  }

  const json& config() const { return config_; }
  const std::string& config_file() const { return config_file_; }
  const std::filesystem::path& path() const { return dir_; }
  std::vector<std::string> names() const {
    std::vector<std::string> n;
    for (auto& [k, v] : where_) n.push_back(k);
    return n;
  }
  const tensor_entry* find(const std::string& name) const {
    auto it = where_.find(name);
    return it == where_.end() ? nullptr : shards_[it->second].find(name);
  }
  const safetensors_file& file_of(const std::string& name) const { return shards_[where_.at(name)]; }

  // The tensor converted to T (F32, F16, BF16, F64 accepted).
  template <floating_element T>
  tensor<T> load(const std::string& name) const {
    const tensor_entry* e = find(name);
    KILN_CHECK(e != nullptr, dir_.string(), ": no tensor named '", name, "'");
    const auto& f = file_of(name);
    shape s;
    for (auto d : e->shape) s.push_back(d);
    tensor<T> out(s);
    auto b = f.bytes(*e);
    auto convert = [&]<class S>(S) {
      std::vector<S> tmp(static_cast<std::size_t>(e->numel()));
      if (!b.empty()) std::memcpy(tmp.data(), b.data(), b.size());
      for (std::size_t i = 0; i < tmp.size(); ++i) out.data()[i] = static_cast<T>(static_cast<compute_t<S>>(tmp[i]));
    };
    if (e->dtype == "F32")
      convert(f32{});
    else if (e->dtype == "F16")
      convert(f16{});
    else if (e->dtype == "BF16")
      convert(bf16{});
    else if (e->dtype == "F64")
      convert(f64{});
    else
      kiln::detail::fail(f.name(), ": tensor '", name, "' has dtype ", e->dtype,
                         "; a model weight must be F32, F16, BF16 or F64");
    return out;
  }

 private:
  void open_index(const std::filesystem::path& index) {
    const std::string file = index.string();
    json j = json::parse(read_text_file(index), file);
    KILN_CHECK(j.is_object() && j.contains("weight_map") && j.at("weight_map").is_object(), file,
               ": expected an object with a \"weight_map\" object (tensor name → shard file)");
    std::map<std::string, std::size_t> shard_ids;
    for (auto& [name, shard] : j.at("weight_map").as_object()) {
      KILN_CHECK(shard.is_string(), file, ": weight_map[\"", name, "\"] must be a file name string");
      const std::string& s = shard.as_string();
      KILN_CHECK(
          !s.empty() && s.find('/') == std::string::npos && s.find('\\') == std::string::npos && s != "." && s != "..",
          file, ": weight_map[\"", name, "\"] = \"", s, "\" is not a plain file name in the model folder");
      auto it = shard_ids.find(s);
      if (it == shard_ids.end()) {
        const auto p = dir_ / s;
        KILN_CHECK(std::filesystem::exists(p), file, ": shard \"", s, "\" (for tensor '", name, "') does not exist");
        it = shard_ids.emplace(s, shards_.size()).first;
        shards_.push_back(safetensors_file::open(p));
      }
      KILN_CHECK(shards_[it->second].contains(name), file, ": tensor '", name, "' is listed in shard \"", s,
                 "\" but that file does not hold it");
      where_[name] = it->second;
    }
  }

  std::filesystem::path dir_;
  std::string config_file_;
  json config_;
  std::vector<safetensors_file> shards_;
  std::map<std::string, std::size_t> where_;
};

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
  std::filesystem::create_directories(dir);
  safetensors_writer w;
  nn::visit_parameters(model, [&](const std::string& name, auto& p) {
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
