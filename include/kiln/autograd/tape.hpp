// kiln/autograd/tape.hpp — the reverse-mode tape.
//
// Spec: while a step runs, each differentiable op that has an input requiring a
// gradient appends one node: a closure holding what its backward needs. Nodes are
// coarse (a fused op is one node) and are placement-constructed in a per-step
// monotonic arena, so recording a step costs no heap allocation once the arena has
// grown to the step's size. backward() replays the nodes in reverse; a node whose
// output received no gradient is skipped. Nodes that ran are destroyed, and the
// arena is rewound (its memory is kept for the next step). One tape per thread.
#pragma once

#include <algorithm>
#include <cstddef>
#include <memory>
#include <new>
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
  // survives, the arena is rewound.
  void backward() {
    std::vector<node> kept;
    std::size_t remaining = nodes_.size();
    try {
      while (remaining > 0) {
        node& n = nodes_[remaining - 1];
        const bool ran = n.run(n.self);
        --remaining;
        if (ran || !n.referenced(n.self))
          n.destroy(n.self);
        else
          kept.push_back(n);
      }
    } catch (...) {
      for (std::size_t i = 0; i < remaining; ++i) nodes_[i].destroy(nodes_[i].self);
      for (auto& n : kept) n.destroy(n.self);
      nodes_.clear();
      arena_.reset();
      throw;
    }
    nodes_.assign(kept.rbegin(), kept.rend());
    if (nodes_.empty()) arena_.reset();
  }

  // Drops all nodes (and the tensors they keep alive) without running them.
  void clear() {
    for (auto it = nodes_.rbegin(); it != nodes_.rend(); ++it) it->destroy(it->self);
    nodes_.clear();
    arena_.reset();
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
  kiln::autograd::arena arena_;
  std::vector<node> nodes_;
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
