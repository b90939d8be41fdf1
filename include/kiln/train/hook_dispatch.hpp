// kiln/train/hook_dispatch.hpp — how a hook reaches the callbacks and the module, and how
// logged values reach the loggers.
//
// Spec: fire<Hook>(t, args...) calls Hook on every callback of trainer t that lists it,
// in the order of the trainer's template arguments, then on the module when it implements
// it. Monitoring callbacks (callback_traits<C>::monitors) fire after every other callback;
// fire<Hook, true> fires them after the module too, so the metrics they watch are
// complete. A hook that returns control::stop requests a graceful stop (ctx.stop) once
// every receiver has run. A hook neither lists nor implements costs nothing.
// log_value(t, name, value, options) records a value in the running loop's metric store
// (combined across ranks first with sync_dist); emit(t, values) hands one row to the
// loggers (on_log) on the global rank zero, never during the sanity check or when
// loggers are off.
// A friend of the trainer, like train::checkpointing; no virtual dispatch.
#pragma once

#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/train/context.hpp"
#include "kiln/train/hooks.hpp"
#include "kiln/train/metrics.hpp"

namespace kiln::train {

template <class Trainer>
struct hook_dispatch {
  using context_type = typename Trainer::context_type;
  using module_type = typename Trainer::module_type;

  template <class Hook, bool MonitorsAfterModule, class... A>
  static void fire(Trainer& t, const A&... a) {
    bool stop = false;
    auto one = [&](auto& c) {
      using C = std::remove_cvref_t<decltype(c)>;
      if constexpr (Hook::template callback_implements<C, context_type&, const A&...>()) {
        using R = decltype(Hook::call(c, std::declval<context_type&>(), std::declval<const A&>()...));
        if constexpr (std::is_same_v<R, control>)
          stop |= Hook::call(c, t.ctx_, a...) == control::stop;
        else
          Hook::call(c, t.ctx_, a...);
      }
    };
    auto callbacks = [&](auto monitoring) {
      std::apply(
          [&](auto&... c) {
            (
                [&](auto& cb) {
                  if constexpr (callback_traits<std::remove_cvref_t<decltype(cb)>>::monitors ==
                                decltype(monitoring)::value)
                    one(cb);
                }(c),
                ...);
          },
          t.callbacks_);
    };
    callbacks(std::false_type{});
    if constexpr (!MonitorsAfterModule) callbacks(std::true_type{});
    if constexpr (Hook::template module_implements<module_type, context_type&, const A&...>()) {
      using R = decltype(Hook::call(std::declval<module_type&>(), std::declval<context_type&>(),
                                    std::declval<const A&>()...));
      if constexpr (std::is_same_v<R, control>)
        stop |= Hook::call(*t.model_, t.ctx_, a...) == control::stop;
      else
        Hook::call(*t.model_, t.ctx_, a...);
    }
    if constexpr (MonitorsAfterModule) callbacks(std::true_type{});
    if (stop) t.ctx_.stop(std::string("a hook returned control::stop at ") + std::string(Hook::name));
  }

  static void log_value(Trainer& t, const std::string& name, double v, const log_options& o) {
    auto& store = t.state_.loop == loop_kind::train ? t.train_metrics_ : t.eval_metrics_;
    if (o.sync_dist) v = t.strategy_.reduce(v, o.reduction);
    store.log(name, v, o, t.state_.phase, t.state_.last_batch_items > 0 ? t.state_.last_batch_items : 1.0);
  }

  static void emit(Trainer& t, std::vector<std::pair<std::string, double>> values) {
    if (values.empty() || !t.state_.loggers_enabled || !t.strategy_.is_global_zero()) return;
    if (t.state_.loop == loop_kind::sanity) return;
    log_record rec{t.state_.global_step, t.state_.epoch, std::move(values)};
    fire<hook::on_log, false>(t, rec);
  }
};

// fire<Hook>(t, args...) and fire<Hook, true>(t, args...): see the spec above.
template <class Hook, bool MonitorsAfterModule = false, class Trainer, class... A>
void fire(Trainer& t, const A&... a) {
  hook_dispatch<Trainer>::template fire<Hook, MonitorsAfterModule>(t, a...);
}

}  // namespace kiln::train
