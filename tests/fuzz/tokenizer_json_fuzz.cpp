// libFuzzer target: tokenizer.json parsing and byte-level BPE encoding.
// 1. The input parsed as a tokenizer.json must load or throw kiln::error — never crash,
//    hang or read out of bounds; a loaded tokenizer then encodes the input and a few fixed
//    strings, decodes them (errors allowed: a hand-made vocabulary may lack bytes) and
//    saves itself.
// 2. The input encoded by a fixed small tokenizer must decode back to exactly the input
//    (any bytes: byte-level BPE round-trips everything); a mismatch aborts.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "kiln/text/bpe.hpp"
#include "kiln/text/bpe_trainer.hpp"

namespace {
const kiln::text::bpe_tokenizer& fixed() {
  static const kiln::text::bpe_tokenizer t = [] {
    kiln::text::bpe_train_options o;
    o.vocab_size = 330;
    o.min_frequency = 1;
    o.special_tokens = {"<|endoftext|>"};
    return kiln::text::train_bpe(
        "the cat sat on the mat; it's 2024 and naïve cafés say 'hello' — 数字\n\n  indented<|endoftext|>", o);
  }();
  return t;
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string_view in(reinterpret_cast<const char*>(data), size);
  std::size_t sum = 0;
  try {
    const auto t = kiln::text::bpe_tokenizer::from_json(in, "fuzz.json");
    for (std::string_view s : {in, std::string_view("hello world <|endoftext|> \xff\xfe")}) {
      try {
        const auto ids = t.encode(s);
        sum += t.decode(ids).size();
      } catch (const kiln::error&) {
      }
    }
    sum += t.to_json().dump().size();
  } catch (const kiln::error&) {
  }
  const auto& f = fixed();
  const auto ids = f.encode(in);
  if (f.decode(ids) != in) std::abort();
  if (f.decode(f.encode_ordinary(in)) != in) std::abort();
  return sum == 0xdeadbeef ? 1 : 0;
}
