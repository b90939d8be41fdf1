// kiln/callbacks/model_checkpoint.hpp — save checkpoints while training, keep the best k.
//
// Spec (PyTorch Lightning's ModelCheckpoint): saves a checkpoint (trainer::save_checkpoint:
// atomic, captured at the loop's next quiet point) when one of its triggers fires:
//   every_n_train_steps   after an optimizer step whose global_step is a multiple of it;
//   train_time_interval   after an optimizer step, when that much time passed since the last save;
//   every_n_epochs        at validation end (when the epoch validated) or at train epoch
//                         end (when it did not), for epochs whose (epoch+1) is a multiple;
//                         save_on_train_epoch_end forces one of the two.
// Never twice for one global_step. Each save goes to dirpath/<filename>.ckpt (dirpath
// defaults to <log dir>/checkpoints). The filename template substitutes {epoch}, {step}
// (global_step) and {metric} / {metric:.3f} (printf-style spec) — with
// auto_insert_metric_name "{epoch}-{val/loss:.3f}" gives "epoch=2-val_loss=0.412" ('/' in a
// metric name becomes '_'). A name taken by a file this callback does not own gets
// "-v1", "-v2", ... With `monitor` the save_top_k best files by `mode` are kept (-1: all;
// 0: none); the evicted file is deleted; best_model_path/best_model_score track the best.
// Without `monitor` the save_top_k newest are kept. save_last also writes last.ckpt.
// weights_only saves model weights and counters only. A monitored metric that was not
// logged is an error naming the metrics that were — except before the run's first
// validation, when only the top-k save is skipped.
// State (best_k, best_model_path/score, last_model_path, the last step saved) is saved in
// checkpoints; the top-k list is restored only when dirpath is the same, so a new run
// in a new version directory does not delete the old run's files.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "kiln/callbacks/monitor.hpp"
#include "kiln/train/checkpoint_io.hpp"
#include "kiln/train/hooks.hpp"

namespace kiln::callbacks {

struct model_checkpoint_options {
  std::string dirpath;                      // default: <log dir>/checkpoints
  std::string filename = "{epoch}-{step}";  // ".ckpt" is appended
  std::string monitor;                      // empty: keep the newest
  callbacks::mode mode = mode::min;
  std::int64_t save_top_k = 1;  // -1: keep all; 0: none (save_last still writes)
  bool save_last = false;
  bool weights_only = false;
  std::int64_t every_n_train_steps = 0;  // 0: off
  std::int64_t every_n_epochs = 1;       // 0: off
  std::optional<std::chrono::duration<double>> train_time_interval;
  std::optional<bool> save_on_train_epoch_end;  // default: decided per epoch (see above)
  bool auto_insert_metric_name = true;
  bool verbose = false;
};

struct model_checkpoint {
  static constexpr bool monitors = true;
  static constexpr bool tracks_checkpoints = true;  // resume_dir(), best_model_path
  static constexpr std::string_view state_key = "model_checkpoint";
  static constexpr std::string_view last_name = "last";
  using hooks = hook_list<hook::on_train_start, hook::on_train_batch_end, hook::on_validation_end,
                          hook::on_train_epoch_end, hook::on_save_checkpoint, hook::on_load_checkpoint>;

  struct saved {
    std::string path;
    double score = 0;
  };

  model_checkpoint_options options;
  // State.
  std::vector<saved> best_k;  // with monitor: the kept files and their scores; without: newest last
  std::string best_model_path;
  double best_model_score = std::numeric_limits<double>::quiet_NaN();
  std::string last_model_path;
  std::int64_t last_step_saved = -1;

  model_checkpoint() : model_checkpoint(model_checkpoint_options{}) {}
  explicit model_checkpoint(model_checkpoint_options o) : options(std::move(o)) {
    KILN_CHECK(options.save_top_k >= -1, "model_checkpoint: save_top_k = ", options.save_top_k,
               ", expected -1 (all), 0 (none) or a count");
    KILN_CHECK(options.every_n_train_steps >= 0 && options.every_n_epochs >= 0,
               "model_checkpoint: every_n_train_steps and every_n_epochs must be >= 0");
    KILN_CHECK(!options.filename.empty(), "model_checkpoint: filename must not be empty");
    check_template(options.filename);
  }

  // The directory fit(..., "last") searches first (only when set explicitly).
  const std::string& resume_dir() const { return options.dirpath; }
  // Where checkpoints go for the run in `ctx`.
  std::filesystem::path dir(const auto& ctx) const {
    return options.dirpath.empty() ? std::filesystem::path(ctx.log_dir()) / "checkpoints"
                                   : std::filesystem::path(options.dirpath);
  }

  void on_train_start(auto&) { last_time_ = std::chrono::steady_clock::now(); }

  void on_train_batch_end(auto& ctx, const auto&) {
    if (!ctx.loggers_enabled() || ctx.global_step() == last_step_saved) return;
    bool due = options.every_n_train_steps > 0 && ctx.global_step() % options.every_n_train_steps == 0;
    if (options.train_time_interval && std::chrono::steady_clock::now() - last_time_ >= *options.train_time_interval)
      due = true;
    if (due) save(ctx);
  }
  void on_validation_end(auto& ctx) {
    if (ctx.sanity_checking() || ctx.current_stage() != train::stage::fit || !ctx.loggers_enabled()) return;
    validated_epoch_ = ctx.epoch();
    if (options.save_on_train_epoch_end.value_or(false) || !epoch_due(ctx)) return;
    save(ctx);
  }
  void on_train_epoch_end(auto& ctx) {
    if (!ctx.loggers_enabled() || !epoch_due(ctx)) return;
    const bool at_train_end = options.save_on_train_epoch_end.value_or(validated_epoch_ != ctx.epoch());
    if (at_train_end) save(ctx);
  }

  // Saves now (at the loop's next quiet point) under the template's name.
  void save(auto& ctx) {
    if (ctx.global_step() == last_step_saved) return;
    writer_ = ctx.is_global_zero();  // only the rank that writes checkpoints deletes them
    const auto d = dir(ctx);
    std::optional<double> score;
    bool skip_top_k = false;
    if (!options.monitor.empty()) {
      // Before the first validation a validation metric cannot exist yet: skip the top-k
      // save (last.ckpt is still written), as Lightning does; afterwards it is an error.
      score = monitored_value(ctx, options.monitor, "model_checkpoint", validated_epoch_ >= 0);
      skip_top_k = !score.has_value();
    }
    if (options.save_top_k != 0 && !skip_top_k) {
      const std::string path = unique_path(d, format_name(ctx));
      // A save to a file already kept replaces that entry.
      std::vector<saved> others;
      for (auto& b : best_k)
        if (b.path != path) others.push_back(b);
      const bool room = options.save_top_k < 0 || static_cast<std::int64_t>(others.size()) < options.save_top_k;
      if (score) {
        const double s = std::isnan(*score) ? (options.mode == mode::min ? INFINITY : -INFINITY) : *score;
        if (room || better(s, others[worst_index(others)].score, options.mode)) {
          write(ctx, path);
          if (!room) drop(others, worst_index(others), path);
          others.push_back({path, s});
          best_k = std::move(others);
          const auto b = std::min_element(best_k.begin(), best_k.end(), [&](const saved& x, const saved& y) {
            return better(x.score, y.score, options.mode);
          });
          best_model_path = b->path;
          best_model_score = b->score;
        }
      } else {
        write(ctx, path);
        if (!room) drop(others, 0, path);  // the oldest
        others.push_back({path, 0.0});
        best_k = std::move(others);
        best_model_path = path;
      }
    }
    if (options.save_last) {
      const std::string last = (d / (std::string(last_name) + ".ckpt")).string();
      write(ctx, last);
      last_model_path = last;
    }
    last_step_saved = ctx.global_step();
    last_time_ = std::chrono::steady_clock::now();
  }

  void on_save_checkpoint(auto& ctx, const train::checkpoint_out& ckpt) const {
    auto& s = ckpt.state();
    s.set("dirpath", dir(ctx).string());
    s.set("monitor", options.monitor);
    s.set("best_model_path", best_model_path);
    s.set("best_model_score", best_model_score);
    s.set("last_model_path", last_model_path);
    s.set("last_step_saved", last_step_saved);
    io::json k = io::json::array();
    for (auto& b : best_k) {
      io::json e = io::json::object();
      e.set("path", b.path);
      e.set("score", b.score);
      k.push_back(std::move(e));
    }
    s.set("best_k", std::move(k));
  }
  void on_load_checkpoint(auto& ctx, const train::checkpoint_in& ckpt) {
    const auto& s = ckpt.state();
    if (!s.contains("dirpath")) return;
    const std::string f = ckpt.file_name() + ": model_checkpoint state";
    std::vector<saved> k;
    for (auto& e : s.at("best_k").as_array(f + ".best_k"))
      k.push_back({e.at("path").as_string(f), e.at("score").as_double(f)});
    std::string bp = s.at("best_model_path").as_string(f);
    const double bs = s.at("best_model_score").as_double(f);
    std::string lp = s.at("last_model_path").as_string(f);
    const auto ls = s.at("last_step_saved").as_int(f);
    const bool same_dir =
        s.at("dirpath").as_string(f) == dir(ctx).string() && s.at("monitor").as_string(f) == options.monitor;
    best_model_path = std::move(bp);
    best_model_score = bs;
    if (same_dir) {
      best_k = std::move(k);
      last_model_path = std::move(lp);
      last_step_saved = ls;
    }
  }

  // "epoch=2-step=300" for the template "{epoch}-{step}" (no extension).
  std::string format_name(const auto& ctx) const {
    const std::string& t = options.filename;
    std::string out;
    for (std::size_t i = 0; i < t.size();) {
      if (t[i] != '{') {
        out += t[i++];
        continue;
      }
      const std::size_t close = t.find('}', i);
      const std::string field = t.substr(i + 1, close - i - 1);
      i = close + 1;
      const std::size_t colon = field.find(':');
      const std::string name = field.substr(0, colon);
      const std::string spec = colon == std::string::npos ? "" : field.substr(colon + 1);
      double v;
      bool integral = false;
      if (name == "epoch") {
        v = double(ctx.epoch());
        integral = true;
      } else if (name == "step") {
        v = double(ctx.global_step());
        integral = true;
      } else {
        auto m = ctx.metric(name);
        if (!m) {
          std::string have;
          for (auto& [k, x] : ctx.callback_metrics()) have += (have.empty() ? "" : ", ") + k;
          kiln::detail::fail("model_checkpoint: filename '", t, "' names metric '", name,
                             "', which was not logged (logged: ", have.empty() ? "none" : have, ")");
        }
        v = *m;
      }
      if (options.auto_insert_metric_name) {
        std::string n = name;
        std::replace(n.begin(), n.end(), '/', '_');
        out += n + "=";
      }
      char buf[64];
      if (spec.empty())
        integral ? std::snprintf(buf, sizeof buf, "%lld", static_cast<long long>(v))
                 : std::snprintf(buf, sizeof buf, "%g", v);
      else if (spec.back() == 'd')
        std::snprintf(buf, sizeof buf, ("%" + spec.substr(0, spec.size() - 1) + "lld").c_str(),
                      static_cast<long long>(v));
      else
        std::snprintf(buf, sizeof buf, ("%" + spec).c_str(), v);
      out += buf;
    }
    return out;
  }

 private:
  static void check_template(const std::string& t) {
    for (std::size_t i = 0; i < t.size(); ++i) {
      if (t[i] == '}') kiln::detail::fail("model_checkpoint: filename '", t, "' has an unmatched '}'");
      if (t[i] != '{') continue;
      const std::size_t close = t.find('}', i);
      KILN_CHECK(close != std::string::npos, "model_checkpoint: filename '", t, "' has an unmatched '{'");
      const std::string field = t.substr(i + 1, close - i - 1);
      KILN_CHECK(!field.empty() && field[0] != ':', "model_checkpoint: filename '", t, "' has an empty field {}");
      const std::size_t colon = field.find(':');
      if (colon != std::string::npos) {
        const std::string spec = field.substr(colon + 1);
        bool ok = !spec.empty() && std::string_view("dfeEgG").find(spec.back()) != std::string_view::npos;
        for (std::size_t k = 0; ok && k + 1 < spec.size(); ++k)
          ok = std::string_view("0123456789.+- #").find(spec[k]) != std::string_view::npos;
        KILN_CHECK(ok, "model_checkpoint: filename field {", field,
                   "}: the format spec must look like .3f, 05d or .2e (printf style)");
      }
      i = close;
    }
  }
  bool epoch_due(const auto& ctx) const {
    return options.every_n_epochs > 0 && (ctx.epoch() + 1) % options.every_n_epochs == 0;
  }
  std::string unique_path(const std::filesystem::path& d, const std::string& stem) const {
    auto owned = [&](const std::string& p) {
      for (auto& b : best_k)
        if (b.path == p) return true;
      return false;
    };
    std::string p = (d / (stem + ".ckpt")).string();
    for (int v = 1; std::filesystem::exists(p) && !owned(p); ++v)
      p = (d / (stem + "-v" + std::to_string(v) + ".ckpt")).string();
    return p;
  }
  void write(auto& ctx, const std::string& path) const {
    ctx.save_checkpoint(path, options.weights_only);
    if (options.verbose) std::fprintf(stderr, "model_checkpoint: saving %s\n", path.c_str());
  }
  std::size_t worst_index(const std::vector<saved>& k) const {
    std::size_t w = 0;
    for (std::size_t i = 1; i < k.size(); ++i)
      if (better(k[w].score, k[i].score, options.mode)) w = i;
    return w;
  }
  // Removes entry i from `k` and deletes its file (never `keep`, the file being saved).
  void drop(std::vector<saved>& k, std::size_t i, const std::string& keep) const {
    const std::string p = k[i].path;
    k.erase(k.begin() + static_cast<std::ptrdiff_t>(i));
    std::error_code ec;
    if (writer_ && p != keep && p != last_model_path) {
      std::filesystem::remove(p, ec);
      io::remove_checkpoint_shards(p);  // a sharded (ZeRO) checkpoint's optimizer shards
    }
  }

  std::chrono::steady_clock::time_point last_time_ = std::chrono::steady_clock::now();
  std::int64_t validated_epoch_ = -1;
  bool writer_ = true;
};

}  // namespace kiln::callbacks
