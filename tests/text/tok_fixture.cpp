// Interop fixture for tests/text/tok_python_check.sh.
//   tok_fixture train CORPUS VOCAB OUT.json   trains a byte-level BPE on the bytes of CORPUS
//                                             (special token <|endoftext|>) and saves it
//                                             (merges as "a b" strings; OUT.json.pairs.json
//                                             with [a, b] pairs)
//   tok_fixture encode TOKENIZER.json TEXTS   TEXTS: one JSON array of strings; prints one
//                                             line per string: its ids, space-separated
#include <cstdio>
#include <string>

#include "kiln/text/bpe.hpp"
#include "kiln/text/bpe_trainer.hpp"

using namespace kiln;

int main(int argc, char** argv) try {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "train" && argc == 5) {
    const std::string corpus = text::detail::read_whole_file(argv[2]);
    text::bpe_train_options o;
    o.vocab_size = std::stoi(argv[3]);
    o.special_tokens = {"<|endoftext|>"};
    const auto t = text::train_bpe(corpus, o);
    t.save(argv[4]);
    t.save(std::string(argv[4]) + ".pairs.json", text::merges_spelling::pairs);
    return 0;
  }
  if (mode == "encode" && argc == 4) {
    const auto t = text::bpe_tokenizer::load(argv[2]);
    const io::json texts = io::json::parse(text::detail::read_whole_file(argv[3]), argv[3]);
    for (auto& s : texts.as_array()) {
      std::string line;
      for (auto id : t.encode(s.as_string())) line += (line.empty() ? "" : " ") + std::to_string(id);
      std::printf("%s\n", line.c_str());
    }
    return 0;
  }
  std::fprintf(stderr, "usage: tok_fixture train CORPUS VOCAB OUT.json | encode TOKENIZER.json TEXTS.json\n");
  return 2;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
