// Writes a known event file into argv[1] for the check that TensorBoard's own reader
// (the `tensorboard` Python package) reads what kiln writes.
#include <cstdio>

#include "kiln/loggers/tensorboard_events.hpp"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: tb_write_fixture DIR\n");
    return 2;
  }
  kiln::loggers::event_writer w(argv[1]);
  for (int s = 0; s < 10; ++s) w.add_scalar("train/loss", 1.0 / (s + 1), s);
  w.add_scalar("val/acc", 0.875, 9);
  w.add_text("hparams", "| lr | 0.001 |", 0);
  w.flush();
  std::printf("%s\n", w.path().c_str());
  return 0;
}
