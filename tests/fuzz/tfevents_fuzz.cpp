// libFuzzer target for the TensorBoard event-file parser: any input must parse or throw
// kiln::error, never crash, read out of bounds or hang.
#include <cstddef>
#include <cstdint>

#include "kiln/loggers/tensorboard_events.hpp"

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  try {
    kiln::loggers::parse_events(data, size, "fuzz");
  } catch (const kiln::error&) {
  }
  return 0;
}
