// kiln/autograd/grad_mode.hpp — whether ops record onto the tape (per thread).
#pragma once

namespace kiln::autograd {

inline bool& grad_enabled_flag() {
  thread_local bool enabled = true;
  return enabled;
}
inline bool grad_enabled() { return grad_enabled_flag(); }

// RAII scope in which ops record nothing and results require no gradient
// (evaluation, optimizer updates, gradient checks' perturbed forwards).
class no_grad {
 public:
  no_grad() : prev_(grad_enabled_flag()) { grad_enabled_flag() = false; }
  ~no_grad() { grad_enabled_flag() = prev_; }
  no_grad(const no_grad&) = delete;
  no_grad& operator=(const no_grad&) = delete;

 private:
  bool prev_;
};

// RAII scope that turns recording back on inside a no_grad region.
class enable_grad {
 public:
  enable_grad() : prev_(grad_enabled_flag()) { grad_enabled_flag() = true; }
  ~enable_grad() { grad_enabled_flag() = prev_; }
  enable_grad(const enable_grad&) = delete;
  enable_grad& operator=(const enable_grad&) = delete;

 private:
  bool prev_;
};

}  // namespace kiln::autograd

namespace kiln {
using autograd::enable_grad;
using autograd::no_grad;
}  // namespace kiln
