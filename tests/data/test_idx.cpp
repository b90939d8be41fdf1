#include <zlib.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "../helpers.hpp"
#include "../skip.hpp"

namespace test_idx {

using namespace kiln;
namespace fs = std::filesystem;

namespace {
std::string write_file(const std::string& name, const std::vector<unsigned char>& bytes, bool gzip = false) {
  const auto path = (fs::temp_directory_path() / ("kiln_idx_" + std::to_string(::getpid()) + "_" + name)).string();
  if (gzip) {
    gzFile f = gzopen(path.c_str(), "wb");
    gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size()));
    gzclose(f);
  } else {
    std::ofstream(path, std::ios::binary)
        .write(reinterpret_cast<const char*>(bytes.data()), static_cast<std::streamsize>(bytes.size()));
  }
  return path;
}
std::vector<unsigned char> idx_2x3() { return {0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3, 4, 5, 6}; }
}  // namespace

TEST_CASE("idx: reads plain and gzip files") {
  for (bool gz : {false, true}) {
    const auto path = write_file(gz ? "ok.gz" : "ok", idx_2x3(), gz);
    auto t = data::read_idx(path);
    CHECK(t.shape() == shape{2, 3});
    CHECK(t(1, 2) == 6);
    fs::remove(path);
  }
}

TEST_CASE("idx: corrupt input gives errors that name the file and the problem") {
  auto expect_error = [](const std::string& name, std::vector<unsigned char> bytes, const char* msg, bool gz = false) {
    const auto path = write_file(name, bytes, gz);
    CAPTURE(name);
    CHECK_THROWS_WITH_AS(data::read_idx(path), doctest::Contains(msg), kiln::error);
    try {
      data::read_idx(path);
    } catch (const kiln::error& e) {
      CHECK(std::string(e.what()).find(path) != std::string::npos);
    }
    fs::remove(path);
  };
  auto bytes = idx_2x3();
  expect_error("short", {0, 0}, "the header alone needs 4");
  expect_error("magic", {1, 0, 8, 1, 0, 0, 0, 0}, "magic bytes are 1 0, expected 0 0");
  expect_error("type", {0, 0, 0x0d, 1, 0, 0, 0, 0}, "element type 0xd is not supported");
  expect_error("rank", {0, 0, 8, 9}, "rank 9 is not supported");
  expect_error("header", {0, 0, 8, 2, 0, 0, 0, 2}, "truncated IDX header");
  auto truncated = bytes;
  truncated.pop_back();
  expect_error("truncated", truncated, "header promises [2, 3] = 6 bytes, file holds 5");
  auto trailing = bytes;
  trailing.push_back(9);
  expect_error("trailing", trailing, "1 unexpected bytes after the IDX data");
  // A gzip stream cut short is reported as corrupt, never silently shortened.
  const auto good = write_file("good.gz", std::vector<unsigned char>(4096, 0), true);
  std::ifstream in(good, std::ios::binary);
  std::vector<unsigned char> gz((std::istreambuf_iterator<char>(in)), {});
  fs::remove(good);
  gz.resize(gz.size() / 2);
  expect_error("cut.gz", gz, "corrupt compressed data");
  CHECK_THROWS_WITH_AS(data::read_idx("/nonexistent/kiln.idx"), doctest::Contains("/nonexistent/kiln.idx: cannot open"),
                       kiln::error);
}

TEST_CASE("idx: the installed Fashion-MNIST files parse to their documented shapes" *
          doctest::test_suite("fashion_mnist")) {
  const std::string dir = "/usr/share/datasets/fashion-mnist/";
  if (!fs::exists(dir + "t10k-images-idx3-ubyte.gz"))
    return kiln::test::skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)");
  auto images = data::read_idx(dir + "t10k-images-idx3-ubyte.gz");
  auto labels = data::read_idx(dir + "t10k-labels-idx1-ubyte.gz");
  CHECK(images.shape() == shape{10000, 28, 28});
  CHECK(labels.shape() == shape{10000});
  for (std::int64_t i = 0; i < labels.numel(); ++i) REQUIRE(labels.data()[i] < 10);
}

TEST_CASE("idx: a zero extent cannot hide an overflowing shape (found by fuzz_idx)") {
  // rank 4: 0 x 0x08040000 x 0x2e0000 x 0x02000000 — the product of the non-zero extents
  // overflows int64; the reader must refuse it rather than build a shape from it.
  const std::vector<unsigned char> bytes = {0, 0, 8, 4, 0, 0, 0, 0, 8, 4, 0, 0, 0, 0x2e, 0, 0, 2, 0, 0, 0};
  CHECK_THROWS_WITH_AS(data::detail::parse_idx(bytes.data(), bytes.size(), "crafted"),
                       doctest::Contains("crafted: IDX extents multiply to more than 16 GiB"), kiln::error);
}

}  // namespace test_idx
