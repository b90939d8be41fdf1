// Must not compile: adding f32 and f64 values silently picks a precision.
#include "kiln/kiln.hpp"
int main() {
  kiln::var<float> a(kiln::tensor<float>::zeros({2}));
  kiln::var<double> b(kiln::tensor<double>::zeros({2}));
  kiln::add(a, b);
}
