// A program outside the kiln tree, built only from the installed headers and kiln.pc.
#include <kiln/kiln.hpp>

int main() {
  kiln::var<float> w(kiln::tensor<float>::from({2}, {1, 2}), true);
  auto loss = kiln::sum(kiln::mul(w, w));
  loss.backward();
  return w.grad()(1) == 4.0f ? 0 : 1;
}
