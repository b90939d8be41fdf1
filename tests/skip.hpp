// Skips that the test runner counts.
//
// A test case that cannot run here (an input not installed, no GPU per rank) calls
// `kiln::test::skip(reason)` and returns. test_main.cpp reads the record after the run: a
// run in which every test case that started was skipped exits 77, which Meson counts as
// SKIP; a run with some cases skipped and others passed prints the reasons and passes, so
// tests/meson.build gives the cases that may skip a test of their own (a doctest suite
// filter), and the summary counts what did not run.
#pragma once

#include <cstdio>
#include <string>
#include <vector>

namespace kiln::test {

struct skip_record {
  std::vector<std::string> reasons;
};

inline skip_record& skips() {
  static skip_record r;
  return r;
}

// Records that the current test case is skipped; the caller returns right after.
inline void skip(std::string reason) {
  std::fprintf(stderr, "SKIP: %s\n", reason.c_str());
  skips().reasons.push_back(std::move(reason));
}

}  // namespace kiln::test
