// kiln/data/text.hpp — text corpora, token streams and next-token-prediction blocks.
//
// Spec:
//   read_text(path, options) reads one file, or every file under a folder, into one string.
//     Folder rule, chosen for corpora such as /usr/share/games/fortunes (text files, each
//     beside a binary `.dat` index and a `.u8` symlink to itself):
//       - recursive (options.recursive), files taken in sorted order of their path relative
//         to the folder (byte-wise), so the result is the same on every machine;
//       - symbolic links are skipped, to files and to folders alike: a link adds no text of
//         its own (the `.u8` links would double the corpus) and cannot make a cycle;
//       - names starting with '.' are skipped, and names ending in one of
//         options.skip_extensions (default {".dat"});
//       - a file with a NUL byte is binary and skipped (strfile's `.dat` indexes have them,
//         text never does); other bytes — invalid UTF-8, backspace overstriking — are kept.
//     A path naming a file is read whatever its name. Files are joined with
//     options.separator (default: nothing). text_corpus keeps where each file starts.
//     No file left to read is an error naming the folder.
//   token_stream: a read-only sequence of token ids, either owned (std::vector<int32>) or a
//     memory-mapped .bin file (kiln/data/token_bin.hpp); copies share the tokens;
//     slice(b, e) is a zero-copy sub-stream.
//   lm_blocks: a dataset (kiln/data/dataset.hpp) of fixed-length blocks for next-token
//     prediction, nanoGPT's: sample i has x = tokens[o : o+T] and y = tokens[o+1 : o+T+1].
//     lm_sampling::sequential: o = i·T, the non-overlapping blocks in order, size (N-1)/T
//       (every token but the last (N-1) mod T is an input once) — for validation.
//     lm_sampling::random: o uniform in [0, N-T-1], drawn from philox(seed, i) — a pure
//       function of (seed, i), so any sample can be recomputed anywhere. size() is
//       options.samples (default (N-1)/T, one epoch ≈ one pass over the tokens). With the
//       data_loader, whose batch order is a pure function of (loader seed, epoch), the whole
//       run is deterministic and resumes at any batch. An "epoch" visits a fixed set of
//       windows (a new order each epoch when shuffle is on). For nanoGPT's fresh windows
//       every step, set samples = steps × batch and train one epoch: the samples are
//       already random, so the loader need not shuffle.
//     get(i) returns lm_sample {x, y} ([T] each); get_batch(indices) fills lm_batch
//     {x, y} ([B, T] each, int64) directly. Indices out of range are errors.
//   train_val_split(stream, fraction) → the first floor(fraction·N) tokens and the rest.
//   tokenize(corpus, tokenizer, separator) encodes each file of a corpus and joins them with
//     an optional separator token (e.g. <|endoftext|>) into an owned token_stream.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kiln/core/error.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/data/token_bin.hpp"

namespace kiln::data {

struct text_read_options {
  bool recursive = true;
  std::vector<std::string> skip_extensions{".dat"};
  std::string separator;  // put between files
};

struct text_corpus {
  std::string text;
  std::vector<std::filesystem::path> files;  // in the order read
  std::vector<std::size_t> starts;           // byte offset of each file in text
  std::vector<std::size_t> sizes;            // its length in bytes
  // File k's text (without the separator).
  std::string_view file_text(std::size_t k) const { return std::string_view(text).substr(starts.at(k), sizes.at(k)); }
};

namespace detail {
inline std::string read_file_bytes(const std::filesystem::path& p) {
  std::ifstream f(p, std::ios::binary);
  KILN_CHECK(f.good(), "read_text: cannot open ", p.string());
  f.seekg(0, std::ios::end);
  const auto n = static_cast<std::size_t>(f.tellg());
  f.seekg(0);
  std::string s(n, '\0');
  f.read(s.data(), static_cast<std::streamsize>(n));
  KILN_CHECK(static_cast<std::size_t>(f.gcount()) == n, "read_text: failed reading ", p.string());
  return s;
}
}  // namespace detail

inline text_corpus read_text(const std::filesystem::path& path, const text_read_options& o = {}) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const auto st = fs::status(path, ec);
  KILN_CHECK(!ec && fs::exists(st), "read_text: ", path.string(), " does not exist");
  text_corpus c;
  const auto add = [&](const fs::path& p, std::string bytes) {
    if (!c.files.empty()) c.text += o.separator;
    c.starts.push_back(c.text.size());
    c.sizes.push_back(bytes.size());
    c.files.push_back(p);
    c.text += bytes;
  };
  if (!fs::is_directory(st)) {
    add(path, detail::read_file_bytes(path));
    return c;
  }
  std::vector<fs::path> files;
  const auto consider = [&](const fs::directory_entry& e) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name[0] == '.' || e.is_symlink() || !e.is_regular_file()) return;
    for (auto& ext : o.skip_extensions)
      if (name.size() >= ext.size() && name.compare(name.size() - ext.size(), ext.size(), ext) == 0) return;
    files.push_back(e.path());
  };
  if (o.recursive) {
    for (auto it = fs::recursive_directory_iterator(path, fs::directory_options::none);
         it != fs::recursive_directory_iterator(); ++it) {
      const std::string name = it->path().filename().string();
      if (it->is_directory() && !it->is_symlink() && !name.empty() && name[0] == '.') {
        it.disable_recursion_pending();
        continue;
      }
      consider(*it);
    }
  } else {
    for (auto& e : fs::directory_iterator(path)) consider(e);
  }
  std::sort(files.begin(), files.end(), [&](const fs::path& a, const fs::path& b) {
    return a.lexically_relative(path).generic_string() < b.lexically_relative(path).generic_string();
  });
  for (auto& p : files) {
    std::string bytes = detail::read_file_bytes(p);
    if (bytes.find('\0') != std::string::npos) continue;  // binary
    add(p, std::move(bytes));
  }
  KILN_CHECK(!c.files.empty(), "read_text: no text file under ", path.string(),
             " (symlinks, hidden names, binary files with NUL bytes and the extensions skipped are left out)");
  return c;
}

class token_stream {
 public:
  token_stream() = default;
  explicit token_stream(std::vector<std::int32_t> tokens) {
    auto v = std::make_shared<const std::vector<std::int32_t>>(std::move(tokens));
    base_ = v->data();
    size_ = static_cast<std::int64_t>(v->size());
    owner_ = std::move(v);
    kind_ = kind::i32;
  }
  // A memory-mapped llm.c .bin file (validated; tokens >= vocab_size are errors).
  static token_stream open_bin(const std::filesystem::path& path,
                               std::optional<std::int64_t> vocab_size = std::nullopt) {
    const token_bin_file f = token_bin_file::open(path, vocab_size);
    token_stream s;
    s.owner_ = f.mapping();
    s.size_ = f.size();
    s.kind_ = f.width() == 2 ? kind::u16 : kind::u32;
    s.base_ = f.width() == 2 ? static_cast<const void*>(f.u16().data()) : static_cast<const void*>(f.u32().data());
    KILN_CHECK(s.kind_ == kind::u16 || f.first_at_least(std::int64_t{1} << 31) < 0, path.string(),
               ": a token is >= 2^31, which kiln's int32 token ids cannot hold");
    return s;
  }

  std::int64_t size() const { return size_; }
  std::int32_t operator[](std::int64_t i) const {
    KILN_CHECK(i >= 0 && i < size_, "token_stream: index ", i, " is outside [0, ", size_, ")");
    return load(i);
  }
  token_stream slice(std::int64_t begin, std::int64_t end) const {
    KILN_CHECK(0 <= begin && begin <= end && end <= size_, "token_stream.slice(", begin, ", ", end, "): outside [0, ",
               size_, "]");
    token_stream s = *this;
    s.base_ = static_cast<const char*>(base_) + begin * width();
    s.size_ = end - begin;
    return s;
  }
  // Copies tokens [begin, begin + n) to out as int64.
  void copy_to(std::int64_t begin, std::int64_t n, std::int64_t* out) const {
    KILN_CHECK(begin >= 0 && n >= 0 && begin + n <= size_, "token_stream: range [", begin, ", ", begin + n,
               ") is outside [0, ", size_, ")");
    switch (kind_) {
      case kind::i32:
        std::copy_n(static_cast<const std::int32_t*>(base_) + begin, n, out);
        break;
      case kind::u16:
        std::copy_n(static_cast<const std::uint16_t*>(base_) + begin, n, out);
        break;
      case kind::u32:
        std::copy_n(static_cast<const std::uint32_t*>(base_) + begin, n, out);
        break;
    }
  }
  std::vector<std::int32_t> to_vector() const {
    std::vector<std::int32_t> v(static_cast<std::size_t>(size_));
    for (std::int64_t i = 0; i < size_; ++i) v[static_cast<std::size_t>(i)] = load(i);
    return v;
  }
  bool memory_mapped() const { return kind_ != kind::i32; }

 private:
  enum class kind { i32, u16, u32 };
  int width() const { return kind_ == kind::u16 ? 2 : 4; }
  std::int32_t load(std::int64_t i) const {
    switch (kind_) {
      case kind::i32:
        return static_cast<const std::int32_t*>(base_)[i];
      case kind::u16:
        return static_cast<const std::uint16_t*>(base_)[i];
      default:
        return static_cast<std::int32_t>(static_cast<const std::uint32_t*>(base_)[i]);
    }
  }
  std::shared_ptr<const void> owner_;
  const void* base_ = nullptr;
  std::int64_t size_ = 0;
  kind kind_ = kind::i32;
};

struct split_streams {
  token_stream train, val;
};
// The first floor(train_fraction · N) tokens, and the rest (nanoGPT's 90% / 10%).
inline split_streams train_val_split(const token_stream& s, double train_fraction = 0.9) {
  KILN_CHECK(train_fraction >= 0 && train_fraction <= 1, "train_val_split: fraction ", train_fraction,
             " is outside [0, 1]");
  const auto cut = static_cast<std::int64_t>(std::floor(train_fraction * static_cast<double>(s.size())));
  return {s.slice(0, cut), s.slice(cut, s.size())};
}

// Encodes each file of a corpus with tok.encode and joins them, with `separator` (e.g. the
// id of <|endoftext|>) between files when given.
template <class Tokenizer>
token_stream tokenize(const text_corpus& c, const Tokenizer& tok,
                      std::optional<std::int32_t> separator = std::nullopt) {
  std::vector<std::int32_t> all;
  for (std::size_t k = 0; k < c.files.size(); ++k) {
    if (k > 0 && separator) all.push_back(*separator);
    const auto ids = tok.encode(c.file_text(k));
    all.insert(all.end(), ids.begin(), ids.end());
  }
  return token_stream(std::move(all));
}

enum class lm_sampling { random, sequential };

struct lm_blocks_options {
  std::int64_t block_size = 256;  // T
  lm_sampling sampling = lm_sampling::random;
  std::uint64_t seed = 0;    // random: which windows
  std::int64_t samples = 0;  // random: samples per epoch; 0 = (N-1)/T
};

struct lm_sample {
  tensor<i64> x, y;  // [T]
};
struct lm_batch {
  tensor<i64> x, y;  // [B, T]
  std::int64_t size() const { return x.rank() ? x.size(0) : 0; }
};

class lm_blocks {
 public:
  lm_blocks(token_stream tokens, lm_blocks_options o) : s_(std::move(tokens)), o_(o) {
    const std::int64_t T = o_.block_size, N = s_.size();
    KILN_CHECK(T >= 1, "lm_blocks: block_size = ", T, ", expected >= 1");
    KILN_CHECK(N >= T + 1, "lm_blocks: ", N, " tokens are too few for one block of ", T,
               " inputs plus the next-token target (need >= ", T + 1, ")");
    KILN_CHECK(o_.samples >= 0, "lm_blocks: samples = ", o_.samples, ", expected >= 0 (0: one per block)");
    n_ = o_.sampling == lm_sampling::sequential || o_.samples == 0 ? (N - 1) / T : o_.samples;
  }
  std::int64_t size() const { return n_; }
  std::int64_t block_size() const { return o_.block_size; }
  const lm_blocks_options& options() const { return o_; }
  const token_stream& tokens() const { return s_; }

  // Where sample i starts in the stream.
  std::int64_t offset(std::int64_t i) const {
    KILN_CHECK(i >= 0 && i < n_, "lm_blocks: index ", i, " is out of range for a dataset of ", n_, " blocks");
    if (o_.sampling == lm_sampling::sequential) return i * o_.block_size;
    const auto range = static_cast<std::uint64_t>(s_.size() - o_.block_size);  // offsets 0 .. N-T-1
    const philox_stream st{o_.seed ^ 0x6C6D5F626C6B73ULL, 0};                  // "lm_blks"
    const std::uint64_t r = (static_cast<std::uint64_t>(st.bits(2 * static_cast<std::uint64_t>(i))) << 32) |
                            st.bits(2 * static_cast<std::uint64_t>(i) + 1);
    return static_cast<std::int64_t>(r % range);  // 64 random bits: the modulo bias is < range / 2^64
  }
  lm_sample get(std::int64_t i) const {
    const std::int64_t o = offset(i), T = o_.block_size;
    lm_sample s{tensor<i64>({T}), tensor<i64>({T})};
    s_.copy_to(o, T, s.x.data());
    s_.copy_to(o + 1, T, s.y.data());
    return s;
  }
  lm_batch get_batch(std::span<const std::int64_t> idx) const {
    const std::int64_t B = static_cast<std::int64_t>(idx.size()), T = o_.block_size;
    lm_batch b{tensor<i64>({B, T}), tensor<i64>({B, T})};
    for (std::int64_t k = 0; k < B; ++k) {
      const std::int64_t o = offset(idx[static_cast<std::size_t>(k)]);
      s_.copy_to(o, T, b.x.data() + k * T);
      s_.copy_to(o + 1, T, b.y.data() + k * T);
    }
    return b;
  }

 private:
  token_stream s_;
  lm_blocks_options o_;
  std::int64_t n_ = 0;
};

}  // namespace kiln::data
