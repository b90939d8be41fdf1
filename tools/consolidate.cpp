// kiln-consolidate — one plain safetensors file of model weights from a training checkpoint.
//
//   kiln-consolidate CHECKPOINT OUT.safetensors [--masters] [--with-optimizer]
//
// Model weights are whole in a kiln checkpoint whatever strategy wrote it; under zero<1|2>
// the optimizer state is one file per rank beside it, with the layout in the checkpoint,
// so no rank count or script is needed to reassemble it (DeepSpeed needs its offline
// zero_to_fp32.py). This tool validates the checkpoint (format, version, every tensor's
// CRC-32C, and every shard's) and writes its "model/" tensors under their own names
// ("net.0.weight"), in their dtype, with metadata {"format": "pt"} — what Hugging Face
// loaders and kiln::io::load_weights read.
//   --masters         the f32 master weights of a mixed-precision run instead of the
//                     16-bit model weights (precision/master/<name>)
//   --with-optimizer  also the optimizer's whole tensors, as "optimizer.<i>/<name>.<slot>"
//                     (reassembled from the rank shards of a zero checkpoint)
// Writes atomically; errors name the file and the tensor.
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "kiln/io/checkpoint.hpp"

int main(int argc, char** argv) try {
  std::string in, out;
  bool masters = false, optimizer = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--masters")
      masters = true;
    else if (a == "--with-optimizer")
      optimizer = true;
    else if (a == "-h" || a == "--help") {
      std::printf("usage: kiln-consolidate CHECKPOINT OUT.safetensors [--masters] [--with-optimizer]\n");
      return 0;
    } else if (!a.empty() && a[0] == '-')
      throw kiln::error("kiln-consolidate: unknown flag '" + a + "' (expected --masters, --with-optimizer)");
    else if (in.empty())
      in = a;
    else if (out.empty())
      out = a;
    else
      throw kiln::error("kiln-consolidate: unexpected argument '" + a + "' (expected CHECKPOINT OUT.safetensors)");
  }
  KILN_CHECK(!in.empty() && !out.empty(),
             "usage: kiln-consolidate CHECKPOINT OUT.safetensors [--masters] [--with-optimizer]");
  const auto r = kiln::io::checkpoint_reader::open(in);
  const auto& f = r.file();
  const std::string section = masters ? "precision/master/" : "model/";
  kiln::io::safetensors_writer w;
  w.set_metadata("format", "pt");
  std::size_t weights = 0, states = 0;
  for (const auto& e : f.tensors()) {
    std::string name;
    if (e.name.starts_with(section)) {
      name = e.name.substr(section.size());
      ++weights;
    } else if (optimizer && e.name.starts_with("optimizer.")) {
      name = e.name;
      ++states;
    } else {
      continue;
    }
    w.add_raw(name, e.dtype, e.shape, f.bytes(e));
  }
  // Optimizer state written as rank shards beside the checkpoint: reassembled whole.
  std::vector<std::map<std::string, kiln::tensor<float>>> assembled;
  if (optimizer)
    if (const auto* opts = r.state().find("optimizers"))
      for (std::size_t i = 0; i < opts->as_array().size(); ++i)
        if (const auto* sh = opts->as_array()[i].find("shards")) {
          assembled.push_back(kiln::io::load_optimizer_shards<float>(r, *sh, in + ": optimizer " + std::to_string(i)));
          for (auto& [name, t] : assembled.back()) {
            w.add("optimizer." + std::to_string(i) + "/" + name, t);
            ++states;
          }
        }
  KILN_CHECK(weights > 0, in, ": no tensors under '", section, "'",
             masters ? " (the run kept no f32 master weights: it was not under a mixed precision policy)" : "");
  w.write(out);
  std::printf("kiln-consolidate: %s -> %s: %zu weight tensors%s\n", in.c_str(), out.c_str(), weights,
              optimizer ? (", " + std::to_string(states) + " optimizer tensors").c_str() : "");
  return 0;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 1;
}
