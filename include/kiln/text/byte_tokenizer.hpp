// kiln/text/byte_tokenizer.hpp — the simplest tokenizers: one token per byte.
//
// Spec:
//   byte_tokenizer: ids 0..255 are the byte values; special tokens (e.g. "<|endoftext|>")
//     get ids 256, 257, ... in the order given. vocab_size() = 256 + #special.
//   char_tokenizer: nanoGPT's shakespeare_char vocabulary — the distinct bytes of a corpus,
//     sorted by value, get ids 0..k-1; special tokens follow. Its vocabulary is smaller, so
//     a byte it never saw has no id: encode() throws kiln::error naming the byte (hex and,
//     when printable, the character) and its byte offset. There is no unknown-token
//     fallback on purpose — a silent <unk> would train a model on corrupted text; build the
//     vocabulary from a corpus that covers what you encode. save()/load() use a small JSON
//     file: {"type": "kiln.char_tokenizer", "version": 1, "bytes": [10, 32, ...],
//     "special_tokens": ["<|endoftext|>"]} (bytes as numbers: a lone byte of a multi-byte
//     UTF-8 character is no valid JSON string).
//   Both: encode(text) recognises the special tokens' contents in text (leftmost-longest,
//   never split); encode_ordinary(text) treats every byte as text. decode(ids) returns the
//   exact bytes (special tokens as their content, or dropped with skip_special), so
//   decode(encode(s)) == s for every byte string s — valid UTF-8 or not. Ids outside the
//   vocabulary are errors naming the id and its position.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "kiln/core/error.hpp"
#include "kiln/io/atomic_file.hpp"
#include "kiln/io/json.hpp"
#include "kiln/text/added_tokens.hpp"

namespace kiln::text {

namespace detail {
inline std::string describe_byte(unsigned char c) {
  static const char* hex = "0123456789ABCDEF";
  std::string s = "0x";
  s += hex[c >> 4];
  s += hex[c & 15];
  if (c >= 0x20 && c < 0x7f) s += std::string(" ('") + static_cast<char>(c) + "')";
  return s;
}
inline std::string read_whole_file(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  KILN_CHECK(f.good(), "cannot open ", path.string());
  std::string s((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  KILN_CHECK(!f.bad(), "failed reading ", path.string());
  return s;
}
}  // namespace detail

class byte_tokenizer {
 public:
  explicit byte_tokenizer(std::vector<std::string> special_tokens = {}) : special_(std::move(special_tokens)) {
    for (std::size_t k = 0; k < special_.size(); ++k) matcher_.add(special_[k], 256 + static_cast<std::int32_t>(k));
  }
  std::int32_t vocab_size() const { return 256 + static_cast<std::int32_t>(special_.size()); }
  const std::vector<std::string>& special_tokens() const { return special_; }
  // The id of a special token's content, or -1.
  std::int32_t special_id(std::string_view content) const {
    for (std::size_t k = 0; k < special_.size(); ++k)
      if (special_[k] == content) return 256 + static_cast<std::int32_t>(k);
    return -1;
  }

  std::vector<std::int32_t> encode_ordinary(std::string_view text) const {
    std::vector<std::int32_t> out(text.size());
    for (std::size_t i = 0; i < text.size(); ++i) out[i] = static_cast<unsigned char>(text[i]);
    return out;
  }
  std::vector<std::int32_t> encode(std::string_view text) const {
    if (matcher_.empty()) return encode_ordinary(text);
    std::vector<std::int32_t> out;
    out.reserve(text.size());
    matcher_.split(
        text,
        [&](std::string_view t) {
          for (unsigned char c : t) out.push_back(c);
        },
        [&](std::int32_t id) { out.push_back(id); });
    return out;
  }
  std::string decode(std::span<const std::int32_t> ids, bool skip_special = false) const {
    std::string out;
    out.reserve(ids.size());
    for (std::size_t k = 0; k < ids.size(); ++k) {
      const std::int32_t id = ids[k];
      KILN_CHECK(id >= 0 && id < vocab_size(), "byte_tokenizer.decode: id ", id, " at position ", k,
                 " is outside the vocabulary [0, ", vocab_size(), ")");
      if (id < 256)
        out += static_cast<char>(id);
      else if (!skip_special)
        out += special_[static_cast<std::size_t>(id - 256)];
    }
    return out;
  }

 private:
  std::vector<std::string> special_;
  added_token_matcher matcher_;
};

class char_tokenizer {
 public:
  char_tokenizer() = default;
  // The vocabulary: the distinct bytes of `corpus` (the special tokens' text excluded
  // only if it occurs nowhere else), then the special tokens.
  static char_tokenizer from_text(std::string_view corpus, std::vector<std::string> special_tokens = {}) {
    std::array<bool, 256> seen{};
    for (unsigned char c : corpus) seen[c] = true;
    std::vector<std::uint8_t> bytes;
    for (int b = 0; b < 256; ++b)
      if (seen[static_cast<std::size_t>(b)]) bytes.push_back(static_cast<std::uint8_t>(b));
    return char_tokenizer(std::move(bytes), std::move(special_tokens));
  }
  char_tokenizer(std::vector<std::uint8_t> bytes, std::vector<std::string> special_tokens)
      : bytes_(std::move(bytes)), special_(std::move(special_tokens)) {
    id_of_.fill(-1);
    for (std::size_t k = 0; k < bytes_.size(); ++k) {
      KILN_CHECK(k == 0 || bytes_[k] > bytes_[k - 1], "char_tokenizer: bytes must be strictly increasing; byte ",
                 int(bytes_[k]), " at position ", k, " follows ", int(bytes_[k - 1]));
      id_of_[bytes_[k]] = static_cast<std::int32_t>(k);
    }
    for (std::size_t k = 0; k < special_.size(); ++k)
      matcher_.add(special_[k], static_cast<std::int32_t>(bytes_.size() + k));
  }

  std::int32_t vocab_size() const { return static_cast<std::int32_t>(bytes_.size() + special_.size()); }
  const std::vector<std::uint8_t>& bytes() const { return bytes_; }
  const std::vector<std::string>& special_tokens() const { return special_; }
  std::int32_t special_id(std::string_view content) const {
    for (std::size_t k = 0; k < special_.size(); ++k)
      if (special_[k] == content) return static_cast<std::int32_t>(bytes_.size() + k);
    return -1;
  }

  std::vector<std::int32_t> encode_ordinary(std::string_view text) const {
    std::vector<std::int32_t> out;
    append(text, 0, out);
    return out;
  }
  std::vector<std::int32_t> encode(std::string_view text) const {
    if (matcher_.empty()) return encode_ordinary(text);
    std::vector<std::int32_t> out;
    out.reserve(text.size());
    matcher_.split(
        text, [&](std::string_view t) { append(t, static_cast<std::size_t>(t.data() - text.data()), out); },
        [&](std::int32_t id) { out.push_back(id); });
    return out;
  }
  std::string decode(std::span<const std::int32_t> ids, bool skip_special = false) const {
    std::string out;
    out.reserve(ids.size());
    const auto nb = static_cast<std::int32_t>(bytes_.size());
    for (std::size_t k = 0; k < ids.size(); ++k) {
      const std::int32_t id = ids[k];
      KILN_CHECK(id >= 0 && id < vocab_size(), "char_tokenizer.decode: id ", id, " at position ", k,
                 " is outside the vocabulary [0, ", vocab_size(), ")");
      if (id < nb)
        out += static_cast<char>(bytes_[static_cast<std::size_t>(id)]);
      else if (!skip_special)
        out += special_[static_cast<std::size_t>(id - nb)];
    }
    return out;
  }

  io::json to_json() const {
    io::json j = io::json::object();
    j.set("type", "kiln.char_tokenizer");
    j.set("version", 1);
    io::json b = io::json::array();
    for (auto c : bytes_) b.push_back(static_cast<int>(c));
    j.set("bytes", std::move(b));
    io::json s = io::json::array();
    for (auto& t : special_) s.push_back(t);
    j.set("special_tokens", std::move(s));
    return j;
  }
  void save(const std::filesystem::path& path) const { io::write_atomically(path, to_json().dump() + "\n"); }

  static char_tokenizer from_json(std::string_view text, std::string_view what = "char_tokenizer JSON") {
    const io::json j = io::json::parse(text, what);
    const std::string w(what);
    KILN_CHECK(j.is_object(), w, ": expected a JSON object, got ", j.describe());
    const io::json* type = j.find("type");
    KILN_CHECK(type && type->is_string() && type->as_string() == "kiln.char_tokenizer", w,
               ": field \"type\": expected \"kiln.char_tokenizer\", got ", type ? type->describe() : "nothing");
    const io::json* version = j.find("version");
    KILN_CHECK(version && version->is_integer() && version->as_int() == 1, w, ": field \"version\": expected 1, got ",
               version ? version->describe() : "nothing");
    const io::json* bytes = j.find("bytes");
    KILN_CHECK(bytes && bytes->is_array(), w, ": field \"bytes\": expected an array of byte values, got ",
               bytes ? bytes->describe() : "nothing");
    std::vector<std::uint8_t> bv;
    for (std::size_t k = 0; k < bytes->size(); ++k) {
      const io::json& e = bytes->as_array()[k];
      KILN_CHECK(e.is_integer() && e.as_int() >= 0 && e.as_int() <= 255, w, ": field \"bytes\"[", k,
                 "]: expected an integer in [0, 255], got ", e.describe());
      bv.push_back(static_cast<std::uint8_t>(e.as_int()));
    }
    std::vector<std::string> sv;
    if (const io::json* s = j.find("special_tokens")) {
      KILN_CHECK(s->is_array(), w, ": field \"special_tokens\": expected an array of strings, got ", s->describe());
      for (std::size_t k = 0; k < s->size(); ++k) {
        const io::json& e = s->as_array()[k];
        KILN_CHECK(e.is_string(), w, ": field \"special_tokens\"[", k, "]: expected a string, got ", e.describe());
        sv.push_back(e.as_string());
      }
    }
    try {
      return char_tokenizer(std::move(bv), std::move(sv));
    } catch (error& e) {
      throw e.with_context("while reading " + w);
    }
  }
  static char_tokenizer load(const std::filesystem::path& path) {
    return from_json(detail::read_whole_file(path), path.string());
  }

 private:
  void append(std::string_view t, std::size_t base, std::vector<std::int32_t>& out) const {
    for (std::size_t i = 0; i < t.size(); ++i) {
      const auto c = static_cast<unsigned char>(t[i]);
      const std::int32_t id = id_of_[c];
      KILN_CHECK(id >= 0, "char_tokenizer.encode: byte ", detail::describe_byte(c), " at offset ", base + i,
                 " is not in the vocabulary (", bytes_.size(), " distinct bytes of the corpus it was built from)");
      out.push_back(id);
    }
  }
  std::vector<std::uint8_t> bytes_;
  std::vector<std::string> special_;
  std::array<std::int32_t, 256> id_of_{};
  added_token_matcher matcher_;
};

}  // namespace kiln::text
