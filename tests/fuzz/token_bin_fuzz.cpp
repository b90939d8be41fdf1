// libFuzzer target: the llm.c token .bin reader must accept the bytes or throw kiln::error —
// never crash or read out of bounds. Accepted files are read through every token, and the
// vocabulary check must agree with a plain scan.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <span>

#include "kiln/data/token_bin.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::span<const std::byte> bytes(reinterpret_cast<const std::byte*>(data), size);
  std::uint64_t sum = 0;
  try {
    const auto v = kiln::data::token_bin_view::parse(bytes, "fuzz.bin");
    std::uint32_t max = 0;
    for (std::int64_t i = 0; i < v.size(); ++i) {
      const std::uint32_t t = v.at(i);
      sum += t;
      if (t > max) max = t;
    }
    if (v.size() > 0) {
      // A vocabulary of max+1 tokens accepts the file; one of max tokens refuses it.
      (void)kiln::data::token_bin_view::parse(bytes, "fuzz.bin", std::int64_t{max} + 1);
      bool refused = false;
      try {
        (void)kiln::data::token_bin_view::parse(bytes, "fuzz.bin", std::int64_t{max});
      } catch (const kiln::error&) {
        refused = true;
      }
      if (!refused) std::abort();
    }
  } catch (const kiln::error&) {
  }
  return sum == 0xdeadbeefULL ? 1 : 0;
}
