// TensorBoard event files: CRC32C, framing, round trips, corruption, and the logger.
#include <fstream>

#include "../train/regression_fixture.hpp"
#include "kiln/callbacks/model_summary.hpp"
#include "kiln/callbacks/progress_bar.hpp"
#include "kiln/callbacks/throughput_monitor.hpp"
#include "kiln/loggers/tensorboard.hpp"

namespace test_tensorboard {

using namespace kiln;
using namespace kiln::test;
namespace fs = std::filesystem;

namespace {
fs::path temp_dir(const std::string& name) {
  auto p = fs::temp_directory_path() / ("kiln_tb_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  return p;
}
std::vector<unsigned char> bytes_of(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return {std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>()};
}
std::string parse_error(const std::vector<unsigned char>& b) {
  try {
    loggers::parse_events(b.data(), b.size(), "f");
  } catch (const error& e) {
    return e.what();
  }
  return "";
}
}  // namespace

TEST_CASE("crc32c: known vectors and TFRecord masking") {
  CHECK(crc32c("123456789", 9) == 0xE3069283u);
  const std::vector<unsigned char> zeros(32, 0);
  CHECK(crc32c(zeros.data(), 32) == 0x8A9136AAu);
  // Split computation continues the same CRC.
  CHECK(crc32c("56789", 5, crc32c("1234", 4)) == 0xE3069283u);
  const std::uint32_t c = crc32c("123456789", 9);
  CHECK(masked_crc32c("123456789", 9) == ((c >> 15) | (c << 17)) + 0xa282ead8u);
}

TEST_CASE("event files: scalars and text round-trip through our reader") {
  const auto dir = temp_dir("rt");
  fs::path file;
  {
    loggers::event_writer w(dir);
    file = w.path();
    for (int s = 0; s < 10; ++s) w.add_scalar("train/loss", 1.0 / (s + 1), s, 1000.0 + s);
    w.add_scalar("val/acc", 0.875, 9);
    w.add_text("hparams", "| lr | 0.001 |", 0);
  }
  CHECK(file.filename().string().rfind("events.out.tfevents.", 0) == 0);
  const auto ev = loggers::read_events(file);
  REQUIRE(ev.size() == 13);
  CHECK(ev[0].file_version == "brain.Event:2");
  CHECK(ev[4].scalars.at(0).first == "train/loss");
  CHECK(ev[4].scalars.at(0).second == 0.25f);
  CHECK(ev[4].step == 3);
  CHECK(ev[4].wall_time == 1003.0);
  CHECK(ev[11].scalars.at(0) == std::pair<std::string, float>{"val/acc", 0.875f});
  CHECK(ev[12].texts.at(0) == std::pair<std::string, std::string>{"hparams", "| lr | 0.001 |"});
  fs::remove_all(dir);
}

TEST_CASE("event files: corruption and truncation are errors naming the byte offset") {
  const auto dir = temp_dir("bad");
  fs::path file;
  {
    loggers::event_writer w(dir);
    file = w.path();
    w.add_scalar("a", 1.0, 1);
  }
  auto good = bytes_of(file);
  CHECK(parse_error(good).empty());
  auto flip = good;
  flip[flip.size() - 6] ^= 0x40;  // inside the last record's data
  CHECK(parse_error(flip).find("record data CRC mismatch") != std::string::npos);
  auto hdr = good;
  hdr[0] ^= 1;
  CHECK(parse_error(hdr) == "kiln: f: byte 8: record length CRC mismatch (corrupt record header)");
  auto cut = good;
  cut.resize(cut.size() - 3);
  CHECK(parse_error(cut).find("truncated record") != std::string::npos);
  cut.resize(good.size() - 20);
  CHECK_FALSE(parse_error(cut).empty());
  fs::remove_all(dir);
}

TEST_CASE("event files: unknown fields are skipped, malformed protobuf is rejected") {
  std::string ev;
  loggers::pb::put_bytes(ev, 15, "future field");
  loggers::pb::put_key(ev, 2, loggers::pb::varint);
  loggers::pb::put_varint(ev, 42);
  loggers::pb::put_key(ev, 16, loggers::pb::fixed32);
  ev += std::string(4, '\0');
  const auto rec = loggers::detail::frame(ev);
  const std::vector<unsigned char> b(rec.begin(), rec.end());
  auto parsed = loggers::parse_events(b.data(), b.size(), "f");
  REQUIRE(parsed.size() == 1);
  CHECK(parsed[0].step == 42);
  std::string bad;
  loggers::pb::put_key(bad, 5, loggers::pb::len);
  loggers::pb::put_varint(bad, 100);  // a summary longer than the event
  const auto rb = loggers::detail::frame(bad);
  CHECK(parse_error({rb.begin(), rb.end()}).find("runs past its message") != std::string::npos);
  std::string group;
  loggers::pb::put_varint(group, (7u << 3) | 3u);  // wire type 3 (group): unsupported
  const auto rg = loggers::detail::frame(group);
  CHECK(parse_error({rg.begin(), rg.end()}).find("unsupported protobuf wire type 3") != std::string::npos);
}

TEST_CASE("loggers::tensorboard writes the trainer's metrics as scalars") {
  const auto root = temp_dir("logger");
  regressor m;
  auto tl = make_loader({2, 2, 2, 2});
  auto vl = make_loader({2}, 9);
  trainer<regressor, strategy::single_device<cpu>, precision::fp32, loggers::tensorboard> tr(
      {.max_epochs = 2,
       .num_sanity_val_steps = 0,
       .log_every_n_steps = 1,
       .default_root_dir = root.string(),
       .enable_progress_bar = false});
  tr.fit(m, tl, vl);
  fs::path file;
  for (auto& e : fs::directory_iterator(root / "version_0"))
    if (e.path().filename().string().find("tfevents") != std::string::npos) file = e.path();
  REQUIRE_FALSE(file.empty());
  std::vector<std::int64_t> loss_steps, val_steps;
  bool hparams = false;
  for (auto& ev : loggers::read_events(file)) {
    for (auto& [tag, v] : ev.scalars) {
      if (tag == "train/loss") loss_steps.push_back(ev.step);
      if (tag == "val/loss") val_steps.push_back(ev.step);
    }
    for (auto& [tag, t] : ev.texts) hparams |= tag == "hparams" && t.find("max_epochs=2") != std::string::npos;
  }
  CHECK(loss_steps == std::vector<std::int64_t>{1, 2, 3, 4, 5, 6, 7, 8});
  CHECK(val_steps == std::vector<std::int64_t>{4, 8});
  CHECK(hparams);
  fs::remove_all(root);
}

TEST_CASE("progress_bar: plain lines off a terminal, a live bar on one, nothing when disabled") {
  auto run = [](int tty, bool enabled) {
    std::FILE* f = std::tmpfile();
    regressor m;
    auto tl = make_loader({2, 2, 2});
    auto vl = make_loader({2}, 9);
    trainer<regressor, strategy::single_device<cpu>, precision::fp32, callbacks::progress_bar> tr(
        {.max_epochs = 2, .num_sanity_val_steps = 0, .enable_progress_bar = enabled},
        callbacks::progress_bar({.refresh_seconds = 0, .stream = f, .force_tty = tty}));
    tr.fit(m, tl, vl);
    std::rewind(f);
    std::string s;
    for (int c; (c = std::fgetc(f)) != EOF;) s += static_cast<char>(c);
    std::fclose(f);
    return s;
  };
  const std::string plain = run(0, true);
  INFO(plain);
  CHECK(plain.find("epoch 1/2 train: 3 batches in ") != std::string::npos);
  CHECK(plain.find("epoch 2/2 validation: 1 batches") != std::string::npos);
  CHECK(plain.find("train/loss=") != std::string::npos);
  CHECK(plain.find('\r') == std::string::npos);
  CHECK(std::count(plain.begin(), plain.end(), '\n') == 4);
  const std::string live = run(1, true);
  CHECK(live.find("\repoch 1/2 train [") != std::string::npos);
  CHECK(live.find("3/3") != std::string::npos);
  CHECK(std::count(live.begin(), live.end(), '\n') == 2);  // one per training epoch
  CHECK(run(0, false).empty());
}

namespace {
struct net_holder {
  nn::mlp<nn::relu> net{784, {256, 256}, 10};
  template <class F>
  void for_each_child(F&& f) {
    f("net", net);
  }
};
}  // namespace

TEST_CASE("model_summary: layers, shapes, trainable and frozen counts, size") {
  net_holder h;
  const std::string s = callbacks::summarize(h, 2);
  INFO(s);
  CHECK(s.find("net.0") != std::string::npos);
  CHECK(s.find("[256, 784], [256]") != std::string::npos);
  CHECK(s.find("269,322  trainable params") != std::string::npos);
  CHECK(s.find("0  non-trainable params") != std::string::npos);
  CHECK(s.find("1.077  total estimated model params size (MB)") != std::string::npos);
  nn::requires_grad(h.net.layers[0], false);
  const std::string frozen = callbacks::summarize(h, 1);
  CHECK(frozen.find("68,362  trainable params") != std::string::npos);
  CHECK(frozen.find("200,960  non-trainable params") != std::string::npos);
}

TEST_CASE("throughput_monitor logs samples per second") {
  regressor m;
  auto tl = make_loader({2, 2, 2, 2});
  trainer<regressor, strategy::single_device<cpu>, precision::fp32, callbacks::throughput_monitor> tr(
      {.max_epochs = 1, .log_every_n_steps = 1, .enable_progress_bar = false}, callbacks::throughput_monitor{2});
  auto r = tr.fit(m, tl);
  CHECK(r.metrics.at("throughput/samples_per_sec") > 0);
  CHECK(r.metrics.at("throughput/epoch_samples_per_sec") > 0);
}

}  // namespace test_tensorboard
