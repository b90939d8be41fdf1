// kiln/core/type_name.hpp — readable names of C++ types, for tables, logs and checkpoint keys.
//
// Spec: demangle(mangled) is the compiler's readable spelling ("kiln::nn::linear<float>");
// type_name<T>() is that for T; short_type_name drops kiln's namespaces and anonymous
// namespaces and cuts the result at 40 characters, for display.
#pragma once

#include <cxxabi.h>

#include <cstdlib>
#include <memory>
#include <string>
#include <typeinfo>

namespace kiln {

inline std::string demangle(const char* mangled) {
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> d(abi::__cxa_demangle(mangled, nullptr, nullptr, &status), std::free);
  return status == 0 && d ? std::string(d.get()) : std::string(mangled);
}

template <class T>
std::string type_name() {
  return demangle(typeid(T).name());
}

inline std::string short_type_name(const char* mangled) {
  std::string s = demangle(mangled);
  for (const std::string ns : {"kiln::nn::", "kiln::", "(anonymous namespace)::"})
    for (std::size_t p; (p = s.find(ns)) != std::string::npos;) s.erase(p, ns.size());
  if (s.size() > 40) s = s.substr(0, 37) + "...";
  return s;
}

}  // namespace kiln
