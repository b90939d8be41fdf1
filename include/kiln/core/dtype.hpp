// kiln/core/dtype.hpp — element types.
//
// Spec: a kiln element type is one of f64, f32, bf16, f16 (floating, may carry
// gradients) or i32, i64, u8 (indices, labels, raw bytes). On the CPU bf16 and f16 are
// Eigen's storage types, which compute by converting through float.
// `dtype_of<T>` names the run-time tag used by type-erased code (checkpoints,
// optimizer state); `dtype_name` gives the safetensors spelling.
#pragma once

#include <Eigen/Core>
#include <concepts>
#include <cstddef>
#include <cstdint>
#include <string_view>
#include <type_traits>

namespace kiln {

using f64 = double;
using f32 = float;
using bf16 = Eigen::bfloat16;
using f16 = Eigen::half;
using i32 = std::int32_t;
using i64 = std::int64_t;
using u8 = std::uint8_t;

enum class dtype : std::uint8_t { f64, f32, bf16, f16, i64, i32, u8 };

template <class T>
struct dtype_traits;  // only the types above are elements

template <>
struct dtype_traits<f64> {
  static constexpr dtype id = dtype::f64;
  static constexpr bool floating = true;
};
template <>
struct dtype_traits<f32> {
  static constexpr dtype id = dtype::f32;
  static constexpr bool floating = true;
};
template <>
struct dtype_traits<bf16> {
  static constexpr dtype id = dtype::bf16;
  static constexpr bool floating = true;
};
template <>
struct dtype_traits<f16> {
  static constexpr dtype id = dtype::f16;
  static constexpr bool floating = true;
};
template <>
struct dtype_traits<i64> {
  static constexpr dtype id = dtype::i64;
  static constexpr bool floating = false;
};
template <>
struct dtype_traits<i32> {
  static constexpr dtype id = dtype::i32;
  static constexpr bool floating = false;
};
template <>
struct dtype_traits<u8> {
  static constexpr dtype id = dtype::u8;
  static constexpr bool floating = false;
};

// Any element type kiln can store.
template <class T>
concept element = requires {
  dtype_traits<std::remove_cv_t<T>>::id;
};

// Element types that take part in differentiation and floating math.
template <class T>
concept floating_element = element<T> && dtype_traits<std::remove_cv_t<T>>::floating;

// Index element types (labels, token ids).
template <class T>
concept index_element = std::same_as<T, i64> || std::same_as<T, i32>;

template <element T>
inline constexpr dtype dtype_of = dtype_traits<T>::id;

constexpr std::size_t dtype_size(dtype d) {
  switch (d) {
    case dtype::f64:
    case dtype::i64:
      return 8;
    case dtype::f32:
    case dtype::i32:
      return 4;
    case dtype::bf16:
    case dtype::f16:
      return 2;
    case dtype::u8:
      return 1;
  }
  return 0;
}

// Names as spelled by safetensors ("F32", "BF16", ...).
constexpr std::string_view dtype_name(dtype d) {
  switch (d) {
    case dtype::f64:
      return "F64";
    case dtype::f32:
      return "F32";
    case dtype::bf16:
      return "BF16";
    case dtype::f16:
      return "F16";
    case dtype::i64:
      return "I64";
    case dtype::i32:
      return "I32";
    case dtype::u8:
      return "U8";
  }
  return "?";
}

// The type in which arithmetic on T is carried out on the CPU: half types compute in
// float, everything else in itself.
template <class T>
struct compute_type {
  using type = T;
};
template <>
struct compute_type<bf16> {
  using type = float;
};
template <>
struct compute_type<f16> {
  using type = float;
};
template <class T>
using compute_t = typename compute_type<T>::type;

}  // namespace kiln
