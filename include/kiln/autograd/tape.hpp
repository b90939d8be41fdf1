// kiln/autograd/tape.hpp — the reverse-mode tape.
//
// Spec: while a step runs, each differentiable op that has an input requiring a
// gradient appends one node: a closure holding what its backward needs. Nodes are
// coarse (a fused op is one node) and are placement-constructed in a per-step
// monotonic arena, so recording a step costs no heap allocation once the arena has
// grown to the step's size. backward() replays the nodes in reverse; a node whose
// output received no gradient is skipped. Nodes that ran are destroyed, and the
// arena is rewound (its memory is kept for the next step). One tape per thread.
// Gradient-ready notifications (what ddp overlaps its reduction with backward on): while
// a listener is installed, ops note the leaves (parameters) each node reads as it is
// recorded; backward calls the listener for a leaf as soon as the earliest recorded node
// that read it has run — nodes run in reverse, so no later node writes its gradient.
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <new>
#include <unordered_set>
#include <utility>
#include <vector>

namespace kiln::autograd {

// A bump allocator over a list of chunks; reset() rewinds without freeing, so a
// steady-state step allocates nothing.
class arena {
 public:
  void* allocate(std::size_t bytes, std::size_t align) {
    for (;;) {
      if (current_ < chunks_.size()) {
        auto& c = chunks_[current_];
        const std::size_t start = (used_ + align - 1) & ~(align - 1);
        if (start + bytes <= c.size) {
          used_ = start + bytes;
          return c.data.get() + start;
        }
        ++current_;
        used_ = 0;
        continue;
      }
      const std::size_t size = std::max(bytes + align, chunks_.empty() ? first_chunk : chunks_.back().size * 2);
      chunks_.push_back({std::make_unique<std::byte[]>(size), size});
    }
  }
  void reset() {
    current_ = 0;
    used_ = 0;
  }
  std::size_t reserved_bytes() const {
    std::size_t n = 0;
    for (auto& c : chunks_) n += c.size;
    return n;
  }

 private:
  static constexpr std::size_t first_chunk = 64 * 1024;
  struct chunk {
    std::unique_ptr<std::byte[]> data;
    std::size_t size;
  };
  std::vector<chunk> chunks_;
  std::size_t current_ = 0, used_ = 0;
};

class tape {
 public:
  tape() = default;
  ~tape() { clear(); }
  tape(const tape&) = delete;
  tape& operator=(const tape&) = delete;

  // The tape ops record onto: the thread's own, or the innermost tape_scope's.
  static tape& current() { return *current_slot(); }
  static tape*& current_slot() {
    thread_local tape root;
    thread_local tape* cur = &root;
    return cur;
  }

  // Appends a node. F provides `bool operator()()` — run the backward, returning false
  // when the node's output received no gradient (nothing to do) — and
  // `bool referenced() const` — whether the output is still held outside the tape.
  template <class F>
  void record(F&& f) {
    using Fn = std::decay_t<F>;
    void* mem = arena_.allocate(sizeof(Fn), alignof(Fn));
    auto* obj = ::new (mem) Fn(std::forward<F>(f));
    nodes_.push_back({[](void* s) { return (*static_cast<Fn*>(s))(); }, [](void* s) { static_cast<Fn*>(s)->~Fn(); },
                      [](const void* s) { return static_cast<const Fn*>(s)->referenced(); }, obj});
  }

  // Runs the nodes from the last to the first. A node that ran is dropped. A node that
  // had nothing to do is dropped too unless its output is still referenced outside the
  // tape (a second graph recorded in the same scope, to be differentiated later):
  // backward consumes the graph it differentiates, not its neighbours. When no node
  // survives, the arena is rewound. With a listener, each noted leaf is reported ready
  // right after its earliest reader ran (and any left at the end, after the last node).
  void backward() {
    std::vector<node> kept;
    std::size_t remaining = nodes_.size();
    try {
      while (remaining > 0) {
        node& n = nodes_[remaining - 1];
        const bool ran = n.run(n.self);
        --remaining;
        left_ = remaining;
        if (ran || !n.referenced(n.self))
          n.destroy(n.self);
        else
          kept.push_back(n);
        if (listener_.ready) report_ready(remaining);
      }
      if (listener_.ready) report_ready(0);
    } catch (...) {
      left_ = 0;
      for (std::size_t i = 0; i < remaining; ++i) nodes_[i].destroy(nodes_[i].self);
      for (auto& n : kept) n.destroy(n.self);
      nodes_.clear();
      arena_.reset();
      forget_leaves();
      throw;
    }
    left_ = 0;
    nodes_.assign(kept.rbegin(), kept.rend());
    if (nodes_.empty()) arena_.reset();
    forget_leaves();
  }
  // During backward (in a listener), the nodes still to run; 0 otherwise.
  std::size_t nodes_left() const { return left_; }

  // Drops all nodes (and the tensors they keep alive) without running them.
  void clear() {
    for (auto it = nodes_.rbegin(); it != nodes_.rend(); ++it) it->destroy(it->self);
    nodes_.clear();
    arena_.reset();
    forget_leaves();
  }

  // ---- gradient-ready notifications ----
  // ready(context, leaf) is called with a leaf's identity (var::id()) once no node left on
  // the tape writes its gradient. Installing a listener starts noting leaves; it stays
  // until stop_listening() (or the next listen()).
  struct listener {
    void (*ready)(void* context, const void* leaf) = nullptr;
    void* context = nullptr;
  };
  void listen(listener l) {
    forget_leaves();
    listener_ = l;
  }
  void stop_listening() {
    listener_ = {};
    forget_leaves();
  }
  bool listening() const { return listener_.ready != nullptr; }
  listener listener_of() const { return listener_; }
  // The node recorded next reads `leaf` (ops call this through any_requires_grad, before
  // the node is appended). Only a leaf's first reader counts: it runs last.
  void note_leaf(const void* leaf) {
    if (seen_.insert(leaf).second) first_reader_.push_back({nodes_.size(), leaf});
  }

  std::size_t size() const { return nodes_.size(); }
  std::size_t arena_bytes() const { return arena_.reserved_bytes(); }

 private:
  struct node {
    bool (*run)(void*);
    void (*destroy)(void*);
    bool (*referenced)(const void*);
    void* self;
  };
  // Reports the leaves whose first reader has index ≥ `done` (every node from there on ran).
  void report_ready(std::size_t done) {
    while (!first_reader_.empty() && first_reader_.back().node >= done) {
      const void* leaf = first_reader_.back().leaf;
      first_reader_.pop_back();
      listener_.ready(listener_.context, leaf);
    }
  }
  void forget_leaves() {
    first_reader_.clear();
    seen_.clear();
  }
  struct reader {
    std::size_t node;
    const void* leaf;
  };
  kiln::autograd::arena arena_;
  std::vector<node> nodes_;
  listener listener_;
  std::vector<reader> first_reader_;  // in recording order, so by node index
  std::unordered_set<const void*> seen_;
  std::size_t left_ = 0;
};

// Notes the leaves a segment reads while it runs without recording (activation
// checkpointing's first forward, under no_grad), so its one node can declare them.
class leaf_sink {
 public:
  leaf_sink() : prev_(slot()) { slot() = this; }
  ~leaf_sink() { slot() = prev_; }
  leaf_sink(const leaf_sink&) = delete;
  leaf_sink& operator=(const leaf_sink&) = delete;
  static leaf_sink*& slot() {
    thread_local leaf_sink* s = nullptr;
    return s;
  }
  void note(const void* leaf) {
    if (seen_.insert(leaf).second) leaves_.push_back(leaf);
    if (prev_) prev_->note(leaf);
  }
  const std::vector<const void*>& leaves() const { return leaves_; }

 private:
  leaf_sink* prev_;
  std::vector<const void*> leaves_;
  std::unordered_set<const void*> seen_;
};

// RAII: no gradient-ready notifications from this thread's tape while it lives (the
// leaves then count as ready only at the end of backward). For code that writes
// gradients outside the tape's nodes, such as nn::thread_replicas adding its twins'.
class quiet_listener {
 public:
  quiet_listener() : saved_(tape::current().listener_of()) { tape::current().stop_listening(); }
  ~quiet_listener() {
    if (saved_.ready) tape::current().listen(saved_);
  }
  quiet_listener(const quiet_listener&) = delete;
  quiet_listener& operator=(const quiet_listener&) = delete;

 private:
  tape::listener saved_;
};

// RAII: ops in this scope record onto a private tape, and backward() inside it replays
// only what was recorded here (activation checkpointing recomputes a block this way in
// the middle of the outer backward). Scopes nest; destruction drops unreplayed nodes.
class tape_scope {
 public:
  tape_scope() : prev_(tape::current_slot()) { tape::current_slot() = &local_; }
  ~tape_scope() { tape::current_slot() = prev_; }
  tape_scope(const tape_scope&) = delete;
  tape_scope& operator=(const tape_scope&) = delete;

 private:
  tape local_;
  tape* prev_;
};

}  // namespace kiln::autograd
