// kiln/loggers/jsonl.hpp — one JSON object per logged record (metrics.jsonl).
//
// Spec: each record the trainer flushes becomes one line
//   {"step": 100, "epoch": 0, "train/loss": 0.42, ...}
// appended to metrics.jsonl (non-finite values are written as null, which JSON can
// spell); the first call writes hparams.json. Lines are flushed to the OS at each epoch
// end, validation end and fit end; a crash loses at most the unflushed tail, never an
// earlier line. Writes into `dir` or the trainer's run directory; nothing under fast_dev_run.
#pragma once

#include <cstdio>
#include <string>

#include "kiln/loggers/detail.hpp"
#include "kiln/train/hooks.hpp"
#include "kiln/train/metrics.hpp"

namespace kiln::loggers {

struct jsonl {
  using hooks = hook_list<hook::on_log, hook::on_log_hyperparams, hook::on_train_epoch_end, hook::on_validation_end,
                          hook::on_test_end, hook::on_fit_end>;
  std::string dir;

  jsonl() = default;
  explicit jsonl(std::string d) : dir(std::move(d)) {}
  jsonl(jsonl&& o) noexcept : dir(std::move(o.dir)), f_(o.f_), path_(std::move(o.path_)) { o.f_ = nullptr; }
  jsonl(const jsonl& o) : dir(o.dir) {}
  ~jsonl() { close(); }

  void on_log_hyperparams(auto& ctx, const train::hparams& hp) {
    std::string s = "{";
    for (std::size_t i = 0; i < hp.values.size(); ++i)
      s += (i ? ", " : "") + detail::json_string(hp.values[i].first) + ": " + detail::json_string(hp.values[i].second);
    s += "}\n";
    detail::write_atomically(open(ctx).parent_path() / "hparams.json", s);
  }
  void on_log(auto& ctx, const train::log_record& r) {
    open(ctx);
    std::string s = "{\"step\": " + std::to_string(r.step) + ", \"epoch\": " + std::to_string(r.epoch);
    for (auto& [k, v] : r.values) s += ", " + detail::json_string(k) + ": " + detail::json_number(v);
    s += "}\n";
    KILN_CHECK(std::fwrite(s.data(), 1, s.size(), f_) == s.size(), "jsonl logger: write failed on ", path_.string());
  }
  void on_train_epoch_end(auto&) { flush(); }
  void on_validation_end(auto&) { flush(); }
  void on_test_end(auto&) { flush(); }
  void on_fit_end(auto&) { flush(); }

  std::filesystem::path path() const { return path_; }
  void flush() {
    if (f_) std::fflush(f_);
  }

 private:
  std::filesystem::path open(auto& ctx) {
    const std::string want = ctx.log_dir();
    if (f_ && want == ctx_dir_) return path_;
    close();
    ctx_dir_ = want;
    path_ = detail::run_dir(dir, want) / "metrics.jsonl";
    f_ = std::fopen(path_.c_str(), "ab");
    KILN_CHECK(f_ != nullptr, "jsonl logger: cannot open ", path_.string());
    return path_;
  }
  void close() {
    if (f_) std::fclose(f_);
    f_ = nullptr;
  }
  std::FILE* f_ = nullptr;
  std::string ctx_dir_;
  std::filesystem::path path_;
};

}  // namespace kiln::loggers
