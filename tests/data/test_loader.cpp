// Datasets, samplers, random_split and the data loader (workers, order, resume, errors).
#include <filesystem>
#include <set>

#include "../helpers.hpp"
#include "../skip.hpp"
#include "kiln/data/data_loader.hpp"
#include "kiln/data/fashion_mnist.hpp"
#include "kiln/data/on_device.hpp"

namespace test_loader {

using namespace kiln;
using namespace kiln::data;

namespace {
// x row i = [i, i + 0.5], y = i.
tensor_dataset numbered(std::int64_t n) {
  tensor<float> x({n, 2});
  tensor<i64> y({n});
  for (std::int64_t i = 0; i < n; ++i) {
    x(i, 0) = float(i);
    x(i, 1) = float(i) + 0.5f;
    y.data()[i] = i;
  }
  return {x, y};
}
std::vector<std::vector<i64>> labels_of(data_loader<tensor_dataset>& l, std::int64_t epoch, std::int64_t first = 0) {
  std::vector<std::vector<i64>> out;
  for (auto&& b : l.epoch(epoch, first)) {
    out.emplace_back(b.y.data(), b.y.data() + b.size());
    for (std::int64_t i = 0; i < b.size(); ++i) REQUIRE(b.x(i, 1) == float(b.y.data()[i]) + 0.5f);
  }
  return out;
}

// A dataset without get_batch: batches go through the collate.
struct squares {
  std::int64_t size() const { return 10; }
  labelled_sample get(std::int64_t i) const {
    KILN_CHECK(i != 7, "squares: sample 7 is cursed");
    labelled_sample s{tensor<float>({1}), i};
    s.x.data()[0] = float(i * i);
    return s;
  }
};
}  // namespace

TEST_CASE("samplers: permutations are functions of (seed, epoch)") {
  random_sampler a{100, 5}, b{100, 5}, c{100, 6};
  CHECK(a.indices(0) == b.indices(0));
  CHECK(a.indices(0) != a.indices(1));
  CHECK(a.indices(0) != c.indices(0));
  auto p = a.indices(3);
  std::sort(p.begin(), p.end());
  CHECK(p == sequential_sampler{100}.indices(0));
}

TEST_CASE("distributed_sampler: disjoint shards that cover every index, padded or dropped") {
  for (int world = 1; world <= 4; ++world)
    for (std::int64_t n : {10, 11, 13}) {
      std::multiset<std::int64_t> all;
      for (int r = 0; r < world; ++r) {
        distributed_sampler s(n, r, world, true, 3, false);
        auto idx = s.indices(2);
        CHECK(static_cast<std::int64_t>(idx.size()) == (n + world - 1) / world);
        all.insert(idx.begin(), idx.end());
      }
      CHECK(static_cast<std::int64_t>(all.size()) == ((n + world - 1) / world) * world);
      for (std::int64_t i = 0; i < n; ++i) CHECK(all.count(i) >= 1);
      // Padding repeats at most world - 1 indices.
      std::int64_t repeats = 0;
      for (std::int64_t i = 0; i < n; ++i) repeats += all.count(i) - 1;
      CHECK(repeats == static_cast<std::int64_t>(all.size()) - n);
      std::set<std::int64_t> dropped;
      for (int r = 0; r < world; ++r)
        for (auto i : distributed_sampler(n, r, world, true, 3, true).indices(2)) CHECK(dropped.insert(i).second);
      CHECK(static_cast<std::int64_t>(dropped.size()) == (n / world) * world);
    }
  CHECK_THROWS_WITH_AS(distributed_sampler(10, 2, 2), doctest::Contains("rank 2 is outside [0, 2)"), error);
}

TEST_CASE("random_split: lengths, fractions, disjointness, errors") {
  auto ds = numbered(10);
  auto parts = random_split(ds, std::vector<std::int64_t>{7, 3}, 1);
  CHECK(parts[0].size() == 7);
  CHECK(parts[1].size() == 3);
  std::set<std::int64_t> seen;
  for (auto& p : parts)
    for (std::int64_t i = 0; i < p.size(); ++i) CHECK(seen.insert(p.get(i).y).second);
  CHECK(seen.size() == 10);
  CHECK(random_split(ds, std::vector<std::int64_t>{7, 3}, 1)[1].indices() == parts[1].indices());
  auto f = random_split(ds, std::vector<double>{0.25, 0.25, 0.5}, 2);
  CHECK(f[0].size() == 3);  // floor 2.5 = 2 each, remainder 1 goes to the first
  CHECK(f[1].size() == 2);
  CHECK(f[2].size() == 5);
  CHECK_THROWS_WITH_AS(random_split(ds, std::vector<std::int64_t>{5, 4}, 1),
                       doctest::Contains("lengths sum to 9 but the dataset has 10"), error);
  auto b = parts[0].get_batch(std::vector<std::int64_t>{0, 6});
  CHECK(b.y.data()[0] == parts[0].indices()[0]);
}

TEST_CASE("data_loader: batch counts with and without drop_last") {
  data_loader<tensor_dataset> a(numbered(10), {.batch_size = 4});
  CHECK(a.size() == 3);
  auto la = labels_of(a, 0);
  CHECK(la.back().size() == 2);
  data_loader<tensor_dataset> b(numbered(10), {.batch_size = 4, .drop_last = true});
  CHECK(b.size() == 2);
  CHECK(labels_of(b, 0).size() == 2);
}

TEST_CASE("data_loader: the batch sequence does not depend on num_workers; resume mid-epoch") {
  data_loader<tensor_dataset> w0(numbered(103), {.batch_size = 8, .shuffle = true, .seed = 9, .num_workers = 0});
  data_loader<tensor_dataset> w1(numbered(103), {.batch_size = 8, .shuffle = true, .seed = 9, .num_workers = 1});
  data_loader<tensor_dataset> w3(numbered(103),
                                 {.batch_size = 8, .shuffle = true, .seed = 9, .num_workers = 3, .prefetch_factor = 1});
  for (std::int64_t e = 0; e < 3; ++e) {
    const auto ref = labels_of(w0, e);
    CHECK(labels_of(w1, e) == ref);
    CHECK(labels_of(w3, e) == ref);
    const auto tail = labels_of(w3, e, 5);
    CHECK(tail == std::vector<std::vector<i64>>(ref.begin() + 5, ref.end()));
  }
  CHECK(labels_of(w0, 0) != labels_of(w0, 1));
}

TEST_CASE("data_loader: leaving an epoch early cancels its work and the next epoch runs") {
  data_loader<tensor_dataset> l(numbered(1000), {.batch_size = 10, .shuffle = true, .seed = 1, .num_workers = 2});
  const auto full = labels_of(l, 4);
  for (int rep = 0; rep < 200; ++rep) {
    int k = 0;
    for (auto&& b : l.epoch(rep)) {
      (void)b;
      if (++k == 1 + rep % 5) break;
    }
  }
  CHECK(labels_of(l, 4) == full);
}

TEST_CASE("data_loader: collate path and worker errors reach the consumer") {
  data_loader<squares> l(squares{}, {.batch_size = 3, .num_workers = 2});
  auto r = l.epoch(0);
  auto it = r.begin();
  CHECK((*it).x(1, 0) == 1.0f);
  ++it;
  CHECK((*it).x(2, 0) == 25.0f);
  CHECK_THROWS_WITH_AS(++it, doctest::Contains("sample 7 is cursed"), error);
  data_loader<squares> inline_l(squares{}, {.batch_size = 3});
  std::int64_t seen = 0;
  try {
    for (auto&& b : inline_l.epoch(0)) seen += b.size();
  } catch (const error&) {
  }
  CHECK(seen == 6);
}

TEST_CASE("fashion_mnist: a missing directory names the file") {
  CHECK_THROWS_WITH_AS(fashion_mnist("/nonexistent", "train"),
                       doctest::Contains("/nonexistent/train-images-idx3-ubyte.gz"), error);
}

TEST_CASE("fashion_mnist: 60,000 + 10,000 images in [0, 1]" * doctest::test_suite("fashion_mnist")) {
  const std::string dir = fashion_mnist_default_dir;
  if (!std::filesystem::exists(dir + "/train-images-idx3-ubyte.gz"))
    return kiln::test::skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)");
  auto train = fashion_mnist(dir, "train");
  auto test = fashion_mnist(dir, "test");
  CHECK(train.size() == 60000);
  CHECK(test.size() == 10000);
  CHECK(train.x().shape() == shape{60000, 784});
  const auto mm = std::minmax_element(train.x().data(), train.x().data() + train.x().numel());
  CHECK(*mm.first == 0.0f);
  CHECK(*mm.second == 1.0f);
}

// data::on_device on the CPU: the same batches as the inner loader, in order, from any
// first batch, with the one-batch lookahead (the GPU's default) and without; leaving early.
namespace {
template <class L>
std::vector<std::vector<i64>> labels_on(L& l, std::int64_t epoch, std::int64_t first = 0) {
  std::vector<std::vector<i64>> out;
  for (auto&& b : l.epoch(epoch, first)) {
    static_assert(std::is_same_v<std::remove_cvref_t<decltype(b)>, labelled_batch_on<cpu>>);
    out.emplace_back(b.y.data(), b.y.data() + b.size());
    for (std::int64_t i = 0; i < b.size(); ++i) REQUIRE(b.x(i, 1) == float(b.y.data()[i]) + 0.5f);
  }
  return out;
}
}  // namespace

TEST_CASE("on_device: the inner loader's batches, in order, with and without lookahead; resume; early exit") {
  for (int workers : {0, 2}) {
    data_loader<tensor_dataset> l(numbered(53), {.batch_size = 8, .shuffle = true, .seed = 4, .num_workers = workers});
    const auto want0 = labels_of(l, 0), want1 = labels_of(l, 1), want1_from3 = labels_of(l, 1, 3);
    REQUIRE(want1_from3.size() == 4);
    for (int ahead : {0, 1}) {
      auto d = on_device<cpu>(l, move_fields{}, {.ahead = ahead});
      CAPTURE(workers);
      CAPTURE(ahead);
      CHECK(d.size() == l.size());
      CHECK(labels_on(d, 0) == want0);
      CHECK(labels_on(d, 1) == want1);
      CHECK(labels_on(d, 1, 3) == want1_from3);
      std::int64_t seen = 0;
      for (auto&& b : d.epoch(0, 0)) {
        CHECK(b.size() == 8);
        if (++seen == 2) break;  // the prefetched batch is dropped with the range
      }
      CHECK(labels_on(d, 0) == want0);
    }
  }
}

TEST_CASE("on_device: lm batches by the default move, a move of your own, and a bad option named") {
  tensor<i64> x({6, 3}), y({6, 3});
  for (std::int64_t i = 0; i < 18; ++i) x.data()[i] = i, y.data()[i] = i + 1;
  struct lm_source {
    tensor<i64> x, y;
    std::int64_t size() const { return 3; }
    std::vector<lm_batch> epoch(std::int64_t, std::int64_t first) const {
      std::vector<lm_batch> out;
      for (std::int64_t b = first; b < 3; ++b)
        out.push_back({x.slice(0, 2 * b, 2 * b + 2).contiguous(), y.slice(0, 2 * b, 2 * b + 2).contiguous()});
      return out;
    }
  } src{x, y};
  auto d = on_device<cpu>(src, move_fields{}, {.ahead = 1});
  std::int64_t n = 0;
  for (auto&& b : d.epoch(0, 1)) {
    static_assert(std::is_same_v<std::remove_cvref_t<decltype(b)>, lm_batch_on<cpu>>);
    CHECK(b.size() == 2);
    CHECK(b.x.data()[0] == 6 * (n + 1));
    CHECK(b.y.data()[5] == 6 * (n + 1) + 6);
    ++n;
  }
  CHECK(n == 2);
  // A move of your own: any batch type, any result.
  auto sums = on_device<cpu>(src, [](const lm_batch& b, auto& up) {
    const auto xs = up(b.x);
    i64 s = 0;
    for (std::int64_t i = 0; i < xs.numel(); ++i) s += xs.data()[i];
    return s;
  });
  std::vector<i64> got;
  for (auto&& s : sums.epoch(0, 0)) got.push_back(s);
  CHECK(got == std::vector<i64>{15, 51, 87});
  CHECK_THROWS_WITH_AS(on_device<cpu>(src, move_fields{}, {.ahead = 2}),
                       doctest::Contains("data::on_device: ahead = 2, expected 0 or 1"), kiln::error);
}

}  // namespace test_loader
