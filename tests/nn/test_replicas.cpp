// nn::thread_replicas: a batch split across threads gives the unsplit step's gradients.
#include <atomic>
#include <cmath>
#include <stdexcept>

#include "../helpers.hpp"
#include "kiln/nn/gpt2.hpp"
#include "kiln/nn/replicas.hpp"
#include "kiln/optim/adamw.hpp"

namespace test_replicas {

using namespace kiln;
using kiln::test::random_ids;

namespace {

nn::gpt2_config tiny(float pdrop = 0.0f) {
  nn::gpt2_config c;
  c.vocab_size = 29;
  c.n_positions = 16;
  c.n_embd = 16;
  c.n_layer = 2;
  c.n_head = 2;
  c.embd_pdrop = c.attn_pdrop = c.resid_pdrop = pdrop;
  return c;
}

// Mean next-token loss over rows [r.begin, r.end) of ids, weighted by the rows' share.
template <class M>
var<f32> shard_loss(M& m, const tensor<i64>& ids, nn::shard_range r) {
  const std::int64_t B = ids.size(0), T = ids.size(1), n = r.size();
  auto rows = ids.slice(0, r.begin, r.end);
  auto x = rows.slice(1, 0, T - 1).contiguous(), y = rows.slice(1, 1, T).contiguous();
  auto loss = cross_entropy(reshape(m(x), shape{n * (T - 1), m.vocab_size()}), y.reshape(shape{n * (T - 1)}));
  return loss * (double(n) / double(B));
}

std::vector<std::vector<float>> grads_of(nn::gpt2<>& m) {
  std::vector<std::vector<float>> g;
  for (auto& p : nn::named_parameters<f32>(m))
    g.push_back(p.param.has_grad() ? p.param.grad().to_vector() : std::vector<float>{});
  return g;
}

double worst_diff(const std::vector<std::vector<float>>& a, const std::vector<std::vector<float>>& b) {
  REQUIRE(a.size() == b.size());
  double w = 0;
  for (std::size_t i = 0; i < a.size(); ++i) {
    REQUIRE(a[i].size() == b[i].size());
    for (std::size_t j = 0; j < a[i].size(); ++j) w = std::max(w, double(std::abs(a[i][j] - b[i][j])));
  }
  return w;
}

// The unsplit step's loss and gradients, from a model built after manual_seed(seed).
struct reference {
  double loss;
  std::vector<std::vector<float>> grads;
};
reference whole_batch(const nn::gpt2_config& c, const tensor<i64>& ids, std::uint64_t seed) {
  manual_seed(seed);
  nn::gpt2<> whole(c);
  auto loss = shard_loss(whole, ids, {0, ids.size(0)});
  loss.backward();
  return {loss.value().flat(0), grads_of(whole)};
}

// Runs one split step over `ids` and returns the summed loss.
double split_step(nn::thread_replicas<nn::gpt2<>>& reps, const tensor<i64>& ids) {
  std::vector<double> losses(static_cast<std::size_t>(reps.size()));
  reps.run([&](nn::gpt2<>& m, int k) {
    auto loss = shard_loss(m, ids, nn::shard(ids.size(0), k, reps.size()));
    losses[static_cast<std::size_t>(k)] = loss.value().flat(0);
    loss.backward();
  });
  double s = 0;
  for (double l : losses) s += l;
  return s;
}

}  // namespace

TEST_CASE("thread_replicas: a split batch gives the whole batch's loss and gradients, deterministically") {
  const auto c = tiny();
  const auto ids = random_ids(6, 16, c.vocab_size, 3);
  const auto [whole_loss, whole_grads] = whole_batch(c, ids, 11);

  for (int n : {1, 2, 3}) {
    CAPTURE(n);
    manual_seed(11);
    nn::gpt2<> primary(c);
    const auto gen_before = default_generator().offset();
    nn::thread_replicas<nn::gpt2<>> reps(primary, n, c);
    CHECK(default_generator().offset() == gen_before);  // building twins draws nothing
    CHECK(reps.size() == n);
    const double split_loss = split_step(reps, ids);
    CHECK(std::abs(split_loss - whole_loss) < 1e-5);
    const auto g = grads_of(primary);
    CHECK(worst_diff(g, whole_grads) < 1e-5);
    // The same step again, from a closed window: bitwise the same (fixed reduction order).
    nn::zero_grad(primary);
    split_step(reps, ids);
    CHECK(worst_diff(grads_of(primary), g) == 0.0);
  }
}

TEST_CASE("thread_replicas: run_split covers every row once, in cached pieces, with the whole batch's gradient") {
  const auto c = tiny();
  const auto ids = random_ids(7, 16, c.vocab_size, 13);
  const auto [whole_loss, whole_grads] = whole_batch(c, ids, 5);
  for (int chunks : {1, 2, 5}) {
    CAPTURE(chunks);
    manual_seed(5);
    nn::gpt2<> primary(c);
    nn::thread_replicas<nn::gpt2<>> reps(primary, 2, c);
    std::vector<std::vector<nn::shard_range>> seen(2);
    double total = 0;
    std::vector<double> losses(2, 0.0);
    reps.run_split(7, chunks, [&](nn::gpt2<>& m, nn::shard_range r, int k) {
      seen[static_cast<std::size_t>(k)].push_back(r);
      auto l = shard_loss(m, ids, r);
      losses[static_cast<std::size_t>(k)] += l.value().flat(0);
      l.backward();
    });
    for (double l : losses) total += l;
    CHECK(std::abs(total - whole_loss) < 1e-5);
    CHECK(worst_diff(grads_of(primary), whole_grads) < 1e-5);
    // Replica 0 has rows [0, 3), replica 1 rows [3, 7); pieces are contiguous and in order.
    std::int64_t next = 0;
    for (int k = 0; k < 2; ++k) {
      const auto& pieces = seen[static_cast<std::size_t>(k)];
      CHECK(pieces.size() == static_cast<std::size_t>(std::min(chunks, k == 0 ? 3 : 4)));
      for (auto& p : pieces) {
        CHECK(p.begin == next);
        CHECK(p.size() > 0);
        next = p.end;
      }
    }
    CHECK(next == 7);
  }
  manual_seed(5);
  nn::gpt2<> primary(c);
  nn::thread_replicas<nn::gpt2<>> three(primary, 3, c);
  CHECK_THROWS_WITH_AS(three.run_split(2, 1, [](nn::gpt2<>&, nn::shard_range, int) {}),
                       doctest::Contains("2 rows cannot be split over 3 replicas"), error);
}

TEST_CASE("thread_replicas: twins see the primary's values; gradients accumulate in the primary's window") {
  const auto c = tiny();
  const auto ids = random_ids(4, 16, c.vocab_size, 5);
  manual_seed(2);
  nn::gpt2<> primary(c);
  nn::thread_replicas<nn::gpt2<>> reps(primary, 2, c);
  optim::adamw<f32> opt({optim::param_group<f32>{nn::named_parameters<f32>(primary)}}, {.lr = 1e-2});
  split_step(reps, ids);
  opt.step();
  // After the optimizer step the twin computes with the updated values.
  split_step(reps, ids);  // refreshes the views
  auto pp = nn::named_parameters<f32>(primary);
  auto tp = nn::named_parameters<f32>(reps.replica(1));
  REQUIRE(pp.size() == tp.size());
  for (std::size_t i = 0; i < pp.size(); ++i) {
    CAPTURE(pp[i].name);
    CHECK(tp[i].param.value().data() == pp[i].param.value().data());
  }
  // Two micro-batches in one window: the primary's gradient is their sum.
  nn::zero_grad(primary);
  split_step(reps, ids);
  const auto once = grads_of(primary);
  split_step(reps, ids);
  const auto twice = grads_of(primary);
  for (std::size_t i = 0; i < once.size(); ++i)
    for (std::size_t j = 0; j < once[i].size(); ++j) REQUIRE(std::abs(twice[i][j] - 2 * once[i][j]) < 1e-6);
  // Frozen parameters stay frozen in the twins and receive no gradient.
  nn::requires_grad(primary, false);
  pp[0].param.set_requires_grad(true);
  nn::zero_grad(primary);
  split_step(reps, ids);
  CHECK(pp[0].param.has_grad());
  for (std::size_t i = 1; i < pp.size(); ++i) CHECK_FALSE(pp[i].param.has_grad());
}

TEST_CASE("thread_replicas: dropout masks differ per replica and replay from the primary's state") {
  const auto c = tiny(0.2f);
  const auto ids = random_ids(2, 16, c.vocab_size, 9);
  auto run = [&](std::uint64_t offset_shift) {
    manual_seed(4);
    nn::gpt2<> primary(c);
    for (auto* g : nn::random_streams(primary).generators) g->set_state(g->seed(), g->offset() + offset_shift);
    nn::thread_replicas<nn::gpt2<>> reps(primary, 2, c);
    std::vector<std::vector<float>> out(2);
    reps.run([&](nn::gpt2<>& m, int k) {
      no_grad ng;
      out[static_cast<std::size_t>(k)] = m(ids).value().to_vector();  // both replicas see the same rows
    });
    return out;
  };
  const auto a = run(0), b = run(0), shifted = run(1000);
  CHECK(a[0] != a[1]);  // distinct streams per replica
  CHECK(a == b);        // a function of the primary's (seed, offset): a resumed run replays it
  CHECK(shifted[1] != a[1]);
}

TEST_CASE("thread_replicas: errors") {
  const auto c = tiny();
  manual_seed(1);
  nn::gpt2<> primary(c);
  auto other = c;
  other.n_embd = 32;
  CHECK_THROWS_WITH_AS(nn::thread_replicas<nn::gpt2<>>(primary, 2, other),
                       doctest::Contains("parameter transformer.wte.weight ([29, 32]) does not match the primary's"),
                       error);
  CHECK_THROWS_WITH_AS(nn::thread_replicas<nn::gpt2<>>(primary, 0, c), doctest::Contains("at least 1, got 0"), error);
  // A step that throws on one thread: every thread finishes, the error reaches the caller.
  nn::thread_replicas<nn::gpt2<>> reps(primary, 2, c);
  std::atomic<int> finished{0};
  CHECK_THROWS_WITH_AS(reps.run([&](nn::gpt2<>&, int k) {
    ++finished;
    if (k == 1) throw std::runtime_error("shard 1 failed");
  }),
                       "shard 1 failed", std::runtime_error);
  CHECK(finished == 2);
  // Grad mode is carried to every thread.
  std::vector<int> recorded(2, -1);
  {
    no_grad ng;
    reps.run([&](nn::gpt2<>& m, int k) {
      recorded[static_cast<std::size_t>(k)] = m(random_ids(1, 4, c.vocab_size, 1)).requires_grad();
    });
  }
  CHECK(recorded == std::vector<int>{0, 0});
}

}  // namespace test_replicas
