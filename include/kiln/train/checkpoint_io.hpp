// kiln/train/checkpoint_io.hpp — what on_save_checkpoint / on_load_checkpoint receive.
//
// Spec: each owner of state (the module, each callback, the precision and strategy
// policies) gets its own section of the checkpoint: a JSON object for small state and a
// tensor namespace for large state. checkpoint_out writes into that section,
// checkpoint_in reads from it. A callback's section is keyed by its `state_key`
// (a static string member) when it has one, else by its type name, so adding or
// reordering callbacks does not shift anyone's state.
#pragma once

#include <string>
#include <vector>

#include "kiln/io/checkpoint.hpp"

namespace kiln::train {

class checkpoint_out {
 public:
  checkpoint_out(io::checkpoint_writer& w, io::json& section, std::string tensor_prefix)
      : w_(&w), section_(&section), prefix_(std::move(tensor_prefix)) {}
  // This owner's JSON object; set fields on it.
  io::json& state() const { return *section_; }
  template <element T, device Dev>
  void add(const std::string& name, const tensor<T, Dev>& t) const {
    w_->add(prefix_ + name, t);
  }

 private:
  io::checkpoint_writer* w_;
  io::json* section_;
  std::string prefix_;
};

class checkpoint_in {
 public:
  checkpoint_in(const io::safetensors_view& file, const io::json& section, std::string tensor_prefix)
      : file_(&file), section_(&section), prefix_(std::move(tensor_prefix)) {}
  const io::json& state() const { return *section_; }
  bool contains(const std::string& name) const { return file_->contains(prefix_ + name); }
  // A copy of tensor `name` of this section (dtype checked; the error names the file).
  template <element T>
  tensor<T> load(const std::string& name) const {
    return file_->load<T>(prefix_ + name);
  }
  const std::string& file_name() const { return file_->name(); }

 private:
  const io::safetensors_view* file_;
  const io::json* section_;
  std::string prefix_;
};

}  // namespace kiln::train
