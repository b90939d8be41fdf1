// Tokenizers: the GPT-2 pre-tokenizer, byte and char tokenizers, byte-level BPE (training,
// encode/decode round trips on any bytes, special tokens), tokenizer.json in and out, and
// ids identical to the `tokenizers` package on committed fixtures.
#include <doctest/doctest.h>

#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "kiln/core/philox.hpp"
#include "kiln/text/bpe.hpp"
#include "kiln/text/bpe_trainer.hpp"
#include "kiln/text/byte_tokenizer.hpp"

namespace test_tokenizers {

using namespace kiln;
using namespace kiln::text;
namespace fs = std::filesystem;

namespace {
fs::path data_dir() {
  const char* d = std::getenv("KILN_TEST_DATA");
  return d ? fs::path(d) : fs::path("tests/data");  // meson sets KILN_TEST_DATA
}
fs::path temp_dir(const std::string& name) {
  auto p = fs::temp_directory_path() / ("kiln_text_" + std::to_string(::getpid()) + "_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p;
}
std::vector<std::string> pieces(std::string_view s) {
  std::vector<std::string> out;
  gpt2_pretokenize(s, [&](std::size_t b, std::size_t e) { out.emplace_back(s.substr(b, e - b)); });
  return out;
}
// Seeded random byte strings (any bytes: mostly invalid UTF-8), lengths 0..max_len.
std::vector<std::string> random_strings(int n, std::uint64_t seed, int max_len = 64) {
  const philox_stream st{seed, 0};
  std::vector<std::string> out;
  std::uint64_t k = 0;
  for (int i = 0; i < n; ++i) {
    const int len = static_cast<int>(st.bits(k++) % static_cast<std::uint32_t>(max_len + 1));
    std::string s;
    for (int j = 0; j < len; ++j) s += static_cast<char>(st.bits(k++) & 0xFF);
    out.push_back(std::move(s));
  }
  return out;
}
// Strings mixing ASCII words, UTF-8 and stray bytes.
std::vector<std::string> tricky_strings() {
  return {"",
          "Hello, world!",
          "It's 2024; we'll see — they've said I'm 'quoted' ''ll",
          "naïve café déjà vu 数字 ١٢٣ 🙂🙂 Ünïcödé",
          "  leading\t\ttabs\n\n\nand   trailing   ",
          std::string("nul\0byte", 8),
          "\xff\xfe invalid \xc3( \xed\xa0\x80 \xf4\x90\x80\x80 \xe2\x82 end\xc3",
          "\xc0\x80 overlong, lone \x80\x81 continuation",
          "<|endoftext|>",
          "a<|endoftext|>b<|endoftext|><|endoftext|>c",
          "<|endoftext"};
}
const char* small_corpus =
    "The quick brown fox jumps over the lazy dog. It's a dog's life, isn't it? 12 dogs, 3 foxes.\n"
    "Numbers like 3.14159 and 2024 appear; so do naïve cafés, déjà vu and 数字.\n"
    "    indented lines\n\tand tabs\n";
}  // namespace

TEST_CASE("unicode: the byte alphabet is GPT-2's bijection") {
  CHECK(byte_to_unicode(' ') == 0x120);   // "Ġ"
  CHECK(byte_to_unicode('\n') == 0x10A);  // "Ċ"
  CHECK(byte_to_unicode('A') == 'A');
  CHECK(byte_to_unicode(0xAD) == 0x143);  // the last non-printable byte
  std::vector<bool> seen(324, false);
  for (int b = 0; b < 256; ++b) {
    const auto cp = byte_to_unicode(static_cast<std::uint8_t>(b));
    REQUIRE(cp < 324);
    CHECK_FALSE(seen[cp]);
    seen[cp] = true;
    CHECK(unicode_to_byte(cp) == b);
  }
  CHECK(unicode_to_byte(0x20) == -1);  // ' ' itself is not in the alphabet
  CHECK(bpe_tokenizer::spell(" hi\n") == "\xC4\xA0hi\xC4\x8A");
  CHECK(bpe_tokenizer::unspell("\xC4\xA0hi\xC4\x8A") == " hi\n");
}

TEST_CASE("unicode: classes and lenient UTF-8 decoding") {
  CHECK(cp_class(U'a') == char_class::letter);
  CHECK(cp_class(U'7') == char_class::number);
  CHECK(cp_class(U'\n') == char_class::space);
  CHECK(cp_class(U'!') == char_class::other);
  CHECK(cp_class(0xE9) == char_class::letter);    // é
  CHECK(cp_class(0x6570) == char_class::letter);  // 数
  CHECK(cp_class(0x661) == char_class::number);   // Arabic-Indic one
  CHECK(cp_class(0xBD) == char_class::number);    // ½
  CHECK(cp_class(0xA0) == char_class::space);     // no-break space
  CHECK(cp_class(0x3000) == char_class::space);   // ideographic space
  CHECK(cp_class(0x2014) == char_class::other);   // em dash
  CHECK(cp_class(0x2019) == char_class::other);   // right single quote
  CHECK(cp_class(0x1F642) == char_class::other);  // emoji
  const auto d = [](std::string_view s) { return decode_utf8_at(s, 0); };
  CHECK((d("\xC3\xA9").valid && d("\xC3\xA9").cp == 0xE9 && d("\xC3\xA9").len == 2));
  CHECK((d("\xF0\x9F\x99\x82").valid && d("\xF0\x9F\x99\x82").cp == 0x1F642));
  for (std::string_view bad : {"\xC0\x80", "\xED\xA0\x80", "\xF4\x90\x80\x80", "\xE2\x82", "\x80", "\xFF", "\xC3"}) {
    CAPTURE(bad);
    CHECK_FALSE(d(bad).valid);
    CHECK(d(bad).len == 1);
  }
}

TEST_CASE("gpt2_pretokenize: the pieces GPT-2's regex makes") {
  using v = std::vector<std::string>;
  CHECK(pieces("Hello world") == v{"Hello", " world"});
  CHECK(pieces("don't stop, they'll") == v{"don", "'t", " stop", ",", " they", "'ll"});
  CHECK(pieces("'S x'd ''s") == v{"'", "S", " x", "'d", " ''", "s"});
  CHECK(pieces("a  b") == v{"a", " ", " b"});
  CHECK(pieces("a \n\n  b   ") == v{"a", " \n\n ", " b", "   "});
  CHECK(pieces("\nhi") == v{"\n", "hi"});
  CHECK(pieces("abc123 456!?. ...") == v{"abc", "123", " 456", "!?.", " ..."});
  CHECK(pieces("café—naïve 数字") == v{"café", "—", "naïve", " 数字"});
  CHECK(pieces("x\xff\xfey") == v{"x", "\xff\xfe", "y"});
  CHECK(pieces("").empty());
  // The pieces tile any input.
  for (auto& s : random_strings(300, 11, 80)) {
    std::string joined;
    for (auto& p : pieces(s)) {
      CHECK_FALSE(p.empty());
      joined += p;
    }
    CHECK(joined == s);
  }
}

TEST_CASE("byte_tokenizer: every byte string round-trips, special tokens are single ids") {
  byte_tokenizer t({"<|endoftext|>"});
  CHECK(t.vocab_size() == 257);
  CHECK(t.special_id("<|endoftext|>") == 256);
  for (auto& s : tricky_strings()) CHECK(t.decode(t.encode(s)) == s);
  for (auto& s : random_strings(200, 3)) {
    CHECK(t.decode(t.encode(s)) == s);
    CHECK(t.encode_ordinary(s).size() == s.size());
  }
  CHECK(t.encode("a<|endoftext|>b") == std::vector<std::int32_t>{'a', 256, 'b'});
  CHECK(t.encode_ordinary("a<|endoftext|>b").size() == 15);
  const std::vector<std::int32_t> ids{'h', 256, 'i'};
  CHECK(t.decode(ids, true) == "hi");
  const std::vector<std::int32_t> bad{'a', 257};
  CHECK_THROWS_WITH_AS(t.decode(bad), doctest::Contains("id 257 at position 1 is outside the vocabulary [0, 257)"),
                       kiln::error);
}

TEST_CASE("char_tokenizer: the corpus's bytes, an error naming an unseen byte, save and load") {
  const std::string corpus = "hello world\n";
  auto t = char_tokenizer::from_text(corpus, {"<|endoftext|>"});
  CHECK(t.vocab_size() == 10);  // \n ' ' d e h l o r w, then the special token
  CHECK(t.encode("\n") == std::vector<std::int32_t>{0});
  CHECK(t.encode("hello") == std::vector<std::int32_t>{4, 3, 5, 5, 6});
  CHECK(t.encode("w<|endoftext|>") == std::vector<std::int32_t>{8, 9});
  CHECK(t.decode(t.encode("hello world\n<|endoftext|>")) == "hello world\n<|endoftext|>");
  CHECK_THROWS_WITH_AS(t.encode("helz"), doctest::Contains("byte 0x7A ('z') at offset 3 is not in the vocabulary"),
                       kiln::error);
  CHECK_THROWS_WITH_AS(t.encode("he<|endoftext|>h\xC3"), doctest::Contains("byte 0xC3 at offset 16"), kiln::error);
  // Any byte string the vocabulary covers round-trips.
  std::string all;
  for (int b = 0; b < 256; ++b) all += static_cast<char>(b);
  auto full = char_tokenizer::from_text(all);
  for (auto& s : random_strings(100, 5)) CHECK(full.decode(full.encode(s)) == s);

  const auto dir = temp_dir("char");
  t.save(dir / "chars.json");
  auto u = char_tokenizer::load(dir / "chars.json");
  CHECK(u.bytes() == t.bytes());
  CHECK(u.special_tokens() == t.special_tokens());
  CHECK(u.encode("world<|endoftext|>") == t.encode("world<|endoftext|>"));

  const auto bad = [&](const std::string& json) { return char_tokenizer::from_json(json, "chars.json"); };
  CHECK_THROWS_WITH_AS(bad(R"({"type":"kiln.char_tokenizer","version":2,"bytes":[]})"),
                       doctest::Contains("chars.json: field \"version\": expected 1, got the integer 2"), kiln::error);
  CHECK_THROWS_WITH_AS(bad(R"({"type":"bpe","version":1,"bytes":[]})"),
                       doctest::Contains("field \"type\": expected \"kiln.char_tokenizer\""), kiln::error);
  CHECK_THROWS_WITH_AS(bad(R"({"type":"kiln.char_tokenizer","version":1,"bytes":[10,300]})"),
                       doctest::Contains("field \"bytes\"[1]: expected an integer in [0, 255], got the integer 300"),
                       kiln::error);
  CHECK_THROWS_WITH_AS(bad(R"({"type":"kiln.char_tokenizer","version":1,"bytes":[20,10]})"),
                       doctest::Contains("strictly increasing"), kiln::error);
  CHECK_THROWS_WITH_AS(bad(R"({"type":"kiln.char_tokenizer","version":1,"bytes":[1],"special_tokens":[3]})"),
                       doctest::Contains("field \"special_tokens\"[0]: expected a string"), kiln::error);
  CHECK_THROWS_WITH_AS(bad(R"({"type":"kiln.char_tokenizer",)"), doctest::Contains("chars.json: invalid JSON at byte"),
                       kiln::error);
  fs::remove_all(dir);
}

TEST_CASE("bpe train: known merges on a small corpus, deterministic tie-break") {
  // Words: "hug" x1, " hug" x2, " pug" x2, " bun" x1. Pair counts: u g 5 -> "ug"; h ug 3 ->
  // "hug"; then Ġ hug, Ġ p, p ug all 2: p ug wins (left id 'p' < 'Ġ'); then Ġ hug and Ġ pug
  // (2 each: right id "hug" < "pug"). Every other pair is seen once < min_frequency.
  bpe_train_options o;
  o.vocab_size = 1000;
  o.min_frequency = 2;
  const auto t = train_bpe("hug hug hug pug pug bun", o);
  REQUIRE(t.num_merges() == 5);
  std::vector<std::string> got;
  for (std::size_t k = 0; k < t.num_merges(); ++k) {
    auto [a, b] = t.merge(k);
    got.push_back(t.token_bytes(a) + "+" + t.token_bytes(b));
    CHECK(t.token_bytes(256 + static_cast<std::int32_t>(k)) == t.token_bytes(a) + t.token_bytes(b));
  }
  CHECK(got == std::vector<std::string>{"u+g", "h+ug", "p+ug", " +hug", " +pug"});
  CHECK(t.vocab_size() == 261);
  CHECK(t.encode(" hug pug bun") == std::vector<std::int32_t>{259, 260, t.token_to_id(" "), t.token_to_id("b"),
                                                              t.token_to_id("u"), t.token_to_id("n")});
  CHECK(t.token_to_id("!") == 0);  // ids 0..255: bytes in alphabet order

  // min_frequency 1 keeps merging; vocab_size caps the merges; specials come last.
  o.min_frequency = 1;
  o.vocab_size = 256 + 7 + 1;
  o.special_tokens = {"<|endoftext|>"};
  const auto u = train_bpe("hug hug hug pug pug bun", o);
  CHECK(u.num_merges() == 7);
  CHECK(u.vocab_size() == 264);
  CHECK(u.token_to_id("<|endoftext|>") == 263);
  CHECK(u.is_special(263));
  // The same input gives the same tokenizer.
  CHECK(train_bpe("hug hug hug pug pug bun", o).to_json().dump() == u.to_json().dump());

  CHECK_THROWS_WITH_AS(train_bpe("x", bpe_train_options{200, 2, {}, false}),
                       doctest::Contains("vocab_size 200 is smaller than the 256 byte tokens"), kiln::error);
}

TEST_CASE("bpe: add_merge extends a tokenizer by hand, as train_bpe does") {
  bpe_tokenizer t;
  const std::int32_t h = t.token_to_id("h"), u = t.token_to_id("u"), g = t.token_to_id("g");
  CHECK(t.encode("hug") == std::vector<std::int32_t>{h, u, g});
  const std::int32_t ug = t.add_merge(u, g);
  CHECK(ug == 256);
  CHECK(t.token_bytes(ug) == "ug");
  CHECK(t.encode("hug") == std::vector<std::int32_t>{h, ug});  // the cached word was forgotten
  const std::int32_t hug = t.add_merge(h, ug);
  CHECK(t.encode("hug") == std::vector<std::int32_t>{hug});
  // A second way to spell "hug" keeps its one token.
  const std::int32_t hu = t.add_merge(h, u);
  CHECK(hu == 258);
  CHECK(t.add_merge(hu, g) == hug);
  CHECK(t.num_merges() == 4);
  CHECK(t.vocab_size() == 259);
  CHECK_THROWS_WITH_AS(t.add_merge(-1, g), doctest::Contains("id -1 is not a token of the model's vocabulary"),
                       kiln::error);
  t.set_add_prefix_space(true);
  CHECK(t.encode("hug") == t.encode(" hug"));
}

TEST_CASE("bpe: round trips on ASCII, UTF-8, invalid UTF-8 and random bytes; special tokens never split") {
  bpe_train_options o;
  o.vocab_size = 400;
  o.special_tokens = {"<|endoftext|>", "<|pad|>"};
  std::string corpus;
  for (int k = 0; k < 20; ++k) corpus += small_corpus;
  corpus += "<|endoftext|>";
  const auto t = train_bpe(corpus, o);
  // Each word of the corpus ends up one token before 400 is reached: training stops early.
  CHECK(t.vocab_size() < 400);
  CHECK(t.num_merges() == static_cast<std::size_t>(t.vocab_size() - 256 - 2));
  CHECK(t.encode(" quick") == std::vector<std::int32_t>{t.token_to_id(" quick")});
  const std::int32_t eot = t.token_to_id("<|endoftext|>"), pad = t.token_to_id("<|pad|>");
  CHECK(eot == t.vocab_size() - 2);
  CHECK(pad == t.vocab_size() - 1);
  for (auto& s : tricky_strings()) {
    CAPTURE(s);
    CHECK(t.decode(t.encode(s)) == s);
    CHECK(t.decode(t.encode_ordinary(s)) == s);
  }
  for (auto& s : random_strings(500, 17, 100)) CHECK(t.decode(t.encode(s)) == s);
  // Merges shorten what they were trained on.
  CHECK(t.encode(small_corpus).size() * 2 < std::string_view(small_corpus).size());

  const auto ids = t.encode("dog<|endoftext|><|pad|>fox");
  CHECK(std::count(ids.begin(), ids.end(), eot) == 1);
  CHECK(std::count(ids.begin(), ids.end(), pad) == 1);
  CHECK(t.decode(ids, true) == "dogfox");
  const auto plain = t.encode_ordinary("<|endoftext|>");
  CHECK(plain.size() > 1);
  CHECK(std::count(plain.begin(), plain.end(), eot) == 0);
  const std::vector<std::int32_t> bad{1, t.vocab_size()};
  const std::string msg = "id " + std::to_string(t.vocab_size()) + " at position 1 is not in the vocabulary";
  CHECK_THROWS_WITH_AS(t.decode(bad), doctest::Contains(msg.c_str()), kiln::error);

  // Encoding from several threads gives the same ids (the word cache is shared).
  std::vector<std::int32_t> a, b;
  std::thread th1([&] {
    for (int k = 0; k < 50; ++k) a = t.encode(corpus);
  });
  std::thread th2([&] {
    for (int k = 0; k < 50; ++k) b = t.encode(corpus);
  });
  th1.join();
  th2.join();
  CHECK(a == b);
  CHECK(a == bpe_tokenizer(t).encode(corpus));
}

TEST_CASE("bpe: tokenizer.json save -> load keeps the tokenizer, in both merge spellings") {
  bpe_train_options o;
  o.vocab_size = 360;
  o.special_tokens = {"<|endoftext|>"};
  const auto t = train_bpe(small_corpus, o);
  const auto dir = temp_dir("bpe_json");
  for (auto sp : {merges_spelling::strings, merges_spelling::pairs}) {
    t.save(dir / "tokenizer.json", sp);
    const auto u = bpe_tokenizer::load(dir / "tokenizer.json");
    CHECK(u.vocab_size() == t.vocab_size());
    CHECK(u.num_merges() == t.num_merges());
    for (std::size_t k = 0; k < t.num_merges(); ++k) CHECK(u.merge(k) == t.merge(k));
    CHECK(u.to_json().dump() == t.to_json().dump());
    for (auto& s : tricky_strings()) CHECK(u.encode(s) == t.encode(s));
    const io::json j = io::json::parse(text::detail::read_whole_file(dir / "tokenizer.json"));
    CHECK(j.at("model").at("merges").as_array()[0].is_string() == (sp == merges_spelling::strings));
  }
  // A prefix-space tokenizer keeps its setting.
  o.add_prefix_space = true;
  const auto p = train_bpe(small_corpus, o);
  p.save(dir / "prefix.json");
  const auto q = bpe_tokenizer::load(dir / "prefix.json");
  CHECK(q.add_prefix_space());
  CHECK(q.encode("dog") == p.encode("dog"));
  CHECK(q.encode("dog") == q.encode(" dog"));
  fs::remove_all(dir);
}

TEST_CASE("bpe: ids identical to the tokenizers package on committed fixtures") {
  const fs::path dir = data_dir() / "tokenizers";
  const io::json expected = io::json::parse(text::detail::read_whole_file(dir / "hf_bpe_small_expected.json"));
  int checked = 0;
  for (auto& [name, cases] : expected.at("files").as_object()) {
    CAPTURE(name);
    const auto t = bpe_tokenizer::load(dir / name);
    for (auto& c : cases.as_array()) {
      const std::string& s = c.at("text").as_string();
      CAPTURE(s);
      std::vector<std::int32_t> want;
      for (auto& v : c.at("ids").as_array()) want.push_back(static_cast<std::int32_t>(v.as_int()));
      CHECK(t.encode(s) == want);
      ++checked;
      if (!t.add_prefix_space()) CHECK(t.decode(want) == s);
    }
    // Our save of their tokenizer loads back to the same thing.
    const auto dirw = temp_dir("hf_resave");
    t.save(dirw / "t.json");
    CHECK(bpe_tokenizer::load(dirw / "t.json").to_json().dump() == t.to_json().dump());
    fs::remove_all(dirw);
  }
  CHECK(checked >= 14);
}

TEST_CASE("bpe: unsupported or broken tokenizer.json files are refused, naming file and field") {
  const std::string base = text::detail::read_whole_file(data_dir() / "tokenizers" / "hf_bpe_small.json");
  const auto with = [&](const std::string& from, const std::string& to) {
    std::string s = base;
    const auto at = s.find(from);
    REQUIRE(at != std::string::npos);
    s.replace(at, from.size(), to);
    return s;
  };
  const auto refused = [](const std::string& json, const std::string& msg) {
    CAPTURE(msg);
    CHECK_THROWS_WITH_AS(bpe_tokenizer::from_json(json, "my/tokenizer.json"), doctest::Contains(msg.c_str()),
                         kiln::error);
  };
  refused(with("\"type\": \"BPE\"", "\"type\": \"WordPiece\""),
          "my/tokenizer.json: field \"model.type\": expected \"BPE\" (kiln reads byte-level BPE models only), got the "
          "string \"WordPiece\"");
  refused(with("\"normalizer\": null", "\"normalizer\": {\"type\": \"NFC\"}"),
          "my/tokenizer.json: field \"normalizer\": expected null (kiln applies no normalizer");
  refused(with("\"byte_fallback\": false", "\"byte_fallback\": true"), "field \"model.byte_fallback\": expected false");
  refused(with("\"dropout\": null", "\"dropout\": 0.1"), "field \"model.dropout\": expected null");
  refused(with("\"end_of_word_suffix\": null", "\"end_of_word_suffix\": \"</w>\""),
          "field \"model.end_of_word_suffix\": expected null");
  refused(with("\"post_processor\": null", "\"post_processor\": {\"type\": \"TemplateProcessing\"}"),
          "field \"post_processor.type\": expected null or \"ByteLevel\"");
  refused(with("\"truncation\": null", "\"truncation\": {\"max_length\": 5}"), "field \"truncation\": expected null");
  refused(with("\"type\": \"ByteLevel\",\n    \"add_prefix_space\": false,\n    \"trim_offsets\": true,\n    "
               "\"use_regex\": true\n  },\n  \"post",
               "\"type\": \"Whitespace\"},\n  \"post"),
          "field \"pre_tokenizer.type\": expected \"ByteLevel\"");
  refused(with("\"pre_tokenizer\": {",
               "\"pre_tokenizer\": {\"type\": \"Sequence\", \"pretokenizers\": [{\"type\": "
               "\"Digits\"}]}, \"unused\": {"),
          "field \"pre_tokenizer.pretokenizers[0].type\": expected \"ByteLevel\"");
  refused(with("\"decoder\": {\n    \"type\": \"ByteLevel\"", "\"decoder\": {\n    \"type\": \"WordPiece\""),
          "field \"decoder.type\": expected null or \"ByteLevel\"");
  refused(with("\"lstrip\": false", "\"lstrip\": true"), "field \"added_tokens[0].lstrip\": expected false");
  refused(with("\"id\": 0,", "\"id\": \"zero\","), "field \"added_tokens[0].id\": expected an integer id");
  refused(with("\"!\": 1,", "\"!\": 2,"), "expected an id no other token has (id 2 is also \"!\")");
  refused(with("\"!\": 1,", "\"!\": -1,"), "field \"model.vocab[\"!\"]\": expected an integer id in [0, ");
  refused(with("\"!\": 1,", "\"!\": 99999999,"), "(ids must be dense)");
  refused(with("\"merges\": [\n      [\n        \"n\",\n        \"d\"\n      ]",
               "\"merges\": [\n      [\n        \"n\",\n        \"Q\\u00e9\"\n      ]"),
          "field \"model.merges[0]\": expected tokens of model.vocab (\"Qé\" is not one)");
  refused(with("\"merges\": [\n      [\n        \"n\",\n        \"d\"\n      ]", "\"merges\": [\"n d x\""),
          "field \"model.merges[0]\": expected \"a b\": two tokens separated by one space");
  refused(with("\"merges\": [\n      [\n        \"n\",\n        \"d\"\n      ]", "\"merges\": [\"n q\""),
          "field \"model.merges[0] (the merged token)\": expected tokens of model.vocab (\"nq\" is not one)");
  refused(with("\"merges\": [", "\"merges\": [7, "), "field \"model.merges[0]\": expected \"a b\" or [\"a\", \"b\"]");
  refused(with("\"model\": {", "\"model\": 3, \"unused\": {"), "field \"model\": expected an object");
  refused(with("\"vocab\": {", "\"vocab\": [], \"unused\": {"), "field \"model.vocab\": expected an object");
  refused(with("\"unk_token\": null", "\"unk_token\": \"<unk>\""),
          "field \"model.unk_token\": expected null or a token");
  refused(base.substr(0, 200), "my/tokenizer.json: invalid JSON at byte 200");
  refused("[1, 2]", "field \"(top level)\": expected a JSON object");
  CHECK_THROWS_WITH_AS(bpe_tokenizer::load("/nonexistent/tokenizer.json"),
                       doctest::Contains("cannot open /nonexistent/tokenizer.json"), kiln::error);
  // A hand-made vocabulary without some bytes: encode names the byte, unless an unk_token takes it.
  const std::string tiny =
      R"({"version":"1.0","added_tokens":[],"normalizer":null,"pre_tokenizer":{"type":"ByteLevel",)"
      R"("add_prefix_space":false,"trim_offsets":true,"use_regex":true},"post_processor":null,)"
      R"("decoder":{"type":"ByteLevel"},"model":{"type":"BPE","vocab":{"a":0,"b":1,"ab":2,"<unk>":3},)"
      R"("unk_token":UNK,"fuse_unk":FUSE,"merges":["a b"]}})";
  const auto make = [&](const char* unk, const char* fuse) {
    std::string s = tiny;
    s.replace(s.find("UNK"), 3, unk);
    s.replace(s.find("FUSE"), 4, fuse);
    return bpe_tokenizer::from_json(s, "tiny.json");
  };
  using ids = std::vector<std::int32_t>;
  CHECK(make("null", "false").encode("abab") == ids{2, 2});
  CHECK_THROWS_WITH_AS(make("null", "false").encode("abc"),
                       doctest::Contains("byte 0x63 ('c') at offset 2 has no token in this vocabulary"), kiln::error);
  CHECK(make("\"<unk>\"", "false").encode("abcc") == ids{2, 3, 3});
  CHECK(make("\"<unk>\"", "true").encode("abcc") == ids{2, 3});
}

}  // namespace test_tokenizers
