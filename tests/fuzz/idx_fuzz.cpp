// libFuzzer target for the IDX parser: any byte string must either parse into a tensor
// whose size matches its header or throw kiln::error — never crash, hang or overread.
#include <cstddef>
#include <cstdint>

#include "kiln/data/idx.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    auto t = kiln::data::detail::parse_idx(data, size, "fuzz-input");
    if (static_cast<std::size_t>(t.numel()) + 4 + 4 * static_cast<std::size_t>(t.rank()) != size) __builtin_trap();
  } catch (const kiln::error&) {
  }
  return 0;
}
