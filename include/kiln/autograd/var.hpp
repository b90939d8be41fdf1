// kiln/autograd/var.hpp — a differentiable value.
//
// Spec: var<T, Dev> is a shared handle to {value, grad, requires_grad, name}. Leaves
// are made by the user (parameters, inputs); non-leaves are made by ops and keep their
// gradient only until their producing node has run in backward. A gradient buffer is
// "valid" once something has been written to it in the current accumulation window;
// the first write overwrites (no memset), later ones accumulate. zero_grad() just
// closes the window (PyTorch's set_to_none), so the next backward overwrites.
// Copying a var copies the handle: both names see the same value and gradient.
#pragma once

#include <memory>
#include <string>
#include <utility>

#include "kiln/autograd/grad_mode.hpp"
#include "kiln/autograd/tape.hpp"
#include "kiln/core/tensor.hpp"
#include "kiln/core/transfer.hpp"
#include "kiln/cuda/ops.hpp"
#include "kiln/ops/kernel/grad_write.hpp"

namespace kiln {

template <floating_element T, device Dev = cpu>
class var {
 public:
  using value_type = T;
  using device_type = Dev;
  using tensor_type = tensor<T, Dev>;

  struct state {
    tensor_type value;
    tensor_type grad;
    bool requires_grad = false;
    bool grad_valid = false;
    bool is_leaf = true;
    std::string name;
    // Set while a strategy holds a copy of the gradient it is reducing (ddp's overlap with
    // backward): the parameter's name, for the error a further write raises.
    const std::string* sealed_by = nullptr;
  };

  var() = default;
  // A leaf holding `value`; pass requires_grad = true for parameters and inputs you
  // want gradients of.
  explicit var(tensor_type value, bool requires_grad = false) : s_(std::make_shared<state>()) {
    s_->value = std::move(value);
    s_->requires_grad = requires_grad;
  }

  bool defined() const { return s_ != nullptr; }
  const tensor_type& value() const { return s_->value; }
  tensor_type& value() { return s_->value; }
  const kiln::shape& shape() const { return s_->value.shape(); }
  std::int64_t numel() const { return s_->value.numel(); }
  int rank() const { return s_->value.rank(); }
  std::int64_t size(int d) const { return s_->value.size(d); }

  bool requires_grad() const { return s_ && s_->requires_grad; }
  const var& set_requires_grad(bool r) const {
    s_->requires_grad = r;
    return *this;
  }
  bool is_leaf() const { return s_->is_leaf; }
  const std::string& name() const { return s_->name; }
  const var& set_name(std::string n) const {
    s_->name = std::move(n);
    return *this;
  }

  // The accumulated gradient; an undefined tensor if none was written since zero_grad().
  bool has_grad() const { return s_->grad_valid; }
  // var is a handle: like std::shared_ptr, constness of the handle does not extend
  // to the shared state, so backward closures holding const copies can write grads.
  tensor_type& grad() const { return s_->grad; }
  // Closes the accumulation window: the next backward overwrites. Keeps the buffer.
  void zero_grad() const { s_->grad_valid = false; }

  // Called by backward nodes before writing this var's gradient: makes sure the buffer
  // exists and says whether to overwrite or accumulate.
  grad_write begin_grad_write() const {
    if (s_->sealed_by) [[unlikely]]
      seal_broken();
    if (s_->grad_valid) return grad_write::accumulate;
    if (!s_->grad.defined() || !(s_->grad.shape() == s_->value.shape())) s_->grad = tensor_type(s_->value.shape());
    s_->grad_valid = true;
    return grad_write::overwrite;
  }

  // Reverse-mode differentiation of this scalar (or, with an explicit seed, any
  // tensor) through every node recorded on this thread's tape since the last backward.
  void backward() {
    KILN_CHECK(numel() == 1, "backward: called on a tensor of shape ", shape().str(),
               "; pass a seed gradient for non-scalar outputs");
    backward(tensor_type::ones(shape()));
  }
  void backward(const tensor_type& seed) {
    KILN_CHECK(requires_grad(),
               "backward: this value does not require a gradient (no parameter or input it "
               "depends on has requires_grad, or it was computed under no_grad)");
    check_same_shape(seed.shape(), shape(), "backward seed");
    const grad_write mode = begin_grad_write();
    if (mode == grad_write::overwrite)
      s_->grad.copy_from(seed);
    else if constexpr (Dev::is_host)
      for (std::int64_t i = 0; i < numel(); ++i)
        s_->grad.data()[i] = T(compute_t<T>(s_->grad.data()[i]) + compute_t<T>(seed.flat(i)));
    else
      ops::gpu::scale(seed.contiguous(), 1.0f, s_->grad, grad_write::accumulate);
    autograd::tape::current().backward();
  }

  // While sealed (name non-null), writing the gradient is an error naming `name`.
  void seal(const std::string* name) const { s_->sealed_by = name; }

  // Identity of the underlying state (used by parameter visitors and optimizers).
  const state* id() const { return s_.get(); }
  std::shared_ptr<state> state_ptr() const { return s_; }

  // Used by ops: an op result that needs a gradient.
  static var make_result(tensor_type value) {
    var v(std::move(value), true);
    v.s_->is_leaf = false;
    return v;
  }

 private:
  [[noreturn]] void seal_broken() const {
    throw error("autograd: a gradient was written to parameter '" + *s_->sealed_by +
                "' after the strategy reduced it during backward (ddp's overlap): the op that wrote it did not "
                "declare the parameter among its inputs, or the gradient was written outside the tape. Set "
                "ddp_options::overlap_backward = false, or pass the parameter to autograd::record / "
                "autograd::any_requires_grad");
  }

  std::shared_ptr<state> s_;
};

namespace autograd {

// Tells the tape (or an active leaf_sink) that the node about to be recorded reads v.
template <class V>
void note_input(const V& v) {
  if (!v.defined() || !v.is_leaf() || !v.requires_grad()) return;
  if (auto* sink = leaf_sink::slot()) sink->note(v.id());
  if (grad_enabled() && tape::current().listening()) tape::current().note_leaf(v.id());
}

// True when an op on these inputs must record a node. Every op asks this of all the vars
// its node writes gradients to (and autograd::record does), which is how the tape learns
// which parameters a node reads.
template <class... V>
bool any_requires_grad(const V&... v) {
  if (leaf_sink::slot() || tape::current().listening()) [[unlikely]]
    (note_input(v), ...);
  return grad_enabled() && (v.requires_grad() || ...);
}

// Records the node that produces `out`: `backward(const tensor& grad_out)` runs if
// `out` received a gradient; a non-leaf's gradient is released once its node has run.
template <floating_element T, device Dev, class Backward>
void record_node(const var<T, Dev>& out, Backward backward) {
  struct node_fn {
    std::shared_ptr<typename var<T, Dev>::state> st;
    Backward bw;
    bool operator()() {
      if (!st->grad_valid) return false;
      bw(static_cast<const tensor<T, Dev>&>(st->grad));
      if (!st->is_leaf) {
        st->grad = {};
        st->grad_valid = false;
      }
      return true;
    }
    bool referenced() const { return st.use_count() > 1; }
  };
  tape::current().record(node_fn{out.state_ptr(), std::move(backward)});
}

// Wraps an op's forward result: when any input requires a gradient, the result does
// too and `backward` is recorded for it.
template <floating_element T, device Dev, class Backward, class... Inputs>
var<T, Dev> record(tensor<T, Dev> value, Backward backward, const Inputs&... inputs) {
  if (!any_requires_grad(inputs...)) return var<T, Dev>(std::move(value));
  var<T, Dev> out = var<T, Dev>::make_result(std::move(value));
  record_node(out, std::move(backward));
  return out;
}

}  // namespace autograd
}  // namespace kiln
