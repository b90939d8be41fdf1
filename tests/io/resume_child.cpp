// The process the resume test kills. Usage:
//   resume_child DIR full               train uninterrupted; DIR/full.losses, DIR/full.safetensors
//   resume_child DIR kill-at N          train with checkpoints in DIR/ckpt; SIGKILL itself at the
//                                       start of micro-batch N (losses so far: DIR/killed.losses)
//   resume_child DIR resume             fit(..., "last") from DIR/ckpt; DIR/resumed.losses, .safetensors
//   resume_child DIR write-loop         rewrite DIR/big.ckpt (~8 MB) forever, alternating contents
#include <csignal>
#include <cstdio>
#include <string>

#include "resume_fixture.hpp"

using namespace kiln;
namespace fs = std::filesystem;
namespace R = kiln::test::resume;

namespace {
// Kills its own process at the start of micro-batch `at`; appends each loss to `f` as it is computed.
struct killer {
  using hooks = hook_list<hook::on_train_batch_start, hook::on_train_batch_end>;
  std::int64_t at;
  std::FILE* f;
  R::net* m;
  void on_train_batch_start(auto& ctx, const auto&) {
    if (ctx.micro_batches() == at) std::raise(SIGKILL);
  }
  void on_train_batch_end(auto& ctx, const auto&) {
    const std::int64_t i = ctx.micro_batches() - 1;  // the batch that just ran
    std::uint32_t bits;
    std::memcpy(&bits, &m->losses.at(i), 4);
    std::fprintf(f, "%lld %08x\n", static_cast<long long>(i), bits);
    std::fflush(f);
  }
};
}  // namespace

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::fprintf(stderr, "usage: resume_child DIR full|kill-at N|resume|write-loop\n");
    return 2;
  }
  const fs::path dir = argv[1];
  const std::string mode = argv[2];
  cpu_runtime::set_num_threads(2);
  if (mode == "write-loop") {
    for (std::int64_t round = 0;; ++round) {
      io::checkpoint_writer w;
      w.state().set("round", round);
      w.add("big", tensor<float>::full({2 * 1024 * 1024}, float(round)));
      w.write(dir / "big.ckpt");
    }
  }
  manual_seed(3);
  R::net model;
  R::data_module dm;
  const std::int64_t kill_at = mode == "kill-at" ? std::stoll(argv[3]) : -1;
  R::run t(R::options(dir / "runs"), R::stopper(), R::saver(dir / "ckpt"));
  if (mode == "full") {
    t.fit(model, dm);
    R::write_losses(model.losses, dir / "full.losses");
    io::save_weights(model, dir / "full.safetensors");
  } else if (mode == "kill-at") {
    // Losses reach the file as they are computed, so what the killed run saw survives it.
    std::FILE* f = std::fopen((dir / "killed.losses").c_str(), "w");
    trainer<R::net, strategy::single_device<cpu>, precision::fp32, callbacks::early_stopping,
            callbacks::model_checkpoint, killer>
        k(R::options(dir / "runs"), R::stopper(), R::saver(dir / "ckpt"), killer{kill_at, f, &model});
    k.fit(model, dm);
    std::fprintf(stderr, "resume_child: finished without reaching micro-batch %lld\n", static_cast<long long>(kill_at));
    return 3;
  } else if (mode == "resume") {
    const auto r = t.fit(model, dm, "last");
    std::printf("resumed from %s\n", r.resumed_from.c_str());
    R::write_losses(model.losses, dir / "resumed.losses");
    io::save_weights(model, dir / "resumed.safetensors");
  } else {
    std::fprintf(stderr, "resume_child: unknown mode '%s'\n", mode.c_str());
    return 2;
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
