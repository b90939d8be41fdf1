// kiln/loggers/detail.hpp — pieces shared by the loggers: the run directory, atomic
// file replacement, JSON string escaping.
#pragma once

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <string>
#include <string_view>

#include "kiln/core/error.hpp"
#include "kiln/io/atomic_file.hpp"

namespace kiln::loggers::detail {

// The directory a logger writes to: its own `dir` when set, else the trainer's run dir.
inline std::filesystem::path run_dir(const std::string& own, const std::string& ctx_dir) {
  std::filesystem::path p = own.empty() ? std::filesystem::path(ctx_dir) : std::filesystem::path(own);
  std::error_code ec;
  std::filesystem::create_directories(p, ec);
  KILN_CHECK(!ec, "logger: cannot create directory ", p.string(), ": ", ec.message());
  return p;
}

// Writes `text` to `path` atomically (see kiln/io/atomic_file.hpp).
inline void write_atomically(const std::filesystem::path& path, std::string_view text) {
  io::write_atomically(path, text);
}

inline std::string json_string(std::string_view s) {
  std::string o = "\"";
  for (unsigned char c : s) {
    switch (c) {
      case '"':
        o += "\\\"";
        break;
      case '\\':
        o += "\\\\";
        break;
      case '\n':
        o += "\\n";
        break;
      case '\t':
        o += "\\t";
        break;
      case '\r':
        o += "\\r";
        break;
      default:
        if (c < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", c);
          o += buf;
        } else {
          o += static_cast<char>(c);
        }
    }
  }
  return o + "\"";
}

// A number as JSON (null for NaN and infinities, which JSON cannot spell), round-trippable.
inline std::string json_number(double v) {
  if (!std::isfinite(v)) return "null";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.17g", v);
  return buf;
}

// A CSV field: quoted when it holds a comma, quote or newline.
inline std::string csv_field(std::string_view s) {
  if (s.find_first_of(",\"\n\r") == std::string_view::npos) return std::string(s);
  std::string o = "\"";
  for (char c : s) {
    if (c == '"') o += '"';
    o += c;
  }
  return o + "\"";
}

}  // namespace kiln::loggers::detail
