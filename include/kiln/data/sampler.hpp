// kiln/data/sampler.hpp — which sample indices an epoch visits, in which order.
//
// Spec: a *sampler* (concept data::sampler) has indices(epoch) -> std::vector<int64>
// and size() (indices per epoch). Orders are pure functions of (seed, epoch), so a
// resumed run and every rank of a distributed run can recompute them.
//   sequential_sampler{n}            0, 1, ..., n-1
//   random_sampler{n, seed}          a fresh permutation each epoch
//   distributed_sampler{n, rank, world, shuffle, seed, drop_last}
//       PyTorch's DistributedSampler: the (shuffled) order is padded with its own first
//       indices to a multiple of world (or cut down to one when drop_last), and rank r
//       takes elements r, r + world, r + 2·world, ... Shards are disjoint apart from the
//       padding and together cover every index.
#pragma once

#include <concepts>
#include <cstdint>
#include <numeric>
#include <vector>

#include "kiln/data/dataset.hpp"

namespace kiln::data {

template <class S>
concept sampler = requires(const S& s, std::int64_t epoch) {
  { s.indices(epoch) } -> std::convertible_to<std::vector<std::int64_t>>;
  { s.size() } -> std::convertible_to<std::int64_t>;
};

struct sequential_sampler {
  std::int64_t n = 0;
  std::int64_t size() const { return n; }
  std::vector<std::int64_t> indices(std::int64_t) const {
    std::vector<std::int64_t> v(static_cast<std::size_t>(n));
    std::iota(v.begin(), v.end(), 0);
    return v;
  }
};

struct random_sampler {
  std::int64_t n = 0;
  std::uint64_t seed = 0;
  std::int64_t size() const { return n; }
  std::vector<std::int64_t> indices(std::int64_t epoch) const {
    return permutation(n, seed, static_cast<std::uint64_t>(epoch));
  }
};

struct distributed_sampler {
  std::int64_t n = 0;
  int rank = 0;
  int world = 1;
  bool shuffle = true;
  std::uint64_t seed = 0;
  bool drop_last = false;

  distributed_sampler() = default;
  distributed_sampler(std::int64_t n_, int rank_, int world_, bool shuffle_ = true, std::uint64_t seed_ = 0,
                      bool drop_last_ = false)
      : n(n_), rank(rank_), world(world_), shuffle(shuffle_), seed(seed_), drop_last(drop_last_) {
    KILN_CHECK(world >= 1, "distributed_sampler: world size ", world, " must be >= 1");
    KILN_CHECK(rank >= 0 && rank < world, "distributed_sampler: rank ", rank, " is outside [0, ", world, ")");
    KILN_CHECK(n >= 0, "distributed_sampler: dataset size ", n, " must be >= 0");
  }
  std::int64_t size() const { return drop_last ? n / world : (n + world - 1) / world; }
  std::vector<std::int64_t> indices(std::int64_t epoch) const {
    std::vector<std::int64_t> order;
    if (shuffle) {
      order = permutation(n, seed, static_cast<std::uint64_t>(epoch));
    } else {
      order.resize(static_cast<std::size_t>(n));
      std::iota(order.begin(), order.end(), 0);
    }
    const std::int64_t total = size() * world;
    if (!drop_last && n > 0)
      for (std::int64_t i = 0; static_cast<std::int64_t>(order.size()) < total; ++i)
        order.push_back(order[static_cast<std::size_t>(i % n)]);
    order.resize(static_cast<std::size_t>(total));
    std::vector<std::int64_t> mine;
    mine.reserve(static_cast<std::size_t>(size()));
    for (std::int64_t i = rank; i < total; i += world) mine.push_back(order[static_cast<std::size_t>(i)]);
    return mine;
  }
};

}  // namespace kiln::data
