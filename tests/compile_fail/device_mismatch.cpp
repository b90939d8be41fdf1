// Must not compile: an op whose operands live on different devices.
#include "kiln/kiln.hpp"
void f(const kiln::var<float, kiln::cpu>& a, const kiln::var<float, kiln::cuda>& b) { kiln::mul(a, b); }
int main() {}
