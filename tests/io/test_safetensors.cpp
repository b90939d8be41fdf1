// The JSON reader and the safetensors reader/writer: round trips, and every way a
// header can be wrong gives an error that names the file and the tensor.
#include <cstring>
#include <fstream>

#include "../helpers.hpp"
#include "kiln/core/crc32c.hpp"
#include "kiln/io/safetensors.hpp"

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
