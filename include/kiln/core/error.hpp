// kiln/core/error.hpp — the one exception type kiln throws.
//
// kiln::error carries a message plus a stack of context lines added as the error
// travels outward ("while loading tensor 'net.0.weight'", "in op 'matmul'"), so the
// final what() reads from the innermost cause to the outermost operation.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace kiln {

class error : public std::runtime_error {
 public:
  explicit error(std::string message) : std::runtime_error(message), message_(std::move(message)) { rebuild(); }

  // Adds an outer context line; returns *this so `throw e.with_context(...)` works.
  error& with_context(std::string context) {
    context_.push_back(std::move(context));
    rebuild();
    return *this;
  }

  const char* what() const noexcept override { return full_.c_str(); }
  const std::string& message() const noexcept { return message_; }
  const std::vector<std::string>& context() const noexcept { return context_; }

 private:
  void rebuild() {
    full_ = "kiln: " + message_;
    for (auto it = context_.begin(); it != context_.end(); ++it) full_ += "\n  " + *it;
  }
  std::string message_;
  std::vector<std::string> context_;
  std::string full_;
};

namespace detail {
template <class... Args>
[[noreturn]] void fail(const Args&... args) {
  std::ostringstream os;
  (os << ... << args);
  throw error(os.str());
}
}  // namespace detail

}  // namespace kiln

// KILN_CHECK(cond, parts...) throws kiln::error built from the streamed parts when
// cond is false. Parts are only evaluated on failure.
#define KILN_CHECK(cond, ...)            \
  do {                                   \
    if (!(cond)) [[unlikely]]            \
      ::kiln::detail::fail(__VA_ARGS__); \
  } while (0)
