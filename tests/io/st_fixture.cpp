// Interop fixture for tests/io/st_python_check.sh.
//   st_fixture write PATH   writes tensors of every dtype kiln has, with metadata
//   st_fixture read PATH    reads every tensor of PATH and prints "name dtype [shape] sum"
//                           (sorted by name), the sum taken in double
#include <cstdio>
#include <string>

#include "kiln/io/safetensors.hpp"

using namespace kiln;

namespace {
template <class T>
double sum_of(const io::safetensors_view& f, const std::string& name) {
  double s = 0;
  for (auto v : f.view<T>(name)) s += static_cast<double>(v);
  return s;
}
}  // namespace

int main(int argc, char** argv) try {
  if (argc != 3) {
    std::fprintf(stderr, "usage: st_fixture write|read PATH\n");
    return 2;
  }
  const std::string mode = argv[1], path = argv[2];
  if (mode == "write") {
    io::safetensors_writer w;
    w.add("f32", tensor<f32>::from({2, 3}, {0.5f, -1.25f, 3.0f, 1e-3f, 7.0f, -0.0f}));
    w.add("f64", tensor<f64>::from({4}, {1.0 / 3.0, -2.5, 1e100, 0.0}));
    w.add("bf16", tensor<bf16>::from({3}, {bf16(1.5f), bf16(-2.0f), bf16(0.25f)}));
    w.add("f16", tensor<f16>::from({2, 2}, {f16(0.5f), f16(1.0f), f16(-3.0f), f16(65504.0f)}));
    w.add("i64", tensor<i64>::from({3}, {-1, 2, 1LL << 50}));
    w.add("i32", tensor<i32>::from({2}, {7, -9}));
    w.add("u8", tensor<u8>::from({5}, {0, 1, 2, 254, 255}));
    w.add("nested.name.weight", tensor<f32>::zeros({1, 1, 1}));
    w.add("empty", tensor<f32>::zeros({0, 4}));
    w.set_metadata("format", "pt");
    w.set_metadata("writer", "kiln");
    w.write(path);
    return 0;
  }
  auto f = io::safetensors_file::open(path);
  std::vector<const io::tensor_entry*> es;
  for (auto& e : f.tensors()) es.push_back(&e);
  std::sort(es.begin(), es.end(), [](auto* a, auto* b) { return a->name < b->name; });
  for (auto* e : es) {
    double s = 0;
    if (e->dtype == "F32")
      s = sum_of<f32>(f, e->name);
    else if (e->dtype == "F64")
      s = sum_of<f64>(f, e->name);
    else if (e->dtype == "F16")
      s = sum_of<f16>(f, e->name);
    else if (e->dtype == "BF16")
      s = sum_of<bf16>(f, e->name);
    else if (e->dtype == "I64")
      s = sum_of<i64>(f, e->name);
    else if (e->dtype == "I32")
      s = sum_of<i32>(f, e->name);
    else if (e->dtype == "U8")
      s = sum_of<u8>(f, e->name);
    std::printf("%s %s %s %.17g\n", e->name.c_str(), e->dtype.c_str(), e->shape_str().c_str(), s);
  }
  for (auto& [k, v] : f.metadata()) std::printf("meta %s=%s\n", k.c_str(), v.c_str());
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
