// kiln/strategy/strategy.hpp — the Strategy slot of kiln::trainer: what a strategy is.
//
// Spec: a *strategy* (concept strategy::policy<S>) owns where the model lives and how
// gradients and metrics are combined across the ranks of a run.
//   Requires, of every strategy:
//     using device_type              the device the model lives on (kiln::cpu, kiln::cuda)
//     S{}                            default construction (the trainer holds one)
//     rank(), world_size(),          where this process sits; only the global rank zero
//     is_global_zero()               logs and writes checkpoints
//     setup(model)                   once per fit, after configure_model and before the
//                                    precision policy's setup (ddp: rank 0's weights)
//     reduce_gradients(params)       once per optimizer step, after the window's last
//                                    backward, on the parameters the optimizer steps
//                                    (the precision policy's master_parameters)
//     reduce(double, train::reduce)  log(..., sync_dist): the value combined over ranks
//     barrier()                      where the ranks meet (a checkpoint's shards written)
//   Optional capabilities: the strategy declares `static constexpr bool NAME = true;` and
//   has the members NAME requires; the trainer calls them only when it is declared.
//     coordinates_ranks   agree(std::int64_t* flags, int n) (max over ranks, in place),
//                         broadcast_string(std::string&) (rank 0's), abort_job(const
//                         std::exception&): several ranks kept in step — stop and save
//                         requests agreed at each quiet point, a failed fit ends the job
//     overlaps_backward   listen_for_backward(params): before the forward of a window's
//                         last micro-batch, when the precision policy steps the module's
//                         own parameters (no keeps_masters), so buckets post during backward
//     shards_gradients    clip_grad_norm(params, max_norm) -> double: the global norm of
//                         gradients each rank holds part of, and the clip to it
//     adapts_optimizers   optimizer_t<O>, adapt(O&&) -> optimizer_t<O>: the optimizer the
//                         trainer keeps for each one the precision policy built
//     shards_parameters   (declares shards_gradients and adapts_optimizers too)
//                         before_forward() before each forward; stepped_parameters(opt)
//                         the parameters the adapted optimizer opt steps, as a module (what
//                         unscaling, clipping and the finite check act on); full_parameters()
//                         a guard holding the whole parameters (checkpoint capture);
//                         finish(model) when a fit ends, abandon() when one fails
//     plans_memory        memory_sharding() -> train::memory_sharding, communication_plan(
//                         model, masters) -> train::communication_bytes (trainer.plan())
//     offloads_optimizer  offload_plan(model, masters) -> bytes of ZeRO-Offload's host copies
//     checkpoints_state   save_state(const train::checkpoint_out&), load_state(const
//                         train::checkpoint_in&): a "strategy" section in checkpoints
//   traits<S> reads the declarations (false where S declares nothing). check<S>() is the
//   compile-time check the trainer runs: a type that is not a strategy gets a message
//   listing the requirements above; a declared capability without one of its members
//   gets a message naming the member (the compiler's "[with S = ...]" names the type).
// Ensures: the loop asks capabilities, never the strategy's type. strategy::compatibility
// (strategy/compatibility.hpp) holds the rules between a strategy and a precision policy.
// single_device is the identity; ddp, zero<1|2|3> are the multi-rank strategies.
#pragma once

#include <concepts>
#include <cstdint>
#include <exception>
#include <string>
#include <utility>

#include "kiln/core/capability.hpp"
#include "kiln/core/device.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/strategy/memory.hpp"
#include "kiln/strategy/reduce.hpp"

namespace kiln::train {
class checkpoint_out;
class checkpoint_in;
}  // namespace kiln::train

namespace kiln::strategy {

template <class S>
concept policy = std::default_initializable<S> && requires {
  typename S::device_type;
} && device<typename S::device_type> && requires(S& s, const S& cs, nn::empty_module& m, double v) {
  { cs.rank() } -> std::convertible_to<int>;
  { cs.world_size() } -> std::convertible_to<int>;
  { cs.is_global_zero() } -> std::convertible_to<bool>;
  s.setup(m);
  s.reduce_gradients(m);
  { s.reduce(v, strategy::reduce::mean) } -> std::convertible_to<double>;
  s.barrier();
};

// The capabilities S declares (false for each it does not).
template <class S>
struct traits {
  static constexpr bool coordinates_ranks = KILN_DECLARED_CAPABILITY(S, coordinates_ranks);
  static constexpr bool overlaps_backward = KILN_DECLARED_CAPABILITY(S, overlaps_backward);
  static constexpr bool shards_gradients = KILN_DECLARED_CAPABILITY(S, shards_gradients);
  static constexpr bool adapts_optimizers = KILN_DECLARED_CAPABILITY(S, adapts_optimizers);
  static constexpr bool shards_parameters = KILN_DECLARED_CAPABILITY(S, shards_parameters);
  static constexpr bool plans_memory = KILN_DECLARED_CAPABILITY(S, plans_memory);
  static constexpr bool offloads_optimizer = KILN_DECLARED_CAPABILITY(S, offloads_optimizer);
  static constexpr bool checkpoints_state = KILN_DECLARED_CAPABILITY(S, checkpoints_state);
};

// The members each capability requires, one concept per member (the messages below name them).
namespace detail {
struct optimizer_probe {};
template <class S>
concept has_agree = requires(S& s, std::int64_t* v) {
  s.agree(v, 1);
};
template <class S>
concept has_broadcast_string = requires(S& s, std::string& str) {
  s.broadcast_string(str);
};
template <class S>
concept has_abort_job = requires(S& s, const std::exception& e) {
  s.abort_job(e);
};
template <class S>
concept has_listen_for_backward = requires(S& s, nn::empty_module& m) {
  s.listen_for_backward(m);
};
template <class S>
concept has_clip_grad_norm = requires(S& s, nn::empty_module& m) {
  { s.clip_grad_norm(m, 1.0) } -> std::convertible_to<double>;
};
template <class S>
concept has_optimizer_t = requires {
  typename S::template optimizer_t<optimizer_probe>;
};
template <class S>
concept has_before_forward = requires(S& s) {
  s.before_forward();
};
template <class S>
concept has_full_parameters = requires(S& s) {
  s.full_parameters();
};
template <class S>
concept has_finish = requires(S& s, nn::empty_module& m) {
  s.finish(m);
};
template <class S>
concept has_abandon = requires(S& s) {
  s.abandon();
};
template <class S>
concept has_memory_sharding = requires(const S& s) {
  { s.memory_sharding() } -> std::convertible_to<strategy::memory_sharding>;
};
template <class S>
concept has_communication_plan = requires(const S& s, nn::empty_module& m) {
  { s.communication_plan(m, true) } -> std::convertible_to<strategy::communication_bytes>;
};
template <class S>
concept has_offload_plan = requires(const S& s, nn::empty_module& m) {
  { s.offload_plan(m, true) } -> std::convertible_to<std::int64_t>;
};
template <class S>
concept has_save_state = requires(S& s, const train::checkpoint_out& o) {
  s.save_state(o);
};
template <class S>
concept has_load_state = requires(S& s, const train::checkpoint_in& i) {
  s.load_state(i);
};
}  // namespace detail

// The compile-time check of a Strategy; true when it passes (so it fits a static_assert).
template <class S>
constexpr bool check() {
  static_assert(policy<S>,
                "kiln::trainer<Module, Strategy, ...>: Strategy is not a strategy (kiln/strategy/strategy.hpp). A "
                "strategy needs: `using device_type = kiln::cpu;` (or kiln::cuda), default construction, rank(), "
                "world_size(), is_global_zero(), setup(model), reduce_gradients(parameters), "
                "reduce(double, kiln::train::reduce) -> double and barrier(); "
                "kiln::strategy::single_device<kiln::cpu> is the one-device strategy");
  if constexpr (policy<S>) {
    using T = traits<S>;
    static_assert(!T::coordinates_ranks || detail::has_agree<S>,
                  "kiln::strategy: this strategy declares coordinates_ranks but has no "
                  "agree(std::int64_t* flags, int n) (the maximum over ranks of each flag, in place)");
    static_assert(!T::coordinates_ranks || detail::has_broadcast_string<S>,
                  "kiln::strategy: this strategy declares coordinates_ranks but has no "
                  "broadcast_string(std::string&) (rank 0's string on every rank)");
    static_assert(!T::coordinates_ranks || detail::has_abort_job<S>,
                  "kiln::strategy: this strategy declares coordinates_ranks but has no "
                  "abort_job(const std::exception&) (a failed fit ends the job)");
    static_assert(!T::overlaps_backward || detail::has_listen_for_backward<S>,
                  "kiln::strategy: this strategy declares overlaps_backward but has no listen_for_backward(model) "
                  "(called before the forward of a window's last micro-batch)");
    static_assert(!T::shards_gradients || detail::has_clip_grad_norm<S>,
                  "kiln::strategy: this strategy declares shards_gradients but has no "
                  "clip_grad_norm(parameters, max_norm) -> double (the global norm over the shards)");
    static_assert(!T::adapts_optimizers || detail::has_optimizer_t<S>,
                  "kiln::strategy: this strategy declares adapts_optimizers but has no "
                  "`template <class O> using optimizer_t` (the optimizer it keeps for O)");
    static_assert(!T::shards_parameters || (T::shards_gradients && T::adapts_optimizers),
                  "kiln::strategy: this strategy declares shards_parameters; it must declare shards_gradients and "
                  "adapts_optimizers too (a rank holds part of each parameter, so part of each gradient, and steps "
                  "it through the optimizer it adapted)");
    static_assert(!T::shards_parameters || detail::has_before_forward<S>,
                  "kiln::strategy: this strategy declares shards_parameters but has no before_forward()");
    static_assert(!T::shards_parameters || detail::has_full_parameters<S>,
                  "kiln::strategy: this strategy declares shards_parameters but has no full_parameters() (a guard "
                  "holding the whole parameters while a checkpoint is captured)");
    static_assert(!T::shards_parameters || detail::has_finish<S>,
                  "kiln::strategy: this strategy declares shards_parameters but has no finish(model) (the whole "
                  "parameters again when a fit ends)");
    static_assert(!T::shards_parameters || detail::has_abandon<S>,
                  "kiln::strategy: this strategy declares shards_parameters but has no abandon() (sharding off after "
                  "a failed fit)");
    static_assert(!T::plans_memory || detail::has_memory_sharding<S>,
                  "kiln::strategy: this strategy declares plans_memory but has no "
                  "memory_sharding() -> kiln::train::memory_sharding");
    static_assert(!T::plans_memory || detail::has_communication_plan<S>,
                  "kiln::strategy: this strategy declares plans_memory but has no "
                  "communication_plan(model, bool masters) -> kiln::train::communication_bytes");
    static_assert(!T::offloads_optimizer || detail::has_offload_plan<S>,
                  "kiln::strategy: this strategy declares offloads_optimizer but has no "
                  "offload_plan(model, bool masters) -> std::int64_t");
    static_assert(!T::checkpoints_state || detail::has_save_state<S>,
                  "kiln::strategy: this strategy declares checkpoints_state but has no "
                  "save_state(const kiln::train::checkpoint_out&)");
    static_assert(!T::checkpoints_state || detail::has_load_state<S>,
                  "kiln::strategy: this strategy declares checkpoints_state but has no "
                  "load_state(const kiln::train::checkpoint_in&)");
  }
  return true;
}

// The members of a capability that need the optimizer the strategy built: checked where
// the trainer holds it.
template <class S, class O>
constexpr bool check_adapt() {
  if constexpr (traits<S>::adapts_optimizers)
    static_assert(
        requires(S & s, O && o) { s.adapt(std::move(o)); },
        "kiln::strategy: this strategy declares adapts_optimizers but has no adapt(O&&) -> optimizer_t<O> "
        "for the optimizer configure_optimizers() returned");
  return true;
}
template <class S, class Adapted>
constexpr bool check_stepped_parameters() {
  if constexpr (traits<S>::shards_parameters)
    static_assert(
        requires(S & s, Adapted & o) { s.stepped_parameters(o); },
        "kiln::strategy: this strategy declares shards_parameters but has no stepped_parameters(optimizer) "
        "(the parameters the optimizer it adapted steps, as a module)");
  return true;
}

}  // namespace kiln::strategy
