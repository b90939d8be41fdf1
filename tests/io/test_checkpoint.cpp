// Checkpoints: bit-exact resume from every kind of position (in process, and after
// SIGKILL in a child process), atomic writes under SIGKILL, errors for bad checkpoints,
// strict and non-strict loading, model_checkpoint's files and state.
#include <signal.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <fstream>
#include <thread>

#include "../helpers.hpp"
#include "resume_fixture.hpp"

extern char** environ;

namespace test_checkpoint {

using namespace kiln;
namespace fs = std::filesystem;
namespace R = kiln::test::resume;
using kiln::test::same_bits;
using kiln::test::weights;

namespace {

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "(no error)";
}

// Saves a checkpoint after every training micro-batch, named by the micro-batch count.
struct every_batch {
  using hooks = hook_list<hook::on_train_batch_end>;
  fs::path dir;
  void on_train_batch_end(auto& ctx, const auto&) {
    ctx.save_checkpoint(dir / ("mb-" + std::to_string(ctx.micro_batches()) + ".ckpt"));
  }
};
// Throws at the start of a micro-batch: an in-process stand-in for a crash.
struct crash_at {
  using hooks = hook_list<hook::on_train_batch_start>;
  std::int64_t at = -1;
  void on_train_batch_start(auto& ctx, const auto&) {
    if (ctx.micro_batches() == at) throw std::runtime_error("simulated crash");
  }
};

using probe_run = trainer<R::net, strategy::single_device<cpu>, precision::fp32, callbacks::early_stopping,
                          callbacks::model_checkpoint, every_batch, crash_at>;

struct reference {
  std::map<std::int64_t, float> losses;
  std::map<std::string, std::vector<float>> final_weights;
  train::fit_result result;
};

// The uninterrupted run, saving a checkpoint after every micro-batch into `dir`.
reference run_reference(const fs::path& root) {
  manual_seed(3);
  R::net model;
  R::data_module dm;
  probe_run t(R::options(root / "runs"), R::stopper(), R::saver(root / "ckpt"), every_batch{root / "all"}, crash_at{});
  reference ref;
  ref.result = t.fit(model, dm);
  ref.losses = model.losses;
  ref.final_weights = weights(model);
  return ref;
}

// A run resumed from `ckpt`; returns its losses and final weights.
reference run_resumed(const fs::path& root, const std::string& ckpt, std::uint64_t construction_seed = 99) {
  manual_seed(construction_seed);  // different initial weights and RNG: the checkpoint must override them
  R::net model;
  R::data_module dm;
  probe_run t(R::options(root / "runs2"), R::stopper(), R::saver(root / "ckpt2"), every_batch{root / "all2"},
              crash_at{});
  reference r;
  r.result = t.fit(model, dm, ckpt);
  r.losses = model.losses;
  r.final_weights = weights(model);
  return r;
}

int spawn(const std::vector<std::string>& args, pid_t* pid_out = nullptr) {
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  pid_t pid;
  REQUIRE(posix_spawn(&pid, argv[0], nullptr, nullptr, argv.data(), environ) == 0);
  if (pid_out) {
    *pid_out = pid;
    return 0;
  }
  int status = 0;
  waitpid(pid, &status, 0);
  return status;
}

std::string child_path() {
  const char* p = std::getenv("KILN_RESUME_CHILD");
  REQUIRE_MESSAGE(p != nullptr, "KILN_RESUME_CHILD is not set (meson sets it to the resume_child executable)");
  return p;
}

// Rewrites a checkpoint with its state document changed by `edit` (tensors kept).
void rewrite_state(const fs::path& src, const fs::path& dst, auto&& edit,
                   std::function<void(io::safetensors_writer&)> meta = nullptr) {
  auto f = io::safetensors_file::open(src);
  io::safetensors_writer w;
  for (auto& e : f.tensors()) w.add_raw(e.name, e.dtype, e.shape, f.bytes(e));
  for (auto& [k, v] : f.metadata()) w.set_metadata(k, v);
  io::json st = io::json::parse(*f.metadata("kiln.state"));
  edit(st);
  w.set_metadata("kiln.state", st.dump());
  if (meta) meta(w);
  w.write(dst);
}

// Models that differ from R::net in one way each.
struct wider {
  nn::linear<float> fc1{8, 16};
  nn::linear<float> fc2{16, 3};
  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("fc2", fc2);
  }
};
struct extra {
  nn::linear<float> fc1{8, 32};
  nn::linear<float> fc2{32, 3};
  nn::linear<float> head{3, 3};
  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("fc2", fc2);
    f("head", head);
  }
};
struct fewer {
  nn::linear<float> fc1{8, 32};
  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
  }
};
struct doubles {
  nn::linear<double> fc1{8, 32};
  nn::linear<double> fc2{32, 3};
  template <class F>
  void for_each_child(F&& f) {
    f("fc1", fc1);
    f("fc2", fc2);
  }
};
struct hf_like {
  nn::linear<float> dense{4, 2};
  template <class F>
  void for_each_child(F&& f) {
    f("dense", dense);
  }
  io::json hf_config() const {
    io::json c = io::json::object();
    c.set("architectures", io::json(io::json::array_type{io::json("KilnDense")}));
    c.set("hidden_size", 4);
    return c;
  }
};

}  // namespace

TEST_CASE("resume from any micro-batch, mid-window and at epoch ends, is bit-exact") {
  const auto root = test::temp_dir("ckpt", "every");
  const reference ref = run_reference(root);
  REQUIRE(ref.result.epochs == 3);
  REQUIRE(ref.losses.size() == 45);
  // 15 micro-batches per epoch, accumulation 2: checkpoints after odd counts hold an open
  // window (with its gradients), after 15/30 the epoch's cut-short step has happened.
  int resumed = 0;
  for (std::int64_t mb : {1, 2, 7, 14, 15, 16, 22, 29, 30, 31, 44}) {
    CAPTURE(mb);
    const auto ckpt = root / "all" / ("mb-" + std::to_string(mb) + ".ckpt");
    REQUIRE(fs::exists(ckpt));
    const reference r = run_resumed(root, ckpt.string());
    CHECK(r.result.resumed_from == ckpt.string());
    CHECK(r.result.global_step == ref.result.global_step);
    CHECK(r.result.micro_batches == ref.result.micro_batches);
    // Every loss computed after the checkpoint equals the uninterrupted run's, bit for bit.
    CHECK(r.losses.size() == static_cast<std::size_t>(45 - mb));
    bool same = !r.losses.empty() || mb == 45;
    for (auto& [i, v] : r.losses) same = same && ref.losses.count(i) && std::memcmp(&v, &ref.losses.at(i), 4) == 0;
    CHECK(same);
    CHECK(same_bits(r.final_weights, ref.final_weights));
    // Metrics the run ends with (epoch means include the batches before the checkpoint).
    CHECK(r.result.metrics.at("train/loss_epoch") == ref.result.metrics.at("train/loss_epoch"));
    CHECK(r.result.metrics.at("val/loss") == ref.result.metrics.at("val/loss"));
    ++resumed;
  }
  CHECK(resumed == 11);
}

TEST_CASE("a crashed run resumed with ckpt_path=\"last\" matches the uninterrupted run") {
  const auto root = test::temp_dir("ckpt", "last");
  const reference ref = run_reference(root / "ref");
  // Crash at micro-batch 25 (epoch 1, inside a window); model_checkpoint saved every 3 steps.
  manual_seed(3);
  R::net model;
  R::data_module dm;
  probe_run t(R::options(root / "runs"), R::stopper(), R::saver(root / "ckpt"), every_batch{root / "ignored"},
              crash_at{25});
  CHECK(error_of([&] { t.fit(model, dm); }).find("simulated crash") != std::string::npos);
  auto& mc = t.callback<callbacks::model_checkpoint>();
  CHECK(fs::exists(root / "ckpt" / "last.ckpt"));
  CHECK(mc.best_k.size() == 2);
  for (auto& b : mc.best_k) CHECK(fs::exists(b.path));
  CHECK(mc.best_model_path.find("epoch=") != std::string::npos);
  // Resume with the callback pointing at the same directory: "last" finds it.
  manual_seed(1234);
  R::net model2;
  R::data_module dm2;
  R::run t2(R::options(root / "runs"), R::stopper(), R::saver(root / "ckpt"));
  const auto r = t2.fit(model2, dm2, "last");
  CHECK(r.resumed_from == (root / "ckpt" / "last.ckpt").string());
  CHECK(same_bits(weights(model2), ref.final_weights));
  for (auto& [i, v] : model2.losses) CHECK(std::memcmp(&v, &ref.losses.at(i), 4) == 0);
  // The top-k list was restored (same dirpath) and still names files that exist.
  auto& mc2 = t2.callback<callbacks::model_checkpoint>();
  CHECK(mc2.best_k.size() == 2);
  for (auto& b : mc2.best_k) CHECK(fs::exists(b.path));
  // "last" with nothing to find starts from scratch.
  manual_seed(3);
  R::net model3;
  R::run t3(R::options(root / "empty"), R::stopper(), R::saver(root / "nothing"));
  CHECK(t3.fit(model3, dm2, "last").resumed_from.empty());
}

TEST_CASE("SIGKILL at an arbitrary step, then resume: identical losses and weights") {
  const std::string child = child_path();
  const auto root = test::temp_dir("ckpt", "sigkill");
  REQUIRE(spawn({child, (root / "ref").string(), "full"}) == 0);
  (void)fs::create_directories(root / "ref");
  const auto full = R::read_losses(root / "ref" / "full.losses");
  REQUIRE(full.size() == 45);
  auto ref = io::safetensors_file::open(root / "ref" / "full.safetensors");
  // Kill points drawn from a seeded stream (printed), plus fixed awkward ones.
  const philox_stream st{20261124, 0};
  std::vector<std::int64_t> points{7, 31};
  for (int i = 0; i < 2; ++i) points.push_back(6 + static_cast<std::int64_t>(st.bits(i) % 38));
  for (auto at : points) {
    MESSAGE("kill at micro-batch " << at);
    const auto dir = root / ("kill" + std::to_string(at));
    fs::create_directories(dir);
    const int status = spawn({child, dir.string(), "kill-at", std::to_string(at)});
    REQUIRE(WIFSIGNALED(status));
    REQUIRE(WTERMSIG(status) == SIGKILL);
    const auto killed = R::read_losses(dir / "killed.losses");
    CHECK(killed.size() == static_cast<std::size_t>(at));
    REQUIRE(spawn({child, dir.string(), "resume"}) == 0);
    const auto resumed = R::read_losses(dir / "resumed.losses");
    // Together they cover every micro-batch; every value is the uninterrupted run's.
    std::map<std::int64_t, std::uint32_t> all = killed;
    bool agree = true;
    for (auto& [i, v] : resumed) {
      if (all.count(i)) agree = agree && all[i] == v;  // replayed after the checkpoint: same bits
      all[i] = v;
    }
    CHECK(agree);
    CHECK(all == full);
    auto res = io::safetensors_file::open(dir / "resumed.safetensors");
    REQUIRE(res.tensors().size() == ref.tensors().size());
    for (auto& e : ref.tensors()) {
      const auto a = ref.bytes(e), b = res.bytes(res.at(e.name));
      CHECK_MESSAGE(std::equal(a.begin(), a.end(), b.begin(), b.end()), e.name);
    }
  }
}

TEST_CASE("SIGKILL while a checkpoint is being written never damages the previous one") {
  const std::string child = child_path();
  const auto dir = test::temp_dir("ckpt", "atomic");
  const philox_stream st{7, 0};
  int checked = 0;
  for (int round = 0; round < 6; ++round) {
    pid_t pid;
    spawn({child, dir.string(), "write-loop"}, &pid);
    std::this_thread::sleep_for(std::chrono::milliseconds(60 + st.bits(static_cast<std::uint64_t>(round)) % 400));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    REQUIRE(WIFSIGNALED(status));
    if (!fs::exists(dir / "big.ckpt")) continue;                   // killed before the first rename
    const auto r = io::checkpoint_reader::open(dir / "big.ckpt");  // complete, checksums verified
    const auto n = r.state().at("round").as_int();
    const auto v = r.file().view<float>("big");
    CHECK(v.front() == float(n));
    CHECK(v.back() == float(n));
    ++checked;
  }
  CHECK(checked >= 4);
  io::remove_stale_temporaries(dir);  // what a killed writer left behind
  for (auto& e : fs::directory_iterator(dir)) CHECK(e.path().filename() == "big.ckpt");
}

TEST_CASE("bad checkpoints: truncated, corrupted, wrong version, wrong model, weights-only") {
  const auto root = test::temp_dir("ckpt", "bad");
  manual_seed(3);
  R::net model;
  R::data_module dm;
  R::run t(R::options(root / "runs", 1), R::stopper(), R::saver(root / "ckpt"));
  t.fit(model, dm);
  const fs::path good = root / "ckpt" / "last.ckpt";
  REQUIRE(fs::exists(good));
  const auto bytes = [&] {
    std::ifstream in(good, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), {});
  }();
  auto write = [&](const fs::path& p, const std::string& b) { std::ofstream(p, std::ios::binary) << b; };

  // Truncated.
  write(root / "trunc.ckpt", bytes.substr(0, bytes.size() / 2));
  CHECK(error_of([&] { io::checkpoint_reader::open(root / "trunc.ckpt"); }).find("trunc.ckpt") != std::string::npos);
  CHECK(error_of([&] { io::checkpoint_reader::open(root / "trunc.ckpt"); }).find("truncated") != std::string::npos);
  // A flipped bit in the data.
  std::string flipped = bytes;
  flipped[flipped.size() - 5] ^= 0x10;
  write(root / "flip.ckpt", flipped);
  const std::string flip_err = error_of([&] { io::checkpoint_reader::open(root / "flip.ckpt"); });
  CHECK(flip_err.find("flip.ckpt: tensor '") != std::string::npos);
  CHECK(flip_err.find("is corrupt") != std::string::npos);
  // A damaged header: broken JSON, or a flipped name that no longer says __metadata__.
  std::string hdr = bytes;
  hdr[9] = '#';
  write(root / "hdr.ckpt", hdr);
  CHECK(error_of([&] {
          io::checkpoint_reader::open(root / "hdr.ckpt");
        }).find("hdr.ckpt (header): invalid JSON at byte 1: expected a string key") != std::string::npos);
  hdr = bytes;
  hdr[20] = '#';
  write(root / "hdr2.ckpt", hdr);
  CHECK(error_of([&] {
          io::checkpoint_reader::open(root / "hdr2.ckpt");
        }).find("hdr2.ckpt: tensor '__metadata#_': unexpected field 'format'") != std::string::npos);
  // Wrong format version.
  rewrite_state(
      good, root / "v99.ckpt", [](io::json&) {},
      [](io::safetensors_writer& w) { w.set_metadata("kiln.version", "99"); });
  CHECK(error_of([&] {
          io::checkpoint_reader::open(root / "v99.ckpt");
        }).find("v99.ckpt: checkpoint format version 99 is not supported") != std::string::npos);
  // Not a checkpoint at all.
  io::save_weights(model, root / "plain.safetensors");
  CHECK(error_of([&] { io::checkpoint_reader::open(root / "plain.safetensors"); }).find("not a kiln checkpoint") !=
        std::string::npos);
  CHECK(error_of([&] { io::checkpoint_reader::open(root / "missing.ckpt"); }).find("does not exist") !=
        std::string::npos);

  // A different model: every mismatch names the file, the tensor and both sides.
  wider w;
  const std::string shape_err = error_of([&] { io::load_weights(w, good); });
  CHECK(shape_err.find("last.ckpt: tensor 'model/fc1.") != std::string::npos);
  CHECK(shape_err.find("but the model's parameter 'fc1.") != std::string::npos);
  extra x;
  const auto before = weights(x);
  const std::string strict_err = error_of([&] { io::load_weights(x, good); });
  CHECK(strict_err.find("strict load") != std::string::npos);
  CHECK(strict_err.find("missing: model/head.weight, model/head.bias") != std::string::npos);
  CHECK(same_bits(weights(x), before));  // nothing half-loaded
  const auto rep = io::load_weights(x, good, {.strict = false});
  CHECK(rep.loaded == 4);
  CHECK(rep.missing.size() == 2);
  CHECK(weights(x).at("fc1.weight") == weights(model).at("fc1.weight"));
  CHECK(weights(x).at("head.weight") == before.at("head.weight"));
  fewer y;
  CHECK(error_of([&] { io::load_weights(y, good); }).find("unexpected: model/fc2.") != std::string::npos);
  CHECK(io::load_weights(y, good, {.strict = false}).unexpected.size() == 2);
  doubles d;
  CHECK(error_of([&] { io::load_weights(d, good); }).find("has dtype F32 but the model's parameter") !=
        std::string::npos);

  // A weights-only checkpoint cannot resume a fit.
  R::run tw(R::options(root / "runs", 1), R::stopper(), R::saver(root / "ckpt_w"));
  t.save_checkpoint(root / "weights.ckpt", true);  // after fit: written at once
  R::net m2;
  CHECK(error_of([&] { tw.fit(m2, dm, (root / "weights.ckpt").string()); }).find("is a weights-only checkpoint") !=
        std::string::npos);
  CHECK(io::load_weights(m2, root / "weights.ckpt").clean());
  CHECK(same_bits(weights(m2), weights(model)));
}

TEST_CASE("checkpoint files: sums taken while writing, and the header-first layout still reads") {
  const auto dir = test::temp_dir("ckpt", "layout");
  io::checkpoint_writer w;
  const auto big = test::rand_tensor<f32>({1000, 1200}, 5);  // spans several write pieces
  const auto small = test::rand_tensor<f32>({7}, 6);
  const auto ids = tensor<i64>::from({3}, {1, -2, 3});
  w.add("model/big", big);
  w.add("model/small", small);
  w.add("other/ids", ids);
  w.state().set("kind", "full");
  w.write(dir / "new.ckpt");
  const auto r = io::checkpoint_reader::open(dir / "new.ckpt");  // verifies every sum
  const io::json sums = io::json::parse(*r.file().metadata("kiln.crc32c"));
  CHECK(sums.at("model/big").as_int() == crc32c(big.data(), big.nbytes()));
  CHECK(sums.at("model/small").as_int() == crc32c(small.data(), small.nbytes()));
  CHECK(sums.at("other/ids").as_int() == crc32c(ids.data(), ids.nbytes()));
  CHECK(r.file().load<f32>("model/big").to_vector() == big.to_vector());
  CHECK(r.state().at("kind").as_string() == "full");
  // The layout written before the sums moved into the write loop: header first, no room
  // left for wider sums. Same metadata, same tensors: it opens and verifies the same way.
  io::safetensors_writer old;
  for (auto& e : r.file().tensors()) old.add_raw(e.name, e.dtype, e.shape, r.file().bytes(e));
  for (auto& [k, v] : r.file().metadata()) old.set_metadata(k, v);
  old.write(dir / "old.ckpt");
  const auto o = io::checkpoint_reader::open(dir / "old.ckpt");
  CHECK(o.file().data_offset() <= r.file().data_offset());
  CHECK(o.file().load<f32>("model/big").to_vector() == big.to_vector());
  CHECK(o.file().load<i64>("other/ids").to_vector() == ids.to_vector());
}

TEST_CASE("a resume that fails half-way leaves the model, callbacks and RNG untouched") {
  const auto root = test::temp_dir("ckpt", "rollback");
  manual_seed(3);
  R::net model;
  R::data_module dm;
  R::run t(R::options(root / "runs", 1), R::stopper(), R::saver(root / "ckpt"));
  t.fit(model, dm);
  // The optimizer section disagrees with configure_optimizers(): found only after the
  // model and callbacks were restored.
  rewrite_state(root / "ckpt" / "last.ckpt", root / "bad_opt.ckpt",
                [](io::json& st) { st.set("optimizers", io::json::array()); });
  manual_seed(77);
  R::net fresh;
  R::run t2(R::options(root / "runs", 1), R::stopper(), R::saver(root / "ckpt2"));
  t2.fit(fresh, dm);  // early_stopping now holds best weights (a tensor state) to roll back
  const auto w0 = weights(fresh);
  t2.callback<callbacks::early_stopping>().wait_count = 7;
  t2.callback<callbacks::model_checkpoint>().best_model_path = "mine";
  const auto rng = default_generator().offset();
  const std::string err = error_of([&] { t2.fit(fresh, dm, (root / "bad_opt.ckpt").string()); });
  CHECK(err.find("bad_opt.ckpt: the checkpoint has 0 optimizer(s), configure_optimizers() returned 1") !=
        std::string::npos);
  CHECK(same_bits(weights(fresh), w0));
  CHECK(t2.callback<callbacks::early_stopping>().wait_count == 7);
  CHECK(t2.callback<callbacks::model_checkpoint>().best_model_path == "mine");
  CHECK(default_generator().offset() == rng);
  t2.save_checkpoint(root / "after.ckpt");
  CHECK(io::checkpoint_reader::open(root / "after.ckpt").file().contains("callbacks/early_stopping/best/fc1.weight"));
  // Optimizer state of the wrong shape is named.
  rewrite_state(root / "ckpt" / "last.ckpt", root / "bad_kind.ckpt", [](io::json& st) {
    io::json o = st.at("optimizers");
    io::json first = o.as_array()[0];
    first.set("kind", "sgd");
    st.set("optimizers", io::json(io::json::array_type{first}));
  });
  CHECK(error_of([&] {
          t2.fit(fresh, dm, (root / "bad_kind.ckpt").string());
        }).find("optimizer 0 is 'sgd' in the checkpoint but configure_optimizers() returned 'adamw'") !=
        std::string::npos);
  CHECK(same_bits(weights(fresh), w0));
}

TEST_CASE("model_checkpoint: top-k files, filename template, last, best, weights-only") {
  const auto root = test::temp_dir("ckpt", "mc");
  manual_seed(3);
  R::net model;
  R::data_module dm;
  R::run t(R::options(root / "runs", 3), R::stopper(), R::saver(root / "ckpt"));
  t.fit(model, dm);
  auto& mc = t.callback<callbacks::model_checkpoint>();
  std::vector<std::string> files;
  for (auto& e : fs::directory_iterator(root / "ckpt")) files.push_back(e.path().filename().string());
  std::sort(files.begin(), files.end());
  // Exactly the 2 best plus last.ckpt remain; names follow the template.
  REQUIRE(files.size() == 3);
  CHECK(files.back() == "last.ckpt");
  for (auto& b : mc.best_k) {
    CHECK(fs::exists(b.path));
    const std::string n = fs::path(b.path).filename().string();
    CHECK(n.starts_with("epoch="));
    CHECK(n.find("-step=") != std::string::npos);
    CHECK(n.find("-val_loss=") != std::string::npos);
    CHECK(b.score >= mc.best_model_score);
  }
  char expect[32];
  std::snprintf(expect, sizeof expect, "val_loss=%.4f", mc.best_model_score);
  CHECK(mc.best_model_path.find(expect) != std::string::npos);
  // "best" loads the best weights for evaluation.
  const auto v = t.validate(model, dm, "best");
  CHECK(v.at("val/loss") == doctest::Approx(mc.best_model_score).epsilon(1e-6));

  // Template checks happen at construction.
  CHECK(error_of([] { callbacks::model_checkpoint({.filename = "{epoch"}); }).find("unmatched '{'") !=
        std::string::npos);
  CHECK(error_of([] { callbacks::model_checkpoint({.filename = "{val:%s}"}); }).find("format spec") !=
        std::string::npos);
  // A metric the template names but nobody logged.
  R::run t2(R::options(root / "runs", 1), R::stopper(),
            callbacks::model_checkpoint({.dirpath = (root / "ckpt2").string(), .filename = "{nope:.2f}"}));
  R::net m2;
  CHECK(error_of([&] { t2.fit(m2, dm); }).find("names metric 'nope', which was not logged (logged: ") !=
        std::string::npos);
  // Without monitor: the newest k; an existing foreign file gets a -v1 suffix; weights only.
  fs::create_directories(root / "ckpt3");
  std::ofstream(root / "ckpt3" / "epoch=0.ckpt") << "someone else's file";
  R::run t3(R::options(root / "runs", 3), R::stopper(),
            callbacks::model_checkpoint(
                {.dirpath = (root / "ckpt3").string(), .filename = "{epoch}", .save_top_k = 2, .weights_only = true}));
  R::net m3;
  t3.fit(m3, dm);
  CHECK(fs::exists(root / "ckpt3" / "epoch=0.ckpt"));           // untouched
  CHECK_FALSE(fs::exists(root / "ckpt3" / "epoch=0-v1.ckpt"));  // the newest 2 are kept: epochs 1 and 2
  CHECK(fs::exists(root / "ckpt3" / "epoch=1.ckpt"));
  CHECK(fs::exists(root / "ckpt3" / "epoch=2.ckpt"));
  const auto r3 = io::checkpoint_reader::open(root / "ckpt3" / "epoch=2.ckpt");
  CHECK(r3.state().at("kind").as_string() == "weights_only");
  CHECK(r3.names_in("optimizer.0").empty());
  CHECK(r3.state().at("trainer").at("epoch").as_int() == 2);
}

TEST_CASE("export: model.safetensors that plain readers load, config.json for HF architectures") {
  const auto dir = test::temp_dir("ckpt", "export");
  hf_like m;
  const auto paths = io::export_weights(m, dir);
  REQUIRE(paths.size() == 2);
  auto f = io::safetensors_file::open(paths[0]);
  CHECK(f.metadata("format") == "pt");
  CHECK(f.load<float>("dense.weight").to_vector() == m.dense.weight.value().to_vector());
  std::ifstream in(paths[1]);
  const std::string text((std::istreambuf_iterator<char>(in)), {});
  CHECK(io::json::parse(text).at("hidden_size").as_int() == 4);
  R::net plain;
  CHECK(io::export_weights(plain, dir / "plain").size() == 1);
}

namespace {
// A module and a callback with state of their own: a counter, a JSON field and a tensor.
struct stateful_net : R::net {
  std::int64_t seen = 0;
  var<float> training_step(auto& ctx, const R::batch& b) {
    ++seen;
    return R::net::training_step(ctx, b);
  }
  void on_save_checkpoint(auto&, const train::checkpoint_out& ckpt) {
    ckpt.state().set("seen", seen);
    ckpt.add("running", tensor<f64>::full({2}, double(seen)));
  }
  void on_load_checkpoint(auto&, const train::checkpoint_in& ckpt) {
    seen = ckpt.state().at("seen").as_int("seen");
    CHECK(ckpt.load<f64>("running").flat(1) == double(seen));
  }
};
struct counter {
  using hooks = hook_list<hook::on_train_batch_end, hook::on_save_checkpoint, hook::on_load_checkpoint>;
  std::int64_t batches = 0;
  void on_train_batch_end(auto&, const auto&) { ++batches; }
  void on_save_checkpoint(auto&, const train::checkpoint_out& ckpt) const { ckpt.state().set("batches", batches); }
  void on_load_checkpoint(auto&, const train::checkpoint_in& ckpt) {
    if (auto* b = ckpt.state().find("batches")) batches = b->as_int();
  }
};
}  // namespace

TEST_CASE("modules and callbacks keep their own state in checkpoints") {
  const auto root = test::temp_dir("ckpt", "hooks");
  using run = trainer<stateful_net, strategy::single_device<cpu>, precision::fp32, counter>;
  manual_seed(3);
  stateful_net m;
  R::data_module dm;
  run t(R::options(root / "runs", 1));
  t.fit(m, dm);
  CHECK(m.seen == 15);
  CHECK(t.callback<counter>().batches == 15);
  t.save_checkpoint(root / "a.ckpt");
  const auto r = io::checkpoint_reader::open(root / "a.ckpt");
  CHECK(r.state().at("module").at("seen").as_int() == 15);
  CHECK(r.file().contains("module/running"));
  // The section key is the callback's type name when it declares no state_key.
  bool found = false;
  for (auto& [k, v] : r.state().at("callbacks").as_object()) found |= k.find("counter") != std::string::npos;
  CHECK(found);
  stateful_net m2;
  run t2(R::options(root / "runs", 2));
  t2.fit(m2, dm, (root / "a.ckpt").string());
  CHECK(m2.seen == 30);  // 15 restored + 15 trained
  CHECK(t2.callback<counter>().batches == 30);
}

}  // namespace test_checkpoint
