#include "../helpers.hpp"
TEST_CASE("todo optim/test_optim") { CHECK(1 == 1); }
