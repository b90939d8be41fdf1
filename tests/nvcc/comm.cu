// Compiled by nvcc in CI: the communicators and strategies in a CUDA translation unit —
// comm::nccl (and the communicator concept it satisfies) with every collective on device
// buffers, and ddp / zero over comm::mpi and comm::nccl, instantiated.
#include "kiln/comm/mpi.hpp"
#include "kiln/comm/nccl.hpp"
#include "kiln/strategy/ddp.hpp"
#include "kiln/strategy/zero.hpp"

static_assert(kiln::comm::communicator<kiln::comm::nccl>);
static_assert(kiln::comm::communicator<kiln::comm::mpi>);

template class kiln::strategy::ddp<kiln::comm::mpi>;
template class kiln::strategy::zero<1, kiln::comm::mpi>;
template class kiln::strategy::zero<2, kiln::comm::mpi, kiln::strategy::offload::cpu>;
// GPU ranks: the strategies over comm::nccl with the model on cuda, and over comm::mpi
// through pinned host memory (their trainers are built by the host compiler in
// tests/gpu/test_dist.cpp and examples/04_distributed.cpp).
template class kiln::strategy::ddp<kiln::comm::nccl, kiln::cuda>;
template class kiln::strategy::ddp<kiln::comm::mpi, kiln::cuda>;
template class kiln::strategy::zero<1, kiln::comm::nccl, kiln::strategy::offload::none, kiln::cuda>;
template class kiln::strategy::zero<2, kiln::comm::nccl, kiln::strategy::offload::none, kiln::cuda>;
template class kiln::strategy::zero<3, kiln::comm::nccl, kiln::strategy::offload::none, kiln::cuda>;

// Device buffers through every collective of the concept (not run here: compiled).
void every_collective(kiln::comm::nccl& c, float* f, kiln::bf16* h, std::byte* b, std::int64_t n) {
  c.all_reduce(f, n, kiln::comm::op::sum, "f32");
  c.all_reduce(h, n, kiln::comm::op::max, "bf16");
  c.reduce_scatter(f, f + n * c.world_size(), n, kiln::comm::op::sum);
  c.all_gather(b, n);
  c.broadcast(b, n, 0);
  c.barrier();
  auto hd = c.iall_reduce(f, n, kiln::comm::op::min);
  hd.wait();
}
