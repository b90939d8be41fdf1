// kiln/nn/hf_config.hpp — reading fields of a Hugging Face config.json with errors that
// name the file, the field and what was expected.
#pragma once

#include <string>
#include <string_view>

#include "kiln/io/json.hpp"

namespace kiln::nn {

class hf_fields {
 public:
  hf_fields(const io::json& j, std::string file) : j_(j), file_(std::move(file)) {
    KILN_CHECK(j.is_object(), file_, ": expected a JSON object (a Hugging Face config.json)");
  }
  const std::string& file() const { return file_; }
  bool has(std::string_view key) const {
    const io::json* v = j_.find(key);
    return v && !v->is_null();
  }
  std::int64_t integer(std::string_view key, std::int64_t fallback, bool required = false) const {
    const io::json* v = get(key, required);
    if (!v) return fallback;
    KILN_CHECK(v->is_integer(), file_, ": field \"", key, "\" must be an integer, got ", v->describe());
    return v->as_int();
  }
  double number(std::string_view key, double fallback) const {
    const io::json* v = get(key, false);
    if (!v) return fallback;
    KILN_CHECK(v->is_number(), file_, ": field \"", key, "\" must be a number, got ", v->describe());
    return v->as_double();
  }
  bool boolean(std::string_view key, bool fallback) const {
    const io::json* v = get(key, false);
    if (!v) return fallback;
    KILN_CHECK(v->is_bool(), file_, ": field \"", key, "\" must be true or false, got ", v->describe());
    return v->as_bool();
  }
  std::string string(std::string_view key, std::string fallback) const {
    const io::json* v = get(key, false);
    if (!v) return fallback;
    KILN_CHECK(v->is_string(), file_, ": field \"", key, "\" must be a string, got ", v->describe());
    return v->as_string();
  }
  const io::json* get(std::string_view key, bool required) const {
    const io::json* v = j_.find(key);
    KILN_CHECK(!required || (v && !v->is_null()), file_, ": required field \"", key, "\" is missing");
    return v && !v->is_null() ? v : nullptr;
  }
  // Fails unless `ok`, naming the field and what kiln supports.
  void require(bool ok, std::string_view key, std::string_view expected) const {
    KILN_CHECK(ok, file_, ": field \"", key, "\": ", expected);
  }

 private:
  const io::json& j_;
  std::string file_;
};

}  // namespace kiln::nn
