// Multi-rank tests (suite mpi): run by mpirun with 2 and 3 ranks on loopback. Every rank
// runs every case; a failing check on one rank makes the others' next collective time
// out in the watchdog (KILN_COLLECTIVE_TIMEOUT is short in the test environment).
#include <doctest/doctest.h>

#include <algorithm>
#include <numeric>

#include "dist_fixture.hpp"
#include "kiln/callbacks/early_stopping.hpp"
#include "kiln/callbacks/nan_detector.hpp"
#include "kiln/nn/lora.hpp"

using namespace kiln;
using namespace kiln::test::dist;

namespace {

comm::mpi& world() {
  static comm::mpi c;
  return c;
}

struct outcome {
  std::vector<double> losses;  // global mean loss per optimizer step
  std::vector<double> weights;
  train::fit_result fit;
};

template <class Strategy, class Precision = precision::fp32, class T = float, class Net = net<T>>
outcome run(const std::filesystem::path& root, std::int64_t epochs = 2, std::int64_t accumulate = 1, double clip = 0) {
  using trainer_t = trainer<Net, Strategy, Precision>;
  auto o = options(root, epochs);
  o.accumulate_grad_batches = accumulate;
  o.gradient_clip_val = clip;
  trainer_t t(o);
  manual_seed(7);  // the same initial weights in every run (ddp then broadcasts rank 0's)
  Net m;
  const int w = t.strategy().world_size();
  data_module dm(global_batch / w);
  outcome r;
  r.fit = t.fit(m, dm);
  r.losses = global_losses(world(), m.losses);
  r.weights = weights(m);
  return r;
}

// The single-device reference: every rank computes it alone on the whole global batch.
outcome reference(const std::filesystem::path& root, std::int64_t epochs = 2, std::int64_t accumulate = 1,
                  double clip = 0) {
  using trainer_t = trainer<net<float>, strategy::single_device<cpu>, precision::fp32>;
  auto o = options(root, epochs);
  o.accumulate_grad_batches = accumulate;
  o.gradient_clip_val = clip;
  trainer_t t(o);
  manual_seed(7);
  net<float> m;
  data_module dm(global_batch);
  outcome r;
  r.fit = t.fit(m, dm);
  r.losses = m.losses;
  r.weights = weights(m);
  return r;
}

std::filesystem::path scratch(const std::string& name) {
  const auto p = std::filesystem::path("mpi_test_runs") / ("w" + std::to_string(world().world_size())) / name;
  if (world().rank() == 0) std::filesystem::remove_all(p);
  world().barrier("test: scratch");
  return p;
}

// Float sums in a different order (MPI's reduction tree, a batch split over ranks) move
// the f32 trajectory by a few ulps per step; over 40 AdamW steps that stays below 1e-5.
constexpr double tolerance = 1e-5;  // measured: 1.5e-7 (2 ranks), 2.0e-7 (3 ranks)

}  // namespace

TEST_CASE("comm::mpi: collectives compute what they claim, blocking and posted") {
  auto& c = world();
  const int r = c.rank(), w = c.world_size();
  REQUIRE(w >= 2);
  std::vector<float> f(5);
  for (int i = 0; i < 5; ++i) f[i] = float(r + i);
  c.all_reduce(f.data(), 5, comm::op::sum);
  for (int i = 0; i < 5; ++i) CHECK(f[i] == float(w * i + w * (w - 1) / 2));
  std::int64_t mx = r * 10, mn = r * 10;
  c.all_reduce(&mx, 1, comm::op::max);
  c.all_reduce(&mn, 1, comm::op::min);
  CHECK(mx == (w - 1) * 10);
  CHECK(mn == 0);
  double d = 0.5;
  auto h = c.iall_reduce(&d, 1, comm::op::sum, "posted");
  h.wait();
  CHECK(d == 0.5 * w);

  // reduce_scatter: block b of every rank's send is b + rank; rank r receives Σ_rank (r + rank).
  std::vector<float> send(static_cast<std::size_t>(3 * w)), recv(3);
  for (int b = 0; b < w; ++b)
    for (int i = 0; i < 3; ++i) send[static_cast<std::size_t>(b * 3 + i)] = float(b + r + i);
  c.reduce_scatter(send.data(), recv.data(), 3, comm::op::sum);
  for (int i = 0; i < 3; ++i) CHECK(recv[i] == float(w * (r + i) + w * (w - 1) / 2));

  // all_gather of bytes: bf16 values travel bit for bit.
  std::vector<bf16> g(static_cast<std::size_t>(2 * w));
  g[static_cast<std::size_t>(2 * r)] = bf16(1.5f + r);
  g[static_cast<std::size_t>(2 * r + 1)] = bf16(-3.0f * r);
  c.all_gather(reinterpret_cast<std::byte*>(g.data()), 2 * sizeof(bf16));
  for (int k = 0; k < w; ++k) {
    CHECK(float(g[static_cast<std::size_t>(2 * k)]) == 1.5f + k);
    CHECK(float(g[static_cast<std::size_t>(2 * k + 1)]) == -3.0f * k);
  }
  std::string s = r == 0 ? "from rank zero" : "x";
  strategy::ddp<comm::mpi> dd;
  dd.broadcast_string(s);
  CHECK(s == "from rank zero");
  CHECK(dd.reduce(double(r), train::reduce::mean) == doctest::Approx((w - 1) / 2.0));
  CHECK(dd.reduce(double(r), train::reduce::max) == w - 1);
}

TEST_CASE("the trainer shards each rank's loader: disjoint, together the whole epoch") {
  auto& c = world();
  const int w = c.world_size();
  data::data_loader<data::tensor_dataset> l(make_data(23, 1), {.batch_size = 4, .shuffle = true, .seed = 9});
  l.distribute(c.rank(), w);
  CHECK(l.num_samples() == (23 + w - 1) / w);  // padded: every rank the same count
  std::vector<std::int64_t> mine = data::distributed_sampler(23, c.rank(), w, true, 9).indices(0);
  std::vector<std::int64_t> all(mine.size() * static_cast<std::size_t>(w));
  std::copy(mine.begin(), mine.end(), all.begin() + static_cast<std::ptrdiff_t>(mine.size() * c.rank()));
  c.all_gather(reinterpret_cast<std::byte*>(all.data()), static_cast<std::int64_t>(mine.size() * 8));
  std::vector<int> seen(23, 0);
  for (auto i : all) ++seen[static_cast<std::size_t>(i)];
  const int padded = static_cast<int>(all.size()) - 23;
  int twice = 0;
  for (int n : seen) {
    CHECK(n >= 1);
    twice += n - 1;
  }
  CHECK(twice == padded);
}

TEST_CASE("ddp, zero<1> and zero<2> follow single_device's trajectory on the same global batch") {
  const auto ref = reference(scratch("ref"));
  REQUIRE(ref.losses.size() == 40);
  const auto ddp = run<strategy::ddp<comm::mpi>>(scratch("ddp"));
  const auto z1 = run<strategy::zero<1, comm::mpi>>(scratch("z1"));
  const auto z2 = run<strategy::zero<2, comm::mpi>>(scratch("z2"));
  for (auto* o : {&ddp, &z1, &z2}) {
    CHECK(o->fit.global_step == ref.fit.global_step);
    CHECK(max_abs_diff(o->losses, ref.losses) < tolerance);
    CHECK(max_abs_diff(o->weights, ref.weights) < tolerance);
  }
  // The loss actually fell, so the comparison is of a trajectory that moved.
  CHECK(ref.losses.back() < 0.8 * ref.losses.front());
  // Replicas are identical on every rank, bit for bit.
  for (auto* o : {&ddp, &z1, &z2}) {
    auto mine = o->weights;
    auto sum = mine;
    world().all_reduce(sum.data(), static_cast<std::int64_t>(sum.size()), comm::op::sum);
    for (std::size_t i = 0; i < mine.size(); ++i) REQUIRE(sum[i] == mine[i] * world().world_size());
  }
}

TEST_CASE("accumulation windows and norm clipping give the same trajectory under every strategy") {
  const auto ref = reference(scratch("ref_acc"), 2, 3, 0.05);
  const auto ddp = run<strategy::ddp<comm::mpi>>(scratch("ddp_acc"), 2, 3, 0.05);
  const auto z1 = run<strategy::zero<1, comm::mpi>>(scratch("z1_acc"), 2, 3, 0.05);
  const auto z2 = run<strategy::zero<2, comm::mpi>>(scratch("z2_acc"), 2, 3, 0.05);
  for (auto* o : {&ddp, &z1, &z2}) {
    CHECK(o->fit.global_step == ref.fit.global_step);
    CHECK(max_abs_diff(o->losses, ref.losses) < tolerance);
    CHECK(max_abs_diff(o->weights, ref.weights) < tolerance);
  }
}

namespace {
// ddp with one bucket per parameter (the cap is a single element), posting during
// backward or after it.
template <bool Overlap>
struct ddp_per_parameter : strategy::ddp<comm::mpi> {
  ddp_per_parameter() : strategy::ddp<comm::mpi>({.bucket_cap_mb = 1e-9, .overlap_backward = Overlap}) {}
};
template <bool Overlap>
struct zero1_per_parameter : strategy::zero<1, comm::mpi> {
  zero1_per_parameter() : strategy::zero<1, comm::mpi>({.bucket_cap_mb = 1e-9, .overlap_backward = Overlap}) {}
};
struct overlap_outcome {
  outcome o;
  std::size_t buckets = 0, overlapped = 0;
};
template <class S>
overlap_outcome run_overlap(const std::filesystem::path& root, std::int64_t accumulate) {
  auto o = options(root, 1);
  o.accumulate_grad_batches = accumulate;
  trainer<net<float>, S, precision::fp32> t(o);
  manual_seed(7);
  net<float> m;
  data_module dm(global_batch / t.strategy().world_size());
  overlap_outcome r;
  r.o.fit = t.fit(m, dm);
  r.o.losses = global_losses(world(), m.losses);
  r.o.weights = weights(m);
  r.buckets = t.strategy().num_buckets();
  r.overlapped = t.strategy().overlapped_buckets();
  return r;
}
}  // namespace

TEST_CASE("zero<1> posts its buckets during backward too, with the bits of posting after it") {
  for (std::int64_t accumulate : {1, 3}) {
    CAPTURE(accumulate);
    const auto during = run_overlap<zero1_per_parameter<true>>(scratch("z1_overlap_on"), accumulate);
    const auto after = run_overlap<zero1_per_parameter<false>>(scratch("z1_overlap_off"), accumulate);
    REQUIRE(during.buckets == 4);
    // Buckets follow the optimizer's parameters (AdamW: weights, then the no-decay biases),
    // reversed: fc2.bias goes out early; fc1.bias, final only at the end, holds back fc2.weight.
    CHECK(during.overlapped == 1);
    CHECK(after.overlapped == 0);
    CHECK(during.o.losses == after.o.losses);
    CHECK(during.o.weights == after.o.weights);
  }
}

TEST_CASE("ddp posts its buckets during backward, with the bits of posting after it") {
  for (std::int64_t accumulate : {1, 3}) {
    CAPTURE(accumulate);
    const auto during = run_overlap<ddp_per_parameter<true>>(scratch("overlap_on"), accumulate);
    const auto after = run_overlap<ddp_per_parameter<false>>(scratch("overlap_off"), accumulate);
    const auto whole = run_overlap<strategy::ddp<comm::mpi>>(scratch("overlap_default"), accumulate);
    REQUIRE(during.buckets == 4);   // fc1 and fc2, weight and bias
    CHECK(during.overlapped == 2);  // fc2's two, posted before fc1's backward ran
    CHECK(after.overlapped == 0);
    CHECK(whole.buckets == 1);
    CHECK(whole.overlapped == 0);              // the default cap: one bucket, complete only at the end
    CHECK(during.o.losses == after.o.losses);  // bit for bit
    CHECK(during.o.weights == after.o.weights);
    // One bucket against four: the same sums, though MPI may order a 3-rank sum differently by size.
    CHECK(max_abs_diff(whole.o.weights, after.o.weights) < tolerance);
    CHECK(during.o.fit.global_step == after.o.fit.global_step);
  }
}

TEST_CASE("bf16_mixed composes with ddp and zero<2>: masters reduced and sharded") {
  // Each rank rounds its half-batch weight gradient to bf16 before the f32 average, where
  // one rank rounds the whole batch's once: against single_device the trajectories agree
  // to bf16 precision; between the two strategies (the same roundings) to f32 order.
  using single = trainer<net<bf16>, strategy::single_device<cpu>, precision::bf16_mixed>;
  single ts(options(scratch("single_bf16")));
  manual_seed(7);
  net<bf16> ms;
  data_module dms(global_batch);
  ts.fit(ms, dms);
  const auto ddp = run<strategy::ddp<comm::mpi>, precision::bf16_mixed, bf16>(scratch("ddp_bf16"));
  const auto z2 = run<strategy::zero<2, comm::mpi>, precision::bf16_mixed, bf16>(scratch("z2_bf16"));
  CHECK(max_abs_diff(ddp.losses, z2.losses) < tolerance);
  CHECK(max_abs_diff(ddp.weights, z2.weights) < tolerance);
  // Measured against single_device: losses 1.1e-3 / 1.4e-3, weights 0.034 / 0.045 (2 / 3
  // ranks) — a few bf16 ulps (2^-7 at 1); a missing or doubled average is off by ~1.
  CHECK(max_abs_diff(ddp.losses, ms.losses) < 5e-3);
  CHECK(max_abs_diff(ddp.weights, weights(ms)) < 0.1);
  CHECK(ddp.losses.back() < 0.8 * ddp.losses.front());
}

using unit_net = net<float, true>;
using zero3 = strategy::zero<3, comm::mpi>;

// Bit-identical on every rank (the replicas agree after fit).
void check_replicas(const std::vector<double>& mine) {
  auto sum = mine;
  world().all_reduce(sum.data(), static_cast<std::int64_t>(sum.size()), comm::op::sum);
  for (std::size_t i = 0; i < mine.size(); ++i) REQUIRE(sum[i] == mine[i] * world().world_size());
}

TEST_CASE("zero<3> follows single_device's trajectory, gathering units or the root unit alone") {
  const auto ref = reference(scratch("ref3"));
  const auto root = run<zero3>(scratch("z3_root"));
  const auto units = run<zero3, precision::fp32, float, unit_net>(scratch("z3_units"));
  for (auto* o : {&root, &units}) {
    CHECK(o->fit.global_step == ref.fit.global_step);
    CHECK(max_abs_diff(o->losses, ref.losses) < tolerance);
    CHECK(max_abs_diff(o->weights, ref.weights) < tolerance);
    check_replicas(o->weights);  // and whole again after fit
  }
  CHECK(ref.losses.back() < 0.8 * ref.losses.front());
}

TEST_CASE("zero<3>: accumulation windows and norm clipping give single_device's trajectory") {
  const auto ref = reference(scratch("ref3_acc"), 2, 3, 0.05);
  const auto z3 = run<zero3, precision::fp32, float, unit_net>(scratch("z3_acc"), 2, 3, 0.05);
  CHECK(z3.fit.global_step == ref.fit.global_step);
  CHECK(max_abs_diff(z3.losses, ref.losses) < tolerance);
  CHECK(max_abs_diff(z3.weights, ref.weights) < tolerance);
}

TEST_CASE("zero<3>: a rank holds 1/world of the parameters between uses, and a unit only while it runs") {
  trainer<unit_net, zero3, precision::fp32> t(options(scratch("z3_bytes"), 1));
  manual_seed(7);
  unit_net m;
  data_module dm(global_batch / world().world_size());
  t.fit(m, dm);
  const std::int64_t n = 8 * 32 + 32 + 32 * 3 + 3, w = world().world_size(), shard = (n + w - 1) / w;
  const std::int64_t expect = std::min(n, shard * (world().rank() + 1)) - std::min(n, shard * world().rank());
  // Every step began with no whole parameter in memory (the model has no root parameters)...
  REQUIRE(m.resident_bytes.size() == 20);
  for (auto b : m.resident_bytes) CHECK(b == 0);
  // ...and between its two layers fc1 had been released and fc2 not yet gathered, in
  // training and in validation alike.
  REQUIRE(m.resident_between.size() > 20);
  for (auto [fc1, fc2] : m.resident_between) {
    CHECK_FALSE(fc1);
    CHECK_FALSE(fc2);
  }
  // What a rank keeps: its segments (parameters) and their optimizer state, 1/world each.
  auto& opt = std::get<0>(t.optimizers()).optimizer;
  CHECK(opt.shard_elements() == expect);
  std::int64_t state = 0;
  opt.for_each_state_tensor([&](const auto& s) { state += s.numel(); });
  CHECK(state == 2 * expect);
  std::int64_t total = opt.shard_elements();
  world().all_reduce(&total, 1, comm::op::sum);
  CHECK(total == n);
  // After fit the model is whole, on every rank alike.
  for (auto& np : nn::named_parameters<float>(m)) CHECK(np.param.value().storage_resident());
  check_replicas(weights(m));
  // Without a listening strategy a unit is its module.
  trainer<unit_net, strategy::single_device<cpu>, precision::fp32> single(options(scratch("z3_bytes_single"), 1));
  manual_seed(7);
  unit_net s;
  data_module dms(global_batch);
  single.fit(s, dms);
  for (auto b : s.resident_bytes) CHECK(b == n * 4);
  // The planner counts parameters, gradients and optimizer state at 1/world of
  // single_device's (allocator blocks, rounded up), plus for parameters and gradients
  // the largest unit whole (fc1; this model has no root parameters).
  unit_net fresh, fresh_single;
  const auto plan = t.plan(fresh, dm).devices.at(0), whole = single.plan(fresh_single, dms).devices.at(0);
  const std::int64_t fc1 = train::detail::block_bytes(8 * 32 * 4) + train::detail::block_bytes(32 * 4);
  CHECK(plan.parameters == (whole.parameters + w - 1) / w + fc1);
  CHECK(plan.gradients == (whole.gradients + w - 1) / w + fc1);
  CHECK(plan.optimizer_state == (whole.optimizer_state + w - 1) / w);
}

TEST_CASE("zero<3> with callbacks that read parameters: nan_detector and early_stopping's best weights") {
  // early_stopping copies the best weights at each validation: under zero<3> it gathers
  // them first (every rank joins); nan_detector skips what is not in memory.
  auto fit = [&]<class S, class Net>(S*, Net*, const char* name) {
    using trainer_t = trainer<Net, S, precision::fp32, callbacks::nan_detector, callbacks::early_stopping>;
    trainer_t t(options(scratch(name), 2), callbacks::nan_detector{},
                callbacks::early_stopping({.monitor = "val/loss", .patience = 5, .restore_best_weights = true}));
    manual_seed(7);
    Net m;
    data_module dm(global_batch / t.strategy().world_size());
    t.fit(m, dm);
    return weights(m);
  };
  const auto ref =
      fit(static_cast<strategy::single_device<cpu>*>(nullptr), static_cast<net<float>*>(nullptr), "cb_ref");
  const auto z3 = fit(static_cast<zero3*>(nullptr), static_cast<unit_net*>(nullptr), "cb_z3");
  CHECK(max_abs_diff(z3, ref) < tolerance);
  check_replicas(z3);
}

TEST_CASE("a zero<3> checkpoint resumes in single_device, ddp and zero<3> and continues the trajectory") {
  const auto dir = scratch("reshard3");
  const auto ckpt = dir / "after_epoch_1.ckpt";
  const auto full = run<zero3, precision::fp32, float, unit_net>(dir / "full", 2);
  {
    trainer<unit_net, zero3, precision::fp32> t(options(dir / "first", 1));
    manual_seed(7);
    unit_net m;
    data_module dm(global_batch / world().world_size());
    t.fit(m, dm);
    t.save_checkpoint(ckpt);
    world().barrier("test: checkpoint written");
  }
  {
    trainer<net<float>, strategy::single_device<cpu>, precision::fp32> t(options(dir / "single", 2));
    manual_seed(7);
    net<float> m;
    data_module dm(global_batch);
    const auto res = t.fit(m, dm, ckpt.string());
    CHECK(res.resumed_from == ckpt.string());
    CHECK(res.global_step == full.fit.global_step);
    CHECK(max_abs_diff(weights(m), full.weights) < tolerance);
    CHECK(max_abs_diff(m.losses, std::vector<double>(full.losses.begin() + 20, full.losses.end())) < tolerance);
  }
  auto resumed = [&]<class S, class Net>(S*, Net*, const char* name) {
    trainer<Net, S, precision::fp32> t(options(dir / name, 2));
    manual_seed(7);
    Net m;
    data_module dm(global_batch / world().world_size());
    const auto res = t.fit(m, dm, ckpt.string());
    CHECK(res.global_step == full.fit.global_step);
    CHECK(max_abs_diff(weights(m), full.weights) < tolerance);
  };
  resumed(static_cast<zero3*>(nullptr), static_cast<unit_net*>(nullptr), "z3");
  resumed(static_cast<strategy::ddp<comm::mpi>*>(nullptr), static_cast<net<float>*>(nullptr), "ddp");
}

TEST_CASE("zero: each rank holds 1/world of the optimizer state") {
  using trainer_t = trainer<net<float>, strategy::zero<1, comm::mpi>, precision::fp32>;
  trainer_t t(options(scratch("bytes"), 1));
  manual_seed(7);
  net<float> m;
  data_module dm(global_batch / world().world_size());
  t.fit(m, dm);
  const std::int64_t n = 8 * 32 + 32 + 32 * 3 + 3;  // parameters the optimizer steps
  std::int64_t elements = 0;
  std::get<0>(t.optimizers()).optimizer.for_each_state_tensor([&](const auto& s) { elements += s.numel(); });
  const std::int64_t w = world().world_size(), shard = (n + w - 1) / w;
  const std::int64_t expect = std::min(n, shard * (world().rank() + 1)) - std::min(n, shard * world().rank());
  CHECK(elements == 2 * expect);  // exp_avg and exp_avg_sq over this rank's range
  std::int64_t total = elements;
  world().all_reduce(&total, 1, comm::op::sum);
  CHECK(total == 2 * n);  // the shards partition the state
  // The plan says the same before the first step.
  net<float> fresh;
  const auto plan = t.plan(fresh, dm);
  CHECK(plan.devices.at(0).rank == world().rank());
}

TEST_CASE("a zero<1> checkpoint loads into single_device, ddp and zero<2> and continues the trajectory") {
  const auto dir = scratch("reshard");
  const auto ckpt = dir / "after_epoch_1.ckpt";
  // Uninterrupted: zero<1> for 2 epochs.
  const auto full = run<strategy::zero<1, comm::mpi>>(dir / "full", 2);
  {
    trainer<net<float>, strategy::zero<1, comm::mpi>, precision::fp32> t(options(dir / "first", 1));
    manual_seed(7);
    net<float> m;
    data_module dm(global_batch / world().world_size());
    t.fit(m, dm);
    t.save_checkpoint(ckpt);  // every rank joins; rank 0 writes
    world().barrier("test: checkpoint written");
    // The file holds whole optimizer tensors, as single_device writes them.
    auto r = io::checkpoint_reader::open(ckpt);
    (void)r;
  }
  // single_device resumes on every rank, on the global batch.
  {
    trainer<net<float>, strategy::single_device<cpu>, precision::fp32> t(options(dir / "single", 2));
    manual_seed(7);
    net<float> m;
    data_module dm(global_batch);
    const auto res = t.fit(m, dm, ckpt.string());
    CHECK(res.resumed_from == ckpt.string());
    CHECK(res.global_step == full.fit.global_step);
    CHECK(max_abs_diff(weights(m), full.weights) < tolerance);
    CHECK(max_abs_diff(m.losses, std::vector<double>(full.losses.begin() + 20, full.losses.end())) < tolerance);
  }
  // zero<2> and ddp resume on the same ranks.
  auto resumed = [&]<class S>(S*, const char* name) {
    trainer<net<float>, S, precision::fp32> t(options(dir / name, 2));
    manual_seed(7);
    net<float> m;
    data_module dm(global_batch / world().world_size());
    const auto res = t.fit(m, dm, ckpt.string());
    CHECK(res.global_step == full.fit.global_step);
    CHECK(max_abs_diff(weights(m), full.weights) < tolerance);
  };
  resumed(static_cast<strategy::zero<2, comm::mpi>*>(nullptr), "z2");
  resumed(static_cast<strategy::ddp<comm::mpi>*>(nullptr), "ddp");
}

TEST_CASE("only rank 0 writes logs and checkpoints; every rank resolves the same run directory") {
  const auto dir = scratch("writers");
  trainer<net<float>, strategy::ddp<comm::mpi>, precision::fp32, callbacks::model_checkpoint> t(
      options(dir, 1), callbacks::model_checkpoint({.dirpath = (dir / "ckpt").string(),
                                                    .monitor = "val/loss",
                                                    .save_top_k = 1,
                                                    .save_last = true,
                                                    .every_n_train_steps = 7}));
  manual_seed(7);
  net<float> m;
  data_module dm(global_batch / world().world_size());
  t.fit(m, dm);
  world().barrier("test: fit done");
  std::string mine = t.state().log_dir;
  std::string zero = mine;
  strategy::ddp<comm::mpi> dd;
  dd.broadcast_string(zero);
  CHECK(mine == zero);
  CHECK(std::filesystem::exists(dir / "ckpt" / "last.ckpt"));
  int files = 0;
  for (auto& e : std::filesystem::directory_iterator(dir / "ckpt")) files += e.path().extension() == ".ckpt";
  CHECK(files == 2);  // last + the best one: no rank deleted what rank 0 kept
}

TEST_CASE("a stop asked for by one rank stops every rank at the same step") {
  trainer<net<float>, strategy::ddp<comm::mpi>, precision::fp32> t(options(scratch("stop"), 3));
  manual_seed(7);
  net<float> m;
  m.stop_rank = 1;
  m.stop_at = 7;
  data_module dm(global_batch / world().world_size());
  const auto r = t.fit(m, dm);
  CHECK(r.global_step == 8);  // the batch that asked still steps, as on one rank
  CHECK(r.stop_reason == (world().rank() == 1 ? "rank-local stop" : "another rank requested a stop"));
  std::int64_t lo = r.global_step, hi = r.global_step;
  world().all_reduce(&lo, 1, comm::op::min);
  world().all_reduce(&hi, 1, comm::op::max);
  CHECK(lo == hi);
}

TEST_CASE("zero checkpoints: each rank writes its own shard; a new save replaces the old shards") {
  const auto dir = scratch("shards");
  const auto ckpt = dir / "z.ckpt";
  trainer<net<float>, strategy::zero<1, comm::mpi>, precision::fp32> t(options(dir, 1));
  manual_seed(7);
  net<float> m;
  data_module dm(global_batch / world().world_size());
  t.fit(m, dm);
  t.save_checkpoint(ckpt);
  world().barrier("test: saved");
  auto shard_files = [&] {
    std::vector<std::filesystem::path> v;
    for (auto& e : std::filesystem::directory_iterator(dir))
      if (e.path().filename().string().starts_with("z.ckpt.")) v.push_back(e.path());
    std::sort(v.begin(), v.end());
    return v;
  };
  const auto first = shard_files();
  REQUIRE(first.size() == static_cast<std::size_t>(world().world_size()));
  {
    // The checkpoint itself holds no optimizer tensor; this rank's file holds its range.
    auto r = io::checkpoint_reader::open(ckpt);
    CHECK(r.names_in("optimizer.0").empty());
    const std::string mine = "rank" + std::to_string(world().rank()) + "-of-" + std::to_string(world().world_size());
    for (auto& f : first) {
      if (f.string().find(mine) == std::string::npos) continue;
      auto s = io::checkpoint_reader::open(f);
      const std::int64_t n = s.state().at("end").as_int() - s.state().at("begin").as_int();
      CHECK(s.file().template load<float>("exp_avg").numel() == n);
      const std::int64_t total = 8 * 32 + 32 + 32 * 3 + 3, w = world().world_size();
      CHECK(n <= (total + w - 1) / w);
    }
  }
  world().barrier("test: read");
  t.save_checkpoint(ckpt);  // again: new tag, the first save's shards are gone
  world().barrier("test: saved again");
  const auto second = shard_files();
  CHECK(second.size() == first.size());
  for (auto& f : first) CHECK(std::find(second.begin(), second.end(), f) == second.end());
  // A missing shard is named on load, before anything changes.
  world().barrier("test: listed");
  if (world().rank() == 0) std::filesystem::remove(second.back());
  world().barrier("test: removed");
  trainer<net<float>, strategy::single_device<cpu>, precision::fp32> single(options(dir / "single", 2));
  net<float> fresh;
  data_module dm1(global_batch);
  std::string what;
  try {
    single.fit(fresh, dm1, ckpt.string());
  } catch (const kiln::error& e) {
    what = e.what();
  }
  CHECK(what.find("is missing: a sharded checkpoint's files must stay together") != std::string::npos);
}

namespace {
// The fixture's two layers frozen, each with a rank-4 LoRA adapter: only the adapters train.
struct adapter_net {
  nn::lora_linear<float> fc1{8, 32}, fc2{32, 3};
  std::vector<double> losses;
  adapter_net() {
    nn::lora_config c;
    c.r = 4;
    c.alpha = 8;
    c.target_modules = {"fc1", "fc2"};
    nn::attach_lora(*this, c);
    // B non-zero, so A moves from the first step too (seeded: the same on every rank).
    for (auto* l : {&fc1, &fc2}) l->lora->B.value() = nn::init::uniform<float>(l->lora->B.shape(), 0.1);
  }
  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("fc2", fc2);
  }
  var<float> forward(const tensor<float>& x) { return fc2(ops::relu(fc1(var<float>(x)))); }
  var<float> training_step(auto& ctx, const batch& b) {
    auto loss = cross_entropy(forward(b.x), b.y);
    losses.push_back(static_cast<double>(loss.value().flat(0)));
    ctx.log("train/loss", loss, {.on_epoch = true, .sync_dist = true});
    return loss;
  }
  void validation_step(auto& ctx, const batch& b) {
    ctx.log("val/loss", cross_entropy(forward(b.x), b.y), {.sync_dist = true});
  }
  auto configure_optimizers() { return optim::adamw<float>(*this, {.lr = 2e-2}); }
};
}  // namespace

TEST_CASE("LoRA adapters under ddp and zero<1|2|3>: single_device's trajectory, the frozen base untouched") {
  using single = strategy::single_device<cpu>;
  const auto ref = run<single, precision::fp32, float, adapter_net>(scratch("lora_ref"));
  REQUIRE(ref.losses.size() == 40);
  CHECK(ref.losses.back() < 0.9 * ref.losses.front());
  manual_seed(7);
  adapter_net initial;
  const auto w0 = weights(initial);
  const auto ddp = run<strategy::ddp<comm::mpi>, precision::fp32, float, adapter_net>(scratch("lora_ddp"));
  const auto z1 = run<strategy::zero<1, comm::mpi>, precision::fp32, float, adapter_net>(scratch("lora_z1"));
  const auto z2 = run<strategy::zero<2, comm::mpi>, precision::fp32, float, adapter_net>(scratch("lora_z2"));
  const auto z3 = run<zero3, precision::fp32, float, adapter_net>(scratch("lora_z3"));
  // Parameters in visit order: fc1.weight, fc1.bias, its A and B, then fc2's; the base
  // weights and biases keep their initial bits under every strategy.
  const std::size_t base1 = 8 * 32 + 32, a1 = 4 * 8 + 32 * 4, base2 = 32 * 3 + 3;
  for (auto* o : {&ref, &ddp, &z1, &z2, &z3}) {
    CHECK(o->fit.global_step == ref.fit.global_step);
    CHECK(max_abs_diff(o->losses, ref.losses) < tolerance);
    CHECK(max_abs_diff(o->weights, ref.weights) < tolerance);
    REQUIRE(o->weights.size() == w0.size());
    bool base_same = true, adapters_moved = false;
    for (std::size_t i = 0; i < w0.size(); ++i) {
      const bool base = i < base1 || (i >= base1 + a1 && i < base1 + a1 + base2);
      if (base)
        base_same = base_same && o->weights[i] == w0[i];
      else
        adapters_moved = adapters_moved || o->weights[i] != w0[i];
    }
    CHECK(base_same);
    CHECK(adapters_moved);
  }
  // zero<1>: the optimizer state covers the adapters alone, 1/world of them on each rank.
  using trainer_t = trainer<adapter_net, strategy::zero<1, comm::mpi>, precision::fp32>;
  trainer_t t(options(scratch("lora_bytes"), 1));
  manual_seed(7);
  adapter_net m;
  data_module dm(global_batch / world().world_size());
  t.fit(m, dm);
  std::int64_t elements = 0;
  std::get<0>(t.optimizers()).optimizer.for_each_state_tensor([&](const auto& st) { elements += st.numel(); });
  const std::int64_t n = 4 * 8 + 32 * 4 + 4 * 32 + 3 * 4;  // A and B of both layers
  std::int64_t total = elements;
  world().all_reduce(&total, 1, comm::op::sum);
  CHECK(total == 2 * n);
  CHECK(elements <= 2 * ((n + world().world_size() - 1) / world().world_size()));
}
