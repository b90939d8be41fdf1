// 05 — LoRA fine-tuning of a pretrained model: adapt a small GPT to text it was not
// trained on, keep the adapter in PEFT's files, merge it, and write the merged model.
//
// Why: this is what most people do with a pretrained model — freeze it, train low-rank
// adapters on the new text (Hu et al. 2021), then either ship the adapter (a few hundred
// kilobytes, loadable by peft.PeftModel.from_pretrained) or fold it into the weights. No
// causal LM can be downloaded here, so by default the example makes its own: it pretrains
// the char GPT of 02 on one part of a corpus (part A), writes it as a Hugging Face folder,
// loads that folder into nn::gpt2<..., nn::adapter::lora>, attaches adapters
// (nn::attach_lora freezes everything else) and trains them with kiln::trainer on the
// other part (part B). It reports the validation loss on B of the base before adaptation
// and of the adapted model after, and the same on A (what the adapter costs the old text).
//
// Data: Debian's `fortunes` (as 02), split by file. Part B is `knghtbrd` (~88 kB): quotes
// from Debian's IRC channels, "<nick> text" and "* nick does" lines, a format the other
// collections hardly use; part A is every other collection (~2.5 MB). Each part is split
// 90% / 10% into training and validation tokens. The char tokenizer is built from the whole
// corpus (A and B): a char GPT cannot grow its vocabulary later, and which bytes exist is no
// information about B's text. All but one of B's bytes occur in A (0xA9, once, inside an
// "é"), so B's symbols have embeddings trained on A; the adapters do not touch them.
// --qlora loads the base with its block projections in NF4 (adapter::qlora, 0.26x the
// bytes of bf16) and trains the same adapters over it; the merged model is the adapter
// folded into the original f32 weights, loaded again (never the dequantised NF4), and the
// example prints how far the adapter on the original base is from the NF4 model it was
// trained on.
// With --model DIR the base is a gpt2 or llama Hugging Face folder (config.json's
// model_type) and --data is the text to adapt to (a file, or the --adapt files of a
// folder). Its tokenizer must be one kiln reads: a char_tokenizer.json (what 02 and 05
// write beside their models) or a byte-level BPE tokenizer.json (GPT-2's);
// kiln::text::bpe_tokenizer refuses others, e.g. SentencePiece-style Llama tokenizers,
// naming the field it cannot read.
//
// Napkin math: the base is 02's shape, 4 layers × n_embd 128, context 128 → 0.82 M
// parameters, ~10 GFLOP a step of 16 × 128 tokens. LoRA r = 8 on the four projections of
// each block (c_attn 128→384, c_proj 128→128, c_fc 128→512, c_proj 512→128) is
// 8 · (512 + 256 + 640 + 640) = 16 k parameters a block, 65,536 in all (8% of the base),
// 256 kB of f32 in the adapter file. An adapter step skips the frozen weights' dW GEMMs (a
// third of the dense work) and keeps AdamW state for 66 k values instead of 0.82 M (model
// states 4.1 MiB against 12.6 MiB, as model_summary prints).
// Measured (AMD EPYC, 2 threads, on a machine shared with other jobs; the defaults: 600
// pretraining and 300 adapter steps of 16 × 128 tokens, seed 1337): validation loss on B
// 2.6433 for the base, 2.3283 adapted (−0.3150); on A 2.2148 → 2.2721 (+0.0573). The base's
// samples read like fortunes; the adapted model's have "<nick> ..." lines. Merged against
// adapter model: max |logit difference| 2.4e-5 (largest |logit| 8.45). Adaptation: 49.8 s
// (12,330 tokens/s), per token no faster than pretraining in a quiet stretch (12,190
// tokens/s). The whole run took 439 s, 353 s of it pretraining slowed by the other jobs
// (3,485 tokens/s).
//
// Usage: 05_lora_finetune [--model DIR] [--data PATH] [--adapt NAMES] [--pretrain-steps N]
//                         [--pretrain-lr X] [--layers L] [--heads H] [--embd C]
//                         [--rank R] [--alpha A] [--dropout P] [--targets NAMES] [--steps N] [--lr X]
//                         [--batch B] [--block T] [--val-every N] [--val-batches N] [--threads N]
//                         [--seed S] [--out DIR] [--sample-tokens N] [--prompt TEXT]
//                         [--min-improvement X] [--no-progress] [--qlora]
//        (exit 1 unless the adapted model's validation loss on B is at least X below the base's).
#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <variant>
#include <vector>

#include "kiln/callbacks/model_summary.hpp"
#include "kiln/callbacks/progress_bar.hpp"
#include "kiln/data/data_loader.hpp"
#include "kiln/data/text.hpp"
#include "kiln/kiln.hpp"
#include "kiln/loggers/csv.hpp"
#include "kiln/nn/lora.hpp"
#include "kiln/nn/peft.hpp"
#include "kiln/text/bpe.hpp"
#include "kiln/text/byte_tokenizer.hpp"
#include "kiln/train/trainer.hpp"

namespace {

namespace fs = std::filesystem;

struct options {
  std::string model;  // empty: pretrain a char GPT on part A
  std::string data = "/usr/share/games/fortunes";
  std::string adapt = "knghtbrd";  // the files of --data that form part B ("all": every file)
  std::int64_t pretrain_steps = 600, layers = 4, heads = 4, embd = 128;
  double pretrain_lr = 2e-3;
  std::int64_t rank = 8;
  double alpha = 16.0;
  float dropout = 0.0f;
  std::string targets = "all-linear";
  std::int64_t steps = 300, batch = 16, block = 128;
  double lr = 3e-3;
  std::int64_t val_every = 100, val_batches = 20, sample_tokens = 200;
  int threads = 2;
  std::uint64_t seed = 1337;
  std::string out = "runs/05_lora_finetune";
  std::string prompt = "\n";
  std::optional<double> min_improvement;
  bool progress = true;
  bool qlora = false;  // the base projections in NF4 (QLoRA)
};

std::vector<std::string> split_list(const std::string& s) {
  std::vector<std::string> out;
  std::size_t b = 0;
  while (b <= s.size()) {
    const std::size_t e = std::min(s.find(',', b), s.size());
    if (e > b) out.push_back(s.substr(b, e - b));
    b = e + 1;
  }
  return out;
}

kiln::nn::lora_config lora_of(const options& o) {
  kiln::nn::lora_config lc;
  lc.r = o.rank;
  lc.alpha = o.alpha;
  lc.dropout = o.dropout;
  lc.target_modules = split_list(o.targets);
  return lc;
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto next = [&]() -> std::string {
      KILN_CHECK(i + 1 < argc, "flag ", a, " expects a value");
      return argv[++i];
    };
    if (a == "--model")
      o.model = next();
    else if (a == "--data")
      o.data = next();
    else if (a == "--adapt")
      o.adapt = next();
    else if (a == "--pretrain-steps")
      o.pretrain_steps = std::stoll(next());
    else if (a == "--pretrain-lr")
      o.pretrain_lr = std::stod(next());
    else if (a == "--layers")
      o.layers = std::stoll(next());
    else if (a == "--heads")
      o.heads = std::stoll(next());
    else if (a == "--embd")
      o.embd = std::stoll(next());
    else if (a == "--rank")
      o.rank = std::stoll(next());
    else if (a == "--alpha")
      o.alpha = std::stod(next());
    else if (a == "--dropout")
      o.dropout = std::stof(next());
    else if (a == "--targets")
      o.targets = next();
    else if (a == "--steps")
      o.steps = std::stoll(next());
    else if (a == "--lr")
      o.lr = std::stod(next());
    else if (a == "--batch")
      o.batch = std::stoll(next());
    else if (a == "--block")
      o.block = std::stoll(next());
    else if (a == "--val-every")
      o.val_every = std::stoll(next());
    else if (a == "--val-batches")
      o.val_batches = std::stoll(next());
    else if (a == "--threads")
      o.threads = std::stoi(next());
    else if (a == "--seed")
      o.seed = std::stoull(next());
    else if (a == "--out")
      o.out = next();
    else if (a == "--sample-tokens")
      o.sample_tokens = std::stoll(next());
    else if (a == "--prompt")
      o.prompt = next();
    else if (a == "--min-improvement")
      o.min_improvement = std::stod(next());
    else if (a == "--no-progress")
      o.progress = false;
    else if (a == "--qlora")
      o.qlora = true;
    else
      throw kiln::error("unknown flag '" + a +
                        "' (expected --model, --data, --adapt, --pretrain-steps, --pretrain-lr, --layers, --heads, "
                        "--embd, --rank, --alpha, --dropout, --targets, --steps, --lr, --batch, --block, --val-every, "
                        "--val-batches, --threads, --seed, --out, --sample-tokens, --prompt, --min-improvement, "
                        "--no-progress, --qlora)");
  }
  KILN_CHECK(o.pretrain_steps > 0 && o.steps > 0 && o.batch > 0 && o.block > 1 && o.val_batches > 0,
             "--pretrain-steps, --steps, --batch and --val-batches must be positive and --block above 1");
  lora_of(o).validate("LoRA flags");  // before any training (the target names are checked against the model)
  return o;
}

// The base's tokenizer, read from its folder: the char tokenizer 02 and 05 save beside
// their models, or a byte-level BPE tokenizer.json.
struct tokenizer {
  std::variant<kiln::text::char_tokenizer, kiln::text::bpe_tokenizer> t;

  static tokenizer load(const fs::path& dir) {
    if (fs::is_regular_file(dir / "char_tokenizer.json"))
      return {kiln::text::char_tokenizer::load(dir / "char_tokenizer.json")};
    if (fs::is_regular_file(dir / "tokenizer.json")) return {kiln::text::bpe_tokenizer::load(dir / "tokenizer.json")};
    throw kiln::error(dir.string() +
                      ": no tokenizer kiln reads (char_tokenizer.json, or a byte-level BPE tokenizer.json)");
  }
  std::int32_t vocab_size() const {
    return std::visit([](const auto& x) { return x.vocab_size(); }, t);
  }
  std::vector<std::int32_t> encode(std::string_view s) const {
    return std::visit([&](const auto& x) { return x.encode(s); }, t);
  }
  std::string decode(std::span<const std::int32_t> ids) const {
    return std::visit([&](const auto& x) { return x.decode(ids); }, t);
  }
  fs::path save(const fs::path& dir) const {
    if (const auto* c = std::get_if<kiln::text::char_tokenizer>(&t)) {
      c->save(dir / "char_tokenizer.json");
      return dir / "char_tokenizer.json";
    }
    std::get<kiln::text::bpe_tokenizer>(t).save(dir / "tokenizer.json");
    return dir / "tokenizer.json";
  }
};

// The corpus split by file: part B the files --adapt names (or the one file --data names),
// part A the others.
struct corpus_parts {
  kiln::data::text_corpus a, b;
};

corpus_parts split_by_file(const kiln::data::text_corpus& c, const options& opt) {
  const bool one_file = !fs::is_directory(opt.data);
  const auto names = split_list(opt.adapt);
  const bool all = names.size() == 1 && names[0] == "all";
  auto name_of = [&](std::size_t k) {
    return one_file ? c.files[k].filename().string() : c.files[k].lexically_relative(opt.data).generic_string();
  };
  std::string known;
  for (std::size_t k = 0; k < c.files.size(); ++k) known += (k ? ", " : "") + name_of(k);
  for (const auto& n : names) {
    bool hit = all || one_file;
    for (std::size_t k = 0; k < c.files.size(); ++k) hit = hit || name_of(k) == n;
    KILN_CHECK(hit, "--adapt names '", n, "', which is no text file of ", opt.data, " (it has ", known, ")");
  }
  corpus_parts p;
  for (std::size_t k = 0; k < c.files.size(); ++k) {
    const bool in_b = one_file || all || std::find(names.begin(), names.end(), name_of(k)) != names.end();
    auto& part = in_b ? p.b : p.a;
    part.starts.push_back(part.text.size());
    part.sizes.push_back(c.sizes[k]);
    part.files.push_back(c.files[k]);
    part.text += c.file_text(k);
  }
  KILN_CHECK(!p.b.files.empty(), "--adapt selects no file of ", opt.data);
  return p;
}

using batch = kiln::data::lm_batch;
using loader = kiln::data::data_loader<kiln::data::lm_blocks>;
// One model type per architecture: the base is pretrained as gpt with no adapter attached
// (lora_linear without an adapter is a plain linear layer, initialised as one).
using gpt =
    kiln::nn::gpt2<kiln::ops::mask::causal, kiln::nn::recompute::none, kiln::f32, kiln::cpu, kiln::nn::adapter::lora>;
using llama =
    kiln::nn::llama<kiln::ops::mask::causal, kiln::nn::recompute::none, kiln::f32, kiln::cpu, kiln::nn::adapter::lora>;
// --qlora: the same models with NF4 base projections (kiln/ops/kernel/nf4.hpp).
using gpt_nf4 =
    kiln::nn::gpt2<kiln::ops::mask::causal, kiln::nn::recompute::none, kiln::f32, kiln::cpu, kiln::nn::adapter::qlora>;
using llama_nf4 =
    kiln::nn::llama<kiln::ops::mask::causal, kiln::nn::recompute::none, kiln::f32, kiln::cpu, kiln::nn::adapter::qlora>;

kiln::var<float> lm_loss(auto& net, const batch& b) {
  const std::int64_t n = b.x.numel();
  auto logits = net(b.x);
  return kiln::cross_entropy(kiln::reshape(logits, kiln::shape{n, net.vocab_size()}), b.y.reshape(kiln::shape{n}));
}

// The module: a causal LM and what one step computes; the optimizer sees only the
// parameters that require a gradient (all of them when pretraining, the adapters after
// attach_lora).
template <class Net>
struct language_model {
  Net net;
  double lr = 2e-3, weight_decay = 0.1;
  std::int64_t total_steps = 1;

  template <class F>
  void for_each_child(F&& f) {
    f("net", net);
  }
  kiln::var<float> training_step(auto& ctx, const batch& b) {
    auto l = lm_loss(net, b);
    ctx.log("train/loss", l, {.prog_bar = true});
    return l;
  }
  void validation_step(auto& ctx, const batch& b) { ctx.log("val/loss", lm_loss(net, b), {.prog_bar = true}); }
  auto configure_optimizers() {
    // 02's recipe: AdamW β2 0.99, linear warmup then cosine to a tenth.
    const std::int64_t warm = std::max<std::int64_t>(1, total_steps / 20);
    return kiln::optim::with_schedule(
        kiln::optim::adamw<float>(*this, {.lr = lr, .beta1 = 0.9, .beta2 = 0.99, .weight_decay = weight_decay}),
        kiln::optim::warmup<kiln::optim::cosine>{.steps = warm,
                                                 .then = {.total_steps = total_steps - warm, .min_factor = 0.1}});
  }
};

template <class Net>
using run = kiln::trainer<language_model<Net>, kiln::strategy::single_device<kiln::cpu>, kiln::precision::fp32,
                          kiln::callbacks::model_summary, kiln::callbacks::progress_bar, kiln::loggers::csv>;

kiln::train::trainer_options fit_options(const options& opt, std::int64_t steps, const fs::path& logs) {
  kiln::train::trainer_options to{.max_epochs = 1,
                                  .seed = opt.seed,
                                  .log_every_n_steps = 25,
                                  .default_root_dir = logs.string(),
                                  .enable_progress_bar = opt.progress};
  to.val_check_interval = std::min(opt.val_every, steps);
  to.limit_val_batches = opt.val_batches;
  to.gradient_clip_val = 1.0;
  return to;
}

// Random training windows (steps × batch: one epoch is the whole run), non-overlapping
// validation blocks.
loader train_loader(const kiln::data::token_stream& s, const options& opt, std::int64_t steps, std::int64_t block,
                    std::uint64_t seed) {
  return loader(kiln::data::lm_blocks(s, {.block_size = block,
                                          .sampling = kiln::data::lm_sampling::random,
                                          .seed = seed,
                                          .samples = steps * opt.batch}),
                kiln::data::loader_options{.batch_size = opt.batch, .drop_last = true, .seed = seed, .num_workers = 1});
}
loader val_loader(const kiln::data::token_stream& s, std::int64_t block) {
  return loader(kiln::data::lm_blocks(s, {.block_size = block, .sampling = kiln::data::lm_sampling::sequential}),
                kiln::data::loader_options{.batch_size = 32});
}

// The mean next-token loss over the first `batches` batches of 32 validation blocks, in
// eval mode (no dropout), nothing recorded.
template <class Net>
double mean_loss(Net& net, const kiln::data::token_stream& s, std::int64_t block, std::int64_t batches) {
  const kiln::data::lm_blocks blocks(s, {.block_size = block, .sampling = kiln::data::lm_sampling::sequential});
  kiln::no_grad ng;
  kiln::nn::eval(net);
  double sum = 0;
  std::int64_t n = 0;
  for (std::int64_t i = 0, k = 0; i < blocks.size() && k < batches; i += 32, ++k) {
    std::vector<std::int64_t> idx(static_cast<std::size_t>(std::min<std::int64_t>(32, blocks.size() - i)));
    std::iota(idx.begin(), idx.end(), i);
    const auto b = blocks.get_batch(idx);
    sum += double(lm_loss(net, b).value().flat(0)) * double(b.x.numel());
    n += b.x.numel();
  }
  kiln::nn::train(net);
  return sum / double(n);
}

// The logits of the first validation batch (8 blocks), on the host.
template <class Net>
kiln::tensor<float> logits_of(Net& net, const kiln::data::token_stream& s, std::int64_t block) {
  const kiln::data::lm_blocks blocks(s, {.block_size = block, .sampling = kiln::data::lm_sampling::sequential});
  std::vector<std::int64_t> idx(static_cast<std::size_t>(std::min<std::int64_t>(8, blocks.size())));
  std::iota(idx.begin(), idx.end(), 0);
  kiln::no_grad ng;
  kiln::nn::eval(net);
  auto out = kiln::host_copy(net(blocks.get_batch(idx).x).value());
  kiln::nn::train(net);
  return out;
}

template <class Net>
void sample(Net& net, const tokenizer& tok, const options& opt, const char* who) {
  std::vector<std::int64_t> prompt;
  for (auto id : tok.encode(opt.prompt)) prompt.push_back(id);
  std::printf("--- %s sample (temperature 0.8, top-k 20, seed %llu) ---\n%s", who,
              static_cast<unsigned long long>(opt.seed), opt.prompt.c_str());
  kiln::nn::generate(net, prompt,
                     {.max_new_tokens = opt.sample_tokens, .temperature = 0.8f, .top_k = 20, .seed = opt.seed},
                     [&](std::int64_t t) {
                       const std::int32_t id = static_cast<std::int32_t>(t);
                       if (id < tok.vocab_size())
                         std::fputs(tok.decode(std::span<const std::int32_t>(&id, 1)).c_str(), stdout);
                       else  // a row of the model's vocabulary the tokenizer does not name (padding)
                         std::printf("<id %d>", id);
                       std::fflush(stdout);
                     });
  std::printf("\n---\n");
}

struct streams {
  kiln::data::split_streams a, b;  // 90% / 10% of each part
};

// Pretrains 02's char GPT on part A; returns the model.
gpt pretrain(const options& opt, std::int32_t vocab, const streams& s) {
  kiln::nn::gpt2_config cfg;
  cfg.vocab_size = vocab;
  cfg.n_positions = opt.block;
  cfg.n_layer = opt.layers;
  cfg.n_head = opt.heads;
  cfg.n_embd = opt.embd;
  language_model<gpt> model{gpt(cfg), opt.pretrain_lr, 0.1, opt.pretrain_steps};
  auto tl = train_loader(s.a.train, opt, opt.pretrain_steps, opt.block, opt.seed);
  auto vl = val_loader(s.a.val, opt.block);
  run<gpt> trainer(fit_options(opt, opt.pretrain_steps, fs::path(opt.out) / "logs" / "pretrain"));
  const auto fit = trainer.fit(model, tl, vl);
  std::printf("pretraining on A: %lld steps in %.1f s (%.0f tokens/s); validation loss on A %.4f\n",
              static_cast<long long>(fit.global_step), fit.seconds,
              double(fit.global_step * opt.batch * opt.block) / std::max(fit.seconds, 1e-9),
              fit.metrics.count("val/loss") ? fit.metrics.at("val/loss") : 0.0);
  return std::move(model.net);
}

// Loads the base from `base`, adapts it to part B, writes the adapter and the merged model.
// Dense is Net with 16-bit (here f32) base weights: the model an NF4 run's adapter is
// merged into, loaded again from `base` (never the dequantised NF4).
template <class Net, class Dense = Net>
int adapt(const options& opt, const fs::path& base, const tokenizer& tok, const streams& s) {
  constexpr bool nf4 = !std::is_same_v<Net, Dense>;
  language_model<Net> model{kiln::io::load_hf<Net>(base), opt.lr, 0.0, opt.steps};  // no weight decay on adapters
  Net& net = model.net;
  KILN_CHECK(tok.vocab_size() <= net.vocab_size(), base.string(), ": the tokenizer has ", tok.vocab_size(),
             " tokens, the model's vocabulary only ", net.vocab_size());
  const std::int64_t block = std::min(opt.block, net.max_positions());
  const bool has_a = s.a.val.size() > block;
  const auto base_params = kiln::nn::count_parameters(net).total + kiln::nn::count_lora(net).quantized_elements;
  std::printf("base: %s (%lld parameters, context %lld)\n", base.c_str(), static_cast<long long>(base_params),
              static_cast<long long>(net.max_positions()));
  if constexpr (nf4) {
    const auto q = kiln::nn::count_lora(net);
    std::printf("QLoRA: %lld projections in NF4, %lld bytes for %lld weights (%.3fx their bf16 bytes)\n",
                static_cast<long long>(q.quantized), static_cast<long long>(q.quantized_bytes),
                static_cast<long long>(q.quantized_elements), double(q.quantized_bytes) / (2.0 * q.quantized_elements));
  }

  // The base, before adaptation: its loss on both parts, and what it writes.
  const double base_b = mean_loss(net, s.b.val, block, opt.val_batches);
  const double base_a = has_a ? mean_loss(net, s.a.val, block, opt.val_batches) : 0.0;
  sample(net, tok, opt, "base");

  kiln::nn::lora_config lc = lora_of(opt);
  lc.base_model_name_or_path = fs::absolute(base).string();
  const auto layers = kiln::nn::attach_lora(net, lc);
  const auto counts = kiln::nn::count_parameters(net);
  std::printf(
      "LoRA: r %lld, alpha %g (scaling %g), dropout %g, targets %s: %zu layers, %lld trainable parameters "
      "(%.1f%% of %lld)\n",
      static_cast<long long>(lc.r), lc.alpha, lc.scaling(), double(lc.dropout), opt.targets.c_str(), layers.size(),
      static_cast<long long>(counts.trainable), 100.0 * double(counts.trainable) / counts.total,
      static_cast<long long>(counts.total));

  auto tl = train_loader(s.b.train, opt, opt.steps, block, opt.seed + 1);
  auto vl = val_loader(s.b.val, block);
  run<Net> trainer(fit_options(opt, opt.steps, fs::path(opt.out) / "logs" / "adapt"));
  const auto fit = trainer.fit(model, tl, vl);
  std::printf("adaptation on B: %lld steps in %.1f s (%.0f tokens/s)\n", static_cast<long long>(fit.global_step),
              fit.seconds, double(fit.global_step * opt.batch * block) / std::max(fit.seconds, 1e-9));

  const double adapted_b = mean_loss(net, s.b.val, block, opt.val_batches);
  const double adapted_a = has_a ? mean_loss(net, s.a.val, block, opt.val_batches) : 0.0;
  const auto tokens = [&](const kiln::data::token_stream& t) {
    return static_cast<long long>(std::min((t.size() - 1) / block, 32 * opt.val_batches) * block);
  };
  std::printf("validation loss on B (%lld tokens): base %.4f, adapted %.4f (%+.4f)\n", tokens(s.b.val), base_b,
              adapted_b, adapted_b - base_b);
  if (has_a)
    std::printf("validation loss on A (%lld tokens): base %.4f, adapted %.4f (%+.4f)\n", tokens(s.a.val), base_a,
                adapted_a, adapted_a - base_a);

  // The adapter in PEFT's files, then the adapters folded into the weights.
  const fs::path out = fs::absolute(opt.out);
  kiln::io::save_peft_adapter(net, lc, out / "adapter");
  auto max_diff = [](const kiln::tensor<float>& x, const kiln::tensor<float>& y) {
    double diff = 0, largest = 0;
    for (std::int64_t i = 0; i < x.numel(); ++i) {
      diff = std::max(diff, double(std::abs(x.data()[i] - y.data()[i])));
      largest = std::max(largest, double(std::abs(x.data()[i])));
    }
    return std::pair{diff, largest};
  };
  const auto adapted_logits = logits_of(net, s.b.val, block);
  // The merged model: the adapters folded into the 16-bit weights — the run's own (LoRA),
  // or (QLoRA) the original ones loaded again, with the adapter file just written.
  auto merged_net = [&]() -> Dense {
    if constexpr (nf4) {
      Dense full = kiln::io::load_hf<Dense>(base);
      kiln::io::load_peft_adapter(full, out / "adapter");
      const auto [d, l] = max_diff(logits_of(full, s.b.val, block), adapted_logits);
      std::printf(
          "the adapter on the original base: max |logit difference| from the NF4 model %.3g (largest |logit| "
          "%.3g): the base's quantisation error\n",
          d, l);
      return full;
    } else {
      return std::move(net);
    }
  }();
  const auto before = logits_of(merged_net, s.b.val, block);
  kiln::nn::merge_lora(merged_net);
  const auto [diff, largest] = max_diff(before, logits_of(merged_net, s.b.val, block));
  std::printf("merged: max |logit difference| from the adapter model %.3g (largest |logit| %.3g), %lld logits\n", diff,
              largest, static_cast<long long>(before.numel()));
  kiln::io::save_hf(merged_net, out / "merged");
  const auto tok_file = tok.save(out / "merged");
  if constexpr (nf4)
    sample(net, tok, opt, "adapted (NF4)");
  else
    sample(merged_net, tok, opt, "adapted");

  std::printf("adapter: %s (adapter_config.json, adapter_model.safetensors)\n", (out / "adapter").c_str());
  std::printf("merged model: %s (config.json, model.safetensors, %s)\n", (out / "merged").c_str(),
              tok_file.filename().c_str());
  std::printf("logs: %s (metrics.csv)\n", fs::absolute(trainer.state().log_dir).c_str());
  if (opt.min_improvement && !(base_b - adapted_b >= *opt.min_improvement)) {
    std::fprintf(stderr, "the adapted model's validation loss on B (%.4f) is not %.4f below the base's (%.4f)\n",
                 adapted_b, *opt.min_improvement, base_b);
    return 1;
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) try {
  const auto t0 = std::chrono::steady_clock::now();
  const options opt = parse(argc, argv);
  kiln::cpu_runtime::set_num_threads(opt.threads);
  kiln::manual_seed(opt.seed);

  const auto corpus = kiln::data::read_text(opt.data);
  const corpus_parts parts = split_by_file(corpus, opt);
  fs::path base = opt.model;
  if (opt.model.empty()) {
    KILN_CHECK(!parts.a.files.empty(), "--adapt takes every file of ", opt.data, ": nothing is left to pretrain on");
    base = fs::absolute(opt.out) / "base";
    fs::create_directories(base);
    kiln::text::char_tokenizer::from_text(corpus.text).save(base / "char_tokenizer.json");
  } else {
    KILN_CHECK(fs::is_regular_file(base / "config.json"), "--model ", base.string(),
               ": no config.json (expected a Hugging Face model folder)");
  }
  const tokenizer tok = tokenizer::load(base);
  auto split = [&](const kiln::data::text_corpus& c) {
    return kiln::data::train_val_split(kiln::data::tokenize(c, tok), 0.9);
  };
  const streams s{parts.a.files.empty() ? kiln::data::split_streams{} : split(parts.a), split(parts.b)};
  std::string b_names;
  for (const auto& f : parts.b.files) b_names += (b_names.empty() ? "" : ", ") + f.filename().string();
  std::printf("corpus: part B (%s) %zu bytes, %lld + %lld tokens for training and validation; ", b_names.c_str(),
              parts.b.text.size(), static_cast<long long>(s.b.train.size()), static_cast<long long>(s.b.val.size()));
  if (!parts.a.files.empty()) {
    std::array<bool, 256> in_a{}, only_b{};
    for (unsigned char c : parts.a.text) in_a[c] = true;
    for (unsigned char c : parts.b.text) only_b[c] = !in_a[c];
    std::printf("part A %zu bytes in %zu files (%lld distinct bytes of B never occur in A); ", parts.a.text.size(),
                parts.a.files.size(), static_cast<long long>(std::count(only_b.begin(), only_b.end(), true)));
  }
  std::printf("%d tokens in the vocabulary\n", tok.vocab_size());

  if (opt.model.empty()) {
    gpt net = pretrain(opt, tok.vocab_size(), s);
    kiln::io::save_hf(net, base);
    std::printf("base model: %s (config.json, model.safetensors, char_tokenizer.json)\n", base.c_str());
  }

  const auto config =
      kiln::io::json::parse(kiln::io::read_text_file(base / "config.json"), (base / "config.json").string());
  const auto* type = config.find("model_type");
  const std::string model_type = type && type->is_string() ? type->as_string() : "";
  int rc = 0;
  if (model_type == "gpt2")
    rc = opt.qlora ? adapt<gpt_nf4, gpt>(opt, base, tok, s) : adapt<gpt>(opt, base, tok, s);
  else if (model_type == "llama")
    rc = opt.qlora ? adapt<llama_nf4, llama>(opt, base, tok, s) : adapt<llama>(opt, base, tok, s);
  else
    throw kiln::error((base / "config.json").string() + ": model_type \"" + model_type +
                      "\" is not one this example adapts (\"gpt2\" or \"llama\")");
  std::printf("total: %.1f s\n", std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  return rc;
} catch (const std::exception& e) {
  std::fprintf(stderr, "%s\n", e.what());
  return 2;
}
