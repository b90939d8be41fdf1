// kiln/comm/nccl.hpp — the communicator of GPU ranks, on NCCL, bootstrapped through MPI.
//
// Spec: comm::nccl is a handle on one NCCL communicator over every rank of
// MPI_COMM_WORLD (copies share it). Construction: MPI is initialised as comm::mpi does;
// each rank takes the GPU `local_rank % device_count` of its node (local_rank from
// MPI_Comm_split_type(SHARED)) unless a device is given; rank 0's ncclUniqueId is
// broadcast over MPI; ncclCommInitRank builds the communicator. There is no bootstrap
// protocol of kiln's own: the launcher is mpirun or srun, as for comm::mpi.
// Buffers are device pointers. Every collective is enqueued on the communicator's own
// CUDA stream and returns a handle whose wait() completes it under the same watchdog as
// comm::mpi: it polls a CUDA event and ncclCommGetAsyncError, and after timeout()
// (KILN_COLLECTIVE_TIMEOUT, default 600 s) prints which collective this rank waits in
// and the last one it completed, aborts the NCCL communicator (so the kernel stops
// spinning) and then the job. NCCL and CUDA errors become kiln::errors naming the
// collective. Element types: f32, f64, i64, bf16 (reductions), bytes (gather, broadcast).
// Buffers that kiln's kernels wrote: call after(compute stream) first, so the NCCL stream
// waits for them (the strategies do; strategy/buffers.hpp).
// Ensures: the communicator concept (comm/communicator.hpp); results as NCCL's (ring or
// tree reductions, deterministic for a fixed world size and NCCL configuration).
#pragma once

#include <cuda_runtime.h>
#include <mpi.h>
#include <nccl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <string_view>
#include <thread>

#include "kiln/comm/communicator.hpp"
#include "kiln/comm/mpi.hpp"
#include "kiln/core/dtype.hpp"
#include "kiln/core/error.hpp"

namespace kiln::comm {

namespace detail {

template <class T>
ncclDataType_t nccl_type() {
  if constexpr (std::is_same_v<T, float>)
    return ncclFloat32;
  else if constexpr (std::is_same_v<T, double>)
    return ncclFloat64;
  else if constexpr (std::is_same_v<T, std::int64_t>)
    return ncclInt64;
  else if constexpr (std::is_same_v<T, int>)
    return ncclInt32;
  else if constexpr (std::is_same_v<T, bf16>)
    return ncclBfloat16;
  else if constexpr (std::is_same_v<T, f16>)
    return ncclFloat16;
  else if constexpr (std::is_same_v<T, std::byte> || std::is_same_v<T, char> || std::is_same_v<T, unsigned char>)
    return ncclUint8;
  else
    static_assert(sizeof(T) == 0, "kiln::comm::nccl: element type must be f32, f64, i64, i32, bf16, f16 or bytes");
}
template <class T>
const char* nccl_type_label() {
  if constexpr (std::is_same_v<T, bf16>)
    return "bf16";
  else if constexpr (std::is_same_v<T, f16>)
    return "f16";
  else
    return type_label<T>();
}
inline ncclRedOp_t nccl_op(op o) {
  switch (o) {
    case op::sum:
      return ncclSum;
    case op::max:
      return ncclMax;
    case op::min:
      return ncclMin;
  }
  return ncclSum;
}

struct nccl_state {
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int rank = 0, size = 1, device = 0;
  std::int64_t next_seq = 0;
  op_record last_done;
  std::chrono::duration<double> timeout{600.0};
  int* scratch = nullptr;  // the barrier's one element
  ~nccl_state() {
    if (comm) ncclCommDestroy(comm);
    if (scratch) cudaFree(scratch);
    if (stream) cudaStreamDestroy(stream);
  }
};

}  // namespace detail

class nccl : public detail::blocking_collectives<nccl> {
 public:
  static constexpr const char* name = "nccl";
  static constexpr bool host_memory = false;  // buffers are device pointers

  class handle {
   public:
    handle() = default;
    handle(detail::nccl_state* s, cudaEvent_t e, detail::op_record rec) : s_(s), ev_(e), rec_(std::move(rec)) {}
    handle(handle&& o) noexcept : s_(o.s_), ev_(std::exchange(o.ev_, nullptr)), rec_(std::move(o.rec_)) {}
    handle& operator=(handle&& o) noexcept {
      if (this != &o) {
        if (ev_) wait_quietly();
        s_ = o.s_;
        ev_ = std::exchange(o.ev_, nullptr);
        rec_ = std::move(o.rec_);
      }
      return *this;
    }
    ~handle() {
      if (ev_) wait_quietly();
    }
    void wait() {
      if (!ev_) return;
      detail::wait_under_watchdog(
          [&] {
            const cudaError_t q = cudaEventQuery(ev_);
            if (q == cudaSuccess) return true;
            if (q != cudaErrorNotReady) fail("CUDA: ", cudaGetErrorString(q));
            ncclResult_t async = ncclSuccess;
            ncclCommGetAsyncError(s_->comm, &async);
            if (async != ncclSuccess && async != ncclInProgress) fail("NCCL: ", ncclGetErrorString(async));
            return false;
          },
          s_->timeout, [&](double waited) { watchdog(waited); });
      cudaEventDestroy(std::exchange(ev_, nullptr));
      s_->last_done = std::move(rec_);
    }

   private:
    void wait_quietly() {
      try {
        wait();
      } catch (...) {
      }
    }
    template <class... A>
    [[noreturn]] void fail(const A&... a) {
      if (ev_) cudaEventDestroy(std::exchange(ev_, nullptr));
      kiln::detail::fail("comm::nccl: rank ", s_->rank, " of ", s_->size, " (GPU ", s_->device,
                         "): ", detail::describe(rec_), " failed: ", a...);
    }
    [[noreturn]] void watchdog(double waited) {
      detail::report_stuck(s_->rank, s_->size, ", GPU " + std::to_string(s_->device), waited, rec_, s_->last_done,
                           s_->timeout.count());
      ncclCommAbort(s_->comm);  // stops the kernel waiting for the missing rank
      s_->comm = nullptr;
      MPI_Abort(MPI_COMM_WORLD, 70);
      std::_Exit(70);
    }
    detail::nccl_state* s_ = nullptr;
    cudaEvent_t ev_ = nullptr;
    detail::op_record rec_;
  };

  // device < 0: the node-local rank's GPU (local rank modulo the node's device count).
  explicit nccl(int device = -1) : s_(std::make_shared<detail::nccl_state>()) {
    detail::mpi_environment::get();
    MPI_Comm_rank(MPI_COMM_WORLD, &s_->rank);
    MPI_Comm_size(MPI_COMM_WORLD, &s_->size);
    int count = 0;
    cuda_check(cudaGetDeviceCount(&count), "cudaGetDeviceCount");
    KILN_CHECK(count > 0, "comm::nccl: rank ", s_->rank, " sees no CUDA device");
    if (device < 0) {
      MPI_Comm node;
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, s_->rank, MPI_INFO_NULL, &node);
      int local = 0;
      MPI_Comm_rank(node, &local);
      MPI_Comm_free(&node);
      device = local % count;
    }
    KILN_CHECK(device < count, "comm::nccl: device ", device, " requested, rank ", s_->rank, " sees ", count);
    s_->device = device;
    cuda_check(cudaSetDevice(device), "cudaSetDevice");
    cuda_check(cudaStreamCreateWithFlags(&s_->stream, cudaStreamNonBlocking), "cudaStreamCreate");
    cuda_check(cudaMalloc(&s_->scratch, sizeof(int)), "cudaMalloc");
    ncclUniqueId id;
    if (s_->rank == 0) nccl_check(ncclGetUniqueId(&id), "ncclGetUniqueId");
    MPI_Bcast(&id, sizeof id, MPI_BYTE, 0, MPI_COMM_WORLD);  // the bootstrap: MPI, not a protocol of ours
    nccl_check(ncclCommInitRank(&s_->comm, s_->size, id, s_->rank), "ncclCommInitRank");
    s_->timeout = detail::timeout_from_env();
  }

  int rank() const { return s_->rank; }
  int world_size() const { return s_->size; }
  int device() const { return s_->device; }
  cudaStream_t stream() const { return s_->stream; }
  double timeout() const { return s_->timeout.count(); }
  void set_timeout(double seconds) {
    KILN_CHECK(seconds > 0, "comm::nccl::set_timeout: ", seconds, " s, expected > 0");
    s_->timeout = std::chrono::duration<double>(seconds);
  }
  [[noreturn]] void abort(int code, std::string_view why) const {
    std::fprintf(stderr, "kiln: rank %d of %d: %.*s\nkiln: rank %d of %d: aborting the job\n", s_->rank, s_->size,
                 int(why.size()), why.data(), s_->rank, s_->size);
    std::fflush(stderr);
    if (s_->comm) ncclCommAbort(s_->comm);
    s_->comm = nullptr;
    MPI_Abort(MPI_COMM_WORLD, code);
    std::_Exit(code);
  }

  // Collectives posted after this call start once the work enqueued on `producer` so far
  // is done (kiln's compute stream: the kernels that packed the buffers). No host wait.
  void after(void* producer) {
    cudaEvent_t e = nullptr;
    cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    cuda_check(cudaEventRecord(e, static_cast<cudaStream_t>(producer)), "cudaEventRecord");
    const cudaError_t w = cudaStreamWaitEvent(s_->stream, e, 0);
    cudaEventDestroy(e);  // released once the wait is resolved
    cuda_check(w, "cudaStreamWaitEvent");
  }

  // ---- enqueued on stream(); wait() under the watchdog ----
  template <class T>
  handle iall_reduce(T* data, std::int64_t n, op o, std::string_view label = {}) {
    auto rec = record<T>("all_reduce", label, n, op_name(o));
    post(ncclAllReduce(data, data, count(n), detail::nccl_type<T>(), detail::nccl_op(o), s_->comm, s_->stream), rec);
    return finish(std::move(rec));
  }
  template <class T>
  handle ireduce_scatter(const T* send, T* recv, std::int64_t n, op o, std::string_view label = {}) {
    auto rec = record<T>("reduce_scatter", label, n, op_name(o));
    post(ncclReduceScatter(send, recv, count(n), detail::nccl_type<T>(), detail::nccl_op(o), s_->comm, s_->stream),
         rec);
    return finish(std::move(rec));
  }
  // In place: block rank() of data is this rank's contribution (NCCL's in-place form).
  template <class T>
  handle iall_gather(T* data, std::int64_t n, std::string_view label = {}) {
    auto rec = record<T>("all_gather", label, n, "");
    post(ncclAllGather(data + static_cast<std::size_t>(s_->rank) * static_cast<std::size_t>(n), data, count(n),
                       detail::nccl_type<T>(), s_->comm, s_->stream),
         rec);
    return finish(std::move(rec));
  }
  template <class T>
  handle ibroadcast(T* data, std::int64_t n, int root, std::string_view label = {}) {
    auto rec = record<T>("broadcast", label, n, "");
    post(ncclBroadcast(data, data, count(n), detail::nccl_type<T>(), root, s_->comm, s_->stream), rec);
    return finish(std::move(rec));
  }

  // all_reduce, reduce_scatter, all_gather, broadcast: detail::blocking_collectives.
  // A one-element all-reduce on the device: every rank's stream reaches this point.
  void barrier(std::string_view label = {}) {
    auto rec = record<int>("barrier", label, 1, "");
    post(ncclAllReduce(s_->scratch, s_->scratch, 1, ncclInt32, ncclSum, s_->comm, s_->stream), rec);
    finish(std::move(rec)).wait();
  }

 private:
  template <class T>
  detail::op_record record(const char* kind, std::string_view label, std::int64_t n, const char* red) {
    return {s_->next_seq++, kind, std::string(label), n, detail::nccl_type_label<T>(), red};
  }
  static std::size_t count(std::int64_t n) {
    KILN_CHECK(n >= 0, "comm::nccl: negative element count ", n);
    return static_cast<std::size_t>(n);
  }
  void post(ncclResult_t r, const detail::op_record& rec) {
    if (r == ncclSuccess) return;
    kiln::detail::fail("comm::nccl: rank ", s_->rank, " of ", s_->size, ": posting ", detail::describe(rec),
                       " failed: ", ncclGetErrorString(r));
  }
  handle finish(detail::op_record rec) {
    cudaEvent_t e = nullptr;
    cuda_check(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreate");
    cuda_check(cudaEventRecord(e, s_->stream), "cudaEventRecord");
    return {s_.get(), e, std::move(rec)};
  }
  void cuda_check(cudaError_t e, const char* what) const {
    KILN_CHECK(e == cudaSuccess, "comm::nccl: rank ", s_->rank, ": ", what, " failed: ", cudaGetErrorString(e));
  }
  void nccl_check(ncclResult_t r, const char* what) const {
    KILN_CHECK(r == ncclSuccess, "comm::nccl: rank ", s_->rank, ": ", what, " failed: ", ncclGetErrorString(r));
  }
  std::shared_ptr<detail::nccl_state> s_;
};
static_assert(communicator<nccl>);

}  // namespace kiln::comm
