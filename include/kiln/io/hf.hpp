// kiln/io/hf.hpp — Hugging Face model directories: config.json + model.safetensors, or
// shards listed in model.safetensors.index.json.
//
// Spec: hf_directory::open(dir) reads config.json and either model.safetensors or the
// index's weight_map (tensor name → shard file; shard names must be plain file names
// inside dir, and every listed tensor must be in its shard). find(name) and file_of(name)
// locate a tensor; load<T>(name) converts an F32, F16, BF16 or F64 tensor to T. Errors
// name the file and the tensor.
// A model built from such a folder, or written as one (load_hf, save_hf), is in
// kiln/nn/hf_model.hpp: it walks the model's parameters.
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
    KILN_CHECK(find(name) != nullptr, dir_.string(), ": no tensor named '", name, "'");
    return file_of(name).template load_as<T>(name);
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

}  // namespace kiln::io
