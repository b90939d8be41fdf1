// kiln/train/checkpointing.hpp — the trainer's full state to a checkpoint and back.
//
// Spec: checkpointing<Trainer>::capture() writes everything a run needs to continue
// bit for bit (kiln/io/checkpoint.hpp has the file layout):
//   model parameters; each optimizer's state tensors, counters and per-group learning
//   rates; each schedule's step count, base rates and (checkpoints_state) its state; the
//   precision and strategy policies' state when they declare checkpoints_state; the loop
//   position (epoch, next batch within it — the data loader's sampler order is a pure
//   function of (seed, epoch), so the position is the loader's whole state), global_step,
//   micro_batches, the accumulation factor and an open accumulation window with its
//   gradients; the stop flag; the elapsed training time (max_time continues); every RNG
//   stream (the default generator and each module-owned generator such as dropout's);
//   the epoch accumulators of logged metrics and the latest callback metrics; each
//   callback's and the module's on_save_checkpoint section; hyperparameters.
// restore_modules() (at configure_model time) and restore_loop() (after on_fit_start)
// put it back. Everything is validated before anything changes; if a later step still
// fails, the model's weights, the callbacks' states and the RNG are rolled back, so a
// failed resume leaves memory as it was before fit() was called.
// find_checkpoint() resolves fit(..., "last" | "best" | path).
//
// Frozen parameters (an adapter run: attach_lora froze the base, kiln/nn/lora.hpp) are
// not written: the checkpoint holds the trainable parameters and, for the frozen ones
// and NF4 bases, a fingerprint (kiln.state.model.frozen: count, elements, and a CRC-32C
// over names, shapes and bytes). Resuming needs the same base in the model (load it as
// the run did: io::load_hf, then attach_lora or load_peft_adapter); a different one is
// refused, naming both fingerprints, before anything changes.
#pragma once

#include <charconv>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "kiln/core/crc32c.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/core/type_name.hpp"
#include "kiln/io/checkpoint.hpp"
#include "kiln/nn/lora.hpp"
#include "kiln/nn/weights.hpp"
#include "kiln/optim/optimizer.hpp"
#include "kiln/optim/schedule.hpp"
#include "kiln/precision/policy.hpp"
#include "kiln/strategy/strategy.hpp"
#include "kiln/train/checkpoint_io.hpp"
#include "kiln/train/hooks.hpp"
#include "kiln/train/metrics.hpp"
#include "kiln/train/ranks.hpp"

namespace kiln::train {

// The schedule slot of an optimizer that configure_optimizers() returned without one.
struct no_schedule {};

// The frozen parameters' and NF4 bases' fingerprint (see the spec); count 0 when none.
struct frozen_fingerprint {
  std::int64_t count = 0, elements = 0;
  std::uint32_t crc = 0;
  std::string str() const {
    char b[96];
    std::snprintf(b, sizeof b, "%lld tensors, %lld elements, CRC-32C %08x", static_cast<long long>(count),
                  static_cast<long long>(elements), crc);
    return b;
  }
};
template <class M>
frozen_fingerprint fingerprint_frozen(M& model) {
  frozen_fingerprint f;
  auto add = [&](const std::string& name, const kiln::shape& s, const void* bytes, std::size_t n) {
    ++f.count;
    f.elements += s.numel();
    f.crc = crc32c(name.data(), name.size(), f.crc);
    const std::string dims = s.str();
    f.crc = crc32c(dims.data(), dims.size(), f.crc);
    f.crc = crc32c(bytes, n, f.crc);
  };
  nn::visit_parameters(model, [&](const std::string& name, auto& p) {
    if (p.requires_grad()) return;
    const auto& v = p.value();
    const auto bytes = static_cast<std::size_t>(v.numel()) * sizeof(*v.data());
    if constexpr (std::remove_cvref_t<decltype(v)>::device_type::is_host)
      if (v.is_contiguous()) return add(name, v.shape(), v.data(), bytes);  // read in place: no copy of the base
    const auto h = host_copy(v).contiguous();
    add(name, h.shape(), h.data(), bytes);
  });
  nn::visit_lora_layers(model, [&](const std::string& name, auto& layer) {
    if (!layer.qweight) return;
    const auto& q = *layer.qweight;
    add(name + ".weight (NF4)", q.dims, q.codes.data(), q.codes.size());
    f.crc = crc32c(q.scale_codes.data(), q.scale_codes.size(), f.crc);
    f.crc = crc32c(q.scale_absmax.data(), q.scale_absmax.size() * sizeof(float), f.crc);
  });
  return f;
}

// The most recent "last.ckpt" (else any *.ckpt) in `dir`, by modification time.
inline std::optional<std::filesystem::path> newest_checkpoint(const std::filesystem::path& dir, bool last_only) {
  namespace fs = std::filesystem;
  std::optional<fs::path> best;
  fs::file_time_type best_t{};
  std::error_code ec;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    const auto& p = it->path();
    const std::string n = p.filename().string();
    if (p.extension() != ".ckpt" || n.starts_with(".")) continue;
    if (last_only && !n.starts_with("last")) continue;
    const auto t = fs::last_write_time(p, ec);
    if (ec) continue;
    if (!best || t > best_t) {
      best = p;
      best_t = t;
    }
  }
  return best;
}

// Where fit(..., ckpt_path) resumes from. "last": the newest last*.ckpt in `dirs`, then
// in <root>/version_*/checkpoints; "best": `best_hint` if set, else the best_model_path
// recorded by model_checkpoint in the newest last checkpoint; anything else is a path
// that must exist. nullopt: "last"/"best" found nothing (fit starts from scratch).
inline std::optional<std::filesystem::path> find_checkpoint(std::string_view which, const std::string& root,
                                                            const std::vector<std::string>& dirs,
                                                            const std::string& best_hint) {
  namespace fs = std::filesystem;
  auto find_last = [&]() -> std::optional<fs::path> {
    for (auto& d : dirs)
      if (auto p = newest_checkpoint(d, true)) return p;
    std::optional<fs::path> best;
    fs::file_time_type best_t{};
    std::error_code ec;
    for (auto it = fs::directory_iterator(root, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
      if (!it->path().filename().string().starts_with("version_")) continue;
      if (auto p = newest_checkpoint(it->path() / "checkpoints", true)) {
        const auto t = fs::last_write_time(*p, ec);
        if (!ec && (!best || t > best_t)) {
          best = p;
          best_t = t;
        }
      }
    }
    return best;
  };
  if (which == "last") return find_last();
  if (which == "best") {
    if (!best_hint.empty()) return fs::path(best_hint);
    if (auto last = find_last()) {
      const auto r = io::checkpoint_reader::open(*last);
      if (const auto* cbs = r.state().find("callbacks"))
        for (auto& [k, v] : cbs->as_object())
          if (const auto* b = v.find("best_model_path"); b && b->is_string() && !b->as_string().empty())
            return fs::path(b->as_string());
    }
    return std::nullopt;
  }
  KILN_CHECK(fs::exists(fs::path(which)), "fit: ckpt_path '", which,
             "' does not exist (pass a checkpoint file, \"last\" or \"best\")");
  return fs::path(which);
}

template <class Trainer>
struct checkpointing {
  using module_type = typename Trainer::module_type;
  using strategy_traits = strategy::traits<typename Trainer::strategy_type>;
  using precision_traits = precision::traits<typename Trainer::precision_type>;

  // ---- keys ----
  template <class C>
  static std::string callback_key() {
    if constexpr (!callback_traits<C>::state_key.empty())
      return std::string(callback_traits<C>::state_key);
    else
      return type_name<C>();
  }

  // fit(..., ckpt_path)'s lookup, with the directories and best path model_checkpoint knows.
  static std::optional<std::filesystem::path> find(Trainer& t, std::string_view which) {
    std::vector<std::string> dirs;
    std::string best;
    std::apply(
        [&](auto&... c) {
          (
              [&](auto& cb) {
                if constexpr (callback_traits<std::remove_cvref_t<decltype(cb)>>::tracks_checkpoints) {
                  if (!cb.resume_dir().empty()) dirs.push_back(cb.resume_dir());
                  if (best.empty()) best = cb.best_model_path;
                }
              }(c),
              ...);
        },
        t.callbacks_);
    return train::find_checkpoint(which, t.options_.default_root_dir, dirs, best);
  }

  // ---- save ----
  static void capture(Trainer& t, io::checkpoint_writer& w, bool weights_only, std::int64_t epoch,
                      std::int64_t next_batch) {
    auto& st = t.state_;
    module_type& model = *t.model_;
    io::json& doc = w.state();
    doc.set("kind", weights_only ? "weights_only" : "full");
    io::json tr = io::json::object();
    tr.set("epoch", epoch);
    tr.set("next_batch", next_batch);
    tr.set("global_step", st.global_step);
    tr.set("micro_batches", st.micro_batches);
    tr.set("train_batches", st.train_batches);
    tr.set("accumulate_grad_batches", st.accumulate_grad_batches);
    tr.set("should_stop", st.should_stop);
    tr.set("stop_reason", st.stop_reason);
    tr.set("elapsed_seconds", t.ctx_.elapsed_seconds());
    tr.set("accum_count", t.accum_count_);
    tr.set("window_items", t.window_items_);
    doc.set("trainer", std::move(tr));
    io::json m = io::json::object();
    m.set("type", type_name<module_type>());
    m.set("parameters", nn::count_parameters(model).total);
    const frozen_fingerprint frozen = fingerprint_frozen(model);
    if (frozen.count > 0) {
      io::json fz = io::json::object();
      fz.set("count", frozen.count);
      fz.set("elements", frozen.elements);
      fz.set("crc32c", static_cast<std::int64_t>(frozen.crc));
      m.set("frozen", std::move(fz));
    }
    doc.set("model", std::move(m));
    io::json hp = io::json::object();
    for (auto& [k, v] : t.collect_hparams().values) hp.set(k, v);
    doc.set("hparams", std::move(hp));
    io::add_module(w, "model/", model, frozen.count > 0 ? io::parameters::trainable : io::parameters::all);
    if (weights_only) return;

    // Gradients of an open accumulation window.
    if (t.accum_count_ > 0)
      nn::visit_parameters(model, [&](const std::string& name, auto& p) {
        if (p.has_grad()) w.add("grad/" + name, p.grad());
      });

    // RNG streams.
    io::json rng = io::json::object();
    rng.set("default", stream_json(default_generator()));
    io::json mods = io::json::object();
    nn::visit_modules(model, [&](const std::string& name, auto& sub) {
      if constexpr (requires { sub.generator.offset(); })
        if constexpr (std::is_same_v<std::remove_cvref_t<decltype(sub.generator)>, philox_generator>)
          mods.set(name.empty() ? "." : name, stream_json(sub.generator));
    });
    rng.set("modules", std::move(mods));
    doc.set("rng", std::move(rng));

    // Optimizers and schedules.
    io::json opts = io::json::array();
    if (t.optimizers_) {
      std::size_t i = 0;
      std::apply([&](auto&... so) { (opts.push_back(save_optimizer(w, so, i++, t.capture_shards_)), ...); },
                 *t.optimizers_);
    }
    doc.set("optimizers", std::move(opts));

    // Metrics.
    io::json met = io::json::object();
    io::json latest = io::json::object();
    for (auto& [k, v] : t.board_.latest) latest.set(k, v);
    met.set("latest", std::move(latest));
    io::json bar = io::json::array();
    for (auto& [k, v] : t.board_.bar) bar.push_back(io::json(io::json::array_type{io::json(k), io::json(v)}));
    met.set("bar", std::move(bar));
    met.set("train", entries_json(t.train_metrics_.entries()));
    doc.set("metrics", std::move(met));

    // Policies, callbacks, module.
    if constexpr (precision_traits::checkpoints_state) {
      io::json& sec = doc.set("precision", io::json::object());
      t.precision_.save_state(checkpoint_out(w, sec, "precision/"));
    }
    if constexpr (strategy_traits::checkpoints_state) {
      io::json& sec = doc.set("strategy", io::json::object());
      t.strategy_.save_state(checkpoint_out(w, sec, "strategy/"));
    }
    save_callbacks(t, w, doc.set("callbacks", io::json::object()));
    if constexpr (hook::on_save_checkpoint::module_implements<module_type, typename Trainer::context_type&,
                                                              const checkpoint_out&>()) {
      io::json& sec = doc.set("module", io::json::object());
      hook::on_save_checkpoint::call(model, t.ctx_, checkpoint_out(w, sec, "module/"));
    }
  }

  // Writes a checkpoint of `t` to `path`. Every rank captures; a sharded optimizer writes
  // its own range to a file beside the checkpoint, and once every rank has, rank 0 writes
  // the checkpoint, then drops shard files of earlier saves to the same path. A crash at
  // any point leaves the previous checkpoint and the shards it names intact (each file is
  // written atomically, and the tag — rank 0's, on every rank — is new each time).
  static void write(Trainer& t, const std::filesystem::path& path, bool weights_only, std::int64_t epoch,
                    std::int64_t next_batch) {
    char tag[48];
    std::snprintf(
        tag, sizeof tag, "step%lld-%llx", static_cast<long long>(t.state_.global_step),
        static_cast<unsigned long long>(std::chrono::system_clock::now().time_since_epoch().count()) & 0xffffffffffULL);
    // Sharded parameters: whole for the capture (a collective; released after).
    [[maybe_unused]] auto whole = [&] {
      if constexpr (strategy_traits::shards_parameters)
        return t.strategy_.full_parameters();
      else
        return 0;
    }();
    io::checkpoint_writer w;
    io::checkpoint_shards shards{path, ranks<Trainer>::from_rank_zero(t, std::string(tag))};
    t.capture_shards_ = &shards;
    try {
      capture(t, w, weights_only, epoch, next_batch);
    } catch (...) {
      t.capture_shards_ = nullptr;
      throw;
    }
    t.capture_shards_ = nullptr;
    for (auto& [p, sw] : shards.files) sw.write(p);
    if (t.strategy_.world_size() > 1) t.strategy_.barrier();
    if (!t.strategy_.is_global_zero()) return;
    w.write(path);
    if (!shards.files.empty()) io::remove_checkpoint_shards(path, shards.tag);
  }

  // ---- restore ----
  // What restore_modules() changed, to put back if the resume fails later.
  struct rollback {
    std::vector<std::pair<std::string, std::shared_ptr<void>>> params;  // cloned parameter values
    io::json callbacks_doc;                                             // callback states before,
    std::vector<std::byte> callback_tensors;                            // and their tensors
    std::uint64_t seed = default_generator().seed(), offset = default_generator().offset();
    bool armed = false;
    // The restored state is the run's own from here: drop the snapshot.
    void release() {
      armed = false;
      params.clear();
      callback_tensors.clear();
    }
  };

  // Model weights, callback states and the module's on_load_checkpoint (Lightning restores
  // these before configure_optimizers).
  static void restore_modules(Trainer& t, const io::checkpoint_reader& r, rollback& rb) {
    module_type& model = *t.model_;
    const io::json& doc = r.state();
    const std::string kind = doc.at("kind").as_string(r.name() + ": kind");
    KILN_CHECK(kind == "full", r.name(),
               " is a weights-only checkpoint; resuming needs a full one (start a new run "
               "from these weights with kiln::io::load_weights)");
    // An adapter run's checkpoint: the trainable parameters, and the frozen base's fingerprint.
    const io::json* fz = doc.at("model").find("frozen");
    const frozen_fingerprint here = fingerprint_frozen(model);
    if (fz || here.count > 0) {
      frozen_fingerprint there;
      if (fz) {
        there.count = fz->at("count").as_int(r.name() + ": model.frozen.count");
        there.elements = fz->at("elements").as_int(r.name() + ": model.frozen.elements");
        there.crc = static_cast<std::uint32_t>(fz->at("crc32c").as_int(r.name() + ": model.frozen.crc32c"));
      }
      KILN_CHECK(there.count == here.count && there.elements == here.elements && there.crc == here.crc, r.name(),
                 ": the model's frozen weights are not the run's (checkpoint: ", there.str(), "; model: ", here.str(),
                 "). Resume with the base the run started from, frozen as it was (e.g. io::load_hf, then attach_lora "
                 "or io::load_peft_adapter with the run's adapter config)");
    }
    io::check_module(r.file(), "model/", model, true, fz ? io::parameters::trainable : io::parameters::all);
    // Snapshot what may change (in host memory, whatever the parameters' device).
    nn::visit_parameters(model, [&](const std::string& name, auto& p) {
      using T = typename std::remove_cvref_t<decltype(p)>::value_type;
      if (r.file().contains("model/" + name))
        rb.params.emplace_back(name, std::make_shared<tensor<T>>(host_copy(p.value())));
    });
    {
      io::checkpoint_writer w;  // callback states, tensors included (early_stopping's best weights)
      rb.callbacks_doc = io::json::object();
      save_callbacks(t, w, rb.callbacks_doc);
      rb.callback_tensors = w.tensor_bytes();
    }
    rb.armed = true;  // rb.seed/offset: taken by the trainer before fit() reseeded anything

    load_callbacks(t, r.file(), doc.find("callbacks"));
    const io::json empty = io::json::object();
    if constexpr (hook::on_load_checkpoint::module_implements<module_type, typename Trainer::context_type&,
                                                              const checkpoint_in&>()) {
      const io::json* sec = doc.find("module");
      hook::on_load_checkpoint::call(model, t.ctx_, checkpoint_in(r.file(), sec ? *sec : empty, "module/"));
    }
    io::copy_module(r.file(), "model/", model);
  }

  // Puts back what restore_modules() changed.
  static void undo(Trainer& t, rollback& rb) {
    if (!rb.armed) return;
    module_type& model = *t.model_;
    std::size_t i = 0;
    nn::visit_parameters(model, [&](const std::string& name, auto& p) {
      using T = typename std::remove_cvref_t<decltype(p)>::value_type;
      if (i < rb.params.size() && rb.params[i].first == name)
        copy_from_host(p.value(), *static_cast<tensor<T>*>(rb.params[i++].second.get()));
    });
    // Callback states: reload the snapshot through the same hook.
    const auto snapshot = io::safetensors_view::parse(rb.callback_tensors, "callback snapshot");
    load_callbacks(t, snapshot, &rb.callbacks_doc);
    default_generator().set_state(rb.seed, rb.offset);
    rb.armed = false;
  }

  // Optimizers, schedules, policies, counters, position, RNG, metrics, open gradients.
  // Returns the batch of state().epoch to continue from.
  static std::int64_t restore_loop(Trainer& t, const io::checkpoint_reader& r) {
    module_type& model = *t.model_;
    const io::json& doc = r.state();
    const std::string& file = r.name();
    const io::json& tr = doc.at("trainer");
    auto field = [&](const char* k) -> const io::json& {
      const io::json* v = tr.find(k);
      KILN_CHECK(v != nullptr, file, ": kiln.state.trainer has no field '", k, "'");
      return *v;
    };
    // 1. Read and validate everything into temporaries.
    const std::int64_t epoch = field("epoch").as_int("trainer.epoch");
    const std::int64_t next_batch = field("next_batch").as_int("trainer.next_batch");
    const std::int64_t global_step = field("global_step").as_int("trainer.global_step");
    const std::int64_t micro = field("micro_batches").as_int("trainer.micro_batches");
    const std::int64_t accumulate = field("accumulate_grad_batches").as_int("trainer.accumulate_grad_batches");
    const bool should_stop = field("should_stop").as_bool("trainer.should_stop");
    const std::string stop_reason = field("stop_reason").as_string("trainer.stop_reason");
    const double elapsed = field("elapsed_seconds").as_double("trainer.elapsed_seconds");
    const std::int64_t accum_count = field("accum_count").as_int("trainer.accum_count");
    const double window_items = field("window_items").as_double("trainer.window_items");
    KILN_CHECK(epoch >= 0 && next_batch >= 0 && global_step >= 0 && accumulate >= 1, file,
               ": kiln.state.trainer holds impossible counters");
    const io::json& opts = doc.at("optimizers");
    KILN_CHECK(opts.as_array("optimizers").size() == Trainer::num_optimizers, file, ": the checkpoint has ",
               opts.size(), " optimizer(s), configure_optimizers() returned ", Trainer::num_optimizers);
    auto staged = [&]<std::size_t... I>(std::index_sequence<I...>) {
      return std::make_tuple(stage_optimizer(r, std::get<I>(*t.optimizers_), opts.as_array()[I], I)...);
    }
    (std::make_index_sequence<Trainer::num_optimizers>{});
    const io::json& met = doc.at("metrics");
    std::vector<metric_store::entry> entries = entries_from(met.at("train"), file);
    if (accum_count > 0)
      nn::visit_parameters(model, [&](const std::string& name, auto& p) {
        using T = typename std::remove_cvref_t<decltype(p)>::value_type;
        if (r.file().contains("grad/" + name)) {
          const auto& e = r.file().at("grad/" + name);
          r.file().check_dtype<T>(e);
          KILN_CHECK(io::safetensors_view::shape_of(e) == p.shape(), file, ": tensor 'grad/", name,
                     "' has the wrong shape");
        }
      });
    const io::json& rng = doc.at("rng");
    const auto def = stream_from(rng.at("default"), file);

    // 2. Apply (nothing below throws on a checkpoint that passed the checks above).
    [&]<std::size_t... I>(std::index_sequence<I...>) {
      (apply_optimizer(std::get<I>(*t.optimizers_), std::get<I>(staged)), ...);
    }
    (std::make_index_sequence<Trainer::num_optimizers>{});
    if constexpr (precision_traits::checkpoints_state) {
      const io::json empty = io::json::object();
      const io::json* sec = doc.find("precision");
      t.precision_.load_state(checkpoint_in(r.file(), sec ? *sec : empty, "precision/"));
    }
    if constexpr (strategy_traits::checkpoints_state) {
      const io::json empty = io::json::object();
      const io::json* sec = doc.find("strategy");
      t.strategy_.load_state(checkpoint_in(r.file(), sec ? *sec : empty, "strategy/"));
    }
    auto& st = t.state_;
    st.epoch = epoch;
    st.global_step = global_step;
    st.micro_batches = micro;
    st.accumulate_grad_batches = accumulate;
    st.should_stop = should_stop;
    st.stop_reason = stop_reason;
    st.start -= std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double>(elapsed));
    t.accum_count_ = accum_count;
    t.window_items_ = window_items;
    if (accum_count > 0)
      nn::visit_parameters(model, [&](const std::string& name, auto& p) {
        using T = typename std::remove_cvref_t<decltype(p)>::value_type;
        p.zero_grad();
        if (r.file().contains("grad/" + name)) {
          p.begin_grad_write();
          copy_from_host(p.grad(), r.file().template load<T>("grad/" + name));
        }
      });
    default_generator().set_state(def.first, def.second);
    if (const io::json* mods = rng.find("modules"))
      nn::visit_modules(model, [&](const std::string& name, auto& sub) {
        if constexpr (requires { sub.generator.offset(); })
          if constexpr (std::is_same_v<std::remove_cvref_t<decltype(sub.generator)>, philox_generator>)
            if (const io::json* g = mods->find(name.empty() ? "." : name)) {
              const auto s = stream_from(*g, file);
              sub.generator.set_state(s.first, s.second);
            }
      });
    t.board_.clear();
    for (auto& [k, v] : met.at("latest").as_object()) t.board_.latest[k] = v.as_double(k);
    for (auto& kv : met.at("bar").as_array())
      t.board_.bar.emplace_back(kv.as_array().at(0).as_string(), kv.as_array().at(1).as_double());
    t.train_metrics_.restore(std::move(entries));
    return next_batch;
  }

 private:
  // Each callback's on_save_checkpoint into its section of `cbs` and `w`.
  static void save_callbacks(Trainer& t, io::checkpoint_writer& w, io::json& cbs) {
    for_each_callback(t, [&](auto& c, const std::string& key) {
      using C = std::remove_cvref_t<decltype(c)>;
      if constexpr (hook::on_save_checkpoint::callback_implements<C, typename Trainer::context_type&,
                                                                  const checkpoint_out&>())
        hook::on_save_checkpoint::call(c, t.ctx_,
                                       checkpoint_out(w, cbs.set(key, io::json::object()), "callbacks/" + key + "/"));
    });
  }
  // Each callback's on_load_checkpoint from its section (an empty one when absent).
  static void load_callbacks(Trainer& t, const io::safetensors_view& file, const io::json* cbs) {
    const io::json empty = io::json::object();
    for_each_callback(t, [&](auto& c, const std::string& key) {
      using C = std::remove_cvref_t<decltype(c)>;
      if constexpr (hook::on_load_checkpoint::callback_implements<C, typename Trainer::context_type&,
                                                                  const checkpoint_in&>()) {
        const io::json* sec = cbs ? cbs->find(key) : nullptr;
        hook::on_load_checkpoint::call(c, t.ctx_, checkpoint_in(file, sec ? *sec : empty, "callbacks/" + key + "/"));
      }
    });
  }

  template <class F>
  static void for_each_callback(Trainer& t, F&& f) {
    std::vector<std::string> seen;
    std::apply(
        [&](auto&... c) {
          (
              [&](auto& cb) {
                std::string key = callback_key<std::remove_cvref_t<decltype(cb)>>();
                int dup = 0;
                for (auto& s : seen) dup += s == key;
                seen.push_back(key);
                if (dup) key += "#" + std::to_string(dup);
                f(cb, key);
              }(c),
              ...);
        },
        t.callbacks_);
  }

  static io::json stream_json(const philox_generator& g) {
    io::json j = io::json::object();
    j.set("seed", std::to_string(g.seed()));  // uint64: as decimal strings, JSON integers are int64
    j.set("offset", std::to_string(g.offset()));
    return j;
  }
  static std::pair<std::uint64_t, std::uint64_t> stream_from(const io::json& j, const std::string& file) {
    auto u64 = [&](const char* k) {
      const std::string& s = j.at(k).as_string(std::string("rng ") + k);
      std::uint64_t v = 0;
      auto [p, ec] = std::from_chars(s.data(), s.data() + s.size(), v);
      KILN_CHECK(ec == std::errc() && p == s.data() + s.size(), file, ": rng ", k, " '", s,
                 "' is not an unsigned integer");
      return v;
    };
    return {u64("seed"), u64("offset")};
  }

  static io::json entries_json(const std::vector<metric_store::entry>& es) {
    io::json a = io::json::array();
    for (auto& e : es) {
      io::json j = io::json::object();
      j.set("name", e.name);
      j.set("reduction", static_cast<int>(e.reduction));
      j.set("on_step", e.on_step);
      j.set("on_epoch", e.on_epoch);
      j.set("prog_bar", e.prog_bar);
      j.set("logger", e.logger);
      j.set("step_value", e.step_value);
      j.set("step_pending", e.step_pending);
      j.set("acc", e.acc);
      j.set("weight", e.weight);
      a.push_back(std::move(j));
    }
    return a;
  }
  static std::vector<metric_store::entry> entries_from(const io::json& a, const std::string& file) {
    std::vector<metric_store::entry> out;
    for (auto& j : a.as_array(file + ": metrics.train")) {
      metric_store::entry e;
      e.name = j.at("name").as_string();
      const auto red = j.at("reduction").as_int();
      KILN_CHECK(red >= 0 && red <= 3, file, ": metric '", e.name, "' has unknown reduction ", red);
      e.reduction = static_cast<reduce>(red);
      e.on_step = j.at("on_step").as_bool();
      e.on_epoch = j.at("on_epoch").as_bool();
      e.prog_bar = j.at("prog_bar").as_bool();
      e.logger = j.at("logger").as_bool();
      e.step_value = j.at("step_value").as_double();
      e.step_pending = j.at("step_pending").as_bool();
      e.acc = j.at("acc").as_double();
      e.weight = j.at("weight").as_double();
      out.push_back(std::move(e));
    }
    return out;
  }

  // A sharded optimizer (ZeRO) with a place for shards writes its own range beside the
  // checkpoint (save_sharded); otherwise its whole state goes into the file.
  template <class SO>
  static io::json save_optimizer(io::checkpoint_writer& w, SO& so, std::size_t i, io::checkpoint_shards* shards) {
    io::json j = io::json::object();
    auto& o = so.optimizer;
    using O = std::remove_cvref_t<decltype(o)>;
    if constexpr (requires { O::kind; }) j.set("kind", std::string(O::kind));
    bool sharded = false;
    if constexpr (requires(io::json & jj, io::checkpoint_shards & sh) { o.save_sharded(jj, sh, i); }) {
      if (shards) {
        o.save_sharded(j, *shards, i);
        sharded = true;
      }
    }
    if (!sharded) {
      const auto st = o.state();
      const std::string prefix = "optimizer." + std::to_string(i) + "/";
      for (auto& [name, ten] : st.tensors) w.add(prefix + name, ten);
      io::json counters = io::json::object();
      for (auto& [k, v] : st.counters) counters.set(k, v);
      j.set("counters", std::move(counters));
    }
    io::json lrs = io::json::array();
    for (std::size_t g = 0; g < o.num_groups(); ++g) lrs.push_back(o.lr(g));
    j.set("lr", std::move(lrs));
    using S = std::remove_cvref_t<decltype(so.schedule)>;
    if constexpr (optim::is_scheduled<SO>::value && !std::is_same_v<S, no_schedule>) {
      io::json s = io::json::object();
      s.set("t", so.t);
      io::json base = io::json::array();
      for (double b : so.base) base.push_back(b);
      s.set("base", std::move(base));
      if constexpr (optim::schedule_traits<S>::checkpoints_state) so.schedule.save_state(s);
      j.set("schedule", std::move(s));
    }
    return j;
  }

  // An optimizer's state read from the file and checked against the live optimizer. It
  // is staged in host memory when the optimizer loads host state (a cuda adamw copies it
  // in tensor by tensor), else on the optimizer's device.
  template <class O>
  static constexpr auto staged_state_probe() {
    using live = decltype(std::declval<O&>().state());
    using T = typename optim::state_tensor_t<O>::value_type;
    if constexpr (requires(O & o, const optim::optimizer_state<T, cpu>& h) { o.load_state(h); })
      return std::type_identity<optim::optimizer_state<T, cpu>>{};
    else
      return std::type_identity<live>{};
  }
  template <class SO>
  struct staged_optimizer {
    typename decltype(staged_state_probe<std::remove_cvref_t<decltype(std::declval<SO&>().optimizer)>>())::type state;
    std::vector<double> lr;
    std::optional<std::int64_t> t;
    std::vector<double> base;
    std::optional<std::remove_cvref_t<decltype(std::declval<SO&>().schedule)>> schedule;  // checkpoints_state
  };
  template <class SO>
  static staged_optimizer<SO> stage_optimizer(const io::checkpoint_reader& r, SO& so, const io::json& j,
                                              std::size_t i) {
    const std::string& file = r.name();
    auto& o = so.optimizer;
    using O = std::remove_cvref_t<decltype(o)>;
    const std::string where = file + ": optimizer " + std::to_string(i);
    if constexpr (requires { O::kind; }) {
      const io::json* k = j.find("kind");
      KILN_CHECK(k && k->as_string() == O::kind, where, " is '", k ? k->as_string() : std::string("?"),
                 "' in the checkpoint but configure_optimizers() returned '", O::kind, "'");
    }
    staged_optimizer<SO> s;
    using state_tensor = typename std::remove_cvref_t<decltype(s.state.tensors)>::value_type::second_type;
    using T = typename state_tensor::value_type;
    const std::string prefix = "optimizer." + std::to_string(i) + "/";
    const auto expected = o.state();
    // Whole tensors: from the file, or reassembled from the shard files beside it; read
    // and checked in the optimizer's order, so the first problem is the one named.
    std::map<std::string, tensor<T>> whole;
    const io::json* sh = j.find("shards");
    if (sh) whole = io::load_optimizer_shards<T>(r, *sh, where);
    const std::size_t stored = sh ? whole.size() : r.names_in("optimizer." + std::to_string(i)).size();
    KILN_CHECK(stored == expected.tensors.size(), where, " has ", stored, " state tensors, the optimizer expects ",
               expected.tensors.size(), " (a different model or optimizer configuration?)");
    for (auto& [name, ten] : expected.tensors) {
      tensor<T> loaded;
      if (sh) {
        auto it = whole.find(name);
        KILN_CHECK(it != whole.end(), where, ": missing state tensor '", prefix + name, "'");
        loaded = std::move(it->second);
      } else {
        KILN_CHECK(r.file().contains(prefix + name), where, ": missing state tensor '", prefix + name, "'");
        loaded = r.file().template load<T>(prefix + name);
      }
      KILN_CHECK(loaded.shape() == ten.shape(), where, ": state tensor '", prefix + name, "' has shape ",
                 loaded.shape().str(), ", expected ", ten.shape().str());
      s.state.tensors.emplace_back(name, to_device<typename state_tensor::device_type>(loaded));
    }
    for (auto& [k, v] : j.at("counters").as_object()) s.state.counters[k] = v.as_int(where + " counter " + k);
    for (auto& [k, v] : expected.counters) KILN_CHECK(s.state.counters.count(k), where, ": missing counter '", k, "'");
    for (auto& v : j.at("lr").as_array()) s.lr.push_back(v.as_double(where + " lr"));
    KILN_CHECK(s.lr.size() == o.num_groups(), where, " has ", s.lr.size(), " parameter groups, the optimizer has ",
               o.num_groups());
    using S = std::remove_cvref_t<decltype(so.schedule)>;
    if constexpr (!std::is_same_v<S, no_schedule>) {
      const io::json* sj = j.find("schedule");
      KILN_CHECK(sj != nullptr, where, " was saved without a learning-rate schedule, but now has one");
      s.t = sj->at("t").as_int(where + " schedule t");
      for (auto& v : sj->at("base").as_array()) s.base.push_back(v.as_double(where + " schedule base"));
      KILN_CHECK(s.base.size() == o.num_groups(), where, ": schedule base rates for ", s.base.size(),
                 " groups, the optimizer has ", o.num_groups());
      if constexpr (optim::schedule_traits<S>::checkpoints_state) {
        s.schedule = so.schedule;  // the live schedule with the checkpoint's state (throws on a bad one)
        s.schedule->load_state(*sj);
      }
    }
    return s;
  }
  template <class SO>
  static void apply_optimizer(SO& so, staged_optimizer<SO>& s) {
    {
      so.optimizer.load_state(s.state);
      using S = std::remove_cvref_t<decltype(so.schedule)>;
      if constexpr (!std::is_same_v<S, no_schedule>) {
        so.t = *s.t;
        so.base = s.base;
        if constexpr (optim::schedule_traits<S>::checkpoints_state) so.schedule = std::move(*s.schedule);
      }
      for (std::size_t g = 0; g < s.lr.size(); ++g) so.optimizer.set_lr(g, s.lr[g]);
    }
  }
};

}  // namespace kiln::train
