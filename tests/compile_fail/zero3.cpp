// Must not compile: ZeRO stage 3 (sharded parameters) is not implemented; the message says so.
#include "kiln/strategy/zero.hpp"

int main() {
  kiln::strategy::zero<3, kiln::comm::local> z;
  (void)z;
}
