// Checkpoint save and load: an MLP's weights plus AdamW's two moments (what a training
// checkpoint is made of), written with fsync and read back with every checksum verified
// and every tensor copied into the live model and optimizer.
//   bench_checkpoint_io [--hidden H] [--layers L] [--reps R] [--dir DIR]
// Prints one JSON line per measurement. bench/run_checkpoint_io.sh runs torch.save /
// torch.load on the same shapes in the same run.
// Napkin: H=2048, L=4: 10.0M parameters → 3 × 40 MB = 120 MB per checkpoint. Bounded by
// the copy into the page cache and the disk's write bandwidth (writeback starts every 8 MiB,
// so the final fsync waits for little); the CRC-32C is taken in the write loop on 2 MiB
// pieces still in cache (crc32 instruction on three streams, ~10 GB/s), and the rename
// frees the previous file's pages. A load maps the file and reads each byte once.
#include <chrono>
#include <cstdio>
#include <filesystem>
#include <string>

#include "kiln/kiln.hpp"

using namespace kiln;
using clk = std::chrono::steady_clock;

int main(int argc, char** argv) {
  std::int64_t hidden = 2048, layers = 4, reps = 5;
  std::string dir = "/tmp/kiln_bench_ckpt";
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--hidden")
      hidden = std::stoll(argv[i + 1]);
    else if (a == "--layers")
      layers = std::stoll(argv[i + 1]);
    else if (a == "--reps")
      reps = std::stoll(argv[i + 1]);
    else if (a == "--dir")
      dir = argv[i + 1];
  }
  std::filesystem::create_directories(dir);
  cpu_runtime::set_num_threads(2);
  std::vector<std::int64_t> h(static_cast<std::size_t>(layers - 1), hidden);
  nn::mlp<nn::relu> net(784, h, 10);
  optim::adamw<float> opt(net, {.lr = 1e-3});
  // One step so the moments are not zero.
  auto loss = sum(net(var<float>(tensor<float>::ones({4, 784}))));
  opt.zero_grad();
  loss.backward();
  opt.step();
  const std::int64_t params = nn::count_parameters(net).total;
  const double mb = double(params) * 3 * 4 / 1e6;
  const auto path = std::filesystem::path(dir) / "bench.ckpt";
  for (std::int64_t r = 0; r < reps; ++r) {
    auto t0 = clk::now();
    {
      io::checkpoint_writer w;
      io::add_module(w, "model/", net);
      const auto st = opt.state();
      for (auto& [n, t] : st.tensors) w.add("optimizer.0/" + n, t);
      w.state().set("kind", "full");
      w.write(path);
    }
    const double save = std::chrono::duration<double>(clk::now() - t0).count();
    t0 = clk::now();
    {
      const auto rd = io::checkpoint_reader::open(path);  // verifies every CRC
      io::check_module(rd.file(), "model/", net, true);
      io::copy_module(rd.file(), "model/", net);
      optim::optimizer_state<float> st;
      for (auto& [n, t] : opt.state().tensors) st.tensors.emplace_back(n, rd.file().load<float>("optimizer.0/" + n));
      st.counters = opt.state().counters;
      opt.load_state(st);
    }
    const double load = std::chrono::duration<double>(clk::now() - t0).count();
    std::printf(
        "{\"impl\": \"kiln\", \"params\": %lld, \"mb\": %.1f, \"save_s\": %.4f, \"load_s\": %.4f, \"file_bytes\": "
        "%lld}\n",
        static_cast<long long>(params), mb, save, load, static_cast<long long>(std::filesystem::file_size(path)));
    std::fflush(stdout);
  }
  std::filesystem::remove(path);
}
