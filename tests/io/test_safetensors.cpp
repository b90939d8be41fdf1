// The JSON reader and the safetensors reader/writer: round trips, and every way a
// header can be wrong gives an error that names the file and the tensor.
#include <cstring>
#include <fstream>

#include "../helpers.hpp"
#include "kiln/core/crc32c.hpp"
#include "kiln/io/safetensors.hpp"

namespace test_safetensors {

using namespace kiln;
using io::json;
namespace fs = std::filesystem;

namespace {

std::string error_of(auto&& f) {
  try {
    f();
  } catch (const kiln::error& e) {
    return e.what();
  }
  return "(no error)";
}

// Builds safetensors bytes from a header text and a data buffer.
std::vector<std::byte> raw_file(const std::string& header, std::size_t data_bytes) {
  std::vector<std::byte> b(8 + header.size() + data_bytes, std::byte{0});
  const std::uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) b[static_cast<std::size_t>(i)] = std::byte(static_cast<unsigned char>(n >> (8 * i)));
  std::memcpy(b.data() + 8, header.data(), header.size());
  return b;
}
std::string parse_error(const std::string& header, std::size_t data_bytes) {
  auto b = raw_file(header, data_bytes);
  return error_of([&] { io::safetensors_view::parse(b, "bad.safetensors"); });
}

}  // namespace

TEST_CASE("json: parses, prints and round-trips values exactly") {
  const json v = json::parse(
      R"({"a": 1, "b": [true, false, null], "c": -2.5e-3, "d": "x\"\\\n\u00e9\ud83d\ude00", "big": 9007199254740993,
          "e": {}, "f": []})");
  CHECK(v.at("a").as_int() == 1);
  CHECK(v.at("a").is_integer());
  CHECK(v.at("big").as_int() == 9007199254740993LL);  // beyond 2^53: kept exact
  CHECK(v.at("c").as_double() == -2.5e-3);
  CHECK(v.at("d").as_string() == "x\"\\\n\xc3\xa9\xf0\x9f\x98\x80");
  CHECK(v.at("b").as_array().size() == 3);
  CHECK(v.at("e").size() == 0);
  CHECK(json::parse(v.dump()) == v);
  // Doubles print with enough digits to come back bit for bit; non-finite ones as strings.
  for (double d : {0.1, 1.0 / 3.0, 1e-300, 123456789.0, -0.0, 5e-324}) {
    const json back = json::parse(json(d).dump());
    CHECK_FALSE(back.is_integer());
    const double got = back.as_double();
    CHECK(std::memcmp(&d, &got, sizeof d) == 0);
  }
  CHECK(std::isnan(json::parse(json(std::nan("")).dump()).as_double()));
  CHECK(json::parse(json(-INFINITY).dump()).as_double() == -INFINITY);
  // Copies are values: changing one leaves the other alone.
  json a = json::object();
  a.set("k", 1);
  json b = a;
  b.set("k", 2);
  CHECK(a.at("k").as_int() == 1);
}

TEST_CASE("json: rejects malformed documents, naming the position") {
  CHECK(error_of([] { json::parse(R"({"a": 1, "a": 2})", "f.json"); }).find("\"a\" is duplicated") !=
        std::string::npos);
  // Large objects switch to a hash set: duplicates are still found, first key or last.
  for (int dup_of : {0, 31, 32, 4999}) {
    std::string big = "{";
    for (int i = 0; i < 5000; ++i) big += "\"k" + std::to_string(i) + "\":" + std::to_string(i) + ",";
    big += "\"k" + std::to_string(dup_of) + "\":0}";
    CAPTURE(dup_of);
    CHECK(error_of([&] { json::parse(big, "big.json"); }).find("\"k" + std::to_string(dup_of) + "\" is duplicated") !=
          std::string::npos);
    big.replace(big.rfind("\"k"), 2, "\"x");
    CHECK(json::parse(big).size() == 5001);
  }
  CHECK(error_of([] { json::parse("[1, 2,]", "f.json"); }).find("f.json: invalid JSON at byte 6") != std::string::npos);
  CHECK(error_of([] { json::parse("{\"a\" 1}"); }).find("expected ':'") != std::string::npos);
  CHECK(error_of([] { json::parse("[1] x"); }).find("end of document") != std::string::npos);
  CHECK(error_of([] { json::parse("\"\\ud800\""); }).find("low surrogate") != std::string::npos);
  CHECK(error_of([] { json::parse("1e999"); }).find("range of a double") != std::string::npos);
  CHECK(error_of([] { json::parse("01"); }).find("end of document") != std::string::npos);
  CHECK(error_of([] { json::parse("NaN"); }).find("expected a value") != std::string::npos);
  CHECK(error_of([] { json::parse("\"a\tb\""); }).find("control characters") != std::string::npos);
  CHECK(error_of([] { json::parse(std::string(100, '[') + std::string(100, ']')); }).find("64 levels") !=
        std::string::npos);
  CHECK(error_of([] { json::parse("{\"x\": 1}").at("y"); }).find("missing field 'y'") != std::string::npos);
  CHECK(error_of([] {
          json::parse("{\"x\": \"s\"}").at("x").as_int("config.x");
        }).find("config.x: expected an integer, got the string \"s\"") != std::string::npos);
}

TEST_CASE("safetensors: write then read every dtype, zero-copy and aligned") {
  const auto dir = test::temp_dir("st", "rt");
  const auto path = dir / "t.safetensors";
  auto a = test::rand_tensor<f32>({3, 4}, 1);
  auto b = test::rand_tensor<f64>({5}, 2);
  auto c = tensor<bf16>::full({2, 2}, bf16(1.5f));
  auto d = tensor<i64>::from({3}, {1, -2, 1LL << 40});
  auto e = tensor<u8>::from({3}, {1, 2, 255});
  auto empty = tensor<f32>::zeros({0, 7});
  auto scalar = tensor<f16>::full({}, f16(2.0f));
  io::safetensors_writer w;
  w.add("z.a", a);
  w.add("b", b);
  w.add("c", c);
  w.add("d", d);
  w.add("e", e);
  w.add("empty", empty);
  w.add("scalar", scalar);
  w.set_metadata("format", "pt");
  w.write(path);

  auto f = io::safetensors_file::open(path);
  CHECK(f.tensors().size() == 7);
  CHECK(f.metadata("format") == "pt");
  CHECK(f.data_offset() % 8 == 0);
  CHECK(f.load<f32>("z.a").to_vector() == a.to_vector());
  CHECK(f.load<f64>("b").to_vector() == b.to_vector());
  CHECK(f.load<bf16>("c").to_vector() == c.to_vector());
  CHECK(f.load<i64>("d").to_vector() == d.to_vector());
  CHECK(f.load<u8>("e").to_vector() == e.to_vector());
  CHECK(f.load<f32>("empty").shape() == shape{0, 7});
  CHECK(f.load<f16>("scalar").shape().rank() == 0);
  CHECK(float(f.load<f16>("scalar").flat(0)) == 2.0f);
  auto v = f.view<f64>("b");  // a span into the mapping
  CHECK(v.size() == 5);
  CHECK(v[3] == b.flat(3));
  // Every tensor is aligned to its element size in the file.
  for (auto& t : f.tensors()) CHECK((f.data_offset() + t.begin) % io::st_dtype_size(t.dtype).value() == 0);
  CHECK(error_of([&] { f.load<f32>("b"); }).find("tensor 'b' has dtype F64, expected F32") != std::string::npos);
  CHECK(error_of([&] { f.load<f32>("nope"); }).find("no tensor named 'nope'") != std::string::npos);
  // No temporary is left behind.
  int files = 0;
  for ([[maybe_unused]] auto& x : fs::directory_iterator(dir)) ++files;
  CHECK(files == 1);
}

TEST_CASE("safetensors: a bad header is rejected with the file and the tensor named") {
  const std::string ok = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  CHECK(parse_error(ok, 8) == "(no error)");
  CHECK(parse_error(ok, 4).find("bad.safetensors: tensor 'w' ends at byte 8 of the data buffer, but the file holds "
                                "only 4 data bytes (truncated file)") != std::string::npos);
  CHECK(parse_error(ok, 12).find("4 bytes after the last tensor") != std::string::npos);
  CHECK(parse_error(R"({"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8)
            .find("tensor 'w': shape [3] of F32 needs 12 bytes but data_offsets [0, 8] span 8") != std::string::npos);
  CHECK(parse_error(R"({"w":{"dtype":"Q4","shape":[2],"data_offsets":[0,8]}})", 8).find("unknown dtype 'Q4'") !=
        std::string::npos);
  CHECK(parse_error(R"({"w":{"dtype":"F32","shape":[2]}})", 8).find("tensor 'w': missing field 'data_offsets'") !=
        std::string::npos);
  CHECK(
      parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}})", 8).find("unexpected field 'x'") !=
      std::string::npos);
  CHECK(parse_error(R"({"w":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}})", 8).find("negative dimension") !=
        std::string::npos);
  CHECK(parse_error(R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}})", 8).find("end before they begin") !=
        std::string::npos);
  CHECK(parse_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                    R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                    12)
            .find("tensor 'b' (bytes 4..12) overlaps tensor 'a' (bytes 0..8)") != std::string::npos);
  CHECK(parse_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                    R"("b":{"dtype":"F32","shape":[1],"data_offsets":[8,12]}})",
                    12)
            .find("hole of 4 bytes before tensor 'b'") != std::string::npos);
  CHECK(parse_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                    R"("a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                    8)
            .find("\"a\" is duplicated") != std::string::npos);
  CHECK(parse_error(R"({"__metadata__":{"k":1}})", 0).find("__metadata__ value 'k' must be a string") !=
        std::string::npos);
  CHECK(parse_error(R"([1,2])", 0).find("does not start with '{'") != std::string::npos);
  CHECK(parse_error(R"({"w":{"dtype":"F32","shape":[4294967296,4294967296,4294967296],"data_offsets":[0,8]}})", 8)
            .find("is too large") != std::string::npos);
  // Header length fields that lie.
  std::vector<std::byte> tiny(5);
  CHECK(error_of([&] { io::safetensors_view::parse(tiny, "tiny"); }).find("too short") != std::string::npos);
  auto b = raw_file(ok, 8);
  b[0] = std::byte{0xff};
  b[1] = std::byte{0xff};
  CHECK(error_of([&] { io::safetensors_view::parse(b, "f"); }).find("runs past the end of the file") !=
        std::string::npos);
  b[7] = std::byte{0x7f};
  CHECK(error_of([&] { io::safetensors_view::parse(b, "f"); }).find("exceeds the limit") != std::string::npos);
}

TEST_CASE("safetensors: header padding, empty files and missing files") {
  // Trailing spaces after the JSON (the Python writer pads to 8 bytes) are accepted.
  CHECK(parse_error(R"({"__metadata__":{"a":"b"}})" + std::string(6, ' '), 0) == "(no error)");
  CHECK(parse_error("{}", 0) == "(no error)");
  const auto dir = test::temp_dir("st", "missing");
  CHECK(error_of([&] { io::safetensors_file::open(dir / "nope.safetensors"); }).find("cannot open") !=
        std::string::npos);
  { std::ofstream(dir / "empty.safetensors"); }
  CHECK(error_of([&] {
          io::safetensors_file::open(dir / "empty.safetensors");
        }).find("empty.safetensors: 0 bytes is too short") != std::string::npos);
  io::safetensors_writer w;
  CHECK(error_of([&] { w.add_raw("x", "F32", {3}, {}); }).find("0 bytes given for 3 elements") != std::string::npos);
  w.add("x", tensor<f32>::zeros({1}));
  CHECK(error_of([&] { w.add("x", tensor<f32>::zeros({1})); }).find("added twice") != std::string::npos);
}

TEST_CASE("crc32c: the instruction path and the portable tables agree") {
  CHECK(crc32c("123456789", 9) == 0xE3069283u);
  CHECK(crc32c_portable("123456789", 9) == 0xE3069283u);
  std::vector<unsigned char> buf(1000);
  const philox_stream st{42, 0};
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<unsigned char>(st.bits(i));
  for (std::size_t off : {0, 1, 3, 7})
    for (std::size_t n : {0, 1, 7, 8, 9, 63, 64, 65, 900}) {
      CAPTURE(off);
      CAPTURE(n);
      CHECK(crc32c(buf.data() + off, n) == crc32c_portable(buf.data() + off, n));
      CHECK(crc32c(buf.data() + off, n, 0x1234u) == crc32c_portable(buf.data() + off, n, 0x1234u));
    }
}

TEST_CASE("crc32c: three-stream blocks agree with the tables on any length, alignment and split") {
  // Lengths around the block sizes (3 × 256 and 3 × 8192 bytes), not multiples of 8, and
  // zero; offsets off 8-byte alignment; a sum continued across a split equals the whole.
  constexpr std::uint64_t seed = 20261207;
  MESSAGE("seed ", seed);
  std::vector<unsigned char> buf(200'000);
  const philox_stream st{seed, 0};
  for (std::size_t i = 0; i < buf.size(); ++i) buf[i] = static_cast<unsigned char>(st.bits(i));
  std::vector<std::size_t> lengths = {0,     1,     5,     767,   768,   769,   775,    1536,
                                      24575, 24576, 24577, 24583, 49152, 50000, 199'000};
  for (std::uint64_t k = 0; k < 200; ++k) lengths.push_back(st.bits(buf.size() + k) % 190'000);
  std::uint64_t draw = 2 * buf.size();
  for (std::size_t n : lengths) {
    const std::size_t off = st.bits(draw++) % 9;
    const std::uint32_t init = (n % 2) ? static_cast<std::uint32_t>(st.bits(draw++)) : 0u;
    CAPTURE(n);
    CAPTURE(off);
    const unsigned char* p = buf.data() + off;
    const std::uint32_t want = crc32c_portable(p, n, init);
    CHECK(crc32c(p, n, init) == want);
    const std::size_t cut = n ? st.bits(draw++) % n : 0;
    CHECK(crc32c(p + cut, n - cut, crc32c(p, cut, init)) == want);
  }
}

TEST_CASE("file_sink: gathered and direct writes, skipped ranges, errors naming the file") {
  const auto dir = test::temp_dir("st", "sink");
  const auto path = dir / "f.bin";
  std::vector<unsigned char> big(3 * io::file_sink::writeback_bytes + 12345);
  const philox_stream st{7, 0};
  for (std::size_t i = 0; i < big.size(); ++i) big[i] = static_cast<unsigned char>(st.bits(i));
  std::string want = "head";
  io::write_atomically(path, [&](io::file_sink& f) {
    f.skip(4);  // filled last
    for (int i = 0; i < 100; ++i) {
      const std::string s = std::to_string(i) + ",";
      f.write(s.data(), s.size());
      want += s;
    }
    f.write(big.data(), big.size());  // straight from the caller's memory, in writeback-sized pieces
    want.append(reinterpret_cast<const char*>(big.data()), big.size());
    f.write("tail", 4);
    want += "tail";
    CHECK(f.position() == want.size());
    f.write_at(0, "head", 4);
    CHECK(error_of([&] { f.write_at(f.position() - 2, "xyz", 3); }).find("f.bin") != std::string::npos);
  });
  std::ifstream in(path, std::ios::binary);
  CHECK(std::string(std::istreambuf_iterator<char>(in), {}) == want);
  // A fill that throws leaves the old file and no temporary.
  CHECK(error_of([&] {
          io::write_atomically(path, [&](io::file_sink& f) {
            f.write(big.data(), big.size());
            detail::fail("stop");
          });
        }) == "kiln: stop");
  CHECK(fs::file_size(path) == want.size());
  int files = 0;
  for ([[maybe_unused]] auto& x : fs::directory_iterator(dir)) ++files;
  CHECK(files == 1);
  // Errors name the file being replaced.
  io::write_atomically(dir / "small.txt", std::string_view("hello\n"));
  CHECK(fs::file_size(dir / "small.txt") == 6);
  CHECK(error_of([&] { io::write_atomically(dir / "small.txt" / "x", std::string_view("a")); }).find("small.txt") !=
        std::string::npos);
}

TEST_CASE("safetensors: write_watched puts the header last and reads back like write()") {
  const auto dir = test::temp_dir("st", "watched");
  auto a = test::rand_tensor<f32>({1000, 1100}, 1);  // several watch pieces
  auto b = test::rand_tensor<f64>({5}, 2);
  auto c = tensor<bf16>::full({2, 3}, bf16(1.5f));
  auto empty = tensor<f32>::zeros({0, 4});
  io::safetensors_writer w;
  w.add("a", a);
  w.add("b", b);
  w.add("c", c);
  w.add("empty", empty);
  w.set_metadata("format", "pt");
  w.write(dir / "plain.safetensors");
  w.set_metadata("sums", "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");  // the widest form, filled by finish()
  std::vector<std::uint32_t> sums(4, 0);
  std::vector<std::size_t> seen(4, 0), pieces(4, 0);
  w.write_watched(
      dir / "watched.safetensors",
      [&](std::size_t i, std::span<const std::byte> bytes) {
        CHECK(bytes.size() <= io::safetensors_writer::watch_bytes);
        sums[i] = crc32c(bytes.data(), bytes.size(), sums[i]);
        seen[i] += bytes.size();
        ++pieces[i];
      },
      [&] { w.set_metadata("sums", std::to_string(sums[0])); });
  CHECK(seen == std::vector<std::size_t>{a.nbytes(), b.nbytes(), c.nbytes(), 0});
  CHECK(pieces[0] >= 3);
  CHECK(sums[0] == crc32c(a.data(), a.nbytes()));
  const auto p = io::safetensors_file::open(dir / "plain.safetensors");
  const auto f = io::safetensors_file::open(dir / "watched.safetensors");
  CHECK(f.metadata("sums") == std::to_string(sums[0]));
  CHECK(f.metadata("format") == "pt");
  CHECK(f.data_offset() % 8 == 0);
  CHECK(f.data_offset() >= p.data_offset());  // the room reserved for the widest metadata
  for (auto& e : p.tensors()) {
    CAPTURE(e.name);
    REQUIRE(f.contains(e.name));
    const auto& g = f.at(e.name);
    CHECK(g.begin == e.begin);
    CHECK(g.shape == e.shape);
    CHECK(std::memcmp(f.bytes(g).data(), p.bytes(e).data(), e.nbytes()) == 0);
  }
  // Metadata that outgrows its room is an error, and the file is left as it was.
  CHECK(error_of([&] {
          w.write_watched(
              dir / "watched.safetensors", [](std::size_t, std::span<const std::byte>) {},
              [&] { w.set_metadata("sums", std::string(100, 'y')); });
        }).find("watched.safetensors grew from") != std::string::npos);
  CHECK(io::safetensors_file::open(dir / "watched.safetensors").metadata("sums") == std::to_string(sums[0]));
}

}  // namespace test_safetensors
