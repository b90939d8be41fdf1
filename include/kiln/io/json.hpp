// kiln/io/json.hpp — a strict JSON value: parse, inspect, build, print.
//
// Spec: json::parse(text, what) reads one RFC 8259 document (UTF-8; no comments, no
// trailing commas, no NaN literals) and rejects what safetensors headers, checkpoint state
// and HF config files must not contain: duplicate object keys, nesting deeper than
// max_depth, numbers that overflow, unpaired UTF-16 surrogates. Errors name `what` (a
// file name), the byte offset and what was expected. Objects keep their insertion order.
// Integers written without fraction or exponent that fit in int64 are kept exactly
// (safetensors offsets exceed 2^53 in principle), other numbers are doubles.
// dump() prints compact JSON that parse() reads back to an equal value; doubles print
// with 17 significant digits, so they round-trip bit for bit. Non-finite doubles, which
// JSON cannot spell, are written as the strings "NaN", "Infinity", "-Infinity" and
// as_double() reads them back.
// Why not a library: the well-known C++ JSON libraries keep the last of duplicate keys
// silently (a safetensors header with two entries for one tensor must be an error), and
// one of them alone costs more compile time than the rest of kiln's I/O.
#pragma once

#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <string_view>
#include <unordered_set>
#include <utility>
#include <variant>
#include <vector>

#include "kiln/core/error.hpp"
#include "kiln/core/utf8.hpp"

namespace kiln::io {

class json {
 public:
  enum class kind { null, boolean, integer, number, string, array, object };
  using array_type = std::vector<json>;
  using object_type = std::vector<std::pair<std::string, json>>;
  static constexpr int max_depth = 64;

  json() = default;  // null
  json(std::nullptr_t) {}
  json(bool b) : v_(b) {}
  json(int i) : v_(static_cast<std::int64_t>(i)) {}
  json(std::int64_t i) : v_(i) {}
  json(std::uint64_t i) : v_(static_cast<std::int64_t>(i)) {
    KILN_CHECK(i <= static_cast<std::uint64_t>(std::numeric_limits<std::int64_t>::max()), "json: integer ", i,
               " does not fit in int64");
  }
  json(double d) : v_(d) {}
  json(const char* s) : v_(std::string(s)) {}
  json(std::string s) : v_(std::move(s)) {}
  json(std::string_view s) : v_(std::string(s)) {}
  json(array_type a) : v_(std::make_shared<array_type>(std::move(a))) {}
  json(object_type o) : v_(std::make_shared<object_type>(std::move(o))) {}

  static json array() { return json(array_type{}); }
  static json object() { return json(object_type{}); }

  kind type() const { return static_cast<kind>(v_.index()); }
  bool is_null() const { return type() == kind::null; }
  bool is_bool() const { return type() == kind::boolean; }
  bool is_integer() const { return type() == kind::integer; }
  bool is_number() const { return type() == kind::integer || type() == kind::number; }
  bool is_string() const { return type() == kind::string; }
  bool is_array() const { return type() == kind::array; }
  bool is_object() const { return type() == kind::object; }
  static const char* kind_name(kind k) {
    constexpr const char* names[] = {"null", "boolean", "integer", "number", "string", "array", "object"};
    return names[static_cast<int>(k)];
  }

  // Typed access; a wrong kind throws naming `field` (the caller's name for this value).
  bool as_bool(std::string_view field = "value") const {
    expect(kind::boolean, field);
    return std::get<bool>(v_);
  }
  std::int64_t as_int(std::string_view field = "value") const {
    KILN_CHECK(is_integer(), field, ": expected an integer, got ", describe());
    return std::get<std::int64_t>(v_);
  }
  double as_double(std::string_view field = "value") const {
    if (is_integer()) return static_cast<double>(std::get<std::int64_t>(v_));
    if (type() == kind::number) return std::get<double>(v_);
    if (is_string()) {
      const auto& s = std::get<std::string>(v_);
      if (s == "NaN") return std::numeric_limits<double>::quiet_NaN();
      if (s == "Infinity") return std::numeric_limits<double>::infinity();
      if (s == "-Infinity") return -std::numeric_limits<double>::infinity();
    }
    detail::fail(field, ": expected a number, got ", describe());
  }
  const std::string& as_string(std::string_view field = "value") const {
    expect(kind::string, field);
    return std::get<std::string>(v_);
  }
  const array_type& as_array(std::string_view field = "value") const {
    expect(kind::array, field);
    return *std::get<std::shared_ptr<array_type>>(v_);
  }
  const object_type& as_object(std::string_view field = "value") const {
    expect(kind::object, field);
    return *std::get<std::shared_ptr<object_type>>(v_);
  }

  // Object members.
  const json* find(std::string_view key) const {
    if (!is_object()) return nullptr;
    for (auto& [k, v] : as_object())
      if (k == key) return &v;
    return nullptr;
  }
  bool contains(std::string_view key) const { return find(key) != nullptr; }
  const json& at(std::string_view key) const {
    const json* v = find(key);
    KILN_CHECK(is_object(), "json: expected an object holding '", key, "', got ", describe());
    KILN_CHECK(v != nullptr, "missing field '", key, "'");
    return *v;
  }
  // Sets (or replaces) a member; turns null into an empty object first.
  json& set(std::string key, json value) {
    if (is_null()) *this = object();
    KILN_CHECK(is_object(), "json::set('", key, "'): not an object but ", describe());
    auto& o = mutable_object();
    for (auto& [k, v] : o)
      if (k == key) {
        v = std::move(value);
        return v;
      }
    o.emplace_back(std::move(key), std::move(value));
    return o.back().second;
  }
  // Appends to an array; turns null into an empty array first.
  json& push_back(json value) {
    if (is_null()) *this = array();
    KILN_CHECK(is_array(), "json::push_back: not an array but ", describe());
    auto& a = mutable_array();
    a.push_back(std::move(value));
    return a.back();
  }
  std::size_t size() const {
    if (is_array()) return as_array().size();
    if (is_object()) return as_object().size();
    return 0;
  }

  std::string describe() const {
    switch (type()) {
      case kind::string:
        return "the string \"" + std::get<std::string>(v_).substr(0, 40) + "\"";
      case kind::integer:
        return "the integer " + std::to_string(std::get<std::int64_t>(v_));
      default:
        return std::string("a ") + kind_name(type());
    }
  }

  // ---- printing ----
  std::string dump() const {
    std::string out;
    dump_to(out);
    return out;
  }
  void dump_to(std::string& out) const {
    switch (type()) {
      case kind::null:
        out += "null";
        break;
      case kind::boolean:
        out += std::get<bool>(v_) ? "true" : "false";
        break;
      case kind::integer:
        out += std::to_string(std::get<std::int64_t>(v_));
        break;
      case kind::number: {
        const double d = std::get<double>(v_);
        if (std::isnan(d)) {
          out += "\"NaN\"";
        } else if (std::isinf(d)) {
          out += d > 0 ? "\"Infinity\"" : "\"-Infinity\"";
        } else {
          char buf[32];
          std::snprintf(buf, sizeof buf, "%.17g", d);
          std::string_view s = buf;
          out += s;
          // Keep it a number that reads back as a double, not an integer.
          if (s.find_first_of(".eEn") == std::string_view::npos) out += ".0";
        }
        break;
      }
      case kind::string:
        quote(std::get<std::string>(v_), out);
        break;
      case kind::array: {
        out += '[';
        bool first = true;
        for (auto& e : as_array()) {
          if (!first) out += ',';
          first = false;
          e.dump_to(out);
        }
        out += ']';
        break;
      }
      case kind::object: {
        out += '{';
        bool first = true;
        for (auto& [k, e] : as_object()) {
          if (!first) out += ',';
          first = false;
          quote(k, out);
          out += ':';
          e.dump_to(out);
        }
        out += '}';
        break;
      }
    }
  }
  static void quote(std::string_view s, std::string& out) {
    out += '"';
    for (unsigned char c : s) {
      switch (c) {
        case '"':
          out += "\\\"";
          break;
        case '\\':
          out += "\\\\";
          break;
        case '\n':
          out += "\\n";
          break;
        case '\t':
          out += "\\t";
          break;
        case '\r':
          out += "\\r";
          break;
        case '\b':
          out += "\\b";
          break;
        case '\f':
          out += "\\f";
          break;
        default:
          if (c < 0x20) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\u%04x", c);
            out += buf;
          } else {
            out += static_cast<char>(c);
          }
      }
    }
    out += '"';
  }

  // ---- parsing ----
  static json parse(std::string_view text, std::string_view what = "JSON") {
    parser p{text, what, 0};
    p.skip_ws();
    json v = p.value(0);
    p.skip_ws();
    if (p.pos != text.size()) p.fail("end of document after the top-level value");
    return v;
  }

  friend bool operator==(const json& a, const json& b) {
    if (a.type() != b.type()) return false;
    switch (a.type()) {
      case kind::array:
        return a.as_array() == b.as_array();
      case kind::object:
        return a.as_object() == b.as_object();
      case kind::number: {
        const double x = std::get<double>(a.v_), y = std::get<double>(b.v_);
        return x == y || (std::isnan(x) && std::isnan(y));
      }
      default:
        return a.v_ == b.v_;
    }
  }

 private:
  void expect(kind k, std::string_view field) const {
    KILN_CHECK(type() == k, field, ": expected ", (k == kind::array || k == kind::object ? "an " : "a "), kind_name(k),
               ", got ", describe());
  }
  // Containers are shared between copies until one is changed (copy on write), so a
  // json behaves as a value.
  object_type& mutable_object() {
    auto& p = std::get<std::shared_ptr<object_type>>(v_);
    if (p.use_count() > 1) p = std::make_shared<object_type>(*p);
    return *p;
  }
  array_type& mutable_array() {
    auto& p = std::get<std::shared_ptr<array_type>>(v_);
    if (p.use_count() > 1) p = std::make_shared<array_type>(*p);
    return *p;
  }

  struct parser {
    std::string_view s;
    std::string_view what;
    std::size_t pos;

    [[noreturn]] void fail(std::string_view expected) const {
      std::string near;
      if (pos < s.size()) {
        const unsigned char c = static_cast<unsigned char>(s[pos]);
        near = c >= 0x20 && c < 0x7f ? std::string("'") + static_cast<char>(c) + "'" : "byte " + std::to_string(c);
      } else {
        near = "end of input";
      }
      detail::fail(what, ": invalid JSON at byte ", pos, ": expected ", expected, ", found ", near);
    }
    void skip_ws() {
      while (pos < s.size() && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == '\n' || s[pos] == '\r')) ++pos;
    }
    bool literal(std::string_view word) {
      if (s.substr(pos, word.size()) != word) return false;
      pos += word.size();
      return true;
    }
    json value(int depth) {
      if (depth > max_depth) fail("nesting no deeper than 64 levels");
      if (pos >= s.size()) fail("a value");
      switch (s[pos]) {
        case '{':
          return object_value(depth);
        case '[':
          return array_value(depth);
        case '"':
          return json(string_value());
        case 't':
          if (literal("true")) return json(true);
          break;
        case 'f':
          if (literal("false")) return json(false);
          break;
        case 'n':
          if (literal("null")) return json();
          break;
        default:
          if (s[pos] == '-' || (s[pos] >= '0' && s[pos] <= '9')) return number_value();
      }
      fail("a value");
    }
    json object_value(int depth) {
      ++pos;  // '{'
      object_type o;
      std::unordered_set<std::string> seen;
      skip_ws();
      if (pos < s.size() && s[pos] == '}') {
        ++pos;
        return json(std::move(o));
      }
      for (;;) {
        skip_ws();
        if (pos >= s.size() || s[pos] != '"') fail("a string key");
        const std::size_t key_at = pos;
        std::string key = string_value();
        // Small objects: a linear scan; large ones (a tokenizer's 50k-entry vocab) a hash set.
        bool dup = false;
        if (o.size() < 32) {
          for (auto& [k, v] : o) dup = dup || k == key;
        } else {
          if (seen.empty())
            for (auto& [k, v] : o) seen.insert(k);
          dup = !seen.insert(key).second;
        }
        if (dup) {
          pos = key_at;
          fail("a key not seen before in this object (\"" + key.substr(0, 60) + "\" is duplicated)");
        }
        skip_ws();
        if (pos >= s.size() || s[pos] != ':') fail("':'");
        ++pos;
        skip_ws();
        json v = value(depth + 1);
        o.emplace_back(std::move(key), std::move(v));
        skip_ws();
        if (pos < s.size() && s[pos] == ',') {
          ++pos;
          continue;
        }
        if (pos < s.size() && s[pos] == '}') {
          ++pos;
          return json(std::move(o));
        }
        fail("',' or '}'");
      }
    }
    json array_value(int depth) {
      ++pos;  // '['
      array_type a;
      skip_ws();
      if (pos < s.size() && s[pos] == ']') {
        ++pos;
        return json(std::move(a));
      }
      for (;;) {
        skip_ws();
        a.push_back(value(depth + 1));
        skip_ws();
        if (pos < s.size() && s[pos] == ',') {
          ++pos;
          continue;
        }
        if (pos < s.size() && s[pos] == ']') {
          ++pos;
          return json(std::move(a));
        }
        fail("',' or ']'");
      }
    }
    unsigned hex4() {
      if (pos + 4 > s.size()) fail("four hex digits");
      unsigned v = 0;
      for (int i = 0; i < 4; ++i) {
        const char c = s[pos];
        v <<= 4;
        if (c >= '0' && c <= '9')
          v |= unsigned(c - '0');
        else if (c >= 'a' && c <= 'f')
          v |= unsigned(c - 'a' + 10);
        else if (c >= 'A' && c <= 'F')
          v |= unsigned(c - 'A' + 10);
        else
          fail("a hex digit");
        ++pos;
      }
      return v;
    }
    std::string string_value() {
      ++pos;  // '"'
      std::string out;
      for (;;) {
        if (pos >= s.size()) fail("a closing '\"'");
        const unsigned char c = static_cast<unsigned char>(s[pos]);
        if (c == '"') {
          ++pos;
          return out;
        }
        if (c < 0x20) fail("no raw control characters inside a string (escape them)");
        if (c != '\\') {
          out += static_cast<char>(c);
          ++pos;
          continue;
        }
        ++pos;
        if (pos >= s.size()) fail("an escape character");
        const char e = s[pos++];
        switch (e) {
          case '"':
            out += '"';
            break;
          case '\\':
            out += '\\';
            break;
          case '/':
            out += '/';
            break;
          case 'b':
            out += '\b';
            break;
          case 'f':
            out += '\f';
            break;
          case 'n':
            out += '\n';
            break;
          case 'r':
            out += '\r';
            break;
          case 't':
            out += '\t';
            break;
          case 'u': {
            unsigned cp = hex4();
            if (cp >= 0xD800 && cp <= 0xDBFF) {
              if (!(pos + 1 < s.size() && s[pos] == '\\' && s[pos + 1] == 'u')) fail("a low surrogate \\uDC00-\\uDFFF");
              pos += 2;
              const unsigned lo = hex4();
              if (lo < 0xDC00 || lo > 0xDFFF) fail("a low surrogate \\uDC00-\\uDFFF");
              cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
            } else if (cp >= 0xDC00 && cp <= 0xDFFF) {
              fail("a high surrogate before a low one");
            }
            append_utf8(cp, out);
            break;
          }
          default:
            --pos;
            fail("one of the escapes \\\" \\\\ \\/ \\b \\f \\n \\r \\t \\uXXXX");
        }
      }
    }
    json number_value() {
      const std::size_t start = pos;
      if (s[pos] == '-') ++pos;
      if (pos >= s.size() || !(s[pos] >= '0' && s[pos] <= '9')) fail("a digit");
      if (s[pos] == '0') {
        ++pos;
      } else {
        while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') ++pos;
      }
      bool integral = true;
      if (pos < s.size() && s[pos] == '.') {
        integral = false;
        ++pos;
        if (pos >= s.size() || !(s[pos] >= '0' && s[pos] <= '9')) fail("a digit after '.'");
        while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') ++pos;
      }
      if (pos < s.size() && (s[pos] == 'e' || s[pos] == 'E')) {
        integral = false;
        ++pos;
        if (pos < s.size() && (s[pos] == '+' || s[pos] == '-')) ++pos;
        if (pos >= s.size() || !(s[pos] >= '0' && s[pos] <= '9')) fail("a digit in the exponent");
        while (pos < s.size() && s[pos] >= '0' && s[pos] <= '9') ++pos;
      }
      const char* b = s.data() + start;
      const char* e = s.data() + pos;
      if (integral) {
        std::int64_t i = 0;
        auto [p, ec] = std::from_chars(b, e, i);
        if (ec == std::errc() && p == e) return json(i);
        // Too large for int64: fall through to a double.
      }
      double d = 0;
      auto [p, ec] = std::from_chars(b, e, d);
      if (ec == std::errc::result_out_of_range || !std::isfinite(d)) {
        pos = start;
        fail("a number within the range of a double");
      }
      if (ec != std::errc() || p != e) {
        pos = start;
        fail("a number");
      }
      return json(d);
    }
  };

  std::variant<std::monostate, bool, std::int64_t, double, std::string, std::shared_ptr<array_type>,
               std::shared_ptr<object_type>>
      v_;
};

}  // namespace kiln::io
