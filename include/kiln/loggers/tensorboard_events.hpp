// kiln/loggers/tensorboard_events.hpp — TensorBoard event files, written and read
// without a protobuf library.
//
// Format: a TFRecord stream. Each record is
//   uint64 length (little endian) | uint32 masked_crc32c(length bytes) | data | uint32 masked_crc32c(data)
// and each data block is a serialized tensorflow.Event (tensorboard/compat/proto/event.proto):
//   Event   { double wall_time = 1; int64 step = 2; string file_version = 3; Summary summary = 5; }
//   Summary { repeated Value value = 1; }
//   Value   { string tag = 1; float simple_value = 2; TensorProto tensor = 8; SummaryMetadata metadata = 9; }
//   SummaryMetadata { PluginData plugin_data = 1; }   PluginData { string plugin_name = 1; bytes content = 2; }
//   TensorProto { DataType dtype = 1 (DT_STRING = 7); TensorShapeProto tensor_shape = 2; repeated bytes string_val = 8;
//   }
// The first record of a file is an Event with file_version "brain.Event:2". Scalars are
// simple_value summaries; text (the hyperparameters) uses the text plugin's string tensor.
// The reader validates both CRCs of every record, record and field lengths against what
// remains, varints (at most 10 bytes) and wire types, and skips unknown fields; every
// problem is a kiln::error naming the origin, the byte offset and what was expected.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "kiln/core/crc32c.hpp"
#include "kiln/core/error.hpp"

namespace kiln::loggers {

namespace pb {
enum wire : std::uint32_t { varint = 0, fixed64 = 1, len = 2, fixed32 = 5 };

inline void put_varint(std::string& o, std::uint64_t v) {
  while (v >= 0x80) {
    o += static_cast<char>((v & 0x7F) | 0x80);
    v >>= 7;
  }
  o += static_cast<char>(v);
}
inline void put_key(std::string& o, std::uint32_t field, wire w) { put_varint(o, (std::uint64_t{field} << 3) | w); }
inline void put_bytes(std::string& o, std::uint32_t field, std::string_view b) {
  put_key(o, field, len);
  put_varint(o, b.size());
  o.append(b);
}
inline void put_double(std::string& o, std::uint32_t field, double v) {
  put_key(o, field, fixed64);
  char b[8];
  std::memcpy(b, &v, 8);
  o.append(b, 8);
}
inline void put_float(std::string& o, std::uint32_t field, float v) {
  put_key(o, field, fixed32);
  char b[4];
  std::memcpy(b, &v, 4);
  o.append(b, 4);
}

// A bounded reader over one message; positions are reported relative to the file.
struct reader {
  const unsigned char* p;
  std::size_t n, at = 0, base = 0;
  const std::string* origin;

  [[noreturn]] void fail(const std::string& what) const {
    throw error(*origin + ": byte " + std::to_string(base + at) + ": " + what);
  }
  bool done() const { return at >= n; }
  std::uint64_t get_varint() {
    std::uint64_t v = 0;
    for (int shift = 0; shift < 70; shift += 7) {
      if (at >= n) fail("truncated varint");
      const unsigned char c = p[at++];
      if (shift == 63 && (c & 0x7E)) fail("varint overflows 64 bits");
      v |= std::uint64_t{c & 0x7Fu} << shift;
      if (!(c & 0x80)) return v;
    }
    fail("varint longer than 10 bytes");
  }
  reader sub(std::size_t len) {
    if (len > n - at)
      fail("field of " + std::to_string(len) + " bytes runs past its message (" + std::to_string(n - at) +
           " bytes left)");
    reader r{p + at, len, 0, base + at, origin};
    at += len;
    return r;
  }
  std::string_view bytes() {
    const std::uint64_t len = get_varint();
    if (len > n - at)
      fail("field of " + std::to_string(len) + " bytes runs past its message (" + std::to_string(n - at) +
           " bytes left)");
    std::string_view s(reinterpret_cast<const char*>(p + at), static_cast<std::size_t>(len));
    at += static_cast<std::size_t>(len);
    return s;
  }
  template <class T>
  T fixed() {
    if (n - at < sizeof(T)) fail("truncated fixed-width field");
    T v;
    std::memcpy(&v, p + at, sizeof(T));
    at += sizeof(T);
    return v;
  }
  void skip(std::uint32_t w) {
    switch (w) {
      case varint:
        get_varint();
        return;
      case fixed64:
        fixed<std::uint64_t>();
        return;
      case len:
        bytes();
        return;
      case fixed32:
        fixed<std::uint32_t>();
        return;
      default:
        fail("unsupported protobuf wire type " + std::to_string(w));
    }
  }
  // Reads a key; returns {field, wire type}.
  std::pair<std::uint32_t, std::uint32_t> key() {
    const std::uint64_t k = get_varint();
    if ((k >> 3) == 0 || (k >> 3) > 0x1FFFFFFF) fail("invalid protobuf field number");
    return {static_cast<std::uint32_t>(k >> 3), static_cast<std::uint32_t>(k & 7)};
  }
  void expect(std::uint32_t got, std::uint32_t want, const char* field) {
    if (got != want)
      fail(std::string("field ") + field + " has wire type " + std::to_string(got) + ", expected " +
           std::to_string(want));
  }
};
}  // namespace pb

struct event {
  double wall_time = 0;
  std::int64_t step = 0;
  std::string file_version;
  std::vector<std::pair<std::string, float>> scalars;
  std::vector<std::pair<std::string, std::string>> texts;
};

namespace detail {
inline void put_u64(std::string& o, std::uint64_t v) {
  for (int i = 0; i < 8; ++i) o += static_cast<char>((v >> (8 * i)) & 0xFF);
}
inline void put_u32(std::string& o, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) o += static_cast<char>((v >> (8 * i)) & 0xFF);
}
inline std::string frame(std::string_view data) {
  std::string r;
  r.reserve(data.size() + 16);
  put_u64(r, data.size());
  put_u32(r, masked_crc32c(r.data(), 8));
  r.append(data);
  put_u32(r, masked_crc32c(data.data(), data.size()));
  return r;
}
inline double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

inline void parse_value(pb::reader r, event& ev) {
  std::string tag, plugin, text;
  bool has_scalar = false, has_text = false;
  float scalar = 0;
  while (!r.done()) {
    auto [f, w] = r.key();
    if (f == 1) {
      r.expect(w, pb::len, "Summary.Value.tag");
      tag = std::string(r.bytes());
    } else if (f == 2) {
      r.expect(w, pb::fixed32, "Summary.Value.simple_value");
      scalar = r.fixed<float>();
      has_scalar = true;
    } else if (f == 8) {
      r.expect(w, pb::len, "Summary.Value.tensor");
      auto t = r.sub(static_cast<std::size_t>(r.get_varint()));
      while (!t.done()) {
        auto [tf, tw] = t.key();
        if (tf == 8 && tw == pb::len) {
          text = std::string(t.bytes());
          has_text = true;
        } else {
          t.skip(tw);
        }
      }
    } else if (f == 9) {
      r.expect(w, pb::len, "Summary.Value.metadata");
      auto m = r.sub(static_cast<std::size_t>(r.get_varint()));
      while (!m.done()) {
        auto [mf, mw] = m.key();
        if (mf == 1 && mw == pb::len) {
          auto pd = m.sub(static_cast<std::size_t>(m.get_varint()));
          while (!pd.done()) {
            auto [pf, pw] = pd.key();
            if (pf == 1 && pw == pb::len)
              plugin = std::string(pd.bytes());
            else
              pd.skip(pw);
          }
        } else {
          m.skip(mw);
        }
      }
    } else {
      r.skip(w);
    }
  }
  if (has_scalar) ev.scalars.emplace_back(tag, scalar);
  if (has_text) ev.texts.emplace_back(tag, text);
}

inline event parse_event(pb::reader r) {
  event ev;
  while (!r.done()) {
    auto [f, w] = r.key();
    if (f == 1) {
      r.expect(w, pb::fixed64, "Event.wall_time");
      ev.wall_time = r.fixed<double>();
    } else if (f == 2) {
      r.expect(w, pb::varint, "Event.step");
      ev.step = static_cast<std::int64_t>(r.get_varint());
    } else if (f == 3) {
      r.expect(w, pb::len, "Event.file_version");
      ev.file_version = std::string(r.bytes());
    } else if (f == 5) {
      r.expect(w, pb::len, "Event.summary");
      auto s = r.sub(static_cast<std::size_t>(r.get_varint()));
      while (!s.done()) {
        auto [sf, sw] = s.key();
        if (sf == 1) {
          s.expect(sw, pb::len, "Summary.value");
          parse_value(s.sub(static_cast<std::size_t>(s.get_varint())), ev);
        } else {
          s.skip(sw);
        }
      }
    } else {
      r.skip(w);
    }
  }
  return ev;
}
}  // namespace detail

// Parses a whole event file held in memory.
inline std::vector<event> parse_events(const unsigned char* p, std::size_t n, const std::string& origin) {
  std::vector<event> out;
  std::size_t at = 0;
  auto fail = [&](std::size_t where, const std::string& what) -> void {
    throw error(origin + ": byte " + std::to_string(where) + ": " + what);
  };
  while (at < n) {
    if (n - at < 12) fail(at, "truncated record header (" + std::to_string(n - at) + " bytes, expected 12)");
    std::uint64_t len = 0;
    for (int i = 0; i < 8; ++i) len |= std::uint64_t{p[at + i]} << (8 * i);
    std::uint32_t lcrc = 0;
    for (int i = 0; i < 4; ++i) lcrc |= std::uint32_t{p[at + 8 + i]} << (8 * i);
    if (lcrc != masked_crc32c(p + at, 8)) fail(at + 8, "record length CRC mismatch (corrupt record header)");
    const std::size_t data_at = at + 12;
    if (len > n - data_at || n - data_at - len < 4)
      fail(at, "truncated record: header promises " + std::to_string(len) + " bytes of data + 4 of CRC, " +
                   std::to_string(n - data_at) + " remain");
    const std::size_t l = static_cast<std::size_t>(len);
    std::uint32_t dcrc = 0;
    for (int i = 0; i < 4; ++i) dcrc |= std::uint32_t{p[data_at + l + i]} << (8 * i);
    if (dcrc != masked_crc32c(p + data_at, l)) fail(data_at + l, "record data CRC mismatch (corrupt record)");
    out.push_back(detail::parse_event(pb::reader{p + data_at, l, 0, data_at, &origin}));
    at = data_at + l + 4;
  }
  return out;
}

inline std::vector<event> read_events(const std::filesystem::path& path) {
  std::ifstream f(path, std::ios::binary);
  KILN_CHECK(f.good(), path.string(), ": cannot open event file");
  std::vector<unsigned char> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  return parse_events(buf.data(), buf.size(), path.string());
}

// Appends events to a new file events.out.tfevents.<unix time>.<host>.<pid>.kiln in dir.
class event_writer {
 public:
  explicit event_writer(const std::filesystem::path& dir) {
    std::error_code ec;
    std::filesystem::create_directories(dir, ec);
    KILN_CHECK(!ec, "tensorboard: cannot create ", dir.string(), ": ", ec.message());
    char host[256] = "localhost";
    ::gethostname(host, sizeof host - 1);
    path_ = dir / ("events.out.tfevents." + std::to_string(static_cast<long long>(detail::unix_now())) + "." + host +
                   "." + std::to_string(::getpid()) + ".kiln");
    f_ = std::fopen(path_.c_str(), "wb");
    KILN_CHECK(f_ != nullptr, "tensorboard: cannot create ", path_.string());
    std::string ev;
    pb::put_double(ev, 1, detail::unix_now());
    pb::put_bytes(ev, 3, "brain.Event:2");
    write(ev);
    flush();
  }
  event_writer(const event_writer&) = delete;
  event_writer& operator=(const event_writer&) = delete;
  ~event_writer() {
    if (f_) std::fclose(f_);
  }

  void add_scalar(std::string_view tag, double value, std::int64_t step, double wall_time = detail::unix_now()) {
    std::string v;
    pb::put_bytes(v, 1, tag);
    pb::put_float(v, 2, static_cast<float>(value));
    write_summary(v, step, wall_time);
  }
  void add_text(std::string_view tag, std::string_view text, std::int64_t step, double wall_time = detail::unix_now()) {
    std::string plugin, meta, tensor, shape, v;
    pb::put_bytes(plugin, 1, "text");
    pb::put_bytes(meta, 1, plugin);
    pb::put_key(tensor, 1, pb::varint);
    pb::put_varint(tensor, 7);  // DT_STRING
    pb::put_bytes(tensor, 2, shape);
    pb::put_bytes(tensor, 8, text);
    pb::put_bytes(v, 1, tag);
    pb::put_bytes(v, 8, tensor);
    pb::put_bytes(v, 9, meta);
    write_summary(v, step, wall_time);
  }
  void flush() { KILN_CHECK(std::fflush(f_) == 0, "tensorboard: cannot write ", path_.string()); }
  const std::filesystem::path& path() const { return path_; }

 private:
  void write_summary(const std::string& value, std::int64_t step, double wall_time) {
    std::string summary, ev;
    pb::put_bytes(summary, 1, value);
    pb::put_double(ev, 1, wall_time);
    pb::put_key(ev, 2, pb::varint);
    pb::put_varint(ev, static_cast<std::uint64_t>(step));
    pb::put_bytes(ev, 5, summary);
    write(ev);
  }
  void write(const std::string& ev) {
    const std::string r = detail::frame(ev);
    KILN_CHECK(std::fwrite(r.data(), 1, r.size(), f_) == r.size(), "tensorboard: cannot write ", path_.string());
  }
  std::filesystem::path path_;
  std::FILE* f_ = nullptr;
};

}  // namespace kiln::loggers
