// kiln/data/dataset.hpp — what a dataset is, the in-memory tensor dataset, subsets and
// random splits.
//
// Spec: a *dataset* (concept data::dataset) has size() and get(i) for 0 <= i < size(),
// returning one sample; random access, no iteration state. A dataset may also offer
// get_batch(indices) (concept data::batch_fetch) that builds a whole batch at once —
// for in-memory tensors a gather of rows, far cheaper than per-sample get + collate.
// tensor_dataset holds x [N, ...] (f32) and y [N] (i64) and yields labelled_batch.
// subset<D> views a dataset through an index list; random_split cuts a dataset into
// disjoint subsets by lengths or fractions (PyTorch's semantics) with a permutation that
// is a pure function of the seed.
// Ensures: out-of-range indices and inconsistent shapes are errors naming the dataset,
// the index and the size.
#pragma once

#include <cmath>
#include <concepts>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <span>
#include <utility>
#include <vector>

#include "kiln/core/error.hpp"
#include "kiln/core/philox.hpp"
#include "kiln/core/tensor.hpp"

namespace kiln::data {

template <class D>
concept dataset = requires(const D& d, std::int64_t i) {
  { d.size() } -> std::convertible_to<std::int64_t>;
  d.get(i);
};

template <dataset D>
using sample_t = std::remove_cvref_t<decltype(std::declval<const D&>().get(std::int64_t{}))>;

template <class D>
concept batch_fetch = dataset<D> && requires(const D& d, std::span<const std::int64_t> idx) {
  d.get_batch(idx);
};

// Batches a loader holds at once: the one in use plus what its workers build ahead
// (num_workers · prefetch_factor of its options(), where it has them). The memory plan
// counts batches by it.
template <class L>
std::int64_t resident_batches(const L& l) {
  if constexpr (requires { l.options().num_workers* l.options().prefetch_factor; })
    return 1 + static_cast<std::int64_t>(l.options().num_workers) * l.options().prefetch_factor;
  else
    return 1;
}

// A batch of inputs and class labels.
struct labelled_batch {
  tensor<float> x;  // [B, ...]
  tensor<i64> y;    // [B]
  std::int64_t size() const { return y.numel(); }
};
struct labelled_sample {
  tensor<float> x;  // one row
  i64 y = 0;
};

// Stacks labelled samples into a batch. Other sample types need their own collate: any
// callable std::vector<Sample> -> Batch.
struct default_collate {
  labelled_batch operator()(const std::vector<labelled_sample>& s) const {
    KILN_CHECK(!s.empty(), "default_collate: empty batch");
    shape row = s[0].x.shape();
    shape bs{static_cast<std::int64_t>(s.size())};
    for (auto d : row) bs.push_back(d);
    labelled_batch b{tensor<float>(bs), tensor<i64>({static_cast<std::int64_t>(s.size())})};
    const std::int64_t n = s[0].x.numel();
    for (std::size_t i = 0; i < s.size(); ++i) {
      KILN_CHECK(s[i].x.shape() == row, "default_collate: sample ", i, " has shape ", s[i].x.shape().str(),
                 ", sample 0 has ", row.str());
      const auto xi = s[i].x.contiguous();
      std::memcpy(b.x.data() + static_cast<std::int64_t>(i) * n, xi.data(), static_cast<std::size_t>(n) * 4);
      b.y.data()[i] = s[i].y;
    }
    return b;
  }
};

// Inputs and labels held in memory. Copies are cheap (tensors are shared handles).
class tensor_dataset {
 public:
  tensor_dataset() = default;
  tensor_dataset(tensor<float> x, tensor<i64> y) : x_(x.contiguous()), y_(y.contiguous()) {
    KILN_CHECK(x_.rank() >= 1 && y_.rank() == 1 && x_.size(0) == y_.size(0),
               "tensor_dataset: x must be [N, ...] and y [N]; got x ", x_.shape().str(), " and y ", y_.shape().str());
    row_ = x_.size(0) ? x_.numel() / x_.size(0) : 0;
  }
  std::int64_t size() const { return y_.numel(); }
  const tensor<float>& x() const { return x_; }
  const tensor<i64>& y() const { return y_; }

  labelled_sample get(std::int64_t i) const {
    check(i);
    shape row_shape;
    for (int d = 1; d < x_.rank(); ++d) row_shape.push_back(x_.size(d));
    labelled_sample s{tensor<float>(row_shape), y_.data()[i]};
    std::memcpy(s.x.data(), x_.data() + i * row_, static_cast<std::size_t>(row_) * sizeof(float));
    return s;
  }
  labelled_batch get_batch(std::span<const std::int64_t> idx) const {
    shape bs = x_.shape();
    bs[0] = static_cast<std::int64_t>(idx.size());
    labelled_batch b{tensor<float>(bs), tensor<i64>({static_cast<std::int64_t>(idx.size())})};
    float* out = b.x.data();
    i64* yo = b.y.data();
    const std::size_t bytes = static_cast<std::size_t>(row_) * sizeof(float);
    for (std::size_t k = 0; k < idx.size(); ++k) {
      const std::int64_t i = idx[k];
      check(i);
      std::memcpy(out + static_cast<std::int64_t>(k) * row_, x_.data() + i * row_, bytes);
      yo[k] = y_.data()[i];
    }
    return b;
  }

 private:
  void check(std::int64_t i) const {
    KILN_CHECK(i >= 0 && i < size(), "tensor_dataset: index ", i, " is out of range for a dataset of ", size(),
               " samples");
  }
  tensor<float> x_;
  tensor<i64> y_;
  std::int64_t row_ = 0;
};

// A dataset seen through a list of indices into a base dataset (held by value: datasets
// are cheap handles).
template <dataset D>
class subset {
 public:
  subset(D base, std::vector<std::int64_t> indices) : base_(std::move(base)), idx_(std::move(indices)) {
    const std::int64_t n = base_.size();
    for (auto i : idx_) KILN_CHECK(i >= 0 && i < n, "subset: index ", i, " is out of range for a dataset of ", n);
  }
  std::int64_t size() const { return static_cast<std::int64_t>(idx_.size()); }
  auto get(std::int64_t i) const {
    KILN_CHECK(i >= 0 && i < size(), "subset: index ", i, " is out of range for a subset of ", size());
    return base_.get(idx_[static_cast<std::size_t>(i)]);
  }
  auto get_batch(std::span<const std::int64_t> idx) const requires batch_fetch<D> {
    std::vector<std::int64_t> mapped(idx.size());
    for (std::size_t k = 0; k < idx.size(); ++k) {
      KILN_CHECK(idx[k] >= 0 && idx[k] < size(), "subset: index ", idx[k], " is out of range for a subset of ", size());
      mapped[k] = idx_[static_cast<std::size_t>(idx[k])];
    }
    return base_.get_batch(mapped);
  }
  const std::vector<std::int64_t>& indices() const { return idx_; }
  const D& base() const { return base_; }

 private:
  D base_;
  std::vector<std::int64_t> idx_;
};

// A uniformly random permutation of 0..n-1, a pure function of (seed, stream).
inline std::vector<std::int64_t> permutation(std::int64_t n, std::uint64_t seed, std::uint64_t stream = 0) {
  std::vector<std::int64_t> p(static_cast<std::size_t>(n));
  std::iota(p.begin(), p.end(), 0);
  if (n < 2) return p;
  // Fisher-Yates driven by a counter-based stream: draw i picks from [0, i].
  const philox_stream st{seed ^ 0x9E3779B97F4A7C15ULL, stream << 32};
  for (std::int64_t i = n - 1; i > 0; --i) {
    const std::uint64_t r = st.bits(static_cast<std::uint64_t>(i));
    std::swap(p[static_cast<std::size_t>(i)], p[static_cast<std::size_t>(r % static_cast<std::uint64_t>(i + 1))]);
  }
  return p;
}

// Splits `d` into disjoint subsets of the given lengths (which must sum to d.size()).
template <dataset D>
std::vector<subset<D>> random_split(const D& d, const std::vector<std::int64_t>& lengths, std::uint64_t seed) {
  std::int64_t total = 0;
  for (auto l : lengths) {
    KILN_CHECK(l >= 0, "random_split: negative length ", l);
    total += l;
  }
  KILN_CHECK(total == d.size(), "random_split: lengths sum to ", total, " but the dataset has ", d.size(), " samples");
  const auto p = permutation(d.size(), seed, 0x5B117);
  std::vector<subset<D>> out;
  std::int64_t at = 0;
  for (auto l : lengths) {
    out.emplace_back(d, std::vector<std::int64_t>(p.begin() + at, p.begin() + at + l));
    at += l;
  }
  return out;
}

// Fractions (summing to 1): floor(f·n) each, the remainder handed out one by one from the
// first split on (PyTorch's rule).
template <dataset D>
std::vector<subset<D>> random_split(const D& d, const std::vector<double>& fractions, std::uint64_t seed) {
  double sum = 0;
  for (double f : fractions) {
    KILN_CHECK(f >= 0 && f <= 1, "random_split: fraction ", f, " is outside [0, 1]");
    sum += f;
  }
  KILN_CHECK(std::abs(sum - 1.0) < 1e-9, "random_split: fractions sum to ", sum, ", expected 1");
  const std::int64_t n = d.size();
  std::vector<std::int64_t> lengths;
  std::int64_t used = 0;
  for (double f : fractions) {
    lengths.push_back(static_cast<std::int64_t>(std::floor(f * static_cast<double>(n))));
    used += lengths.back();
  }
  for (std::size_t i = 0; used < n; i = (i + 1) % lengths.size(), ++used) ++lengths[i];
  return random_split(d, lengths, seed);
}

}  // namespace kiln::data
