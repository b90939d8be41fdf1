// Language-model data: reading text folders, token .bin files (llm.c's layout), token
// streams, lm_blocks (shapes, the one-token shift, determinism, coverage) and their use
// through the data_loader.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <set>
#include <string>
#include <vector>

#include "kiln/data/data_loader.hpp"
#include "kiln/data/text.hpp"
#include "kiln/data/token_bin.hpp"
#include "kiln/text/byte_tokenizer.hpp"

namespace test_lm_data {

using namespace kiln;
using namespace kiln::data;
namespace fs = std::filesystem;

namespace {
fs::path temp_dir(const std::string& name) {
  auto p = fs::temp_directory_path() / ("kiln_lm_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}
void write_file(const fs::path& p, const std::string& bytes) {
  fs::create_directories(p.parent_path());
  std::ofstream(p, std::ios::binary).write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}
std::string read_file(const fs::path& p) {
  std::ifstream f(p, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}
std::vector<std::int32_t> iota_tokens(std::int32_t n, std::int32_t start = 0) {
  std::vector<std::int32_t> v(static_cast<std::size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}
// A .bin header by hand: magic, version, count, then zeros.
std::string header(std::int32_t magic, std::int32_t version, std::int32_t count) {
  std::int32_t h[256] = {};
  h[0] = magic;
  h[1] = version;
  h[2] = count;
  return std::string(reinterpret_cast<const char*>(h), sizeof h);
}
std::vector<i64> row(const tensor<i64>& t, std::int64_t r) {
  const std::int64_t T = t.size(t.rank() - 1);
  return std::vector<i64>(t.data() + r * T, t.data() + (r + 1) * T);
}
}  // namespace

TEST_CASE("token .bin: write and map back, uint16 and uint32, llm.c's header") {
  const auto dir = temp_dir("bin");
  const auto small = iota_tokens(1000, 64000);  // max 64999 < 65536: uint16
  write_token_bin(dir / "a.bin", small);
  const std::string raw = read_file(dir / "a.bin");
  REQUIRE(raw.size() == 1024 + 2 * 1000);
  CHECK(raw.substr(0, 1024) == header(20240520, 1, 1000));
  auto f = token_bin_file::open(dir / "a.bin");
  CHECK(f.size() == 1000);
  CHECK(f.width() == 2);
  CHECK(f.u16()[999] == 64999);
  CHECK(f.at(5) == 64005u);

  const std::vector<std::int32_t> big{0, 70000, 128255, 5};
  write_token_bin(dir / "b.bin", big);
  CHECK(read_file(dir / "b.bin").substr(0, 1024) == header(20240801, 7, 4));
  auto g = token_bin_file::open(dir / "b.bin", 128256);
  CHECK(g.width() == 4);
  CHECK(std::vector<std::uint32_t>(g.u32().begin(), g.u32().end()) == std::vector<std::uint32_t>{0, 70000, 128255, 5});
  // Forced width, empty file.
  write_token_bin(dir / "c.bin", std::vector<std::int32_t>{1, 2}, token_width::u32);
  CHECK(token_bin_file::open(dir / "c.bin").width() == 4);
  write_token_bin(dir / "e.bin", std::vector<std::int32_t>{});
  CHECK(token_bin_file::open(dir / "e.bin").size() == 0);
  // Through a token_stream: mapped, same values.
  auto s = token_stream::open_bin(dir / "b.bin");
  CHECK(s.memory_mapped());
  CHECK(s.to_vector() == big);
  fs::remove_all(dir);
}

TEST_CASE("token .bin: every bad input is an error naming the file and the field") {
  const auto dir = temp_dir("bin_bad");
  const auto bad = [&](const std::string& bytes, const std::string& msg, std::optional<std::int64_t> vocab = {}) {
    write_file(dir / "x.bin", bytes);
    CAPTURE(msg);
    const std::string path = (dir / "x.bin").string();
    CHECK_THROWS_WITH_AS(token_bin_file::open(dir / "x.bin", vocab), doctest::Contains((path + ": " + msg).c_str()),
                         kiln::error);
  };
  const std::string two_u16("\x05\x00\x07\x00", 4);
  bad("short", "5 bytes is shorter than the 1024-byte header");
  bad(header(1234, 1, 2) + two_u16, "header field \"magic\" is 1234, expected 20240520 (uint16 tokens) or 20240801");
  bad(header(20240520, 2, 2) + two_u16, "header field \"version\" is 2, expected 1 for magic 20240520");
  bad(header(20240801, 1, 1) + two_u16, "header field \"version\" is 1, expected 7 for magic 20240801");
  bad(header(20240520, 1, -3), "header field \"count\" is -3, expected a token count >= 0");
  bad(header(20240520, 1, 3) + two_u16,
      "file size is 1028 bytes, expected 1030 (1024-byte header + header field \"count\" = 3 tokens × 2 bytes): the "
      "file is truncated");
  bad(header(20240520, 1, 1) + two_u16,
      "file size is 1028 bytes, expected 1026 (1024-byte header + header field \"count\" = 1 tokens × 2 bytes): "
      "trailing bytes after the tokens");
  std::string reserved = header(20240520, 1, 2) + two_u16;
  reserved[4 * 100] = 1;
  bad(reserved, "header word 100 is 1, expected 0 (reserved)");
  bad(header(20240520, 1, 2) + two_u16, "token 1 is 7, expected < vocab_size 6", 6);
  CHECK_NOTHROW(token_bin_file::open(dir / "x.bin", 8));
  CHECK_THROWS_WITH_AS(token_bin_file::open(dir / "missing.bin"), doctest::Contains("cannot open"), kiln::error);
  // The writer refuses what the format cannot hold.
  CHECK_THROWS_WITH_AS(write_token_bin(dir / "w.bin", std::vector<std::int32_t>{1, -2}),
                       doctest::Contains("token 1 is -2, expected >= 0"), kiln::error);
  CHECK_THROWS_WITH_AS(write_token_bin(dir / "w.bin", std::vector<std::int32_t>{70000}, token_width::u16),
                       doctest::Contains("token value 70000 does not fit uint16 tokens"), kiln::error);
  CHECK_FALSE(fs::exists(dir / "w.bin"));
  fs::remove_all(dir);
}

TEST_CASE("token_stream: slices share the tokens; train/val split at the fraction") {
  token_stream s(iota_tokens(100));
  CHECK(s.size() == 100);
  auto sl = s.slice(10, 20);
  CHECK(sl.size() == 10);
  CHECK(sl[0] == 10);
  CHECK(sl[9] == 19);
  CHECK_THROWS_WITH_AS(sl[10], doctest::Contains("index 10 is outside [0, 10)"), kiln::error);
  CHECK_THROWS_WITH_AS(s.slice(50, 101), doctest::Contains("slice(50, 101): outside [0, 100]"), kiln::error);
  const auto [train, val] = train_val_split(s, 0.9);
  CHECK(train.size() == 90);
  CHECK(val.size() == 10);
  CHECK(val[0] == 90);
  CHECK(train_val_split(token_stream(iota_tokens(7)), 0.5).train.size() == 3);
  CHECK_THROWS_AS(train_val_split(s, 1.5), kiln::error);
}

TEST_CASE("lm_blocks: shapes, the one-token shift, determinism under a seed") {
  token_stream s(iota_tokens(1000));
  lm_blocks ds(s, {.block_size = 16, .sampling = lm_sampling::random, .seed = 7});
  CHECK(ds.size() == 999 / 16);
  const std::vector<std::int64_t> idx{0, 5, 3, 61};
  const lm_batch b = ds.get_batch(idx);
  CHECK(b.x.shape() == shape{4, 16});
  CHECK(b.y.shape() == shape{4, 16});
  CHECK(b.size() == 4);
  for (std::int64_t r = 0; r < 4; ++r) {
    const auto x = row(b.x, r), y = row(b.y, r);
    const std::int64_t o = ds.offset(idx[static_cast<std::size_t>(r)]);
    CHECK((o >= 0 && o <= 1000 - 16 - 1));
    for (std::int64_t t = 0; t < 16; ++t) {
      CHECK(x[static_cast<std::size_t>(t)] == o + t);
      CHECK(y[static_cast<std::size_t>(t)] == o + t + 1);
    }
    const lm_sample one = ds.get(idx[static_cast<std::size_t>(r)]);
    CHECK(one.x.shape() == shape{16});
    CHECK(std::vector<i64>(one.x.data(), one.x.data() + 16) == x);
    CHECK(std::vector<i64>(one.y.data(), one.y.data() + 16) == y);
  }
  // A pure function of (seed, i): another instance agrees, another seed does not.
  lm_blocks same(s, {.block_size = 16, .sampling = lm_sampling::random, .seed = 7});
  lm_blocks other(s, {.block_size = 16, .sampling = lm_sampling::random, .seed = 8});
  int differ = 0;
  std::set<std::int64_t> offsets;
  for (std::int64_t i = 0; i < ds.size(); ++i) {
    CHECK(same.offset(i) == ds.offset(i));
    differ += other.offset(i) != ds.offset(i);
    offsets.insert(ds.offset(i));
  }
  CHECK(differ > ds.size() / 2);
  CHECK(offsets.size() > static_cast<std::size_t>(ds.size() / 2));  // not one window repeated
  // Offsets reach both ends of [0, N-T-1] when enough are drawn.
  lm_blocks many(token_stream(iota_tokens(20)), {.block_size = 4, .seed = 1, .samples = 2000});
  std::set<std::int64_t> seen;
  for (std::int64_t i = 0; i < many.size(); ++i) seen.insert(many.offset(i));
  CHECK(seen == std::set<std::int64_t>{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15});
  CHECK_THROWS_WITH_AS(ds.get(ds.size()), doctest::Contains("index 62 is out of range for a dataset of 62 blocks"),
                       kiln::error);
  CHECK_THROWS_WITH_AS(lm_blocks(token_stream(iota_tokens(16)), {.block_size = 16}),
                       doctest::Contains("16 tokens are too few for one block of 16"), kiln::error);
}

TEST_CASE("lm_blocks: sequential blocks cover the stream once, in order") {
  token_stream s(iota_tokens(103));
  lm_blocks ds(s, {.block_size = 10, .sampling = lm_sampling::sequential});
  REQUIRE(ds.size() == 10);  // (103 - 1) / 10
  std::vector<std::int64_t> idx(10);
  std::iota(idx.begin(), idx.end(), 0);
  const lm_batch b = ds.get_batch(idx);
  for (std::int64_t i = 0; i < 100; ++i) {
    CHECK(b.x.data()[i] == i);  // every input token once, in order
    CHECK(b.y.data()[i] == i + 1);
  }
  // Exactly enough tokens for the last target.
  CHECK(lm_blocks(token_stream(iota_tokens(21)), {.block_size = 10, .sampling = lm_sampling::sequential}).size() == 2);
  CHECK(lm_blocks(token_stream(iota_tokens(20)), {.block_size = 10, .sampling = lm_sampling::sequential}).size() == 1);
}

TEST_CASE("lm_blocks through the data_loader: the same batches with workers and after a resume") {
  token_stream s(iota_tokens(5000));
  lm_blocks ds(s, {.block_size = 32, .seed = 3, .samples = 40});
  const auto collect = [&](int workers, std::int64_t epoch, std::int64_t first) {
    data_loader<lm_blocks> l(ds, {.batch_size = 8, .shuffle = true, .seed = 11, .num_workers = workers});
    std::vector<std::vector<i64>> out;
    for (auto&& b : l.epoch(epoch, first)) {
      CHECK(b.x.shape() == shape{8, 32});
      out.emplace_back(b.x.data(), b.x.data() + b.x.numel());
    }
    return out;
  };
  const auto a = collect(0, 2, 0);
  CHECK(a.size() == 5);
  CHECK(collect(2, 2, 0) == a);
  const auto resumed = collect(0, 2, 3);
  REQUIRE(resumed.size() == 2);
  CHECK(resumed[0] == a[3]);
  CHECK(resumed[1] == a[4]);
  CHECK(collect(0, 3, 0) != a);  // another epoch, another order
}

TEST_CASE("read_text: sorted, recursive, symlinks / hidden / .dat / binary files left out") {
  const auto dir = temp_dir("corpus");
  write_file(dir / "b.txt", "bee\n");
  write_file(dir / "a", "ay\n");
  write_file(dir / "a.dat", std::string("\0\0\0\2index", 9));
  write_file(dir / "sub" / "c", "sea\n");
  write_file(dir / "sub" / "blob", std::string("bin\0ary", 7));
  write_file(dir / ".hidden", "secret\n");
  write_file(dir / ".git" / "x", "no\n");
  fs::create_symlink("a", dir / "a.u8");
  fs::create_directory_symlink("sub", dir / "loop");
  const auto c = read_text(dir);
  CHECK(c.text == "ay\nbee\nsea\n");
  REQUIRE(c.files.size() == 3);
  CHECK(c.files[0].filename() == "a");
  CHECK(c.files[2].filename() == "c");
  CHECK(c.file_text(1) == "bee\n");
  text_read_options o;
  o.separator = "<|endoftext|>";
  o.recursive = false;
  const auto d = read_text(dir, o);
  CHECK(d.text == "ay\n<|endoftext|>bee\n");
  CHECK(d.file_text(1) == "bee\n");
  // tokenize: each file encoded, joined by the separator id.
  text::byte_tokenizer tok({"<|endoftext|>"});
  const auto ts = tokenize(d, tok, 256);
  CHECK(ts.to_vector() == std::vector<std::int32_t>{'a', 'y', '\n', 256, 'b', 'e', 'e', '\n'});
  // A file path is read whatever its name; an empty folder is an error.
  CHECK(read_text(dir / "a.dat").text.size() == 9);
  fs::create_directories(dir / "empty");
  CHECK_THROWS_WITH_AS(read_text(dir / "empty"), doctest::Contains("no text file under"), kiln::error);
  CHECK_THROWS_WITH_AS(read_text(dir / "nope"), doctest::Contains("does not exist"), kiln::error);
  fs::remove_all(dir);
}

TEST_CASE("read_text: the fortunes corpus (skipped where it is not installed)") {
  const fs::path dir = "/usr/share/games/fortunes";
  if (!fs::is_directory(dir)) return;
  const auto c = read_text(dir);
  CHECK(c.files.size() > 10);
  for (auto& f : c.files) {
    CHECK(f.extension() != ".dat");
    CHECK(f.extension() != ".u8");
  }
  CHECK(c.text.find('\0') == std::string::npos);
  CHECK(c.text.size() > 1000000);
}

}  // namespace test_lm_data
