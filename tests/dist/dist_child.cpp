// The multi-rank program the mpi suite's scripts launch (tests/dist/*.sh):
//   dist_child train --strategy single|ddp|zero1|zero2|zero3 --epochs E --root DIR
//              [--resume PATH|last] [--save PATH] [--every N]
//              [--fault-at-step K --fault-marker FILE] [--out FILE] [--expect FILE --tol T]
//     trains the fixture run; --save writes a checkpoint after fit; --every N keeps
//     last.ckpt every N steps; --fault-at-step kills rank 1 (SIGKILL) at step K once (the
//     marker file records that it happened); --out writes rank 0's final weights and
//     per-step losses as exact hex; --expect compares against such a file (exit 1 beyond
//     T, 0 meaning bit-exact).
//   dist_child weights --resume FILE --out OUT   loads FILE (a checkpoint or plain
//              safetensors) strictly into the fixture net and writes its weights to OUT
//   dist_child watchdog   rank 1 is busy elsewhere (sleeps) while rank 0 waits in an all-reduce
//   dist_child mismatch   rank 1 enters a barrier where rank 0 enters an all-reduce
//   dist_child die        rank 1 crashes (_Exit(3)) while rank 0 waits in a collective
//   dist_child train ... --throw-at-step K   rank 1's fit throws at step K
#include <signal.h>

#include <cstdlib>
#include <fstream>
#include <iostream>
#include <sstream>
#include <thread>

#include "dist_fixture.hpp"

using namespace kiln;
using namespace kiln::test::dist;

namespace {

struct args {
  std::string mode, strategy = "ddp", root = "dist_run", resume, save, out, expect, marker;
  std::int64_t epochs = 2, every = 0, fault_at = -1, throw_at = -1;
  double tol = 0;
};

// Kills this process (rank 1) at global step K, once.
struct fault {
  using hooks = hook_list<hook::on_train_batch_end>;
  std::int64_t at = -1, throw_at = -1;
  std::string marker;
  void on_train_batch_end(auto& ctx, const auto&) {
    if (ctx.global_step() == throw_at && ctx.global_rank() == 1)
      KILN_CHECK(false, "dist_child: rank 1 throws at step ", throw_at, " (as a failing hook would)");
    if (at < 0 || ctx.global_step() != at || ctx.global_rank() != 1 || std::filesystem::exists(marker)) return;
    std::ofstream(marker) << "rank 1 killed at step " << at << "\n";
    std::fprintf(stderr, "dist_child: rank 1 kills itself at step %lld\n", static_cast<long long>(at));
    std::fflush(stderr);
    ::kill(::getpid(), SIGKILL);
  }
};

std::string hex(double v) {
  std::ostringstream os;
  os << std::hexfloat << v;
  return os.str();
}

void write_result(const std::string& path, const std::vector<double>& losses, const std::vector<double>& w) {
  std::ofstream f(path);
  for (double l : losses) f << "loss " << hex(l) << "\n";
  for (double x : w) f << "weight " << hex(x) << "\n";
}

int compare(const std::string& path, const std::vector<double>& losses, const std::vector<double>& w, double tol) {
  std::ifstream f(path);
  if (!f) {
    std::fprintf(stderr, "dist_child: cannot read %s\n", path.c_str());
    return 1;
  }
  std::vector<double> el, ew;
  std::string kind, v;
  while (f >> kind >> v) (kind == "loss" ? el : ew).push_back(std::strtod(v.c_str(), nullptr));
  // A resumed run knows only the losses after the checkpoint: compare the tail.
  if (losses.size() > el.size() || w.size() != ew.size()) {
    std::fprintf(stderr, "dist_child: %zu losses / %zu weights, %s has %zu / %zu\n", losses.size(), w.size(),
                 path.c_str(), el.size(), ew.size());
    return 1;
  }
  const std::vector<double> tail(el.end() - static_cast<std::ptrdiff_t>(losses.size()), el.end());
  const double dl = max_abs_diff(losses, tail), dw = max_abs_diff(w, ew);
  std::printf("dist_child: against %s: max |Δloss| %.3g over %zu steps, max |Δweight| %.3g (tolerance %.3g)\n",
              path.c_str(), dl, losses.size(), dw, tol);
  return dl <= tol && dw <= tol ? 0 : 1;
}

template <class S>
int train(const args& a) {
  train::trainer_options o = options(a.root, a.epochs);
  using trainer_t = trainer<net<float>, S, precision::fp32, callbacks::model_checkpoint, fault>;
  trainer_t t(o,
              callbacks::model_checkpoint({.dirpath = (std::filesystem::path(a.root) / "checkpoints").string(),
                                           .save_top_k = 0,
                                           .save_last = a.every > 0,
                                           .every_n_train_steps = a.every > 0 ? a.every : 0}),
              fault{a.fault_at, a.throw_at, a.marker});
  manual_seed(7);
  net<float> m;
  data_module dm(global_batch / t.strategy().world_size());
  const auto r = t.fit(m, dm, a.resume);
  if (!a.save.empty()) t.save_checkpoint(a.save);
  std::vector<double> losses = m.losses;
  if constexpr (!std::is_same_v<S, strategy::single_device<cpu>>) {
    losses = global_losses(t.strategy().communicator(), losses);
  }
  if (!t.strategy().is_global_zero()) return 0;
  std::printf("dist_child: %s on %d rank(s): %lld steps%s%s\n", a.strategy.c_str(), t.strategy().world_size(),
              static_cast<long long>(r.global_step), r.resumed_from.empty() ? "" : ", resumed from ",
              r.resumed_from.c_str());
  const auto w = weights(m);
  if (!a.out.empty()) write_result(a.out, losses, w);
  if (!a.expect.empty()) return compare(a.expect, losses, w, a.tol);
  return 0;
}

args parse(int argc, char** argv) {
  args a;
  a.mode = argc > 1 ? argv[1] : "";
  for (int i = 2; i < argc; ++i) {
    const std::string k = argv[i];
    KILN_CHECK(i + 1 < argc, "dist_child: flag ", k, " needs a value");
    const std::string v = argv[++i];
    if (k == "--strategy")
      a.strategy = v;
    else if (k == "--epochs")
      a.epochs = std::stoll(v);
    else if (k == "--root")
      a.root = v;
    else if (k == "--resume")
      a.resume = v;
    else if (k == "--save")
      a.save = v;
    else if (k == "--every")
      a.every = std::stoll(v);
    else if (k == "--fault-at-step")
      a.fault_at = std::stoll(v);
    else if (k == "--throw-at-step")
      a.throw_at = std::stoll(v);
    else if (k == "--fault-marker")
      a.marker = v;
    else if (k == "--out")
      a.out = v;
    else if (k == "--expect")
      a.expect = v;
    else if (k == "--tol")
      a.tol = std::stod(v);
    else
      KILN_CHECK(false, "dist_child: unknown flag ", k);
  }
  return a;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const args a = parse(argc, argv);
    if (a.mode == "train") {
      if (a.strategy == "single") return train<strategy::single_device<cpu>>(a);
      if (a.strategy == "ddp") return train<strategy::ddp<comm::mpi>>(a);
      if (a.strategy == "zero1") return train<strategy::zero<1, comm::mpi>>(a);
      if (a.strategy == "zero2") return train<strategy::zero<2, comm::mpi>>(a);
      if (a.strategy == "zero3") return train<strategy::zero<3, comm::mpi>>(a);
      KILN_CHECK(false, "dist_child: --strategy ", a.strategy, ": expected single, ddp, zero1, zero2 or zero3");
    }
    if (a.mode == "weights") {
      net<float> m;
      io::load_weights(m, a.resume);  // strict: every parameter present, nothing extra
      write_result(a.out, {}, weights(m));
      return 0;
    }
    if (a.mode == "watchdog") {
      comm::mpi c;
      float x = 1;
      c.all_reduce(&x, 1, comm::op::sum, "warm-up");
      if (c.rank() == 1) std::this_thread::sleep_for(std::chrono::seconds(60));
      c.all_reduce(&x, 1, comm::op::sum, "rank 1 is late for");
      return 0;
    }
    if (a.mode == "mismatch") {
      comm::mpi c;
      float x = 1;
      c.all_reduce(&x, 1, comm::op::sum, "warm-up");
      if (c.rank() == 1)
        c.barrier("rank 1 took another path");
      else
        c.all_reduce(&x, 1, comm::op::sum, "rank 0's path");
      return 0;
    }
    if (a.mode == "die") {
      comm::mpi c;
      float x = 1;
      c.all_reduce(&x, 1, comm::op::sum, "warm-up");
      if (c.rank() == 1) std::_Exit(3);  // a crash: no clean-up, no MPI_Finalize
      c.all_reduce(&x, 1, comm::op::sum, "rank 1 never joins");
      return 0;
    }
    KILN_CHECK(false, "dist_child: mode '", a.mode, "': expected train, weights, watchdog, mismatch or die");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "%s\n", e.what());
    return 2;
  }
}
