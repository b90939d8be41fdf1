// kiln/ops/check_gradients.hpp — the public finite-difference gradient checker.
//
// Spec: check_gradients(f, inputs...) compares the gradients that backward computes
// for f(inputs...) with central finite differences, in f64. A non-scalar output y is
// reduced to the scalar L = Σ y ⊙ r with a fixed random projection r (seeded,
// printed in the report), which checks every output element's gradient at once.
// Each input element x is perturbed by ±eps·max(1, |x|); the check passes when
// |analytic − numeric| ≤ atol + rtol·|numeric| for every element. The result names
// the worst element. Inputs are restored exactly afterwards.
#pragma once

#include <cmath>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "kiln/autograd/var.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/ops/arithmetic.hpp"
#include "kiln/ops/reduce.hpp"

namespace kiln {

struct gradient_check_options {
  double eps = 1e-6;
  double atol = 1e-6;
  double rtol = 1e-5;
  std::uint64_t seed = 1234;  // of the output projection
};

struct gradient_check_result {
  bool ok = true;
  double max_abs_error = 0;
  std::int64_t elements_checked = 0;
  std::string report;  // the worst element, or the first failure
  explicit operator bool() const { return ok; }
};

// f: nullary callable returning var<f64>; wrt: the values to differentiate by.
inline gradient_check_result check_gradients_of(const std::function<var<f64>()>& f, std::vector<var<f64>> wrt,
                                                const gradient_check_options& opt = {}) {
  std::vector<bool> had(wrt.size());
  for (std::size_t i = 0; i < wrt.size(); ++i) {
    had[i] = wrt[i].requires_grad();
    wrt[i].set_requires_grad(true).zero_grad();
  }
  struct restore {
    std::vector<var<f64>>& w;
    std::vector<bool>& h;
    ~restore() {
      for (std::size_t i = 0; i < w.size(); ++i) w[i].set_requires_grad(h[i]);
    }
  } restore_flags{wrt, had};

  // Projection r, fixed for the analytic and numeric passes.
  var<f64> probe;
  {
    no_grad ng;
    probe = f();
  }
  const philox_stream rs{opt.seed, 0};
  tensor<f64> r(probe.shape());
  for (std::int64_t i = 0; i < r.numel(); ++i) r.data()[i] = static_cast<f64>(rs.normal(static_cast<std::uint64_t>(i)));
  const var<f64> rv(r);
  auto objective = [&] { return ops::sum(ops::mul(f(), rv)); };

  {
    enable_grad eg;
    var<f64> l = objective();
    KILN_CHECK(l.requires_grad(), "check_gradients: the function's output does not depend on any checked input");
    l.backward();
  }
  gradient_check_result res;
  double worst = -1;
  for (std::size_t i = 0; i < wrt.size(); ++i) {
    auto& x = wrt[i];
    tensor<f64>& xv = x.value();
    KILN_CHECK(xv.is_contiguous(), "check_gradients: input ", i, " is not contiguous");
    for (std::int64_t j = 0; j < xv.numel(); ++j) {
      const f64 orig = xv.data()[j];
      const f64 h = opt.eps * std::max(1.0, std::abs(orig));
      f64 lp, lm;
      {
        no_grad ng;
        xv.data()[j] = orig + h;
        lp = objective().value().data()[0];
        xv.data()[j] = orig - h;
        lm = objective().value().data()[0];
        xv.data()[j] = orig;
      }
      const f64 numeric = (lp - lm) / (2 * h);
      const f64 analytic = x.has_grad() ? x.grad().data()[j] : 0.0;
      const f64 err = std::abs(analytic - numeric);
      const f64 allowed = opt.atol + opt.rtol * std::abs(numeric);
      ++res.elements_checked;
      res.max_abs_error = std::max(res.max_abs_error, err);
      const bool bad = !(err <= allowed);
      if ((bad && res.ok) || (res.ok && err - allowed > worst)) {
        worst = err - allowed;
        std::ostringstream os;
        os << (bad ? "mismatch" : "worst") << " at input " << i << (x.name().empty() ? "" : " '" + x.name() + "'")
           << " " << xv.shape().str() << " element " << j << ": analytic " << analytic << ", numeric " << numeric
           << " (|diff| " << err << ", allowed " << allowed << "; projection seed " << opt.seed << ")";
        res.report = os.str();
      }
      if (bad) res.ok = false;
    }
  }
  return res;
}

// check_gradients(f, x, y, ...): f(x, y, ...) must return var<f64>; checks d/dx, d/dy, ...
template <class F, class... Vars>
requires(std::same_as<Vars, var<f64>>&&...) gradient_check_result check_gradients(F&& f, const Vars&... inputs) {
  return check_gradients_of([&] { return f(inputs...); }, std::vector<var<f64>>{inputs...});
}
template <class F, class... Vars>
requires(std::same_as<Vars, var<f64>>&&...) gradient_check_result
    check_gradients(const gradient_check_options& opt, F&& f, const Vars&... inputs) {
  return check_gradients_of([&] { return f(inputs...); }, std::vector<var<f64>>{inputs...}, opt);
}

}  // namespace kiln
