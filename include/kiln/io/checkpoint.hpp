// kiln/io/checkpoint.hpp — the checkpoint file.
//
// Spec: a kiln checkpoint is one safetensors file (any safetensors reader opens it):
//   tensors   named "<section>/<name>": "model/net.0.weight", "optimizer.0/net.0.weight.exp_avg",
//             "callbacks/<callback>/<name>", "grad/<param>" (an open accumulation window);
//   metadata  "format": "kiln.checkpoint", "kiln.version": the format version,
//             "kiln.state": a JSON document with everything that is not a tensor
//             (counters, RNG streams, loop position, schedules, callback and module state,
//             hyperparameters), "kiln.crc32c": a JSON object tensor name → CRC-32C of its
//             bytes, so a flipped bit anywhere in the data is caught on load.
// checkpoint_writer::write(path) is atomic (kiln/io/atomic_file.hpp); each checksum is taken
// while the tensor's bytes are written, so it covers exactly the bytes in the file, and the
// header that records them is written last. checkpoint_reader::open
// validates the safetensors header, the format and version, and every checksum before
// it returns; errors name the file and the tensor.
// A module's weights in and out of these files (load_weights, save_weights, ...) walk the
// module, so they live a layer up, in kiln/nn/weights.hpp.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "kiln/core/crc32c.hpp"
#include "kiln/core/transfer.hpp"
#include "kiln/io/atomic_file.hpp"
#include "kiln/io/json.hpp"
#include "kiln/io/safetensors.hpp"

namespace kiln::io {

inline constexpr std::string_view checkpoint_format = "kiln.checkpoint";
inline constexpr std::int64_t checkpoint_version = 1;

class checkpoint_writer {
 public:
  checkpoint_writer() : state_(json::object()) {}

  json& state() { return state_; }
  template <element T, device Dev>
  void add(const std::string& name, const tensor<T, Dev>& t) {
    st_.add(name, t);
    names_.push_back(name);
  }
  std::size_t num_tensors() const { return st_.size(); }
  // The tensors alone as safetensors bytes, for an in-memory snapshot.
  std::vector<std::byte> tensor_bytes() { return st_.serialize(); }

  void write(const std::filesystem::path& path) {
    st_.set_metadata("format", std::string(checkpoint_format));
    st_.set_metadata("kiln.version", std::to_string(checkpoint_version));
    st_.set_metadata("kiln.state", state_.dump());
    // The sums are taken in the write loop, on each piece while it is in cache; the header
    // goes out last, into room sized by the widest sums.
    std::vector<std::uint32_t> sums(names_.size(), 0xFFFFFFFFu);
    st_.set_metadata("kiln.crc32c", crc_json(sums));
    std::fill(sums.begin(), sums.end(), 0u);
    st_.write_watched(
        path, [&](std::size_t i, std::span<const std::byte> b) { sums[i] = crc32c(b.data(), b.size(), sums[i]); },
        [&] { st_.set_metadata("kiln.crc32c", crc_json(sums)); });
  }

 private:
  std::string crc_json(const std::vector<std::uint32_t>& sums) const {
    json::object_type o;
    o.reserve(sums.size());
    for (std::size_t i = 0; i < sums.size(); ++i) o.emplace_back(names_[i], json(static_cast<std::int64_t>(sums[i])));
    return json(std::move(o)).dump();
  }

  safetensors_writer st_;
  std::vector<std::string> names_;  // in the order of add(), as the writer counts them
  json state_;
};

// Files written beside a checkpoint, one set per rank: ZeRO's optimizer shards. Each is a
// checkpoint-format file of its own (atomic, CRC-32C per tensor) named
// "<checkpoint file name>.<tag>.<what>.safetensors", the tag unique to one save, so a new
// save never overwrites the shards an older checkpoint still points to.
struct checkpoint_shards {
  std::filesystem::path main;                                              // the checkpoint being written
  std::string tag;                                                         // the same on every rank
  std::vector<std::pair<std::filesystem::path, checkpoint_writer>> files;  // this rank's, to write
  std::string file_name(std::string_view what) const {
    return main.filename().string() + "." + tag + "." + std::string(what) + ".safetensors";
  }
};

class checkpoint_reader {
 public:
  // Opens, validates (header, format, version) and verifies every tensor's checksum.
  static checkpoint_reader open(const std::filesystem::path& path, bool verify_checksums = true) {
    KILN_CHECK(std::filesystem::exists(path), "checkpoint ", path.string(), " does not exist");
    checkpoint_reader r;
    r.file_ = safetensors_file::open(path);
    const std::string name = path.string();
    const auto fmt = r.file_.metadata("format");
    KILN_CHECK(fmt && *fmt == checkpoint_format, name, ": not a kiln checkpoint (metadata format is ",
               fmt ? "'" + *fmt + "'" : std::string("absent"),
               ", expected 'kiln.checkpoint'); plain weights load with kiln::io::load_weights");
    const auto ver = r.file_.metadata("kiln.version");
    KILN_CHECK(ver.has_value(), name, ": checkpoint metadata has no kiln.version");
    std::int64_t v = -1;
    try {
      v = json::parse(*ver, name + " (kiln.version)").as_int("kiln.version");
    } catch (const error&) {
      detail::fail(name, ": kiln.version '", *ver, "' is not an integer");
    }
    KILN_CHECK(v == checkpoint_version, name, ": checkpoint format version ", v, " is not supported (this kiln reads ",
               "version ", checkpoint_version, ")");
    const auto st = r.file_.metadata("kiln.state");
    KILN_CHECK(st.has_value(), name, ": checkpoint metadata has no kiln.state");
    r.state_ = json::parse(*st, name + " (kiln.state)");
    KILN_CHECK(r.state_.is_object(), name, ": kiln.state is not a JSON object");
    if (verify_checksums) {
      const auto crc = r.file_.metadata("kiln.crc32c");
      KILN_CHECK(crc.has_value(), name, ": checkpoint metadata has no kiln.crc32c");
      const json sums = json::parse(*crc, name + " (kiln.crc32c)");
      for (auto& e : r.file_.tensors()) {
        const json* want = sums.find(e.name);
        KILN_CHECK(want != nullptr, name, ": tensor '", e.name, "' has no checksum in kiln.crc32c");
        auto b = r.file_.bytes(e);
        const auto got = static_cast<std::int64_t>(crc32c(b.data(), b.size()));
        KILN_CHECK(got == want->as_int(e.name + " checksum"), name, ": tensor '", e.name,
                   "' is corrupt: its bytes' CRC-32C does not match the one recorded when it was written");
      }
    }
    return r;
  }

  const json& state() const { return state_; }
  const safetensors_file& file() const { return file_; }
  const std::string& name() const { return file_.name(); }
  // Names of tensors under "<section>/", without the prefix.
  std::vector<std::string> names_in(std::string_view section) const {
    std::vector<std::string> out;
    const std::string p = std::string(section) + "/";
    for (auto& e : file_.tensors())
      if (e.name.starts_with(p)) out.push_back(e.name.substr(p.size()));
    return out;
  }

 private:
  safetensors_file file_;
  json state_;
};

// Whole state tensors ("<param>.<slot>") reassembled from a sharded optimizer's files:
// every file is opened and verified (format, CRC-32C), its rank, world and range checked
// against the layout, and its flat slots copied into place. Any world size, any strategy.
template <class T>
std::map<std::string, tensor<T>> load_optimizer_shards(const checkpoint_reader& r, const json& sh,
                                                       const std::string& where) {
  const std::filesystem::path dir = std::filesystem::path(r.name()).parent_path();
  const std::int64_t world = sh.at("world").as_int(where + " shards.world");
  const std::int64_t total = sh.at("total").as_int(where + " shards.total");
  const auto& files = sh.at("files").as_array(where + " shards.files");
  KILN_CHECK(static_cast<std::int64_t>(files.size()) == world, where, ": ", files.size(), " shard files listed for ",
             world, " ranks");
  std::vector<std::string> slots;
  for (auto& v : sh.at("slots").as_array()) slots.push_back(v.as_string(where + " shards.slots"));
  std::map<std::string, std::vector<T>> flat;
  for (auto& sl : slots) flat[sl].assign(static_cast<std::size_t>(total), T(0));
  std::int64_t covered = 0;
  for (std::int64_t rk = 0; rk < world; ++rk) {
    const auto p = dir / files[static_cast<std::size_t>(rk)].as_string(where + " shards.files");
    KILN_CHECK(std::filesystem::exists(p), where, ": optimizer shard ", p.string(), " (rank ", rk, " of ", world,
               ") is missing: a sharded checkpoint's files must stay together in one directory");
    const auto f = checkpoint_reader::open(p);
    const json& st = f.state();
    KILN_CHECK(st.at("rank").as_int() == rk && st.at("world").as_int() == world, p.string(), ": holds rank ",
               st.at("rank").as_int(), " of ", st.at("world").as_int(), ", the checkpoint lists it as rank ", rk,
               " of ", world);
    const std::int64_t b = st.at("begin").as_int(), e = st.at("end").as_int();
    KILN_CHECK(b == covered && e >= b && e <= total, p.string(), ": range [", b, ", ", e, ") does not continue [0, ",
               covered, ") of ", total, " elements");
    covered = e;
    for (auto& sl : slots) {
      KILN_CHECK(f.file().contains(sl), p.string(), ": missing slot '", sl, "'");
      const auto t = f.file().template load<T>(sl);
      KILN_CHECK(t.numel() == e - b, p.string(), ": slot '", sl, "' has ", t.numel(), " elements, the range ", e - b);
      std::memcpy(flat[sl].data() + b, t.data(), static_cast<std::size_t>(e - b) * sizeof(T));
    }
  }
  KILN_CHECK(covered == total, where, ": the shards cover ", covered, " of ", total, " elements");
  std::map<std::string, tensor<T>> out;
  for (auto& pj : sh.at("params").as_array()) {
    const std::string name = pj.at("name").as_string(where + " shards.params.name");
    const std::int64_t off = pj.at("offset").as_int(where + " shards.params.offset");
    std::vector<std::int64_t> dims;
    for (auto& d : pj.at("shape").as_array()) dims.push_back(d.as_int(where + " shards.params.shape"));
    const kiln::shape shp{std::span<const std::int64_t>(dims)};
    KILN_CHECK(off >= 0 && off + shp.numel() <= total, where, ": parameter '", name, "' lies outside the shards");
    for (auto& sl : slots) {
      tensor<T> t(shp);
      std::memcpy(t.data(), flat[sl].data() + off, static_cast<std::size_t>(shp.numel()) * sizeof(T));
      out.emplace(name + "." + sl, std::move(t));
    }
  }
  return out;
}

// Removes the shard files written beside checkpoint `main` ("<name>.<tag>.*.rank*.safetensors"),
// except those of tag `keep`.
inline void remove_checkpoint_shards(const std::filesystem::path& main, const std::string& keep = {}) {
  namespace fs = std::filesystem;
  const std::string prefix = main.filename().string() + ".", kept = prefix + keep + ".";
  const fs::path dir = main.parent_path().empty() ? fs::path(".") : main.parent_path();
  std::error_code ec;
  for (auto& e : fs::directory_iterator(dir, ec)) {
    const std::string n = e.path().filename().string();
    if (n.starts_with(prefix) && n.ends_with(".safetensors") && n.find(".rank") != std::string::npos &&
        (keep.empty() || !n.starts_with(kept)))
      fs::remove(e.path(), ec);
  }
}

}  // namespace kiln::io
