// kiln/core/capability.hpp — reading a policy's declared capabilities.
//
// Spec: a policy (a strategy, a precision policy, a schedule, a callback) declares each
// optional capability it has as `static constexpr bool NAME = true;`. The slot's traits
// read them with KILN_DECLARED_CAPABILITY(Type, NAME): Type::NAME converted to bool, or
// false when Type declares no NAME. The loop then asks the capability (`if constexpr
// (strategy::traits<S>::shards_parameters)`), never the type and never whether a member
// exists; the slot's check<>() makes a declared capability without its members a compile
// error naming them.
#pragma once

#include <concepts>

#define KILN_DECLARED_CAPABILITY(TYPE, NAME)                     \
  ([] {                                                          \
    if constexpr (requires {                                     \
                    { TYPE::NAME } -> std::convertible_to<bool>; \
                  })                                             \
      return static_cast<bool>(TYPE::NAME);                      \
    else                                                         \
      return false;                                              \
  }())
