// kiln/train/eval_loop.hpp — the validation, test and predict loops.
//
// Spec: eval_loop<Trainer> runs the loops that change no weight, under no_grad with the
// model in eval mode (back in train mode afterwards during fit):
//   run(t, loader, kind, max)   one validation (or sanity, or test) epoch over at most
//                               limit_*_batches (and fast_dev_run, and max) batches:
//                               on_{validation,test}_start → _epoch_start → per batch:
//                               _batch_start → validation_step / test_step → _batch_end →
//                               _epoch_end → the epoch's metrics emitted → _end (monitors
//                               after the module). The loop's counters are restored after,
//                               so a validation inside a training epoch leaves it as it was
//   standalone(t, model, data, stage)   trainer.validate / test: setup → one epoch over the
//                               loader, or the datamodule's test_loader / val_loader →
//                               teardown; returns the epoch's metrics
//   predict(t, model, data)     trainer.predict: setup → on_predict_start → per batch
//                               predict_step, its outputs in order → on_predict_end →
//                               teardown
// A module without validation_step runs the hooks with no step; test without test_step is
// an error.
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/autograd/grad_mode.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/train/concepts.hpp"
#include "kiln/train/hook_dispatch.hpp"
#include "kiln/train/step.hpp"

namespace kiln::train {

template <class Trainer>
struct eval_loop {
  using module_type = typename Trainer::module_type;
  using context_type = typename Trainer::context_type;

  static std::int64_t limited(std::int64_t available, const batch_limit& lim) { return lim.resolve(available); }

  template <class L>
  static void run(Trainer& t, L& l, loop_kind kind, std::int64_t max_batches = -1) {
    const auto& o = t.options_;
    std::int64_t n = l.size();
    if (kind == loop_kind::test)
      n = limited(n, o.limit_test_batches);
    else if (kind != loop_kind::sanity || max_batches < 0)
      n = limited(n, o.limit_val_batches);
    if (max_batches >= 0) n = std::min(n, max_batches);
    if (o.fast_dev_run > 0) n = std::min(n, o.fast_dev_run);
    run_range(t, l.epoch(0, 0), n, kind);
  }

  template <class Range>
  static void run_range(Trainer& t, Range&& range, std::int64_t n, loop_kind kind) {
    auto& st = t.state_;
    module_type& model = *t.model_;
    const auto saved_loop = st.loop;
    const auto saved_idx = st.batch_idx, saved_batches = st.loop_batches;
    const auto saved_phase = st.phase;
    const auto saved_items = st.last_batch_items;
    const bool test = kind == loop_kind::test;
    st.loop = kind;
    st.loop_batches = n;
    st.batch_idx = 0;
    {
      no_grad ng;
      nn::eval(model);
      st.phase = log_phase::other;
      if (test) {
        fire<hook::on_test_start>(t);
        fire<hook::on_test_epoch_start>(t);
      } else {
        fire<hook::on_validation_start>(t);
        fire<hook::on_validation_epoch_start>(t);
      }
      for (auto&& b : range) {
        if (st.batch_idx >= n) break;
        st.last_batch_items = batch_items(b);
        st.phase = log_phase::eval_step;
        if (test) {
          fire<hook::on_test_batch_start>(t, b);
          if constexpr (requires(context_type & c) { model.test_step(c, b); }) {
            stepper<Trainer>::prepare_forward(t);
            model.test_step(t.ctx_, b);
          } else {
            KILN_CHECK(false, "trainer.test: the module has no test_step(auto& ctx, const Batch& batch)");
          }
          fire<hook::on_test_batch_end>(t, b);
        } else {
          fire<hook::on_validation_batch_start>(t, b);
          if constexpr (requires(context_type & c) { model.validation_step(c, b); }) {
            stepper<Trainer>::prepare_forward(t);
            model.validation_step(t.ctx_, b);
          }
          fire<hook::on_validation_batch_end>(t, b);
        }
        st.phase = log_phase::other;
        ++st.batch_idx;
      }
      st.phase = log_phase::epoch_end;
      if (test)
        fire<hook::on_test_epoch_end>(t);
      else
        fire<hook::on_validation_epoch_end>(t);
      auto values = t.eval_metrics_.close_epoch();
      t.last_eval_ = values;
      hook_dispatch<Trainer>::emit(t, std::move(values));
      st.phase = log_phase::other;
      if (test)
        fire<hook::on_test_end, true>(t);
      else
        fire<hook::on_validation_end, true>(t);
    }
    if (st.current_stage == stage::fit) nn::train(model);
    st.loop = saved_loop;
    st.batch_idx = saved_idx;
    st.loop_batches = saved_batches;
    st.phase = saved_phase;
    st.last_batch_items = saved_items;
  }

  // trainer.validate / trainer.test.
  template <class D>
  static std::map<std::string, double> standalone(Trainer& t, module_type& model, D& data, stage s) {
    t.model_ = &model;
    t.begin_stage(s);
    fire<hook::setup>(t, s);
    if constexpr (loader<D>) {
      run(t, data, s == stage::test ? loop_kind::test : loop_kind::validation);
    } else if (s == stage::test) {
      static_assert(has_test_loader<D> || has_val_loader<D> || loader<D>,
                    "kiln::trainer::test/validate: pass a loader or a datamodule with test_loader()/val_loader()");
      if constexpr (has_test_loader<D>) {
        if constexpr (requires { data.setup(s); }) data.setup(s);
        decltype(auto) l = data.test_loader();
        run(t, l, loop_kind::test);
      } else {
        KILN_CHECK(false, "trainer.test: the datamodule has no test_loader()");
      }
    } else {
      if constexpr (has_val_loader<D>) {
        if constexpr (requires { data.setup(s); }) data.setup(s);
        decltype(auto) l = data.val_loader();
        run(t, l, loop_kind::validation);
      } else {
        KILN_CHECK(false, "trainer.validate: the datamodule has no val_loader()");
      }
    }
    fire<hook::teardown>(t, s);
    std::map<std::string, double> out;
    for (auto& [k, v] : t.last_eval_) out[k] = v;
    return out;
  }

  // trainer.predict: predict_step over every batch, the outputs in order.
  template <class D>
  static auto predict(Trainer& t, module_type& model, D& data) {
    auto& st = t.state_;
    t.model_ = &model;
    t.begin_stage(stage::predict);
    auto&& l = predict_source(data);
    using B = batch_of<std::remove_cvref_t<decltype(l)>>;
    static_assert(
        requires(module_type & m, context_type & c, const B& b) { m.predict_step(c, b); },
        "kiln::trainer::predict: the module needs predict_step(auto& ctx, const Batch& batch)");
    using R = decltype(model.predict_step(t.ctx_, std::declval<const B&>()));
    std::vector<R> out;
    fire<hook::setup>(t, stage::predict);
    no_grad ng;
    nn::eval(model);
    st.loop = loop_kind::predict;
    const std::int64_t n = limited(l.size(), t.options_.limit_predict_batches);
    st.loop_batches = n;
    fire<hook::on_predict_start>(t);
    fire<hook::on_predict_epoch_start>(t);
    st.batch_idx = 0;
    for (auto&& b : l.epoch(0, 0)) {
      if (st.batch_idx >= n) break;
      fire<hook::on_predict_batch_start>(t, b);
      out.push_back(model.predict_step(t.ctx_, b));
      fire<hook::on_predict_batch_end>(t, b);
      ++st.batch_idx;
    }
    fire<hook::on_predict_epoch_end>(t);
    fire<hook::on_predict_end>(t);
    st.loop = loop_kind::none;
    fire<hook::teardown>(t, stage::predict);
    return out;
  }

 private:
  // The loader predict() runs over: the argument itself, or the datamodule's predict_loader().
  template <class D>
  static decltype(auto) predict_source(D& data) {
    if constexpr (loader<D>) {
      return (data);
    } else {
      static_assert(has_predict_loader<D>,
                    "kiln::trainer::predict: pass a loader or a datamodule with predict_loader()");
      if constexpr (requires { data.setup(stage::predict); }) data.setup(stage::predict);
      return data.predict_loader();
    }
  }
};

}  // namespace kiln::train
