// kiln/comm/communicator.hpp — what a communication backend is.
//
// Spec: a *communicator* connects world_size() ranks, this process being rank(). Every
// collective is entered by every rank in the same order with the same sizes (MPI's rule);
// a rank that does not join is what the watchdog reports (comm/mpi.hpp).
//   all_reduce(data, n, op)            in place: data[i] = op over ranks of data[i]
//   reduce_scatter(send, recv, n, op)  send holds world·n elements; rank r receives the
//                                      reduction of block r (n elements) in recv
//   all_gather(data, n)                in place: data holds world·n elements, block r is
//                                      rank r's contribution; afterwards every rank has all
//   broadcast(data, n, root)           root's data to every rank
//   barrier()
//   iall_reduce / ireduce_scatter / iall_gather return a handle; handle.wait() completes
//   the operation (the buffers must stay alive and untouched until then).
// Element types: f32, f64, std::int64_t, and std::byte (all_gather / broadcast only:
// bytes move any dtype, bf16 and f16 included, bit for bit).
// Every operation takes an optional label that the watchdog prints ("ddp bucket 2/5").
// `host_memory` says where the buffers live: true for comm::local and comm::mpi (host
// pointers), false for comm::nccl (device pointers).
// Engines: comm::local (one rank, the identity; what a single-process run or a unit test
// composes), comm::mpi (Open MPI; CPU ranks), comm::nccl (GPU, bootstrapped through MPI:
// the CUDA issue).
#pragma once

#include <concepts>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <string_view>

namespace kiln::comm {

enum class op { sum, max, min };

inline const char* op_name(op o) {
  switch (o) {
    case op::sum:
      return "sum";
    case op::max:
      return "max";
    case op::min:
      return "min";
  }
  return "?";
}

template <class C>
concept communicator = requires {
  bool(C::host_memory);
}
&&requires(C& c, float* f, const float* cf, double* d, std::int64_t* i, std::byte* b, std::int64_t n,
           std::string_view label) {
  { c.rank() } -> std::convertible_to<int>;
  { c.world_size() } -> std::convertible_to<int>;
  c.all_reduce(f, n, op::sum, label);
  c.all_reduce(d, n, op::sum, label);
  c.all_reduce(i, n, op::max, label);
  c.reduce_scatter(cf, f, n, op::sum, label);
  c.all_gather(f, n, label);
  c.all_gather(b, n, label);
  c.broadcast(b, n, 0, label);
  c.barrier(label);
  c.iall_reduce(f, n, op::sum, label).wait();
  c.ireduce_scatter(cf, f, n, op::sum, label).wait();
  c.iall_gather(b, n, label).wait();
};

// One rank: every collective is the identity (reduce_scatter copies block 0).
struct local {
  static constexpr const char* name = "local";
  static constexpr bool host_memory = true;
  struct handle {
    void wait() {}
  };
  static constexpr int rank() { return 0; }
  static constexpr int world_size() { return 1; }
  template <class T>
  void all_reduce(T*, std::int64_t, op, std::string_view = {}) {}
  template <class T>
  void reduce_scatter(const T* send, T* recv, std::int64_t n, op, std::string_view = {}) {
    if (send != recv) std::memmove(recv, send, static_cast<std::size_t>(n) * sizeof(T));
  }
  template <class T>
  void all_gather(T*, std::int64_t, std::string_view = {}) {}
  template <class T>
  void broadcast(T*, std::int64_t, int, std::string_view = {}) {}
  void barrier(std::string_view = {}) {}
  template <class T>
  handle iall_reduce(T*, std::int64_t, op, std::string_view = {}) {
    return {};
  }
  template <class T>
  handle ireduce_scatter(const T* send, T* recv, std::int64_t n, op o, std::string_view l = {}) {
    reduce_scatter(send, recv, n, o, l);
    return {};
  }
  template <class T>
  handle iall_gather(T*, std::int64_t, std::string_view = {}) {
    return {};
  }
};
static_assert(communicator<local>);

}  // namespace kiln::comm
