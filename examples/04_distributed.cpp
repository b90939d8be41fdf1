// 04 — The Fashion-MNIST classifier on several CPU processes: ddp, zero<1>, zero<2>, zero<3>.
//
// Why: the distributed strategy is a slot of the trainer type, like the precision. The
// module and the data are the ones of example 01; only the type changes:
//     kiln::trainer<classifier, kiln::strategy::ddp<kiln::comm::mpi>, kiln::precision::fp32>
// Launch it with Open MPI — kiln has no launcher of its own:
//     mpirun -n 2 build/examples/04_distributed --strategy ddp
//     (tests/dist/mpirun.sh 2 ... adds the flags a 2-core container needs: loopback TCP,
//      --oversubscribe, one thread per rank)
// Each rank builds the same datamodule; the trainer hands each rank's loaders a
// distributed_sampler, so rank r sees elements r, r + world, ... of each epoch's
// shuffled order. --batch is the global batch: each rank takes batch / world of it, so
// the run takes the same optimizer steps as one process with --batch (single_device),
// and ddp reproduces its trajectory up to float order. zero<1> also splits AdamW's two
// moments across the ranks (each holds 1/world), zero<2> the gradient reduction too
// (reduce-scatter), and zero<3> the parameters: between steps each rank keeps only its
// 1/world of them, and gathers the whole for the step (this MLP is one unit — deep
// models wrap each block in kiln::nn::unit so only one block is whole at a time). The
// memory plan printed before training shows the per-rank bytes.
// Rank 0 alone logs and writes the checkpoint; --resume last continues a killed run
// (tools/kiln-elastic restarts the whole job from it when a rank fails).
//
// 04_distributed_cuda (built with -Dcuda, KILN_EXAMPLE_CUDA defined) is the same run with
// the model, the optimizer and the batches on each rank's GPU (kiln::cuda_runtime::
// use_local_device() picks local rank mod GPUs before the model is built):
//     mpirun -n 8 build/examples/04_distributed_cuda --strategy ddp      (comm::nccl)
//     mpirun -n 2 build/examples/04_distributed_cuda --strategy ddp-mpi  (comm::mpi through
//         pinned host memory: ranks may share a GPU, as the gpu test suite's run does)
// zero1, zero2 and zero3 shard over NCCL as well; zero2-offload keeps AdamW's state and
// step on the host (ZeRO-Offload: the memory plan shows it in the cpu column).
//
// Napkin math: 269,322 parameters; an all-reduce of 1.08 MB of f32 gradients per step.
// On loopback TCP that is ~1 ms; a batch-64 step of this MLP is ~1.5 ms on one core, so
// two ranks cannot scale by 2x here: communication is a large share of a small step.
//
// Usage: 04_distributed [--strategy single|ddp|zero1|zero2|zero3] [--epochs N] [--batch B]
//                       [--lr X] [--threads N] [--seed S] [--data DIR] [--out DIR]
//                       [--bucket-mb X] [--no-overlap]  (ddp: bucket cap, reduce after backward)
//                       [--limit-batches N] [--no-val] [--resume last|PATH]
//                       [--min-accuracy A] [--json]
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>

#include "kiln/callbacks/model_checkpoint.hpp"
#include "kiln/comm/mpi.hpp"
#include "kiln/data/data_loader.hpp"
#include "kiln/data/fashion_mnist.hpp"
#include "kiln/data/on_device.hpp"
#include "kiln/kiln.hpp"
#include "kiln/loggers/csv.hpp"
#include "kiln/strategy/ddp.hpp"
#include "kiln/strategy/zero.hpp"
#include "kiln/train/trainer.hpp"
#if defined(KILN_EXAMPLE_NCCL)
#include "kiln/comm/nccl.hpp"
#endif

namespace {

#if defined(KILN_EXAMPLE_CUDA)
using device = kiln::cuda;
#else
using device = kiln::cpu;
#endif

struct options {
  std::string strategy = "ddp";
  std::int64_t epochs = 3;
  std::int64_t batch = 128;  // global
  double lr = 2e-3;
  int threads = 1;
  std::uint64_t seed = 42;
  std::string data = kiln::data::fashion_mnist_default_dir;
  std::string out = "runs/04_distributed";
  std::int64_t limit_batches = -1;
  bool val = true;
  std::string resume;
  double min_accuracy = -1;
  bool json = false;
  double bucket_mb = 25.0;  // ddp's bucket cap
  bool overlap = true;      // ddp posts buckets during backward
};

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      KILN_CHECK(i + 1 < argc, "flag ", a, " expects a value");
      return argv[++i];
    };
    if (a == "--strategy")
      o.strategy = next();
    else if (a == "--epochs")
      o.epochs = std::stoll(next());
    else if (a == "--batch")
      o.batch = std::stoll(next());
    else if (a == "--lr")
      o.lr = std::stod(next());
    else if (a == "--threads")
      o.threads = std::stoi(next());
    else if (a == "--seed")
      o.seed = std::stoull(next());
    else if (a == "--data")
      o.data = next();
    else if (a == "--out")
      o.out = next();
    else if (a == "--limit-batches")
      o.limit_batches = std::stoll(next());
    else if (a == "--no-val")
      o.val = false;
    else if (a == "--resume")
      o.resume = next();
    else if (a == "--min-accuracy")
      o.min_accuracy = std::stod(next());
    else if (a == "--json")
      o.json = true;
    else if (a == "--bucket-mb")
      o.bucket_mb = std::stod(next());
    else if (a == "--no-overlap")
      o.overlap = false;
    else
      throw kiln::error("unknown flag '" + a +
                        "' (expected --strategy, --epochs, --batch, --lr, --threads, --seed, --data, --out, "
                        "--limit-batches, --no-val, --resume, --min-accuracy, --json, --bucket-mb, --no-overlap)");
  }
  return o;
}

// Batches arrive on the device (data::on_device, as in example 01).
using batch = kiln::data::labelled_batch_on<device>;
using input = kiln::var<float, device>;

struct classifier {
  kiln::nn::mlp<kiln::nn::relu, float, device> net{784, {256, 256}, 10};
  double lr = 2e-3;
  std::int64_t total_steps = 1;

  template <class F>
  void for_each_child(F&& f) {
    f("net", net);
  }
  input training_step(auto& ctx, const batch& b) {
    auto loss = kiln::cross_entropy(net(input(b.x)), b.y);
    ctx.log("train/loss", loss, {.sync_dist = true});  // the global batch's loss (mean over ranks)
    return loss;
  }
  // The validation loader is sharded too: sync_dist makes the epoch values global.
  void validation_step(auto& ctx, const batch& b) {
    auto l = net(input(b.x));
    ctx.log("val/loss", kiln::cross_entropy(l, b.y), {.sync_dist = true});
    ctx.log("val/acc", kiln::accuracy(l, b.y), {.sync_dist = true});
  }
  void test_step(auto& ctx, const batch& b) { ctx.log("test/acc", kiln::accuracy(net(input(b.x)), b.y)); }
  auto configure_optimizers() {
    const std::int64_t warm = std::max<std::int64_t>(1, total_steps * 3 / 100);
    return kiln::optim::with_schedule(
        kiln::optim::adamw<float, device>(*this, {.lr = lr, .weight_decay = 0.01}),
        kiln::optim::warmup<kiln::optim::cosine>{.steps = warm,
                                                 .then = {.total_steps = total_steps - warm, .min_factor = 0.05}});
  }
};

struct fashion_mnist_data {
  options opt;
  std::int64_t world = 1;
  using dataset = kiln::data::tensor_dataset;
  using split_loader = kiln::data::data_loader<kiln::data::subset<dataset>>;
  using test_loader_t = kiln::data::data_loader<dataset>;
  std::optional<split_loader> train_host, val_host;
  std::optional<test_loader_t> test_host;
  // The trainer shards these (each rank its part of every epoch) through to the host loaders.
  std::optional<kiln::data::on_device_loader<device, split_loader>> train, val;
  std::optional<kiln::data::on_device_loader<device, test_loader_t>> test;
  void setup(kiln::train::stage s) {
    if (s == kiln::train::stage::fit && !train) {
      auto parts = kiln::data::random_split(kiln::data::fashion_mnist(opt.data, "train"),
                                            std::vector<std::int64_t>{55000, 5000}, opt.seed);
      KILN_CHECK(opt.batch % world == 0, "--batch ", opt.batch, " is the global batch: it must divide by the ", world,
                 " ranks");
      train_host.emplace(parts[0],
                         kiln::data::loader_options{
                             .batch_size = opt.batch / world, .shuffle = true, .drop_last = true, .seed = opt.seed});
      val_host.emplace(parts[1], kiln::data::loader_options{.batch_size = 1000});
      train.emplace(*train_host, kiln::data::move_fields{}, kiln::data::on_device_options{});
      val.emplace(*val_host, kiln::data::move_fields{}, kiln::data::on_device_options{});
    }
    if (s == kiln::train::stage::test && !test) {
      test_host.emplace(kiln::data::fashion_mnist(opt.data, "test"), kiln::data::loader_options{.batch_size = 1000});
      test.emplace(*test_host, kiln::data::move_fields{}, kiln::data::on_device_options{});
    }
  }
  auto& train_loader() { return *train; }
  auto& val_loader() { return *val; }
  auto& test_loader() { return *test; }
};

template <class Strategy>
int run(const options& opt) {
  using trainer_t =
      kiln::trainer<classifier, Strategy, kiln::precision::fp32, kiln::callbacks::model_checkpoint, kiln::loggers::csv>;
  kiln::train::trainer_options to{.max_epochs = opt.epochs,
                                  .seed = opt.seed,
                                  .log_every_n_steps = 50,
                                  .default_root_dir = opt.out,
                                  .enable_progress_bar = false,
                                  .enable_model_summary = false};
  if (opt.limit_batches > 0) to.limit_train_batches = opt.limit_batches;
  if (!opt.val) {
    to.limit_val_batches = std::int64_t{0};
    to.num_sanity_val_steps = 0;
  }
  trainer_t trainer(to, kiln::callbacks::model_checkpoint({.save_top_k = 0, .save_last = true}), kiln::loggers::csv{});
  auto& st = trainer.strategy();
  if constexpr (requires { st.set_options(kiln::strategy::ddp_options{}); })
    st.set_options({.bucket_cap_mb = opt.bucket_mb, .overlap_backward = opt.overlap});
  const bool zero_rank = st.is_global_zero();
  kiln::manual_seed(opt.seed);  // rank 0's initial weights are broadcast anyway
  classifier model;
  model.lr = opt.lr;
  fashion_mnist_data data{opt, st.world_size()};
  data.setup(kiln::train::stage::fit);
  const std::int64_t per_epoch = (55000 / opt.batch);
  model.total_steps = (opt.limit_batches > 0 ? std::min(opt.limit_batches, per_epoch) : per_epoch) * opt.epochs;

  const auto plan = trainer.plan(model, data);
  if (zero_rank) std::printf("%s", plan.str().c_str());
  const auto fit = trainer.fit(model, data, opt.resume);
  const double acc = trainer.test(model, data).at("test/acc");
  const double samples = double(fit.global_step) * double(opt.batch);
  if (zero_rank) {
    std::printf(
        "%s on %d rank(s) x %d thread(s): %lld steps of %lld in %.2f s (%.0f samples/s)%s%s; test accuracy %.2f%%\n",
        opt.strategy.c_str(), st.world_size(), opt.threads, static_cast<long long>(fit.global_step),
        static_cast<long long>(opt.batch), fit.seconds, samples / fit.seconds,
        fit.resumed_from.empty() ? "" : ", resumed from ", fit.resumed_from.c_str(), 100 * acc);
    std::printf(
        "checkpoint: %s\nlogs: %s\n",
        std::filesystem::absolute(trainer.template callback<kiln::callbacks::model_checkpoint>().last_model_path)
            .string()
            .c_str(),
        std::filesystem::absolute(trainer.state().log_dir).string().c_str());
    if (opt.json)
      std::printf(
          "{\"impl\": \"kiln\", \"strategy\": \"%s\", \"ranks\": %d, \"threads\": %d, \"steps\": %lld, \"batch\": "
          "%lld, \"seconds\": %.4f, \"samples_per_s\": %.1f, \"test_acc\": %.6f, \"optimizer_state_bytes_rank0\": "
          "%lld, \"model_state_bytes_rank0\": %lld, \"bucket_mb\": %g, \"overlap\": %s}\n",
          opt.strategy.c_str(), st.world_size(), opt.threads, static_cast<long long>(fit.global_step),
          static_cast<long long>(opt.batch), fit.seconds, samples / fit.seconds, acc,
          static_cast<long long>(plan.devices.at(0).optimizer_state),
          static_cast<long long>(plan.devices.at(0).model_states()), opt.bucket_mb, opt.overlap ? "true" : "false");
  }
  if (opt.min_accuracy >= 0 && acc < opt.min_accuracy) {
    if (zero_rank) std::fprintf(stderr, "test accuracy %.4f is below --min-accuracy %.4f\n", acc, opt.min_accuracy);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  const options opt = parse(argc, argv);
  kiln::cpu_runtime::set_num_threads(opt.threads);
  namespace st = kiln::strategy;
#if defined(KILN_EXAMPLE_CUDA)
  if (kiln::cuda_runtime::device_count() == 0) {
    std::fprintf(stderr, "04_distributed_cuda: no CUDA device is visible; skipped (exit 77)\n");
    return 77;
  }
  kiln::cuda_runtime::use_local_device();  // before the model: each rank's weights on its GPU
  if (opt.strategy == "single") return run<st::single_device<kiln::cuda>>(opt);
  if (opt.strategy == "ddp-mpi") return run<st::ddp<kiln::comm::mpi, kiln::cuda>>(opt);
#if defined(KILN_EXAMPLE_NCCL)
  if (opt.strategy == "ddp") return run<st::ddp<kiln::comm::nccl, kiln::cuda>>(opt);
  if (opt.strategy == "zero1") return run<st::zero<1, kiln::comm::nccl, st::offload::none, kiln::cuda>>(opt);
  if (opt.strategy == "zero2") return run<st::zero<2, kiln::comm::nccl, st::offload::none, kiln::cuda>>(opt);
  if (opt.strategy == "zero3") return run<st::zero<3, kiln::comm::nccl, st::offload::none, kiln::cuda>>(opt);
  if (opt.strategy == "zero2-offload") return run<st::zero<2, kiln::comm::nccl, st::offload::cpu, kiln::cuda>>(opt);
  throw kiln::error("--strategy '" + opt.strategy +
                    "': compiled into this binary: single, ddp, ddp-mpi, zero1, zero2, zero3, zero2-offload");
#else
  throw kiln::error("--strategy '" + opt.strategy +
                    "': compiled into this binary: single, ddp-mpi (NCCL was not found when it was built)");
#endif
#else
  if (opt.strategy == "single") return run<st::single_device<kiln::cpu>>(opt);
  if (opt.strategy == "ddp") return run<st::ddp<kiln::comm::mpi>>(opt);
  if (opt.strategy == "zero1") return run<st::zero<1, kiln::comm::mpi>>(opt);
  if (opt.strategy == "zero2") return run<st::zero<2, kiln::comm::mpi>>(opt);
  if (opt.strategy == "zero3") return run<st::zero<3, kiln::comm::mpi>>(opt);
  throw kiln::error("--strategy '" + opt.strategy + "': compiled into this binary: single, ddp, zero1, zero2, zero3");
#endif
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 2;
}
