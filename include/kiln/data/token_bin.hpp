// kiln/data/token_bin.hpp — token streams on disk in llm.c's .bin layout, memory-mapped.
//
// Format (llm.c's, so files move between the two): a header of 256 little-endian int32 —
// [0] magic, [1] version, [2] token count, the rest zero — then `count` tokens, nothing
// after them. Two kinds exist, both written and read here:
//   magic 20240520, version 1: uint16 tokens (GPT-2's 50257-token vocabulary fits);
//   magic 20240801, version 7: uint32 tokens (llm.c's choice for LLaMA-3's 128k vocabulary).
// The header is 1024 bytes, so the tokens of a mapping are aligned for either width.
//
// Spec: write_token_bin(path, tokens, width) writes atomically (kiln/io/atomic_file.hpp);
// width auto picks uint16 when every token is < 65536, else uint32. Tokens must be >= 0,
// fit the width, and number at most 2^31 - 1 (the count is an int32), else kiln::error.
// token_bin_view::parse(bytes, name, vocab_size) validates everything before returning:
// a file shorter than the header, an unknown magic, a version that does not go with the
// magic, a negative count, a size that is not exactly header + count × width, a nonzero
// reserved header word, and — when vocab_size is given — a token >= vocab_size (the first
// one is named with its index) are errors naming the file, the field, what was found and
// what was expected. token_bin_file::open(path, vocab_size) maps the file read-only (the
// tokens are never copied) and validates it the same way; views stay valid while it lives.
// Hosts must be little-endian (checked at compile time).
#pragma once

#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "kiln/core/error.hpp"
#include "kiln/io/atomic_file.hpp"
#include "kiln/io/safetensors.hpp"

namespace kiln::data {

static_assert(std::endian::native == std::endian::little, "token .bin files are little-endian; so must the host be");

enum class token_width { automatic, u16, u32 };

inline constexpr std::int32_t token_bin_magic_u16 = 20240520, token_bin_version_u16 = 1;
inline constexpr std::int32_t token_bin_magic_u32 = 20240801, token_bin_version_u32 = 7;
inline constexpr std::size_t token_bin_header_bytes = 256 * 4;

// A validated view of a .bin file's bytes (which it does not own).
class token_bin_view {
 public:
  static token_bin_view parse(std::span<const std::byte> bytes, std::string_view name = "token .bin",
                              std::optional<std::int64_t> vocab_size = std::nullopt) {
    const std::string n(name);
    KILN_CHECK(bytes.size() >= token_bin_header_bytes, n, ": ", bytes.size(),
               " bytes is shorter than the 1024-byte header (256 int32: magic, version, token count, zeros)");
    std::int32_t h[256];
    std::memcpy(h, bytes.data(), token_bin_header_bytes);
    token_bin_view v;
    if (h[0] == token_bin_magic_u16) {
      v.width_ = 2;
      KILN_CHECK(h[1] == token_bin_version_u16, n, ": header field \"version\" is ", h[1], ", expected ",
                 token_bin_version_u16, " for magic ", token_bin_magic_u16, " (uint16 tokens)");
    } else if (h[0] == token_bin_magic_u32) {
      v.width_ = 4;
      KILN_CHECK(h[1] == token_bin_version_u32, n, ": header field \"version\" is ", h[1], ", expected ",
                 token_bin_version_u32, " for magic ", token_bin_magic_u32, " (uint32 tokens)");
    } else {
      kiln::detail::fail(n, ": header field \"magic\" is ", h[0], ", expected ", token_bin_magic_u16,
                         " (uint16 tokens) or ", token_bin_magic_u32, " (uint32 tokens): not an llm.c token file");
    }
    KILN_CHECK(h[2] >= 0, n, ": header field \"count\" is ", h[2], ", expected a token count >= 0");
    for (int k = 3; k < 256; ++k)
      KILN_CHECK(h[k] == 0, n, ": header word ", k, " is ", h[k], ", expected 0 (reserved)");
    v.count_ = h[2];
    const std::uint64_t want = token_bin_header_bytes + static_cast<std::uint64_t>(v.count_) * v.width_;
    KILN_CHECK(bytes.size() == want, n, ": file size is ", bytes.size(), " bytes, expected ", want,
               " (1024-byte header + header field \"count\" = ", v.count_, " tokens × ", v.width_, " bytes)",
               bytes.size() < want ? ": the file is truncated" : ": trailing bytes after the tokens");
    v.data_ = bytes.data() + token_bin_header_bytes;
    if (vocab_size) {
      const std::int64_t i = v.first_at_least(*vocab_size);
      KILN_CHECK(i < 0, n, ": token ", i, " is ", i >= 0 ? v.at(i) : 0, ", expected < vocab_size ", *vocab_size);
    }
    return v;
  }

  std::int64_t size() const { return count_; }
  int width() const { return static_cast<int>(width_); }  // bytes per token: 2 or 4
  std::uint32_t at(std::int64_t i) const {
    if (width_ == 2) {
      std::uint16_t t;
      std::memcpy(&t, data_ + 2 * i, 2);
      return t;
    }
    std::uint32_t t;
    std::memcpy(&t, data_ + 4 * i, 4);
    return t;
  }
  // The tokens as they lie in the file (width() says which one is valid).
  std::span<const std::uint16_t> u16() const {
    KILN_CHECK(width_ == 2, "token_bin_view::u16: the file holds uint32 tokens");
    return {reinterpret_cast<const std::uint16_t*>(data_), static_cast<std::size_t>(count_)};
  }
  std::span<const std::uint32_t> u32() const {
    KILN_CHECK(width_ == 4, "token_bin_view::u32: the file holds uint16 tokens");
    return {reinterpret_cast<const std::uint32_t*>(data_), static_cast<std::size_t>(count_)};
  }
  // Index of the first token >= limit, or -1.
  std::int64_t first_at_least(std::int64_t limit) const {
    for (std::int64_t i = 0; i < count_; ++i)
      if (static_cast<std::int64_t>(at(i)) >= limit) return i;
    return -1;
  }

 private:
  const std::byte* data_ = nullptr;
  std::int64_t count_ = 0;
  std::size_t width_ = 2;
};

// A .bin file, memory-mapped and validated.
class token_bin_file : public token_bin_view {
 public:
  static token_bin_file open(const std::filesystem::path& path, std::optional<std::int64_t> vocab_size = std::nullopt) {
    token_bin_file f;
    f.map_ = std::make_shared<io::mapped_file>(path);
    static_cast<token_bin_view&>(f) = token_bin_view::parse(f.map_->bytes(), path.string(), vocab_size);
    return f;
  }
  const std::filesystem::path& path() const { return map_->path(); }
  // The mapping, shared: a holder keeps the views alive.
  const std::shared_ptr<io::mapped_file>& mapping() const { return map_; }

 private:
  std::shared_ptr<io::mapped_file> map_;  // stable address: the view points into it
};

inline void write_token_bin(const std::filesystem::path& path, std::span<const std::int32_t> tokens,
                            token_width width = token_width::automatic) {
  KILN_CHECK(tokens.size() <= 0x7FFFFFFFu, "write_token_bin ", path.string(), ": ", tokens.size(),
             " tokens, but the header's count field holds at most 2^31 - 1");
  std::int32_t max = 0;
  for (std::size_t i = 0; i < tokens.size(); ++i) {
    KILN_CHECK(tokens[i] >= 0, "write_token_bin ", path.string(), ": token ", i, " is ", tokens[i], ", expected >= 0");
    max = std::max(max, tokens[i]);
  }
  if (width == token_width::automatic) width = max < 65536 ? token_width::u16 : token_width::u32;
  KILN_CHECK(width == token_width::u32 || max < 65536, "write_token_bin ", path.string(), ": token value ", max,
             " does not fit uint16 tokens (version 1); use token_width::u32");
  std::int32_t h[256] = {};
  const bool wide = width == token_width::u32;
  h[0] = wide ? token_bin_magic_u32 : token_bin_magic_u16;
  h[1] = wide ? token_bin_version_u32 : token_bin_version_u16;
  h[2] = static_cast<std::int32_t>(tokens.size());
  io::write_atomically(path, [&](std::FILE* f) {
    const auto put = [&](const void* p, std::size_t n) {
      if (std::fwrite(p, 1, n, f) != n)
        kiln::detail::fail("failed writing ", path.string(), ": ", std::strerror(errno));
    };
    put(h, sizeof h);
    constexpr std::size_t chunk = 1 << 16;
    std::vector<std::uint16_t> b16;
    std::vector<std::uint32_t> b32;
    for (std::size_t at = 0; at < tokens.size(); at += chunk) {
      const std::size_t n = std::min(chunk, tokens.size() - at);
      if (wide) {
        b32.assign(tokens.begin() + static_cast<std::ptrdiff_t>(at),
                   tokens.begin() + static_cast<std::ptrdiff_t>(at + n));
        put(b32.data(), n * 4);
      } else {
        b16.assign(tokens.begin() + static_cast<std::ptrdiff_t>(at),
                   tokens.begin() + static_cast<std::ptrdiff_t>(at + n));
        put(b16.data(), n * 2);
      }
    }
  });
}

}  // namespace kiln::data
