// kiln/data/data_loader.hpp — batches from a dataset, built ahead by persistent workers.
//
// Spec: data_loader<D, Collate> turns a dataset into batches of batch_size indices taken
// from a sampler (sequential, random — chosen by options.shuffle — or one passed in, such
// as distributed_sampler). size() is the number of batches per epoch (drop_last drops a
// short tail). epoch(e, first_batch) is an input range over batches first_batch.. of
// epoch e; the batch sequence is a pure function of (seed, epoch) whatever num_workers
// is and wherever it starts, so a resumed run continues with exactly the next batch.
// Batches are built by get_batch(indices) when the dataset has it, else by Collate over
// get(i) for each index.
// num_workers = 0 builds batches on the consumer thread. num_workers > 0 starts that many
// threads on first use, kept for the loader's lifetime (persistent across epochs), which
// build up to num_workers · prefetch_factor batches ahead; batches are delivered strictly
// in order. An exception thrown while building a batch is rethrown to the consumer when
// it reaches that batch. Leaving the loop early (destroying the range) cancels the work
// still queued; the loader stays usable. One epoch range may be live at a time.
// Loaders are movable, not copyable (they own threads).
#pragma once

#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <thread>
#include <variant>
#include <vector>

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/data/dataset.hpp"
#include "kiln/data/sampler.hpp"

namespace kiln::data {

struct loader_options {
  std::int64_t batch_size = 1;
  bool shuffle = false;
  bool drop_last = false;
  std::uint64_t seed = 0;
  int num_workers = 0;
  int prefetch_factor = 2;

  std::string str() const {
    std::ostringstream os;
    os << "batch_size=" << batch_size << " shuffle=" << shuffle << " drop_last=" << drop_last << " seed=" << seed
       << " num_workers=" << num_workers << " prefetch_factor=" << prefetch_factor;
    return os.str();
  }
};

using any_sampler = std::variant<sequential_sampler, random_sampler, distributed_sampler>;

template <dataset D, class Collate = default_collate>
class data_loader {
  static auto build(const D& d, const Collate& c, std::span<const std::int64_t> idx) {
    if constexpr (batch_fetch<D>) {
      (void)c;
      return d.get_batch(idx);
    } else {
      std::vector<sample_t<D>> s;
      s.reserve(idx.size());
      for (auto i : idx) s.push_back(d.get(i));
      return c(s);
    }
  }

 public:
  using batch_type = decltype(build(std::declval<const D&>(), std::declval<const Collate&>(), {}));

  // Samples sequentially, or in a fresh random order each epoch when options.shuffle.
  data_loader(D ds, loader_options o, Collate collate = {})
      : data_loader(std::make_shared<shared>(std::move(ds), std::move(collate)), o) {}
  // Samples what `s` says (e.g. a distributed_sampler); options.shuffle is ignored.
  data_loader(D ds, loader_options o, any_sampler s, Collate collate = {})
      : data_loader(std::make_shared<shared>(std::move(ds), std::move(collate)), o, std::move(s)) {}
  data_loader(data_loader&& o) noexcept = default;
  data_loader& operator=(data_loader&& o) noexcept {
    if (this != &o) {
      if (shared_) shared_->shutdown();
      shared_ = std::move(o.shared_);
      opt_ = o.opt_;
      sampler_ = std::move(o.sampler_);
      num_samples_ = o.num_samples_;
    }
    return *this;
  }
  data_loader(const data_loader&) = delete;
  data_loader& operator=(const data_loader&) = delete;
  ~data_loader() {
    if (shared_) shared_->shutdown();
  }

 private:
  struct shared;
  static any_sampler default_sampler(std::int64_t n, const loader_options& o) {
    return o.shuffle ? any_sampler(random_sampler{n, o.seed}) : any_sampler(sequential_sampler{n});
  }
  data_loader(std::shared_ptr<shared> sh, loader_options o, std::optional<any_sampler> s = std::nullopt)
      : shared_(std::move(sh)),
        opt_(o),
        sampler_(s ? std::move(*s) : default_sampler(static_cast<std::int64_t>(shared_->ds.size()), o)) {
    KILN_CHECK(o.batch_size >= 1, "data_loader: batch_size = ", o.batch_size, ", expected >= 1");
    KILN_CHECK(o.num_workers >= 0, "data_loader: num_workers = ", o.num_workers, ", expected >= 0");
    KILN_CHECK(o.prefetch_factor >= 1, "data_loader: prefetch_factor = ", o.prefetch_factor, ", expected >= 1");
    const std::int64_t n = std::visit([](auto& x) { return x.size(); }, sampler_);
    num_samples_ = n;
    KILN_CHECK(n <= shared_->ds.size(), "data_loader: the sampler draws ", n, " indices from a dataset of ",
               shared_->ds.size());
  }

 public:
  std::int64_t size() const {
    return opt_.drop_last ? num_samples_ / opt_.batch_size : (num_samples_ + opt_.batch_size - 1) / opt_.batch_size;
  }
  std::int64_t num_samples() const { return num_samples_; }

  // Rank `rank` of `world` from now on: the sampler becomes a distributed_sampler over the
  // whole dataset that keeps this loader's shuffle, seed and drop_last (the trainer calls
  // this under a multi-rank strategy). Uneven sizes: without drop_last the epoch's order
  // is padded by repeating its first indices to a multiple of world, so every rank has
  // the same number of samples (and batches); with drop_last the tail is dropped.
  // A loader already given a distributed_sampler keeps it, if it is for this rank.
  void distribute(int rank, int world) {
    if (auto* d = std::get_if<distributed_sampler>(&sampler_)) {
      KILN_CHECK(d->rank == rank && d->world == world, "data_loader.distribute: the loader's distributed_sampler is ",
                 "for rank ", d->rank, " of ", d->world, ", but this process is rank ", rank, " of ", world);
      return;
    }
    const bool shuffle = std::holds_alternative<random_sampler>(sampler_);
    sampler_ = distributed_sampler(static_cast<std::int64_t>(shared_->ds.size()), rank, world, shuffle, opt_.seed,
                                   opt_.drop_last);
    num_samples_ = std::visit([](auto& x) { return x.size(); }, sampler_);
  }
  const D& dataset() const { return shared_->ds; }
  const loader_options& options() const { return opt_; }

  class range;
  // Batches first_batch.. of epoch `e`.
  range epoch(std::int64_t e, std::int64_t first_batch = 0) {
    KILN_CHECK(first_batch >= 0 && first_batch <= size(), "data_loader.epoch: first_batch ", first_batch,
               " is outside [0, ", size(), "]");
    return range(this, e, first_batch);
  }

  class range {
   public:
    struct sentinel {};
    class iterator {
     public:
      using value_type = batch_type;
      using difference_type = std::ptrdiff_t;
      iterator() = default;
      explicit iterator(range* r) : r_(r) {}
      batch_type& operator*() const { return *r_->current_; }
      batch_type* operator->() const { return &*r_->current_; }
      iterator& operator++() {
        r_->advance();
        return *this;
      }
      void operator++(int) { ++*this; }
      bool operator==(sentinel) const { return r_->at_ >= r_->end_; }

     private:
      range* r_ = nullptr;
    };

    range(data_loader* l, std::int64_t epoch, std::int64_t first)
        : l_(l), at_(first), end_(l->size()), next_submit_(first) {
      indices_ = std::visit([&](auto& s) { return s.indices(epoch); }, l->sampler_);
      if (l_->opt_.num_workers > 0) {
        auto& sh = *l_->shared_;
        sh.start(l_->opt_.num_workers);
        std::lock_guard lk(sh.mu);
        KILN_CHECK(!sh.active, "data_loader: an epoch range is already live on this loader");
        sh.active = true;
        ++sh.generation;
        sh.results.clear();
        gen_ = sh.generation;
      }
      fill();
    }
    range(const range&) = delete;
    range& operator=(const range&) = delete;
    ~range() {
      if (l_->opt_.num_workers > 0) {
        auto& sh = *l_->shared_;
        std::unique_lock lk(sh.mu);
        ++sh.generation;  // in-flight results of this range are dropped when they arrive
        sh.queue.clear();
        // In-flight jobs read this range's index vector: wait for them before it goes.
        sh.done_cv.wait(lk, [&] { return sh.busy == 0; });
        sh.results.clear();
        sh.active = false;
      }
    }
    iterator begin() { return iterator(this); }
    sentinel end() const { return {}; }

   private:
    friend class iterator;
    std::span<const std::int64_t> slice(std::int64_t b) const {
      const std::int64_t bs = l_->opt_.batch_size;
      const std::int64_t lo = b * bs, hi = std::min<std::int64_t>(lo + bs, static_cast<std::int64_t>(l_->num_samples_));
      return {indices_.data() + lo, static_cast<std::size_t>(hi - lo)};
    }
    // Builds or fetches batch at_ into current_.
    void fill() {
      current_.reset();
      if (at_ >= end_) return;
      if (l_->opt_.num_workers == 0) {
        current_.emplace(build(l_->shared_->ds, l_->shared_->collate, slice(at_)));
        return;
      }
      auto& sh = *l_->shared_;
      const std::int64_t window = static_cast<std::int64_t>(l_->opt_.num_workers) * l_->opt_.prefetch_factor;
      std::unique_lock lk(sh.mu);
      for (; next_submit_ < end_ && next_submit_ < at_ + window; ++next_submit_)
        sh.queue.push_back({gen_, next_submit_, slice(next_submit_)});
      sh.work_cv.notify_all();
      sh.done_cv.wait(lk, [&] { return sh.results.count(at_) != 0; });
      auto node = sh.results.extract(at_);
      lk.unlock();
      if (node.mapped().error) std::rethrow_exception(node.mapped().error);
      current_.emplace(std::move(*node.mapped().batch));
    }
    void advance() {
      ++at_;
      fill();
    }

    data_loader* l_;
    std::int64_t at_, end_, next_submit_;
    std::uint64_t gen_ = 0;
    std::vector<std::int64_t> indices_;
    std::optional<batch_type> current_;
  };

 private:
  struct result {
    std::optional<batch_type> batch;
    std::exception_ptr error;
  };
  struct job {
    std::uint64_t gen;
    std::int64_t batch;
    std::span<const std::int64_t> idx;  // into the live range's index vector
  };
  // State shared with the worker threads (kept alive by them through a shared_ptr).
  struct shared {
    D ds;
    Collate collate;
    std::mutex mu;
    std::condition_variable work_cv, done_cv;
    std::deque<job> queue;
    std::map<std::int64_t, result> results;
    std::uint64_t generation = 0;
    bool active = false, stopping = false;
    std::vector<std::thread> threads;
    int busy = 0;

    shared(D d, Collate c) : ds(std::move(d)), collate(std::move(c)) {}
    void start(int n) {
      if (!threads.empty()) return;
      for (int i = 0; i < n; ++i) threads.emplace_back([this] { work(); });
    }
    void work() {
      cpu_runtime::set_flush_denormals();
      std::unique_lock lk(mu);
      for (;;) {
        work_cv.wait(lk, [&] { return stopping || !queue.empty(); });
        if (stopping) return;
        job j = queue.front();
        queue.pop_front();
        ++busy;
        lk.unlock();
        result r;
        try {
          r.batch.emplace(build(ds, collate, j.idx));
        } catch (...) {
          r.error = std::current_exception();
        }
        lk.lock();
        --busy;
        if (j.gen == generation) results.emplace(j.batch, std::move(r));
        done_cv.notify_all();
      }
    }
    void shutdown() {
      {
        std::lock_guard lk(mu);
        stopping = true;
      }
      work_cv.notify_all();
      for (auto& t : threads) t.join();
      threads.clear();
    }
  };

  std::shared_ptr<shared> shared_;
  loader_options opt_;
  any_sampler sampler_;
  std::int64_t num_samples_ = 0;
};

}  // namespace kiln::data
