// kiln/data/idx.hpp — reader for the IDX format (MNIST, Fashion-MNIST), plain or gzip.
//
// Format: two zero bytes, a type byte (0x08 = unsigned byte, the only type these data
// sets use), a rank byte, then `rank` big-endian uint32 extents, then the row-major
// data. Files ending in .gz are inflated with zlib (gzread also passes plain files
// through). Every deviation — bad magic, unsupported type, absurd rank, truncated data,
// trailing bytes — is a kiln::error that names the file and what was expected.
#pragma once

#include <zlib.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <vector>

#include "kiln/core/error.hpp"
#include "kiln/core/tensor.hpp"

namespace kiln::data {

namespace detail {
// Parses an IDX image held in memory; `origin` names it in errors.
inline tensor<u8> parse_idx(const unsigned char* p, std::size_t n, const std::string& origin) {
  KILN_CHECK(n >= 4, origin, ": not an IDX file (", n, " bytes, the header alone needs 4)");
  KILN_CHECK(p[0] == 0 && p[1] == 0, origin, ": not an IDX file (magic bytes are ", int(p[0]), " ", int(p[1]),
             ", expected 0 0)");
  KILN_CHECK(p[2] == 0x08, origin, ": IDX element type 0x", std::hex, int(p[2]), std::dec,
             " is not supported (expected 0x08, unsigned byte)");
  const int rank = p[3];
  KILN_CHECK(rank >= 1 && rank <= 4, origin, ": IDX rank ", rank, " is not supported (expected 1 to 4)");
  KILN_CHECK(n >= 4 + 4 * static_cast<std::size_t>(rank), origin, ": truncated IDX header (", n, " bytes, need ",
             4 + 4 * rank, ")");
  shape s;
  std::uint64_t count = 1, bound = 1;  // bound: product of max(extent, 1), so a zero extent cannot hide overflow
  for (int i = 0; i < rank; ++i) {
    const unsigned char* d = p + 4 + 4 * i;
    const std::uint32_t e =
        (std::uint32_t{d[0]} << 24) | (std::uint32_t{d[1]} << 16) | (std::uint32_t{d[2]} << 8) | d[3];
    constexpr std::uint64_t limit = std::uint64_t{1} << 34;
    KILN_CHECK(std::max<std::uint64_t>(e, 1) <= limit / bound, origin, ": IDX extents multiply to more than 16 GiB");
    bound *= std::max<std::uint64_t>(e, 1);
    count *= e;
    s.push_back(static_cast<std::int64_t>(e));
  }
  const std::size_t header = 4 + 4 * static_cast<std::size_t>(rank);
  const std::size_t have = n - header;
  KILN_CHECK(have >= count, origin, ": truncated IDX data: header promises ", s.str(), " = ", count,
             " bytes, file holds ", have);
  KILN_CHECK(have == count, origin, ": ", have - count, " unexpected bytes after the IDX data of shape ", s.str());
  tensor<u8> t(s);
  if (count) std::memcpy(t.data(), p + header, count);
  return t;
}
}  // namespace detail

// Reads an IDX file (optionally gzip-compressed) into a u8 tensor of its shape.
inline tensor<u8> read_idx(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");
  KILN_CHECK(f != nullptr, path, ": cannot open IDX file");
  std::vector<unsigned char> buf;
  unsigned char chunk[1 << 16];
  for (;;) {
    const int got = gzread(f, chunk, sizeof chunk);
    if (got < 0) {
      int code = 0;
      const std::string msg = gzerror(f, &code);
      gzclose(f);
      throw error(path + ": corrupt compressed data (" + msg + ")");
    }
    if (got == 0) break;
    buf.insert(buf.end(), chunk, chunk + got);
  }
  int code = 0;
  gzerror(f, &code);
  gzclose(f);
  KILN_CHECK(code == Z_OK || code == Z_STREAM_END, path, ": corrupt compressed data");
  return detail::parse_idx(buf.data(), buf.size(), path);
}

}  // namespace kiln::data
