// 00 — an MLP on Fashion-MNIST with kiln's foundation layer, written out by hand.
//
// Why: this is the smallest complete training program — tensors, autograd, a module,
// AdamW, a data pass — with every step visible. The trainer (examples/01) wraps the
// same pieces in a compile-time composed loop; this file shows what it composes.
//
// Napkin math: 784-256-256-10 has 269,322 parameters; a training step costs
// 6 · (784·256 + 256·256 + 256·10) ≈ 1.6 MFLOP per sample (forward, dX and dW GEMMs).
// At ~150-230 GFLOP/s (Eigen, 2 cores) an epoch of 60,000 samples is ~0.5 s of GEMM,
// so an epoch should take around a second; AdamW touches 269k parameters per step.
//
// Usage: 00_mlp_fashion_mnist [--epochs N] [--batch B] [--lr X] [--limit-batches N]
//                             [--threads N] [--seed S] [--data DIR] [--out DIR]
//                             [--min-accuracy A]   (exit 1 if test accuracy < A)
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <string>

#include "kiln/kiln.hpp"

namespace {

struct options {
  int epochs = 3;
  std::int64_t batch = 128;
  double lr = 1e-3;
  std::int64_t limit_batches = -1;
  int threads = 2;
  std::uint64_t seed = 42;
  std::string data = "/usr/share/datasets/fashion-mnist";
  std::string out = "runs/00_mlp_fashion_mnist";
  double min_accuracy = 0.0;
};

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      KILN_CHECK(i + 1 < argc, "flag ", a, " expects a value");
      return argv[++i];
    };
    if (a == "--epochs")
      o.epochs = std::stoi(next());
    else if (a == "--batch")
      o.batch = std::stoll(next());
    else if (a == "--lr")
      o.lr = std::stod(next());
    else if (a == "--limit-batches")
      o.limit_batches = std::stoll(next());
    else if (a == "--threads")
      o.threads = std::stoi(next());
    else if (a == "--seed")
      o.seed = std::stoull(next());
    else if (a == "--data")
      o.data = next();
    else if (a == "--out")
      o.out = next();
    else if (a == "--min-accuracy")
      o.min_accuracy = std::stod(next());
    else
      throw kiln::error("unknown flag '" + a +
                        "' (expected --epochs, --batch, --lr, --limit-batches, --threads, --seed, --data, --out, "
                        "--min-accuracy)");
  }
  return o;
}

// Images as f32 in [0, 1], shape [N, 784]; labels as i64 [N].
struct split {
  kiln::tensor<float> x;
  kiln::tensor<kiln::i64> y;
};
split load(const std::string& dir, const std::string& prefix) {
  auto images = kiln::data::read_idx(dir + "/" + prefix + "-images-idx3-ubyte.gz");
  auto labels = kiln::data::read_idx(dir + "/" + prefix + "-labels-idx1-ubyte.gz");
  KILN_CHECK(images.rank() == 3 && images.size(1) == 28 && images.size(2) == 28, dir, "/", prefix,
             "-images: expected [N, 28, 28], got ", images.shape().str());
  KILN_CHECK(labels.numel() == images.size(0), dir, "/", prefix, ": ", images.size(0), " images but ", labels.numel(),
             " labels");
  split s{kiln::tensor<float>({images.size(0), 784}), kiln::tensor<kiln::i64>({images.size(0)})};
  for (std::int64_t i = 0; i < images.numel(); ++i) s.x.data()[i] = images.data()[i] / 255.0f;
  for (std::int64_t i = 0; i < labels.numel(); ++i) s.y.data()[i] = labels.data()[i];
  return s;
}

// Rows `idx[b*B .. (b+1)*B)` of a split gathered into a batch.
split gather(const split& s, const std::vector<std::int64_t>& idx, std::int64_t begin, std::int64_t n) {
  split b{kiln::tensor<float>({n, 784}), kiln::tensor<kiln::i64>({n})};
  for (std::int64_t i = 0; i < n; ++i) {
    const std::int64_t r = idx[static_cast<std::size_t>(begin + i)];
    std::copy_n(s.x.data() + r * 784, 784, b.x.data() + i * 784);
    b.y.data()[i] = s.y.data()[r];
  }
  return b;
}

double accuracy(const kiln::nn::mlp<kiln::nn::relu>& net, const split& test) {
  kiln::no_grad ng;
  std::int64_t correct = 0;
  const std::int64_t n = test.x.size(0), bs = 1000;
  for (std::int64_t b = 0; b < n; b += bs) {
    const std::int64_t m = std::min(bs, n - b);
    auto logits = net(kiln::var<float>(test.x.slice(0, b, b + m))).value();
    for (std::int64_t i = 0; i < m; ++i) {
      std::int64_t best = 0;
      for (std::int64_t j = 1; j < 10; ++j)
        if (logits(i, j) > logits(i, best)) best = j;
      correct += best == test.y.data()[b + i];
    }
  }
  return static_cast<double>(correct) / static_cast<double>(n);
}

}  // namespace

int main(int argc, char** argv) try {
  const options opt = parse(argc, argv);
  kiln::cpu_runtime::set_num_threads(opt.threads);
  kiln::manual_seed(opt.seed);
  const auto train = load(opt.data, "train");
  const auto test = load(opt.data, "t10k");

  kiln::nn::mlp<kiln::nn::relu> net(784, {256, 256}, 10);
  kiln::optim::adamw<float> opt_w(net, {.lr = opt.lr, .weight_decay = 0.01});
  std::printf("model: mlp 784-256-256-10, %lld parameters; adamw lr %g; batch %lld; %d threads\n",
              static_cast<long long>(kiln::nn::count_parameters(net).total), opt.lr, static_cast<long long>(opt.batch),
              opt.threads);

  std::filesystem::create_directories(opt.out);
  const std::string metrics_path = opt.out + "/metrics.csv";
  std::ofstream metrics(metrics_path);
  metrics << "epoch,step,train_loss,test_accuracy,seconds\n";

  kiln::philox_generator shuffle_rng(opt.seed ^ 0x5348554646ULL);
  std::vector<std::int64_t> order(static_cast<std::size_t>(train.x.size(0)));
  std::int64_t step = 0;
  double acc = 0;
  for (int epoch = 0; epoch < opt.epochs; ++epoch) {
    // Fisher-Yates from a counter-based stream: the permutation is a function of (seed, epoch).
    std::iota(order.begin(), order.end(), 0);
    const auto st = shuffle_rng.take(order.size());
    for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[st.bits(i) % (i + 1)]);

    const auto t0 = std::chrono::steady_clock::now();
    double loss_sum = 0;
    std::int64_t batches = train.x.size(0) / opt.batch;  // drop_last
    if (opt.limit_batches >= 0) batches = std::min(batches, opt.limit_batches);
    for (std::int64_t b = 0; b < batches; ++b) {
      auto batch = gather(train, order, b * opt.batch, opt.batch);
      auto loss = kiln::cross_entropy(net(kiln::var<float>(batch.x)), batch.y);
      opt_w.zero_grad();
      loss.backward();
      opt_w.step();
      loss_sum += loss.value()();
      ++step;
    }
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    acc = accuracy(net, test);
    const double mean_loss = loss_sum / static_cast<double>(std::max<std::int64_t>(batches, 1));
    std::printf("epoch %d: train loss %.4f, test accuracy %.2f%%, %.2f s (%.0f samples/s)\n", epoch + 1, mean_loss,
                100 * acc, secs, static_cast<double>(batches * opt.batch) / secs);
    metrics << epoch + 1 << ',' << step << ',' << mean_loss << ',' << acc << ',' << secs << '\n';
  }
  metrics.close();
  std::printf("logs: %s\n", std::filesystem::absolute(metrics_path).c_str());
  // A hand-written loop keeps its own state; the weights go out as plain safetensors.
  const auto weights = std::filesystem::absolute(opt.out + "/model.safetensors");
  kiln::io::save_weights(net, weights);
  std::printf("weights: %s\n", weights.c_str());
  if (acc < opt.min_accuracy) {
    std::fprintf(stderr, "test accuracy %.4f is below --min-accuracy %.4f\n", acc, opt.min_accuracy);
    return 1;
  }
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 2;
}
