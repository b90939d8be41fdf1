// kiln/data/fashion_mnist.hpp — Fashion-MNIST as a tensor_dataset.
//
// Spec: fashion_mnist(dir, "train" | "test") reads the gzip IDX files Debian's
// dataset-fashion-mnist package installs (train-images-idx3-ubyte.gz and
// train-labels-idx1-ubyte.gz; t10k-* for test), and returns images as f32 in [0, 1]
// flattened to [N, 784] with labels as i64 [N]. Shapes and the label range 0..9 are
// checked, naming the file.
#pragma once

#include <string>
#include <string_view>

#include "kiln/data/dataset.hpp"
#include "kiln/data/idx.hpp"

namespace kiln::data {

inline constexpr const char* fashion_mnist_default_dir = "/usr/share/datasets/fashion-mnist";

inline tensor_dataset fashion_mnist(const std::string& dir, std::string_view split) {
  KILN_CHECK(split == "train" || split == "test", "fashion_mnist: split '", split, "' is not 'train' or 'test'");
  const std::string prefix = dir + "/" + (split == "train" ? "train" : "t10k");
  const std::string image_file = prefix + "-images-idx3-ubyte.gz", label_file = prefix + "-labels-idx1-ubyte.gz";
  const auto images = read_idx(image_file);
  const auto labels = read_idx(label_file);
  KILN_CHECK(images.rank() == 3 && images.size(1) == 28 && images.size(2) == 28, image_file,
             ": expected images of shape [N, 28, 28], got ", images.shape().str());
  KILN_CHECK(labels.rank() == 1 && labels.size(0) == images.size(0), label_file, ": expected ", images.size(0),
             " labels (one per image in ", image_file, "), got shape ", labels.shape().str());
  const std::int64_t n = images.size(0);
  tensor<float> x({n, 784});
  tensor<i64> y({n});
  const auto* ip = images.data();
  float* xp = x.data();
  for (std::int64_t i = 0; i < n * 784; ++i) xp[i] = static_cast<float>(ip[i]) * (1.0f / 255.0f);
  for (std::int64_t i = 0; i < n; ++i) {
    const int v = labels.data()[i];
    KILN_CHECK(v <= 9, label_file, ": label ", v, " at index ", i, " is outside 0..9");
    y.data()[i] = v;
  }
  return {x, y};
}

}  // namespace kiln::data
