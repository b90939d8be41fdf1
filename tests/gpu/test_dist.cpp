// Multi-rank training with the model on the GPU (suite gpu; tests/gpu/run_dist.sh runs it
// on 2 ranks, which share the GPU where there is one). The fixture run of the mpi suite
// (tests/dist/dist_fixture.hpp), with its layers on the device:
//   - ddp, zero<1>, zero<2> and zero<3> (each layer an nn::unit) over comm::mpi (buckets
//     packed on the GPU, reduced through pinned host memory) follow single_device<cuda> on
//     the same global batch, with accumulation and norm clipping (zero<2|3> clip their
//     shards on the device);
//   - bf16_mixed under ddp and zero<2>: f32 masters on the GPU, reduced and sharded;
//   - zero<1|2|3> with offload::cpu (optimizer state and step on the host);
//   - a zero<1> checkpoint written from the GPU resumes in single_device, ddp and zero<2>;
//   - ddp and zero<1|2|3> over comm::nccl, where every rank has a GPU of its own (NCCL does
//     not put two ranks of one communicator on one device).
// KILN_GPU_TEST_DEVICE=kiln::cpu builds the same bodies with the model on the CPU (comm::mpi
// only; suite mpi): how the test itself is checked on a machine without a GPU.
#include <doctest/doctest.h>

#include "../dist/dist_fixture.hpp"
#include "../skip.hpp"
#include "kiln/core/transfer.hpp"
#include "kiln/data/on_device.hpp"
#if defined(KILN_TEST_NCCL)
#include "kiln/comm/nccl.hpp"
#endif

#ifndef KILN_GPU_TEST_DEVICE
#define KILN_GPU_TEST_DEVICE kiln::cuda
#endif

using namespace kiln;
using namespace kiln::test::dist;
using gpu = KILN_GPU_TEST_DEVICE;

namespace {

comm::mpi& world() {
  static comm::mpi c;
  return c;
}

// The fixture's net with its layers on Dev, its batches on Dev through data::on_device
// (whose loaders the trainer shards like any other).
// Units = true wraps each layer in an nn::unit (zero<3> gathers one at a time).
template <class T, class Dev, bool Units = false>
struct gnet {
  using batch = data::labelled_batch_on<Dev>;
  using layer = std::conditional_t<Units, nn::unit<nn::linear<T, Dev>>, nn::linear<T, Dev>>;
  layer fc1{8, 32};
  layer fc2{32, 3};
  std::vector<double> losses;  // per optimizer step: this rank's mean loss over its batch

  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("fc2", fc2);
  }
  var<float, Dev> forward(const tensor<float, Dev>& xd) {
    if constexpr (std::is_same_v<T, float>)
      return fc2(ops::relu(fc1(var<float, Dev>(xd))));
    else
      return ops::cast<float>(fc2(ops::relu(fc1(var<T, Dev>(xd.template to<T>())))));
  }
  var<float, Dev> training_step(auto& ctx, const batch& b) {
    auto loss = cross_entropy(forward(b.x), b.y);
    losses.push_back(item(loss.value()));
    ctx.log("train/loss", loss, {.on_epoch = true, .sync_dist = true});
    return loss;
  }
  void validation_step(auto& ctx, const batch& b) {
    ctx.log("val/loss", cross_entropy(forward(b.x), b.y), {.sync_dist = true});
  }
  auto configure_optimizers() {
    return optim::with_schedule(optim::adamw<T, Dev>(*this, {.lr = 2e-2, .weight_decay = 0.01}),
                                optim::warmup<optim::cosine>{.steps = 3, .then = {.total_steps = 60}});
  }
};

struct device_data {
  data_module host;
  data::on_device_loader<gpu, decltype(host.train)> train{host.train, {}, {}};
  data::on_device_loader<gpu, decltype(host.val)> val{host.val, {}, {}};
  explicit device_data(std::int64_t batch) : host(batch) {}
  auto& train_loader() { return train; }
  auto& val_loader() { return val; }
};

template <class M>
std::vector<double> host_weights(M& m) {
  std::vector<double> out;
  nn::visit_parameters(m, [&](const std::string&, auto& p) {
    const auto h = to_host(p.value());
    for (std::int64_t i = 0; i < h.numel(); ++i) out.push_back(static_cast<double>(h.flat(i)));
  });
  return out;
}

struct outcome {
  std::vector<double> losses;  // the global batch's mean loss per optimizer step
  std::vector<double> weights;
  train::fit_result fit;
};

struct run_options {
  std::int64_t epochs = 2, accumulate = 1;
  double clip = 0;
  std::string resume;
};

// Strategy over `world` ranks (single_device: every rank alone on the global batch).
template <class Strategy, class Precision = precision::fp32, class T = float, bool Units = false>
outcome run(const std::filesystem::path& root, run_options ro = {}) {
  if constexpr (!gpu::is_host) cuda_runtime::use_local_device();
  auto o = options(root, ro.epochs);
  o.accumulate_grad_batches = ro.accumulate;
  o.gradient_clip_val = ro.clip;
  trainer<gnet<T, gpu, Units>, Strategy, Precision> t(o);
  manual_seed(7);  // the same initial weights in every run (ddp then broadcasts rank 0's)
  gnet<T, gpu, Units> m;
  const int w = t.strategy().world_size();
  device_data dm(global_batch / w);
  outcome r;
  r.fit = ro.resume.empty() ? t.fit(m, dm) : t.fit(m, dm, ro.resume);
  r.losses = w == 1 ? m.losses : global_losses(world(), m.losses);
  r.weights = host_weights(m);
  return r;
}

std::filesystem::path scratch(const std::string& name) {
  const auto p = std::filesystem::path("gpu_dist_runs") / std::string(gpu::name) /
                 ("w" + std::to_string(world().world_size())) / name;
  if (world().rank() == 0) std::filesystem::remove_all(p);
  world().barrier("test: scratch");
  return p;
}

// Bit-identical on every rank (the replicas agree after fit).
void check_replicas(const std::vector<double>& mine) {
  auto sum = mine;
  world().all_reduce(sum.data(), static_cast<std::int64_t>(sum.size()), comm::op::sum);
  for (std::size_t i = 0; i < mine.size(); ++i) REQUIRE(sum[i] == mine[i] * world().world_size());
}

// As the mpi suite's: float sums in another order (the reduction, the split batch) move
// the f32 trajectory by a few ulps a step.
constexpr double tolerance = 1e-5;

using single = strategy::single_device<gpu>;
template <class Comm>
using ddp = strategy::ddp<Comm, gpu>;
template <int S, class Comm>
using zero = strategy::zero<S, Comm, strategy::offload::none, gpu>;
template <int S, class Comm>
using zero_offload = strategy::zero<S, Comm, strategy::offload::cpu, gpu>;

template <class Comm>
void follows_single_device(const char* tag) {
  const auto ref = run<single>(scratch(std::string(tag) + "_ref"));
  REQUIRE(ref.losses.size() == 40);
  const auto d = run<ddp<Comm>>(scratch(std::string(tag) + "_ddp"));
  const auto z1 = run<zero<1, Comm>>(scratch(std::string(tag) + "_z1"));
  const auto z2 = run<zero<2, Comm>>(scratch(std::string(tag) + "_z2"));
  const auto z3 = run<zero<3, Comm>, precision::fp32, float, true>(scratch(std::string(tag) + "_z3"));
  const auto o1 = run<zero_offload<1, Comm>>(scratch(std::string(tag) + "_o1"));
  const auto o2 = run<zero_offload<2, Comm>>(scratch(std::string(tag) + "_o2"));
  const auto o3 = run<zero_offload<3, Comm>, precision::fp32, float, true>(scratch(std::string(tag) + "_o3"));
  for (auto* o : {&d, &z1, &z2, &z3, &o1, &o2, &o3}) {
    CHECK(o->fit.global_step == ref.fit.global_step);
    CHECK(max_abs_diff(o->losses, ref.losses) < tolerance);
    CHECK(max_abs_diff(o->weights, ref.weights) < tolerance);
    check_replicas(o->weights);
  }
  CHECK(ref.losses.back() < 0.8 * ref.losses.front());  // a trajectory that moved
}

}  // namespace

TEST_CASE("ddp and zero<1|2|3> over comm::mpi, the model on the device, follow single_device") {
  REQUIRE(world().world_size() >= 2);
  follows_single_device<comm::mpi>("mpi");
}

TEST_CASE("on the device: accumulation and zero<2|3>'s sharded norm clipping keep the trajectory") {
  const run_options ro{.epochs = 2, .accumulate = 3, .clip = 0.05};
  const auto ref = run<single>(scratch("ref_acc"), ro);
  const auto d = run<ddp<comm::mpi>>(scratch("ddp_acc"), ro);
  const auto z2 = run<zero<2, comm::mpi>>(scratch("z2_acc"), ro);
  const auto z3 = run<zero<3, comm::mpi>, precision::fp32, float, true>(scratch("z3_acc"), ro);
  const auto o2 = run<zero_offload<2, comm::mpi>>(scratch("o2_acc"), ro);
  const auto o3 = run<zero_offload<3, comm::mpi>, precision::fp32, float, true>(scratch("o3_acc"), ro);
  for (auto* o : {&d, &z2, &z3, &o2, &o3}) {
    CHECK(o->fit.global_step == ref.fit.global_step);
    CHECK(max_abs_diff(o->losses, ref.losses) < tolerance);
    CHECK(max_abs_diff(o->weights, ref.weights) < tolerance);
  }
}

TEST_CASE("on the device: bf16_mixed under ddp and zero<2> reduces and shards the f32 masters") {
  const auto s = run<single, precision::bf16_mixed, bf16>(scratch("single_bf16"));
  const auto d = run<ddp<comm::mpi>, precision::bf16_mixed, bf16>(scratch("ddp_bf16"));
  const auto z2 = run<zero<2, comm::mpi>, precision::bf16_mixed, bf16>(scratch("z2_bf16"));
  const auto o2 = run<zero_offload<2, comm::mpi>, precision::bf16_mixed, bf16>(scratch("o2_bf16"));
  // The strategies round the same half-batch gradients: they agree to f32 order.
  for (auto* o : {&z2, &o2}) {
    CHECK(max_abs_diff(d.losses, o->losses) < tolerance);
    CHECK(max_abs_diff(d.weights, o->weights) < tolerance);
  }
  // Against one rank's whole-batch roundings, a few bf16 ulps (the mpi suite's bounds).
  CHECK(max_abs_diff(d.losses, s.losses) < 5e-3);
  CHECK(max_abs_diff(d.weights, s.weights) < 0.1);
  CHECK(d.losses.back() < 0.8 * d.losses.front());
  check_replicas(z2.weights);
}

TEST_CASE("on the device: a zero<1> checkpoint resumes in single_device, ddp, zero<2> and zero<2> offloaded") {
  const auto dir = scratch("reshard");
  const auto ckpt = dir / "after_epoch_1.ckpt";
  const auto full = run<zero<1, comm::mpi>>(dir / "full");
  {
    if constexpr (!gpu::is_host) cuda_runtime::use_local_device();
    trainer<gnet<float, gpu>, zero<1, comm::mpi>, precision::fp32> t(options(dir / "first", 1));
    manual_seed(7);
    gnet<float, gpu> m;
    device_data dm(global_batch / world().world_size());
    t.fit(m, dm);
    t.save_checkpoint(ckpt);  // every rank writes its optimizer shard; rank 0 the rest
    world().barrier("test: checkpoint written");
  }
  const run_options resume{.epochs = 2, .resume = ckpt.string()};
  const auto s = run<single>(dir / "single", resume);
  const auto d = run<ddp<comm::mpi>>(dir / "ddp", resume);
  const auto z2 = run<zero<2, comm::mpi>>(dir / "z2", resume);
  const auto o2 = run<zero_offload<2, comm::mpi>>(dir / "o2", resume);
  for (auto* o : {&s, &d, &z2, &o2}) {
    CHECK(o->fit.resumed_from == ckpt.string());
    CHECK(o->fit.global_step == full.fit.global_step);
    CHECK(max_abs_diff(o->weights, full.weights) < tolerance);
  }
  CHECK(max_abs_diff(d.losses, std::vector<double>(full.losses.begin() + 20, full.losses.end())) < tolerance);
}

#if defined(KILN_TEST_NCCL)
TEST_CASE("ddp and zero<1|2|3> over comm::nccl follow single_device, where every rank has a GPU of its own" *
          doctest::test_suite("nccl")) {
  const int w = world().world_size();
  if (cuda_runtime::device_count() < w)
    return kiln::test::skip("comm::nccl: " + std::to_string(w) + " ranks, " +
                            std::to_string(cuda_runtime::device_count()) + " GPU(s); NCCL needs one device per rank");
  follows_single_device<comm::nccl>("nccl");
}
#endif

TEST_CASE(
    "zero with offload::cpu keeps its optimizer state and a copy of its range on the host, and the memory plan says "
    "so") {
  if constexpr (!gpu::is_host) cuda_runtime::use_local_device();
  const int w = world().world_size();
  auto plan_of = [&]<class S>(S*) {
    trainer<gnet<float, gpu>, S, precision::fp32> t(options(scratch("plan")));
    manual_seed(7);
    gnet<float, gpu> m;
    device_data dm(global_batch / w);
    return t.plan(m, dm);
  };
  const auto kept = plan_of(static_cast<zero<2, comm::mpi>*>(nullptr));
  const auto off = plan_of(static_cast<zero_offload<2, comm::mpi>*>(nullptr));
  const std::int64_t state = kept.devices.at(0).optimizer_state;
  CHECK(state > 0);
  if constexpr (gpu::is_host) {
    CHECK(off.devices.at(0).optimizer_state == state);  // the host is the model's device
  } else {
    REQUIRE(off.devices.size() == 2);
    CHECK(off.devices.at(0).optimizer_state == 0);
    CHECK(off.devices.at(1).device == "cpu");
    CHECK(off.devices.at(1).optimizer_state == state);
  }
  // The sharded optimizer's own state tensors are host tensors; its host copies of the
  // rank's range are in the plan: values under master weights, the gradients copied down
  // under gradients (on CPU ranks, on top of what the one column holds without offload).
  {
    const auto kept1 = plan_of(static_cast<zero<1, comm::mpi>*>(nullptr));
    const auto off1 = plan_of(static_cast<zero_offload<1, comm::mpi>*>(nullptr));
    trainer<gnet<float, gpu>, zero_offload<1, comm::mpi>, precision::fp32> t(options(scratch("offload_state"), 1));
    manual_seed(7);
    gnet<float, gpu> m;
    device_data dm(global_batch / w);
    t.fit(m, dm);
    std::int64_t host_tensors = 0;
    const auto& opt = std::get<0>(t.optimizers()).optimizer;
    opt.for_each_state_tensor([&](const auto& ten) {
      static_assert(std::remove_cvref_t<decltype(ten)>::device_type::is_host);
      host_tensors += ten.numel();
    });
    CHECK(host_tensors > 0);
    std::int64_t values = 0, grads = 0;
    auto block = [](std::int64_t n) { return static_cast<std::int64_t>(kiln::detail::round_block_size(n * 4)); };
    for (const auto& [k, v] : opt.segments()) {
      values += block(v.value().numel());
      if (v.grad().defined()) grads += block(v.grad().numel());
    }
    INFO("host copies held: ", values, " B of values, ", grads, " B of gradients");
    CHECK(values > 0);
    CHECK(grads == values);
    if constexpr (gpu::is_host) {
      CHECK(off1.devices.at(0).master_weights - kept1.devices.at(0).master_weights == values);
      CHECK(off1.devices.at(0).gradients - kept1.devices.at(0).gradients == grads);
    } else {
      REQUIRE(off1.devices.size() == 2);
      CHECK(off1.devices.at(1).master_weights == values);
      CHECK(off1.devices.at(1).gradients == grads);
      CHECK(off1.devices.at(0).master_weights == kept1.devices.at(0).master_weights);
    }
  }
}

TEST_CASE("the memory plan's communication row is what ddp's and zero<1|2|3>'s buffers hold after fit") {
  if constexpr (!gpu::is_host) cuda_runtime::use_local_device();
  const int w = world().world_size();
  auto check = [&]<class S, class P, class T, bool Units = false>(S*, P*, T*, const char* name) {
    trainer<gnet<T, gpu, Units>, S, P> t(options(scratch(std::string("comm_") + name), 1));
    manual_seed(7);
    gnet<T, gpu, Units> m;
    device_data dm(global_batch / w);
    const auto plan = t.plan(m, dm);
    t.fit(m, dm);
    const train::communication_bytes held = t.strategy().buffer_bytes();
    INFO(std::string(name), ": planned ", plan.devices.at(0).communication, " B, held ", held.device, " + ", held.host,
         " B (device + host)");
    CHECK(held.device > 0);
    CHECK(plan.devices.at(0).communication == (gpu::is_host ? held.device + held.host : held.device));
    if constexpr (!gpu::is_host) CHECK(plan.devices.at(1).communication == held.host);
  };
  using fp32 = precision::fp32;
  using mixed = precision::bf16_mixed;
  check(static_cast<ddp<comm::mpi>*>(nullptr), static_cast<fp32*>(nullptr), static_cast<float*>(nullptr), "ddp");
  check(static_cast<zero<1, comm::mpi>*>(nullptr), static_cast<fp32*>(nullptr), static_cast<float*>(nullptr), "z1");
  check(static_cast<zero<2, comm::mpi>*>(nullptr), static_cast<fp32*>(nullptr), static_cast<float*>(nullptr), "z2");
  check(static_cast<zero<2, comm::mpi>*>(nullptr), static_cast<mixed*>(nullptr), static_cast<bf16*>(nullptr),
        "z2_bf16");
  check(static_cast<zero_offload<1, comm::mpi>*>(nullptr), static_cast<mixed*>(nullptr), static_cast<bf16*>(nullptr),
        "o1_bf16");
  check.template operator()<zero<3, comm::mpi>, fp32, float, true>(nullptr, nullptr, nullptr, "z3");
}
