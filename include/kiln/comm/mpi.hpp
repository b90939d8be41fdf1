// kiln/comm/mpi.hpp — the communicator of CPU ranks, on Open MPI.
//
// Spec: comm::mpi is a handle on a duplicate of MPI_COMM_WORLD (copies share it). The
// first one constructed initialises MPI (MPI_Init_thread, funneled) unless the program
// already did, and MPI is finalised at exit by whoever initialised it. Ranks are
// launched by `mpirun -n N prog` or `srun`; kiln has no launcher protocol of its own.
// Every collective is posted non-blocking and completed by a wait loop that is also the
// collective watchdog: a rank that has waited longer than timeout() (default 600 s;
// KILN_COLLECTIVE_TIMEOUT=<seconds> or set_timeout) prints which collective it is in —
// its sequence number, label, element count and type — and the last one it completed,
// then aborts the whole job, so a mismatch or a stuck rank ends in a report on every
// waiting rank instead of a silent hang. MPI errors (a peer that died, a broken link)
// are returned, not fatal: they become a kiln::error naming the collective.
// Ensures: reductions are MPI's; for a fixed world size and inputs the result is the
// same on every rank and in every run (Open MPI's tuned algorithms are deterministic).
#pragma once

#include <mpi.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include "kiln/comm/communicator.hpp"
#include "kiln/comm/watchdog.hpp"
#include "kiln/core/error.hpp"

namespace kiln::comm {

namespace detail {

template <class T>
MPI_Datatype mpi_type() {
  if constexpr (std::is_same_v<T, float>)
    return MPI_FLOAT;
  else if constexpr (std::is_same_v<T, double>)
    return MPI_DOUBLE;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return MPI_INT64_T;
  else if constexpr (std::is_same_v<T, int>)
    return MPI_INT;
  else if constexpr (std::is_same_v<T, std::byte> || std::is_same_v<T, char> || std::is_same_v<T, unsigned char>)
    return MPI_BYTE;
  else
    static_assert(sizeof(T) == 0, "kiln::comm::mpi: element type must be float, double, int64, int or std::byte");
}
template <class T>
const char* type_label() {
  if constexpr (std::is_same_v<T, float>)
    return "f32";
  else if constexpr (std::is_same_v<T, double>)
    return "f64";
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return "i64";
  else if constexpr (std::is_same_v<T, int>)
    return "i32";
  else
    return "bytes";
}
inline MPI_Op mpi_op(op o) {
  switch (o) {
    case op::sum:
      return MPI_SUM;
    case op::max:
      return MPI_MAX;
    case op::min:
      return MPI_MIN;
  }
  return MPI_SUM;
}

// Initialises MPI once per process and finalises it at exit if it did.
struct mpi_environment {
  bool owns = false;
  mpi_environment() {
    int init = 0;
    MPI_Initialized(&init);
    if (!init) {
      int provided = 0;
      MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided);
      owns = true;
    }
    // Errors come back as codes (then a kiln::error naming the collective); completion
    // calls of non-blocking collectives may report on the world communicator.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  ~mpi_environment() {
    int fin = 0;
    MPI_Finalized(&fin);
    if (owns && !fin) MPI_Finalize();
  }
  static mpi_environment& get() {
    static mpi_environment env;
    return env;
  }
};

struct mpi_state {
  MPI_Comm comm = MPI_COMM_NULL;
  int rank = 0, size = 1;
  std::int64_t next_seq = 0;
  op_record last_done;
  std::chrono::duration<double> timeout{600.0};
  ~mpi_state() {
    int fin = 0;
    MPI_Finalized(&fin);
    if (comm != MPI_COMM_NULL && !fin) MPI_Comm_free(&comm);
  }
};

}  // namespace detail

class mpi : public detail::blocking_collectives<mpi> {
 public:
  static constexpr const char* name = "mpi";
  static constexpr bool host_memory = true;

  // A posted collective; wait() completes it under the watchdog.
  class handle {
   public:
    handle() = default;
    handle(detail::mpi_state* s, MPI_Request r, detail::op_record rec) : s_(s), req_(r), rec_(std::move(rec)) {}
    handle(handle&& o) noexcept : s_(o.s_), req_(std::exchange(o.req_, MPI_REQUEST_NULL)), rec_(std::move(o.rec_)) {}
    handle& operator=(handle&& o) noexcept {
      if (this != &o) {
        if (req_ != MPI_REQUEST_NULL) wait();
        s_ = o.s_;
        req_ = std::exchange(o.req_, MPI_REQUEST_NULL);
        rec_ = std::move(o.rec_);
      }
      return *this;
    }
    // An abandoned handle is completed, never leaked with MPI still writing its buffer.
    ~handle() {
      if (req_ != MPI_REQUEST_NULL) {
        try {
          wait();
        } catch (...) {
        }
      }
    }
    void wait() {
      if (req_ == MPI_REQUEST_NULL) return;
      detail::wait_under_watchdog(
          [&] {
            int done = 0;
            MPI_Status st;
            const int rc = MPI_Test(&req_, &done, &st);
            if (rc != MPI_SUCCESS) fail_mpi(rc);
            return done != 0;
          },
          s_->timeout, [&](double waited) { watchdog(waited); });
      req_ = MPI_REQUEST_NULL;
      s_->last_done = std::move(rec_);
    }
    const detail::op_record& record() const { return rec_; }

   private:
    [[noreturn]] void fail_mpi(int rc) {
      char msg[MPI_MAX_ERROR_STRING];
      int len = 0;
      MPI_Error_string(rc, msg, &len);
      req_ = MPI_REQUEST_NULL;
      kiln::detail::fail("comm::mpi: rank ", s_->rank, " of ", s_->size, ": ", detail::describe(rec_),
                         " failed: ", std::string_view(msg, static_cast<std::size_t>(len)),
                         " (the ranks entered different collectives, or a peer exited: see the other ranks' output)");
    }
    [[noreturn]] void watchdog(double waited) {
      detail::report_stuck(s_->rank, s_->size, "", waited, rec_, s_->last_done, s_->timeout.count());
      MPI_Abort(MPI_COMM_WORLD, 70);
      std::_Exit(70);
    }
    detail::mpi_state* s_ = nullptr;
    MPI_Request req_ = MPI_REQUEST_NULL;
    detail::op_record rec_;
  };

  mpi() : s_(std::make_shared<detail::mpi_state>()) {
    detail::mpi_environment::get();
    MPI_Comm_dup(MPI_COMM_WORLD, &s_->comm);
    MPI_Comm_set_errhandler(s_->comm, MPI_ERRORS_RETURN);
    MPI_Comm_rank(s_->comm, &s_->rank);
    MPI_Comm_size(s_->comm, &s_->size);
    s_->timeout = detail::timeout_from_env();
  }

  int rank() const { return s_->rank; }
  int world_size() const { return s_->size; }
  double timeout() const { return s_->timeout.count(); }
  void set_timeout(double seconds) {
    KILN_CHECK(seconds > 0, "comm::mpi::set_timeout: ", seconds, " s, expected > 0");
    s_->timeout = std::chrono::duration<double>(seconds);
  }
  MPI_Comm native() const { return s_->comm; }

  // Ends every rank of the job now (MPI_Abort), after printing `why` with this rank's
  // place: what a rank does when it cannot go on, so the others do not wait for it.
  [[noreturn]] void abort(int code, std::string_view why) const {
    std::fprintf(stderr,
                 "kiln: rank %d of %d: %.*s\nkiln: rank %d of %d: aborting the job so the other ranks do not wait for "
                 "this one\n",
                 s_->rank, s_->size, int(why.size()), why.data(), s_->rank, s_->size);
    std::fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

  // ---- non-blocking ----
  template <class T>
  handle iall_reduce(T* data, std::int64_t n, op o, std::string_view label = {}) {
    auto rec = record<T>("all_reduce", label, n, op_name(o));
    MPI_Request r;
    check(MPI_Iallreduce(MPI_IN_PLACE, data, count(n, rec), detail::mpi_type<T>(), detail::mpi_op(o), s_->comm, &r),
          rec);
    return {s_.get(), r, std::move(rec)};
  }
  template <class T>
  handle ireduce_scatter(const T* send, T* recv, std::int64_t n, op o, std::string_view label = {}) {
    auto rec = record<T>("reduce_scatter", label, n, op_name(o));
    MPI_Request r;
    check(MPI_Ireduce_scatter_block(send, recv, count(n, rec), detail::mpi_type<T>(), detail::mpi_op(o), s_->comm, &r),
          rec);
    return {s_.get(), r, std::move(rec)};
  }
  template <class T>
  handle iall_gather(T* data, std::int64_t n, std::string_view label = {}) {
    auto rec = record<T>("all_gather", label, n, "");
    MPI_Request r;
    check(MPI_Iallgather(MPI_IN_PLACE, 0, MPI_DATATYPE_NULL, data, count(n, rec), detail::mpi_type<T>(), s_->comm, &r),
          rec);
    return {s_.get(), r, std::move(rec)};
  }
  template <class T>
  handle ibroadcast(T* data, std::int64_t n, int root, std::string_view label = {}) {
    auto rec = record<T>("broadcast", label, n, "");
    MPI_Request r;
    check(MPI_Ibcast(data, count(n, rec), detail::mpi_type<T>(), root, s_->comm, &r), rec);
    return {s_.get(), r, std::move(rec)};
  }
  handle ibarrier(std::string_view label = {}) {
    auto rec = record<std::byte>("barrier", label, 0, "");
    MPI_Request r;
    check(MPI_Ibarrier(s_->comm, &r), rec);
    return {s_.get(), r, std::move(rec)};
  }

  // ---- blocking (post, then wait under the watchdog): all_reduce, reduce_scatter,
  // all_gather and broadcast come from detail::blocking_collectives ----
  void barrier(std::string_view label = {}) { ibarrier(label).wait(); }

 private:
  template <class T>
  detail::op_record record(const char* kind, std::string_view label, std::int64_t n, const char* red) {
    return {s_->next_seq++, kind, std::string(label), n, detail::type_label<T>(), red};
  }
  static int count(std::int64_t n, const detail::op_record& rec) {
    KILN_CHECK(n >= 0 && n <= INT_MAX, "comm::mpi: ", detail::describe(rec), ": ", n,
               " elements per rank exceed MPI's int count; split the buffer");
    return static_cast<int>(n);
  }
  void check(int rc, const detail::op_record& rec) {
    if (rc == MPI_SUCCESS) return;
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    kiln::detail::fail("comm::mpi: rank ", s_->rank, ": posting ", detail::describe(rec),
                       " failed: ", std::string_view(msg, static_cast<std::size_t>(len)));
  }
  std::shared_ptr<detail::mpi_state> s_;
};
static_assert(communicator<mpi>);

}  // namespace kiln::comm
