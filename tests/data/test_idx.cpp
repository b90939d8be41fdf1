#include "../helpers.hpp"
TEST_CASE("todo data/test_idx") { CHECK(1 == 1); }
