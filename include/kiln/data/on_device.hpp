// kiln/data/on_device.hpp — a loader whose batches arrive on the training device, each
// batch's copy overlapping the step before it.
//
//   auto train = data::on_device<cuda>(loader);   // labelled_batch → labelled_batch_on<cuda>
//   trainer.fit(model, train);                    // training_step gets batches on the GPU
//   auto lm = data::on_device<cuda>(blocks, [](const data::lm_batch& b, auto& up) {
//     return data::lm_batch_on<cuda>{up(b.x), up(b.y)};   // any batch type: say how it moves
//   });
//
// Spec: on_device<Dev>(inner, move, options) has inner's size() and epoch(e, first): the
// same batches in the same order (so resume, limits and the memory plan see what inner
// gives), each mapped by move(host_batch, up), where up(tensor<T, cpu>) returns the
// tensor on Dev; distribute(rank, world) (the trainer's sharding under ddp and zero)
// reaches the inner loader. The inner loader is kept by reference and must outlive the
// adaptor.
// With options.ahead = 1 (the default on cuda) batch n+1 is built and its copies are
// enqueued when the consumer moves to batch n, so they run while batch n computes:
// copies go on cuda_runtime::copy_stream() from pinned buffers that the range owns (two
// slots, reused), and dereferencing a batch makes the compute stream wait for that
// batch's copies (an event; the host does not wait). Refilling a slot first waits for the
// copies it sent a batch earlier, long finished by then. With ahead = 0 (the default on
// the CPU, where up returns the host tensor itself) a batch is mapped when reached.
// ahead = 1 reads inner one batch early, so inner must build each batch in storage of its
// own (kiln's loaders do).
#pragma once

#include <optional>
#include <type_traits>
#include <utility>

#include "kiln/core/cuda_runtime.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/core/transfer.hpp"
#include "kiln/data/dataset.hpp"
#include "kiln/data/text.hpp"

namespace kiln::data {

// kiln's batch types with their tensors on Dev.
template <device Dev>
struct labelled_batch_on {
  tensor<float, Dev> x;
  tensor<i64, Dev> y;
  std::int64_t size() const { return y.numel(); }
};
template <device Dev>
struct lm_batch_on {
  tensor<i64, Dev> x, y;
  std::int64_t size() const { return x.rank() ? x.size(0) : 0; }
};

// The default move: kiln's batch types, field by field.
struct move_fields {
  template <class Up>
  auto operator()(const labelled_batch& b, Up& up) const {
    return labelled_batch_on<typename Up::device_type>{up(b.x), up(b.y)};
  }
  template <class Up>
  auto operator()(const lm_batch& b, Up& up) const {
    return lm_batch_on<typename Up::device_type>{up(b.x), up(b.y)};
  }
};

// up(t) for one batch: on the CPU the tensor itself; on cuda an asynchronous copy.
template <device Dev>
class uploader {
 public:
  using device_type = Dev;
  template <element T>
  tensor<T, Dev> operator()(const tensor<T, cpu>& host) {
    return to_device<Dev>(host);
  }
  void begin() {}
  void end() {}
  void ready() const {}
};

template <>
class uploader<cuda> {
 public:
  using device_type = cuda;
  template <element T>
  tensor<T, cuda> operator()(const tensor<T, cpu>& host) {
    const tensor<T, cpu> src = host.contiguous();
    tensor<T, cuda> out(src.shape());  // stream-ordered on the compute stream
    const std::size_t bytes = static_cast<std::size_t>(src.numel()) * sizeof(T);
    if (bytes == 0) return out;
    if (used_ == pins_.size()) pins_.emplace_back();
    pin& p = pins_[used_++];
    if (p.bytes < bytes) {
      p.data.reset();
      p.bytes = 0;
      p.data.reset(cuda_runtime::pinned_allocate(bytes));
      p.bytes = bytes;
    }
    std::memcpy(p.data.get(), src.data(), bytes);
    allocated_.record(cuda_runtime::compute_stream());  // the copy may not run before the allocation
    allocated_.wait_on(cuda_runtime::copy_stream());
    cuda_runtime::copy(out.data(), p.data.get(), bytes, cuda_runtime::copy_kind::host_to_device,
                       cuda_runtime::copy_stream());
    return out;
  }
  // Before a batch: this slot's previous copies are done, so its pinned buffers are free.
  void begin() {
    copied_.synchronize();
    used_ = 0;
  }
  void end() { copied_.record(cuda_runtime::copy_stream()); }
  // The compute stream waits for this batch's copies.
  void ready() const { copied_.wait_on(cuda_runtime::compute_stream()); }
  ~uploader() {
    if (used_ > 0) copied_.synchronize();  // the DMA may still read the pinned buffers
  }

 private:
  struct pin {
    cuda_runtime::pinned_buffer data;
    std::size_t bytes = 0;
  };
  std::vector<pin> pins_;
  std::size_t used_ = 0;
  cuda_runtime::event allocated_, copied_;
};

struct on_device_options {
  int ahead = -1;  // batches built ahead: 0 or 1; -1 = 1 on a GPU, 0 on the CPU
};

template <device Dev, class Loader, class Move = move_fields>
class on_device_loader {
 public:
  using device_type = Dev;
  on_device_loader(Loader& inner, Move move, on_device_options o) : inner_(&inner), move_(std::move(move)) {
    ahead_ = o.ahead < 0 ? (Dev::is_host ? 0 : 1) : o.ahead;
    KILN_CHECK(ahead_ == 0 || ahead_ == 1, "data::on_device: ahead = ", o.ahead,
               ", expected 0 or 1 (or -1: the default)");
  }
  std::int64_t size() const { return static_cast<std::int64_t>(inner_->size()); }
  // The trainer's sharding under ddp / zero (train/ranks.hpp) reaches the inner loader.
  void distribute(int rank, int world) requires requires(Loader& l) { l.distribute(rank, world); }
  { inner_->distribute(rank, world); }
  Loader& inner() { return *inner_; }
  const Loader& inner() const { return *inner_; }
  // What the memory plan counts (kiln/train/planner.hpp): batches held on Dev (the one in
  // use and the one ahead), and pinned host copies of them (one per slot; none on the CPU).
  std::int64_t batches_on_device() const { return Dev::is_host ? resident_batches(*inner_) + ahead_ : 1 + ahead_; }
  std::int64_t pinned_batches() const { return Dev::is_host ? 0 : 1 + ahead_; }

  using inner_range = std::remove_cvref_t<decltype(std::declval<Loader&>().epoch(0, 0))>;
  using host_batch = std::remove_cvref_t<decltype(*std::declval<inner_range&>().begin())>;
  using batch_type = std::remove_cvref_t<decltype(std::declval<Move&>()(std::declval<const host_batch&>(),
                                                                        std::declval<uploader<Dev>&>()))>;

  class range {
   public:
    struct sentinel {};
    class iterator {
     public:
      explicit iterator(range* r) : r_(r) {}
      batch_type& operator*() const {
        r_->slots_[r_->cur_].up.ready();
        return *r_->slots_[r_->cur_].batch;
      }
      iterator& operator++() {
        r_->advance();
        return *this;
      }
      bool operator==(sentinel) const { return !r_->slots_[r_->cur_].batch; }

     private:
      range* r_;
    };

    range(on_device_loader* owner, std::int64_t epoch, std::int64_t first)
        : owner_(owner), inner_(owner->inner_->epoch(epoch, first)), it_(inner_.begin()), end_(inner_.end()) {}
    range(const range&) = delete;
    range& operator=(const range&) = delete;
    ~range() {
      release(0);
      release(1);
    }
    iterator begin() {
      if (!started_) {
        started_ = true;
        fill(cur_);
        if (owner_->ahead_ == 1) fill(1 - cur_);
      }
      return iterator(this);
    }
    sentinel end() const { return {}; }

   private:
    struct slot {
      uploader<Dev> up;
      std::optional<batch_type> batch;
    };
    // Maps the inner loader's next batch into slot s (empty when inner is done).
    void fill(int s) {
      release(s);
      if (it_ == end_) return;
      slots_[s].up.begin();
      slots_[s].batch.emplace(owner_->move_(*it_, slots_[s].up));
      slots_[s].up.end();
      ++it_;
    }
    // Frees slot s's batch. A batch nobody dereferenced may still be copying: its blocks go
    // back to the compute stream's allocator only after the compute stream waits for them.
    void release(int s) {
      if (!slots_[s].batch) return;
      slots_[s].up.ready();
      slots_[s].batch.reset();
    }
    void advance() {
      if (owner_->ahead_ == 1) {
        release(cur_);
        cur_ = 1 - cur_;
        if (slots_[cur_].batch) fill(1 - cur_);
      } else {
        fill(cur_);
      }
    }

    on_device_loader* owner_;
    inner_range inner_;
    decltype(std::declval<inner_range&>().begin()) it_;
    decltype(std::declval<inner_range&>().end()) end_;
    slot slots_[2];
    int cur_ = 0;
    bool started_ = false;
  };

  range epoch(std::int64_t e, std::int64_t first) { return range(this, e, first); }

 private:
  Loader* inner_;
  Move move_;
  int ahead_ = 0;
};

template <device Dev, class Loader, class Move = move_fields>
on_device_loader<Dev, Loader, Move> on_device(Loader& inner, Move move = {}, on_device_options o = {}) {
  return on_device_loader<Dev, Loader, Move>(inner, std::move(move), o);
}

}  // namespace kiln::data
