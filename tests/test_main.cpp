// doctest's main, plus the exit status Meson reads for skips (tests/skip.hpp): 77 when
// every test case that ran was skipped, so the summary counts a skip, not a pass.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <cstdio>

#include "skip.hpp"

namespace {

int test_cases_started = 0;

// Counts the test cases that started (the filters and doctest's own skips leave out the rest).
struct start_counter : doctest::IReporter {
  explicit start_counter(const doctest::ContextOptions&) {}
  void report_query(const doctest::QueryData&) override {}
  void test_run_start() override {}
  void test_run_end(const doctest::TestRunStats&) override {}
  void test_case_start(const doctest::TestCaseData&) override { ++test_cases_started; }
  void test_case_reenter(const doctest::TestCaseData&) override {}
  void test_case_end(const doctest::CurrentTestCaseStats&) override {}
  void test_case_exception(const doctest::TestCaseException&) override {}
  void subcase_start(const doctest::SubcaseSignature&) override {}
  void subcase_end() override {}
  void log_assert(const doctest::AssertData&) override {}
  void log_message(const doctest::MessageData&) override {}
  void test_case_skipped(const doctest::TestCaseData&) override {}
};

}  // namespace

DOCTEST_REGISTER_LISTENER("kiln_start_counter", 1, start_counter);

int main(int argc, char** argv) {
  doctest::Context context(argc, argv);
  const int status = context.run();
  if (context.shouldExit()) return status;
  const auto skipped = static_cast<int>(kiln::test::skips().reasons.size());
  if (status == 0 && skipped > 0) {
    std::printf("kiln: %d of %d test case(s) skipped:\n", skipped, test_cases_started);
    for (const auto& r : kiln::test::skips().reasons) std::printf("  %s\n", r.c_str());
    if (skipped >= test_cases_started) return 77;
  }
  return status;
}
