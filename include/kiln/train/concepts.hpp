// kiln/train/concepts.hpp — what the trainer asks of a module, a loader and a datamodule.
//
// Spec:
//   module (the Module slot; concept train::trainable<M, Ctx, Batch> for one batch type):
//       a class whose parameters nn::visit_parameters finds (for_each_child, or a
//       Boost.Hana struct), with
//         training_step(ctx, const Batch&)  the batch's *mean* loss as a scalar var<float>,
//                                           or a step_output {loss, items}; with automatic
//                                           optimisation the trainer runs backward and the
//                                           optimizer step
//         configure_optimizers()            (for fit) an optimizer, optim::with_schedule(
//                                           optimizer, schedule), or a std::tuple of them
//       Optional members, detected at compile time: validation_step, test_step,
//       predict_step (same arguments as training_step), hparams(), every lifecycle hook
//       in kiln::hook (a member named like a hook with the wrong signature is an error),
//       element_type / precision_requirement (precision/policy.hpp).
//       Capability, read by module_traits<M>: automatic_optimization (true unless the
//       module declares `static constexpr bool automatic_optimization = false;`, and then
//       it steps its own optimizers through ctx: ctx.optimizer<I>(),
//       ctx.manual_backward(loss), ctx.optimizer_step<I>()).
//   loader (concept train::loader<L>): l.size() batches per epoch and l.epoch(e, first)
//       an input range of batches — kiln::data::data_loader satisfies it.
//   datamodule (concept train::datamodule<D>): at least train_loader(); optional
//       val_loader(), test_loader(), predict_loader(), setup(stage), teardown(stage).
// Items: gradient accumulation and epoch means weigh each micro-batch by its number of
// items — step_output::items when given, else batch.size(), else 1.
#pragma once

#include <concepts>
#include <cstdint>
#include <type_traits>
#include <utility>

#include "kiln/autograd/var.hpp"
#include "kiln/train/hooks.hpp"

namespace kiln::train {

// What a training_step may return instead of a bare loss: the mean loss and the number
// of items it averages over (tokens that count, samples), so accumulation is exact.
template <class T = float>
struct step_output {
  var<T> loss;
  double items = 1;
};

template <class L>
concept loader = requires(L& l, std::int64_t e) {
  { l.size() } -> std::convertible_to<std::int64_t>;
  l.epoch(e, e).begin();
  l.epoch(e, e).end();
};

template <loader L>
using batch_of = std::remove_cvref_t<decltype(*std::declval<L&>().epoch(0, 0).begin())>;

template <class D>
concept datamodule = requires(D& d) {
  { d.train_loader() } -> loader;
};
template <class D>
concept has_val_loader = requires(D& d) {
  { d.val_loader() } -> loader;
};
template <class D>
concept has_test_loader = requires(D& d) {
  { d.test_loader() } -> loader;
};
template <class D>
concept has_predict_loader = requires(D& d) {
  { d.predict_loader() } -> loader;
};

// The number of items in a batch: batch.size() when it has one, else 1.
template <class B>
double batch_items(const B& b) {
  if constexpr (requires { b.size(); })
    return static_cast<double>(b.size());
  else
    return 1.0;
}

// What a module declares (automatic_optimization: true unless it says false).
template <class M>
struct module_traits {
  static constexpr bool automatic_optimization = [] {
    if constexpr (requires {
                    { M::automatic_optimization } -> std::convertible_to<bool>;
                  })
      return static_cast<bool>(M::automatic_optimization);
    else
      return true;
  }();
};

// A module that trains on batches of type Batch with the context Ctx.
template <class M, class Ctx, class Batch>
concept trainable = requires(M& m, Ctx& c, const Batch& b) {
  m.training_step(c, b);
};

template <class M>
concept has_configure_optimizers = requires(M& m) {
  m.configure_optimizers();
};

template <class R>
struct is_step_output : std::false_type {};
template <class T>
struct is_step_output<step_output<T>> : std::true_type {};

template <class R>
struct is_loss_var : std::false_type {};
template <class T, class D>
struct is_loss_var<var<T, D>> : std::true_type {};

}  // namespace kiln::train
