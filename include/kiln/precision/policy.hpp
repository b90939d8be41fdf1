// kiln/precision/policy.hpp — the Precision slot of kiln::trainer: what a precision
// policy is, and what the policies share.
//
// Spec: a *precision policy* (concept precision::policy<P>) owns how the loss becomes
// gradients and how those reach the optimizer.
//   Requires, of every policy:
//     name                  a string literal naming it ("fp32"), for logs and checkpoints
//     param_type            the element type the module's parameters (and so its
//                           activations) have: f32, bf16 or f16. param_t<P> names it, so a
//                           module written as a template over its element type is spelled
//                           `classifier<kiln::precision::param_t<P>>`
//     P{}                   default construction (the trainer holds one)
//     check_module<M>()     compile-time rules on the module (static_asserts)
//     setup(model)          after configure_model (and a resume's weights), before
//                           configure_optimizers: the mixed policies create their masters
//     backward(loss, w, m)  runs backward with seed w·S (S the loss scale, 1 without one)
//     unscale(m, factor)    once per optimizer step, before clipping and
//                           on_before_optimizer_step: gradients times factor / S, in f32
//     master_parameters(m)  the module whose gradients the optimizer steps: the model
//                           itself (m, by reference) unless the policy keeps_masters
//     overflowed()          true between an overflow's unscale and its skipped step
//     optimizer_t<O>        the optimizer the trainer keeps for the O configure_optimizers()
//                           returned, adapt(O&&) -> optimizer_t<O> builds it, and
//                           step(opt, m) -> bool steps it (false: skipped on an overflow);
//                           checked with the user's optimizer (check_optimizer<P, O>())
//   Optional capabilities: the policy declares `static constexpr bool NAME = true;` and has
//   the members NAME requires; the trainer calls them only when it is declared.
//     keeps_masters         finish_gradients(m): the optimizer steps separate f32 masters
//                           (master_parameters(m) returns them, same names); the trainer
//                           folds the window's last micro-batch in before reducing
//     scaled                scale() -> double: the loss is multiplied by a loss scale, so
//                           a non-finite gradient is an overflow to skip, not an error
//     flags_non_finite      non_finite_gradients() -> bool, mark_non_finite_gradients():
//                           ranks agree on a non-finite gradient so they skip together
//     keeps_device_state    `template <device D> using on_device`: the policy with its
//                           state on D; the trainer keeps P::on_device<its strategy's
//                           device> (bf16_mixed on single_device<cuda>: masters on cuda)
//     checkpoints_state     save_state(const train::checkpoint_out&), load_state(const
//                           train::checkpoint_in&): a "precision" section in checkpoints, so
//                           a resume continues the loss scale and the rounding stream exactly
//   traits<P> reads the declarations (false where P declares nothing); check<P>() is the
//   compile-time check the trainer runs (a message listing the requirements, or naming
//   the member a declared capability lacks).
// A non-finite loss or gradient under fp32 and bf16 is an error naming the first
// offending parameter (check_finite, on by default); under f16_mixed it is the overflow
// signal that the loss scaler handles.
#pragma once

#include <atomic>
#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/autograd/var.hpp"
#include "kiln/core/capability.hpp"
#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/error.hpp"
#include "kiln/nn/module.hpp"

namespace kiln::train {
class checkpoint_out;
class checkpoint_in;
}  // namespace kiln::train

namespace kiln::precision {

template <class P>
using param_t = typename P::param_type;

template <class P>
concept policy = std::default_initializable<P> && requires {
  { P::name } -> std::convertible_to<std::string_view>;
  typename P::param_type;
  P::template check_module<nn::empty_module>();
} && floating_element<typename P::param_type> && requires(P& p, const P& cp, nn::empty_module& m, var<f32> loss) {
  p.setup(m);
  p.backward(loss, 1.0, m);
  p.unscale(m, 1.0);
  p.master_parameters(m);
  { cp.overflowed() } -> std::convertible_to<bool>;
};

// The capabilities P declares (false for each it does not).
template <class P>
struct traits {
  static constexpr bool keeps_masters = KILN_DECLARED_CAPABILITY(P, keeps_masters);
  static constexpr bool scaled = KILN_DECLARED_CAPABILITY(P, scaled);
  static constexpr bool flags_non_finite = KILN_DECLARED_CAPABILITY(P, flags_non_finite);
  static constexpr bool keeps_device_state = KILN_DECLARED_CAPABILITY(P, keeps_device_state);
  static constexpr bool checkpoints_state = KILN_DECLARED_CAPABILITY(P, checkpoints_state);
};

// The compile-time check of a Precision policy; true when it passes.
template <class P>
constexpr bool check() {
  static_assert(policy<P>,
                "kiln::trainer<Module, Strategy, Precision, ...>: Precision is not a precision policy "
                "(kiln/precision/policy.hpp). A precision policy needs: `static constexpr const char* name`, "
                "`using param_type` (f32, bf16 or f16), default construction, `template <class M> static "
                "constexpr void check_module()`, setup(model), backward(loss, weight, model), unscale(model, "
                "factor), master_parameters(model), overflowed() -> bool, and for the optimizer "
                "`template <class O> using optimizer_t`, adapt(O&&) and step(optimizer, model) -> bool; "
                "kiln::precision::fp32 is the simplest");
  if constexpr (policy<P>) {
    using T = traits<P>;
    static_assert(
        !T::keeps_masters || requires(P & p, nn::empty_module & m) { p.finish_gradients(m); },
        "kiln::precision: this policy declares keeps_masters but has no finish_gradients(model) (the "
        "window's last micro-batch folded into the masters before the strategy reduces them)");
    static_assert(
        !T::scaled ||
            requires(const P& p) {
              { p.scale() } -> std::convertible_to<double>;
            },
        "kiln::precision: this policy declares scaled but has no scale() -> double (the loss scale)");
    static_assert(
        !T::flags_non_finite ||
            requires(P & p, const P& cp) {
              { cp.non_finite_gradients() } -> std::convertible_to<bool>;
            },
        "kiln::precision: this policy declares flags_non_finite but has no non_finite_gradients() -> bool");
    static_assert(
        !T::flags_non_finite || requires(P & p) { p.mark_non_finite_gradients(); },
        "kiln::precision: this policy declares flags_non_finite but has no mark_non_finite_gradients()");
    static_assert(
        !T::keeps_device_state || requires { typename P::template on_device<cpu>; },
        "kiln::precision: this policy declares keeps_device_state but has no "
        "`template <kiln::device D> using on_device` (the policy with its state on D)");
    static_assert(
        !T::checkpoints_state || requires(P & p, const train::checkpoint_out& o) { p.save_state(o); },
        "kiln::precision: this policy declares checkpoints_state but has no "
        "save_state(const kiln::train::checkpoint_out&)");
    static_assert(
        !T::checkpoints_state || requires(P & p, const train::checkpoint_in& i) { p.load_state(i); },
        "kiln::precision: this policy declares checkpoints_state but has no "
        "load_state(const kiln::train::checkpoint_in&)");
  }
  return true;
}

// What the trainer asks of P for its module M: P's own rules on M (check_module), and
// master_parameters(m) being m itself unless P declares keeps_masters.
template <class P, class M>
constexpr bool check_for_module() {
  P::template check_module<M>();
  static_assert(traits<P>::keeps_masters ||
                    std::is_same_v<decltype(std::declval<P&>().master_parameters(std::declval<M&>())), M&>,
                "kiln::precision: this policy does not declare keeps_masters, so master_parameters(model) must "
                "return the model itself; a policy whose optimizer steps separate master weights declares "
                "`static constexpr bool keeps_masters = true;`");
  return true;
}

// What the trainer asks of P for the optimizer O configure_optimizers() returned (checked
// where it builds the optimizers, with the user's type).
template <class P, class O>
constexpr bool check_optimizer() {
  static_assert(
      requires { typename P::template optimizer_t<O>; },
      "kiln::precision: the precision policy has no `template <class O> using optimizer_t` (the optimizer "
      "it keeps for the one configure_optimizers() returned)");
  if constexpr (requires { typename P::template optimizer_t<O>; }) {
    static_assert(
        requires(P & p, O && o) {
          { p.adapt(std::move(o)) } -> std::convertible_to<typename P::template optimizer_t<O>>;
        },
        "kiln::precision: the precision policy has no adapt(O&&) -> optimizer_t<O>");
    static_assert(
        requires(P & p, typename P::template optimizer_t<O> & o, nn::empty_module & m) {
          { p.step(o, m) } -> std::convertible_to<bool>;
        },
        "kiln::precision: the precision policy has no step(optimizer, model) -> bool");
  }
  return true;
}

// A module's element type when its type says it: a member `element_type`, or a template
// over one floating element type (`classifier<bf16>`), alone or with a device
// (`classifier<bf16, cuda>`). void when the type does not say.
namespace detail {
template <class M>
struct template_element {
  using type = void;
};
template <template <class> class Tmpl, floating_element T>
struct template_element<Tmpl<T>> {
  using type = T;
};
// A template over an element type and a device, in either order (`classifier<bf16, cuda>`,
// `net<cuda, bf16>`).
template <template <class, class> class Tmpl, class A, class B>
requires((floating_element<A> && device<B>) || (device<A> && floating_element<B>)) struct template_element<Tmpl<A, B>> {
  using type = std::conditional_t<floating_element<A>, A, B>;
};
template <class M>
constexpr auto module_element_probe() {
  if constexpr (requires { typename M::element_type; })
    return std::type_identity<typename M::element_type>{};
  else
    return std::type_identity<typename template_element<M>::type>{};
}
}  // namespace detail
template <class M>
using module_element_t = typename decltype(detail::module_element_probe<M>())::type;

// What a module (or the kernel policy it was composed with) needs of the compute type:
// `using precision_requirement = kiln::precision::needs<kiln::bf16>;` in the module makes
// every trainer whose policy computes in another type a compile error naming the remedy.
template <floating_element... Allowed>
struct needs {
  template <class T>
  static constexpr bool allows = (std::is_same_v<T, Allowed> || ...);
};

template <class M, class T>
constexpr bool requirement_allows() {
  if constexpr (requires { typename M::precision_requirement; })
    return M::precision_requirement::template allows<T>;
  else
    return true;
}

// The compile-time rules every policy applies to its module.
template <class Module, class Policy>
constexpr void check_module_common() {
  using E = module_element_t<Module>;
  static_assert(std::is_void_v<E> || std::is_same_v<E, param_t<Policy>>,
                "kiln::trainer<Module, Strategy, Precision, ...>: the module's element type differs from the "
                "precision policy's param_type (f32 for precision::fp32, bf16 for bf16_mixed/bf16_true, f16 for "
                "f16_mixed/f16_true); instantiate the module at kiln::precision::param_t<Precision>, e.g. "
                "classifier<kiln::precision::param_t<kiln::precision::bf16_mixed>>");
  static_assert(requirement_allows<Module, param_t<Policy>>(),
                "kiln::trainer<Module, Strategy, Precision, ...>: the module's precision_requirement (declared by "
                "the module or its kernel policy) does not allow this precision policy's compute type; choose a "
                "policy that computes in an allowed type (e.g. precision::bf16_mixed instead of f16_mixed) or a "
                "kernel policy that supports this one");
}

namespace detail {
// The first non-finite element of a host tensor: its index and value.
template <class T, device Dev>
std::optional<std::pair<std::int64_t, double>> first_non_finite(const tensor<T, Dev>& t) {
  static_assert(Dev::is_host, "precision: non-finite scans run on host tensors");
  const T* d = t.data();
  const std::int64_t n = t.numel();
  // x * 0 is 0 for finite x and NaN otherwise: one vectorisable pass, split over the team
  // for large tensors (~19 µs for 269k f32 on one core, ~1.4% of an MLP step).
  std::atomic<bool> bad{false};
  std::atomic<bool>* flag = &bad;
  cpu_runtime::parallel_for(n, 1 << 16, [d, flag](std::int64_t b, std::int64_t e) {
    const T* __restrict p = d;
    float probe = 0;
#pragma omp simd reduction(+ : probe)
    for (std::int64_t i = b; i < e; ++i) probe += static_cast<float>(p[i]) * 0.0f;
    if (!std::isfinite(probe)) flag->store(true, std::memory_order_relaxed);
  });
  if (!bad.load()) return std::nullopt;
  for (std::int64_t i = 0; i < n; ++i)
    if (!std::isfinite(static_cast<double>(d[i]))) return std::make_pair(i, static_cast<double>(d[i]));
  return std::nullopt;
}

// The same for a tensor on any device: a device tensor is screened on the device (Σ x² in
// f64, finite exactly when every element is: one 8-byte read back) and copied to the host
// only when it holds a non-finite element, to name it.
template <class T, device Dev>
std::optional<std::pair<std::int64_t, double>> find_non_finite(const tensor<T, Dev>& t) {
  if constexpr (Dev::is_host) {
    return first_non_finite(t.contiguous());
  } else {
    auto acc = tensor<double, Dev>::zeros(shape{1});
    ops::gpu::add_sum_squares(t.contiguous(), acc);
    if (std::isfinite(item(acc))) return std::nullopt;
    return first_non_finite(to_host(t));
  }
}

// What the non-finite screens look at: a parameter's gradient (Grad) or value, and only
// parameters that have a gradient when screening gradients.
template <bool Grad>
inline constexpr auto checked_tensor = [](auto& p) -> auto& {
  if constexpr (Grad)
    return p.grad();
  else
    return p.value();
};
template <bool Grad>
inline constexpr auto screened = [](auto& p) { return !Grad || p.has_grad(); };

// Σ x² in f64 of the gradient (Grad) or value (!Grad) of every device parameter of m
// (that has a gradient, for Grad), in visit order, each into its own slot of one device
// vector, read back once. Empty when m has no such parameter. (All device work, the read
// back included, sits in `if constexpr` branches of the visits, so a cpu-only program
// never instantiates the CUDA runtime's calls.)
template <bool Grad, class M>
std::vector<double> device_square_sums(M& m) {
  constexpr auto checked = checked_tensor<Grad>;
  constexpr auto wanted = screened<Grad>;
  std::int64_t on_device = 0;
  nn::visit_parameters(m, [&](const std::string&, auto& p) {
    if constexpr (!std::remove_cvref_t<decltype(p)>::device_type::is_host) on_device += wanted(p) ? 1 : 0;
  });
  if (on_device == 0) return {};
  std::optional<tensor<double, cuda>> acc;
  std::int64_t slot = 0;
  nn::visit_parameters(m, [&](const std::string&, auto& p) {
    if constexpr (!std::remove_cvref_t<decltype(p)>::device_type::is_host)
      if (wanted(p)) {
        if (!acc) acc = tensor<double, cuda>::zeros(shape{on_device});
        auto s = acc->slice(0, slot, slot + 1);
        ops::gpu::add_sum_squares(checked(p).contiguous(), s);
        ++slot;
      }
  });
  std::vector<double> sums;
  nn::visit_parameters(m, [&](const std::string&, auto& p) {
    if constexpr (!std::remove_cvref_t<decltype(p)>::device_type::is_host)
      if (sums.empty() && wanted(p)) sums = to_host(*acc).to_vector();  // the one read back
  });
  return sums;
}

// Whether any gradient of m is inf or NaN: device gradients through one read back of
// their Σ g² (nothing else is copied), host ones scanned.
template <class M>
bool any_non_finite_gradient(M& m) {
  for (double s : device_square_sums<true>(m))
    if (!std::isfinite(s)) return true;
  bool bad = false;
  nn::visit_parameters(m, [&](const std::string&, auto& p) {
    if constexpr (std::remove_cvref_t<decltype(p)>::device_type::is_host)
      if (!bad && p.has_grad()) bad = first_non_finite(p.grad()).has_value();
  });
  return bad;
}

// "parameter 'net.0.weight' (element 12 = nan)" for the first parameter of m whose
// gradient (Grad) or value (!Grad) is not finite; nullopt when all are. Device tensors are
// screened through device_square_sums (one read back per call); only a non-finite one is
// copied to the host, to name the element.
template <bool Grad, class M>
std::optional<std::string> describe_first_non_finite(M& m) {
  constexpr auto checked = checked_tensor<Grad>;
  constexpr auto wanted = screened<Grad>;
  const std::vector<double> sums = device_square_sums<Grad>(m);
  std::optional<std::string> out;
  std::size_t next = 0;
  nn::visit_parameters(m, [&](const std::string& name, auto& p) {
    if (out || !wanted(p)) return;
    std::optional<std::pair<std::int64_t, double>> bad;
    if constexpr (std::remove_cvref_t<decltype(p)>::device_type::is_host) {
      bad = first_non_finite(checked(p));
    } else {
      if (!std::isfinite(sums[next++])) bad = first_non_finite(to_host(checked(p)));
    }
    if (bad) {
      std::ostringstream os;
      os << "parameter '" << name << "' (element " << bad->first << " = " << bad->second << ")";
      out = os.str();
    }
  });
  return out;
}

// Throws when the loss is not finite, naming the first parameter holding a non-finite
// value, or saying that every parameter is finite.
template <class T, class D, class M>
void check_loss_finite(const var<T, D>& loss, M& model, const char* policy) {
  const double v = item(loss.value());
  if (std::isfinite(v)) return;
  const auto bad = describe_first_non_finite<false>(model);
  std::ostringstream os;
  os << policy << ": the training loss is " << v << "; ";
  if (bad)
    os << "the first non-finite parameter is " << *bad;
  else
    os << "every parameter is finite, so the forward pass produced it (an overflow, log of 0, 0/0)";
  os << " (set check_finite = false on the precision policy to let the run continue)";
  throw error(os.str());
}

// Throws when any gradient of m (the module the optimizer steps) is not finite.
template <class M>
void check_gradients_finite(M& m, const char* policy) {
  if (auto bad = describe_first_non_finite<true>(m))
    throw error(std::string(policy) + ": non-finite gradient in " + *bad +
                " before the optimizer step although the loss was finite: backward overflowed (lower the learning "
                "rate or clip gradients; set check_finite = false on the precision policy to let the run continue)");
}

// Seeds backward with weight·scale in the loss's own type.
template <class T, class D>
void seeded_backward(var<T, D> loss, double seed) {
  if (seed == 1.0)
    loss.backward();
  else
    loss.backward(tensor<T, D>::full(loss.shape(), static_cast<T>(seed)));
}
}  // namespace detail

}  // namespace kiln::precision
