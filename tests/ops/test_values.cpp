#include "../helpers.hpp"
TEST_CASE("placeholder values") { CHECK(true); }
