// kiln/core/device.hpp — devices are types.
//
// Spec: a device tag is an empty regular type with a static `name` and a static
// `is_host` flag. Tensors, allocators and strategies are parameterised by it, so
// both backends can live in one binary and a tensor's device is known at compile
// time (mixing devices in one op is a compile error, not a run-time surprise).
#pragma once

#include <concepts>
#include <string_view>

namespace kiln {

struct cpu {
  static constexpr std::string_view name = "cpu";
  static constexpr bool is_host = true;
  friend constexpr bool operator==(cpu, cpu) { return true; }
};

struct cuda {
  static constexpr std::string_view name = "cuda";
  static constexpr bool is_host = false;
  friend constexpr bool operator==(cuda, cuda) { return true; }
};

template <class D>
concept device = std::regular<D> && requires {
  { D::name } -> std::convertible_to<std::string_view>;
  { D::is_host } -> std::convertible_to<bool>;
};

// True when the library was built with the CUDA backend.
#if defined(KILN_WITH_CUDA)
inline constexpr bool cuda_enabled = true;
#else
inline constexpr bool cuda_enabled = false;
#endif

}  // namespace kiln
