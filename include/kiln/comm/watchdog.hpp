// kiln/comm/watchdog.hpp — what every communicator engine shares: the record of a
// collective, the wait loop that is the collective watchdog, and the blocking forms.
//
// Spec: wait_under_watchdog(poll, timeout, on_timeout) calls poll() — true when the
// operation completed; it may throw on an error — spinning (yield) for the first ~2000
// polls, then every 100 µs; once `timeout` has passed it calls on_timeout(waited s),
// which does not return. report_stuck() prints the watchdog's line. The timeout comes
// from KILN_COLLECTIVE_TIMEOUT (seconds) when set, else 600 s.
#pragma once

#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <thread>

#include "kiln/core/error.hpp"

namespace kiln::comm::detail {

// What the watchdog and errors report about one collective.
struct op_record {
  std::int64_t seq = -1;
  const char* kind = "";
  std::string label;
  std::int64_t count = 0;
  const char* type = "";
  const char* reduction = "";
};

inline std::string describe(const op_record& r) {
  if (r.seq < 0) return "none";
  std::string s = std::string(r.kind) + " #" + std::to_string(r.seq);
  if (!r.label.empty()) s += " [" + r.label + "]";
  s += " (" + std::to_string(r.count) + " " + r.type + (r.reduction[0] ? std::string(", ") + r.reduction : "") + ")";
  return s;
}

inline std::chrono::duration<double> timeout_from_env() {
  const char* t = std::getenv("KILN_COLLECTIVE_TIMEOUT");
  if (!t) return std::chrono::duration<double>(600.0);
  char* end = nullptr;
  const double v = std::strtod(t, &end);
  KILN_CHECK(end != t && *end == '\0' && v > 0, "KILN_COLLECTIVE_TIMEOUT='", t,
             "': expected a positive number of seconds");
  return std::chrono::duration<double>(v);
}

template <class Poll, class OnTimeout>
void wait_under_watchdog(Poll&& poll, std::chrono::duration<double> timeout, OnTimeout&& on_timeout) {
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  for (long spins = 0;; ++spins) {
    if (poll()) return;
    const auto waited = clock::now() - t0;
    if (waited > timeout) on_timeout(std::chrono::duration<double>(waited).count());
    if (spins < 2000)
      std::this_thread::yield();
    else
      std::this_thread::sleep_for(std::chrono::microseconds(100));
  }
}

// `where` names the engine's place ("" or ", GPU 3").
inline void report_stuck(int rank, int size, std::string_view where, double waited, const op_record& current,
                         const op_record& last, double timeout) {
  char host[256] = {};
  gethostname(host, sizeof host - 1);
  std::fprintf(stderr,
               "kiln: collective watchdog: rank %d of %d (pid %d on %s%.*s) has waited %.1f s in %s; "
               "the last collective it completed was %s. Some rank has not joined this one: it is stuck "
               "elsewhere, has died, or took a different path (each waiting rank prints this line). "
               "Aborting the job (timeout %.1f s; set KILN_COLLECTIVE_TIMEOUT=<seconds> to change it).\n",
               rank, size, static_cast<int>(getpid()), host, int(where.size()), where.data(), waited,
               describe(current).c_str(), describe(last).c_str(), timeout);
  std::fflush(stderr);
}

// The blocking collectives of an engine Derived, each its posted form then wait().
template <class Derived>
struct blocking_collectives {
  template <class T>
  void all_reduce(T* data, std::int64_t n, auto o, std::string_view label = {}) {
    self().iall_reduce(data, n, o, label).wait();
  }
  template <class T>
  void reduce_scatter(const T* send, T* recv, std::int64_t n, auto o, std::string_view label = {}) {
    self().ireduce_scatter(send, recv, n, o, label).wait();
  }
  template <class T>
  void all_gather(T* data, std::int64_t n, std::string_view label = {}) {
    self().iall_gather(data, n, label).wait();
  }
  template <class T>
  void broadcast(T* data, std::int64_t n, int root, std::string_view label = {}) {
    self().ibroadcast(data, n, root, label).wait();
  }

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
};

}  // namespace kiln::comm::detail
