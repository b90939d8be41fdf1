// kiln/core/shape.hpp — fixed-capacity shapes and strides (no heap, rank <= 8).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <initializer_list>
#include <ostream>
#include <span>
#include <string>

#include "kiln/core/error.hpp"

namespace kiln {

class shape {
 public:
  static constexpr int max_rank = 8;

  constexpr shape() = default;
  constexpr shape(std::initializer_list<std::int64_t> dims) {
    KILN_CHECK(dims.size() <= max_rank, "shape: rank ", dims.size(), " exceeds the maximum of ", max_rank);
    for (auto d : dims) push_back(d);
  }
  explicit shape(std::span<const std::int64_t> dims) {
    KILN_CHECK(dims.size() <= max_rank, "shape: rank ", dims.size(), " exceeds the maximum of ", max_rank);
    for (auto d : dims) push_back(d);
  }

  constexpr int rank() const { return rank_; }
  constexpr std::int64_t operator[](int i) const { return d_[static_cast<std::size_t>(i)]; }
  constexpr std::int64_t& operator[](int i) { return d_[static_cast<std::size_t>(i)]; }
  // Negative indices count from the back, as in Python.
  constexpr std::int64_t at(int i) const { return d_[static_cast<std::size_t>(i < 0 ? i + rank_ : i)]; }
  constexpr std::int64_t back() const { return d_[static_cast<std::size_t>(rank_ - 1)]; }

  constexpr void push_back(std::int64_t d) { d_[static_cast<std::size_t>(rank_++)] = d; }
  constexpr std::int64_t numel() const {
    std::int64_t n = 1;
    for (int i = 0; i < rank_; ++i) n *= d_[static_cast<std::size_t>(i)];
    return n;
  }
  constexpr const std::int64_t* begin() const { return d_.data(); }
  constexpr const std::int64_t* end() const { return d_.data() + rank_; }

  friend constexpr bool operator==(const shape& a, const shape& b) {
    if (a.rank_ != b.rank_) return false;
    for (int i = 0; i < a.rank_; ++i)
      if (a[i] != b[i]) return false;
    return true;
  }

  std::string str() const {
    std::string s = "[";
    for (int i = 0; i < rank_; ++i) s += (i ? ", " : "") + std::to_string(d_[static_cast<std::size_t>(i)]);
    return s + "]";
  }
  friend std::ostream& operator<<(std::ostream& os, const shape& s) { return os << s.str(); }

  // Row-major (C-contiguous) strides for this shape.
  constexpr shape contiguous_strides() const {
    shape s;
    s.rank_ = rank_;
    std::int64_t acc = 1;
    for (int i = rank_ - 1; i >= 0; --i) {
      s.d_[static_cast<std::size_t>(i)] = acc;
      acc *= d_[static_cast<std::size_t>(i)];
    }
    return s;
  }

  // Shape without the last dimension's extent folded in: product of all but last.
  constexpr std::int64_t rows() const { return rank_ == 0 ? 1 : numel() / std::max<std::int64_t>(back(), 1); }

 private:
  std::array<std::int64_t, max_rank> d_{};
  int rank_ = 0;
};

using strides = shape;

// NumPy broadcasting of two shapes; `op` names the operation for the error message.
inline shape broadcast_shapes(const shape& a, const shape& b, const char* op) {
  const int r = std::max(a.rank(), b.rank());
  shape out;
  for (int i = 0; i < r; ++i) {
    const int ia = i - (r - a.rank()), ib = i - (r - b.rank());
    const std::int64_t da = ia >= 0 ? a[ia] : 1, db = ib >= 0 ? b[ib] : 1;
    KILN_CHECK(da == db || da == 1 || db == 1, op, ": shapes ", a.str(), " and ", b.str(),
               " cannot be broadcast together (dimension ", i, ": ", da, " vs ", db, ")");
    out.push_back(da == 1 ? db : da);
  }
  return out;
}

}  // namespace kiln
