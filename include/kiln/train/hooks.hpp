// kiln/train/hooks.hpp — the hook points of the training loop, and how they are called.
//
// Spec: each hook point is a tag type in kiln::hook (hook::on_train_epoch_end, ...), with
// the member-function name and the expected signature spelled out. Hooks take one
// context object first (so adding state never breaks a callback), then the batch for
// batch-level hooks, and return void or kiln::train::control (control::stop ends the
// fit gracefully: the current point finishes, end hooks still run).
//
//   callbacks: the Callbacks... slots of kiln::trainer (concept kiln::callback<C>): an
//              object type that lists the hooks it implements,
//                using hooks = kiln::hook_list<kiln::hook::on_train_epoch_end, ...>;
//              a listed hook without a member callable with the expected signature is a
//              compile error naming the hook and the signature; a member named like a
//              hook but not listed is a compile error too (never a silent skip).
//              A callback may instead implement `invoke(hook_tag<H>, ctx, args...)` to receive
//              every listed hook through one generic entry point (lambda_callback does).
//              Optional, declared by the callback and read by callback_traits<C>:
//                monitors            (a capability) it fires after every other callback,
//                                    and after the module at on_train_epoch_end and
//                                    on_validation_end, so the metrics it watches are
//                                    complete (early_stopping, model_checkpoint)
//                tracks_checkpoints  (a capability) resume_dir() and best_model_path:
//                                    where fit(..., "last") looks first, and what "best"
//                                    resolves to (model_checkpoint)
//                state_key           a string naming its checkpoint section (else its
//                                    type name)
//              check_callback<C>() is the compile-time check the trainer runs.
//   modules:   lifecycle hooks are optional and detected with a requires-expression; a
//              non-template member named like a hook that does not accept the hook's
//              arguments is a compile error naming the expected signature.
// Ensures: a hook that is not implemented costs nothing (no call, no virtual dispatch).
#pragma once

#include <concepts>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "kiln/core/capability.hpp"

namespace kiln::train {

// A hook's verdict. Returning control::stop from any hook requests a graceful stop.
enum class control { proceed, stop };

enum class stage { fit, validate, test, predict };
inline const char* stage_name(stage s) {
  switch (s) {
    case stage::fit:
      return "fit";
    case stage::validate:
      return "validate";
    case stage::test:
      return "test";
    case stage::predict:
      return "predict";
  }
  return "?";
}

}  // namespace kiln::train

namespace kiln {

template <class... Hooks>
struct hook_list {};

// Passed to a callback's generic `invoke(hook_tag<Hook>, ctx, args...)` entry point.
template <class Hook>
struct hook_tag {
  using type = Hook;
};

template <class Hook, class List>
struct hook_listed : std::false_type {};
template <class Hook, class... H>
struct hook_listed<Hook, hook_list<H...>> : std::bool_constant<(std::is_same_v<Hook, H> || ...)> {};

template <class C>
concept declares_hooks = requires {
  typename C::hooks;
};

// A callback is any object-type that declares the hooks it implements.
template <class C>
concept callback = std::is_object_v<C> && declares_hooks<C>;

// What a callback declares beyond its hooks (false / empty for what it does not).
template <class C>
struct callback_traits {
  static constexpr bool monitors = KILN_DECLARED_CAPABILITY(C, monitors);
  static constexpr bool tracks_checkpoints = KILN_DECLARED_CAPABILITY(C, tracks_checkpoints);
  static constexpr std::string_view state_key = [] {
    if constexpr (requires { std::string_view(C::state_key); })
      return std::string_view(C::state_key);
    else
      return std::string_view{};
  }();
};

// The compile-time check of a callback; true when it passes.
template <class C>
constexpr bool check_callback() {
  static_assert(callback<C>,
                "kiln::trainer<Module, Strategy, Precision, Callbacks...>: every type after the precision policy "
                "must be a callback, i.e. declare `using hooks = kiln::hook_list<...>`");
  static_assert(
      !callback_traits<C>::tracks_checkpoints ||
          requires(const C& c) {
            { c.resume_dir() } -> std::convertible_to<std::string>;
            { c.best_model_path } -> std::convertible_to<std::string>;
          },
      "kiln: this callback declares tracks_checkpoints but lacks resume_dir() -> std::string or a "
      "std::string best_model_path");
  return true;
}

namespace hook {

// KILN_HOOK(name, "signature"): a hook tag. The static_asserts live in the macro so their
// messages can repeat the hook's name and expected signature literally.
#define KILN_HOOK(NAME, SIG)                                                                                \
  struct NAME {                                                                                             \
    static constexpr std::string_view name = #NAME;                                                         \
    static constexpr std::string_view signature = SIG;                                                      \
    template <class C, class... A>                                                                          \
    static constexpr bool by_member = requires(C & c, A&&... a) {                                           \
      c.NAME(std::forward<A>(a)...);                                                                        \
    };                                                                                                      \
    template <class C, class... A>                                                                          \
    static constexpr bool by_invoke = requires(C & c, A&&... a) {                                           \
      c.invoke(::kiln::hook_tag<NAME>{}, std::forward<A>(a)...);                                            \
    };                                                                                                      \
    template <class C>                                                                                      \
    static constexpr bool named_by = requires {                                                             \
      &C::NAME;                                                                                             \
    };                                                                                                      \
    template <class C, class... A>                                                                          \
    static constexpr bool callback_implements() {                                                           \
      constexpr bool listed = ::kiln::hook_listed<NAME, typename C::hooks>::value;                          \
      static_assert(!listed || by_member<C, A...> || by_invoke<C, A...>,                                    \
                    "kiln: this callback lists kiln::hook::" #NAME                                          \
                    " in its `hooks` but has no member callable with the expected signature: " SIG);        \
      static_assert(listed || !named_by<C>,                                                                 \
                    "kiln: this callback defines " #NAME " but does not list it: add kiln::hook::" #NAME    \
                    " to its `using hooks = kiln::hook_list<...>`");                                        \
      return listed && (by_member<C, A...> || by_invoke<C, A...>);                                          \
    }                                                                                                       \
    template <class M, class... A>                                                                          \
    static constexpr bool module_implements() {                                                             \
      static_assert(by_member<M, A...> || !named_by<M>,                                                     \
                    "kiln: the module defines " #NAME " but its signature does not match; expected: " SIG); \
      return by_member<M, A...>;                                                                            \
    }                                                                                                       \
    template <class C, class... A>                                                                          \
    static decltype(auto) call(C& c, A&&... a) {                                                            \
      if constexpr (by_member<C, A...>)                                                                     \
        return c.NAME(std::forward<A>(a)...);                                                               \
      else                                                                                                  \
        return c.invoke(::kiln::hook_tag<NAME>{}, std::forward<A>(a)...);                                   \
    }                                                                                                       \
  };

KILN_HOOK(setup, "void setup(auto& ctx, kiln::train::stage s)")
KILN_HOOK(teardown, "void teardown(auto& ctx, kiln::train::stage s)")
KILN_HOOK(configure_model, "void configure_model(auto& ctx)")
KILN_HOOK(on_fit_start, "void on_fit_start(auto& ctx)")
KILN_HOOK(on_fit_end, "void on_fit_end(auto& ctx)")
KILN_HOOK(on_sanity_check_start, "void on_sanity_check_start(auto& ctx)")
KILN_HOOK(on_sanity_check_end, "void on_sanity_check_end(auto& ctx)")
KILN_HOOK(on_train_start, "void on_train_start(auto& ctx)")
KILN_HOOK(on_train_end, "void on_train_end(auto& ctx)")
KILN_HOOK(on_train_epoch_start, "void on_train_epoch_start(auto& ctx)")
KILN_HOOK(on_train_epoch_end, "void on_train_epoch_end(auto& ctx)")
KILN_HOOK(on_train_batch_start, "void on_train_batch_start(auto& ctx, const auto& batch)")
KILN_HOOK(on_train_batch_end, "void on_train_batch_end(auto& ctx, const auto& batch)")
KILN_HOOK(on_before_zero_grad, "void on_before_zero_grad(auto& ctx)")
KILN_HOOK(on_before_backward, "void on_before_backward(auto& ctx, const auto& loss)")
KILN_HOOK(on_after_backward, "void on_after_backward(auto& ctx)")
KILN_HOOK(on_before_optimizer_step, "void on_before_optimizer_step(auto& ctx)")
KILN_HOOK(on_validation_start, "void on_validation_start(auto& ctx)")
KILN_HOOK(on_validation_end, "void on_validation_end(auto& ctx)")
KILN_HOOK(on_validation_epoch_start, "void on_validation_epoch_start(auto& ctx)")
KILN_HOOK(on_validation_epoch_end, "void on_validation_epoch_end(auto& ctx)")
KILN_HOOK(on_validation_batch_start, "void on_validation_batch_start(auto& ctx, const auto& batch)")
KILN_HOOK(on_validation_batch_end, "void on_validation_batch_end(auto& ctx, const auto& batch)")
KILN_HOOK(on_test_start, "void on_test_start(auto& ctx)")
KILN_HOOK(on_test_end, "void on_test_end(auto& ctx)")
KILN_HOOK(on_test_epoch_start, "void on_test_epoch_start(auto& ctx)")
KILN_HOOK(on_test_epoch_end, "void on_test_epoch_end(auto& ctx)")
KILN_HOOK(on_test_batch_start, "void on_test_batch_start(auto& ctx, const auto& batch)")
KILN_HOOK(on_test_batch_end, "void on_test_batch_end(auto& ctx, const auto& batch)")
KILN_HOOK(on_predict_start, "void on_predict_start(auto& ctx)")
KILN_HOOK(on_predict_end, "void on_predict_end(auto& ctx)")
KILN_HOOK(on_predict_epoch_start, "void on_predict_epoch_start(auto& ctx)")
KILN_HOOK(on_predict_epoch_end, "void on_predict_epoch_end(auto& ctx)")
KILN_HOOK(on_predict_batch_start, "void on_predict_batch_start(auto& ctx, const auto& batch)")
KILN_HOOK(on_predict_batch_end, "void on_predict_batch_end(auto& ctx, const auto& batch)")
// Loggers are callbacks that receive flushed metrics and the run's hyperparameters.
KILN_HOOK(on_log, "void on_log(auto& ctx, const kiln::train::log_record& record)")
KILN_HOOK(on_log_hyperparams, "void on_log_hyperparams(auto& ctx, const kiln::train::hparams& hp)")
KILN_HOOK(on_save_checkpoint, "void on_save_checkpoint(auto& ctx, const kiln::train::checkpoint_out& ckpt)")
KILN_HOOK(on_load_checkpoint, "void on_load_checkpoint(auto& ctx, const kiln::train::checkpoint_in& ckpt)")
KILN_HOOK(on_exception, "void on_exception(auto& ctx, const std::exception& e)")

#undef KILN_HOOK

}  // namespace hook
}  // namespace kiln
