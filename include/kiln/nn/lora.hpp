// kiln/nn/lora.hpp — LoRA adapters on linear layers (Hu et al. 2021), with PEFT's math,
// initialisation and names.
//
// Spec: the adapter policy is part of the model's type, as the attention mask and the
// recomputation policy are: nn::llama<Mask, Recompute, T, Dev, Adapter>.
//   - adapter::none: the blocks' projections are nn::linear (the default);
//   - adapter::lora: they are nn::lora_linear, which keeps the base weight and bias under
//     linear's names (so a Hugging Face checkpoint loads exactly as before) and, once
//     attach_lora(model, config) has chosen it by name, a low-rank pair
//         y = x·Wᵀ + b + s·(dropout(x)·Aᵀ)·Bᵀ,   A [r, in], B [out, r],
//     A ~ U(−1/√in, 1/√in) (PEFT's kaiming_uniform_ with a = √5), B = 0 — so a fresh
//     adapter changes nothing — and s = alpha/r, or alpha/√r with use_rslora.
// Rank, alpha, dropout, rsLoRA, target_modules and modules_to_save are run-time values
// (lora_config), read from and written to PEFT's adapter_config.json (kiln/nn/peft.hpp).
// attach_lora freezes every other parameter (requires_grad = false: no gradient buffer,
// no optimizer state, no reduction or sharding by the strategies), except those of the
// modules named in modules_to_save. The LM head is never adapted ("all-linear" means the
// blocks' projections, as in PEFT).
// Names: "<layer>.lora_A.weight" and "<layer>.lora_B.weight", PEFT's without its
// "base_model.model." prefix and adapter name.
// merge_lora folds s·B·A into W (in W's element type, the product accumulated in f64);
// unmerge_lora subtracts it again. Merging twice, or unmerging what is not merged, is an
// error, never a silent double count. While merged, the adapters are not applied.
//
// QLoRA: adapter::qlora makes the projections lora_linear<T, Dev, base_weight::nf4>, whose
// base weight is quantised to NF4 with double-quantised scales (kiln/ops/kernel/nf4.hpp,
// bitsandbytes' layout) by quantize_nf4(model) — io::load_hf calls it once the weights
// are in, and attach_lora calls it for layers still dense. The dense weight is then
// released: the layer holds 0.258 bytes per base element where bf16 holds 2. A quantised
// base is frozen for good; its parameter name disappears from the walks (checkpoints,
// save_hf), and merging is refused: merge from the original 16-bit weights instead (load
// them with adapter::lora, load the adapter, merge_lora), never from the dequantised NF4.
#pragma once

#include <cmath>
#include <concepts>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "kiln/core/cpu_runtime.hpp"
#include "kiln/core/transfer.hpp"
#include "kiln/nn/dropout.hpp"
#include "kiln/nn/init.hpp"
#include "kiln/nn/linear.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/ops.hpp"
#include "kiln/ops/kernel/nf4.hpp"

namespace kiln::nn {

namespace adapter {
struct none {};   // plain linear layers
struct lora {};   // low-rank adapters on the linear layers attach_lora targets
struct qlora {};  // the same over NF4-quantised base weights
}  // namespace adapter

template <class A>
concept adapter_policy =
    std::same_as<A, adapter::none> || std::same_as<A, adapter::lora> || std::same_as<A, adapter::qlora>;

// How a lora_linear stores its frozen base weight.
namespace base_weight {
struct dense {};  // a var<T, Dev> (trainable until attach_lora freezes it)
struct nf4 {};    // NF4 once quantize() has run (dense until then)
}  // namespace base_weight

// The run-time half of a LoRA adapter: what PEFT's LoraConfig holds.
struct lora_config {
  std::int64_t r = 8;
  double alpha = 8.0;  // lora_alpha
  float dropout = 0.0f;
  bool use_rslora = false;
  // Module names ("q_proj": every module whose name is it or ends in ".q_proj"; or a full
  // name), or the single entry "all-linear".
  std::vector<std::string> target_modules{"q_proj", "v_proj"};
  std::vector<std::string> modules_to_save;  // trained in full beside the adapters
  std::string base_model_name_or_path;

  double scaling() const {
    return use_rslora ? alpha / std::sqrt(static_cast<double>(r)) : alpha / static_cast<double>(r);
  }
  bool all_linear() const { return target_modules.size() == 1 && target_modules[0] == "all-linear"; }
  void validate(std::string_view who = "lora_config") const {
    KILN_CHECK(r > 0, who, ": r must be positive, got ", r);
    KILN_CHECK(alpha > 0 && std::isfinite(alpha), who, ": lora_alpha must be a positive number, got ", alpha);
    KILN_CHECK(0.0f <= dropout && dropout < 1.0f, who, ": lora_dropout must be in [0, 1), got ", dropout);
    KILN_CHECK(!target_modules.empty(), who, ": target_modules is empty (name the layers to adapt, or \"all-linear\")");
  }
};

// PEFT's rule for a list of targets: the module's name equals a target or ends in "." + target.
inline bool name_matches(std::string_view module_name, std::string_view target) {
  return module_name == target || (module_name.size() > target.size() && module_name.ends_with(target) &&
                                   module_name[module_name.size() - target.size() - 1] == '.');
}

template <floating_element T, device Dev = cpu, class Base = base_weight::dense>
struct lora_linear {
  using device_type = Dev;
  using value_type = T;
  static constexpr bool nf4_base = std::same_as<Base, base_weight::nf4>;
  static_assert(!nf4_base || Dev::is_host, "lora_linear: NF4 base weights run on the CPU only in this release");

  struct low_rank {
    var<T, Dev> A;  // [r, in]
    var<T, Dev> B;  // [out, r]
    double scaling = 1.0;
    nn::dropout drop{0.0f};
  };

  var<T, Dev> weight;               // [out_features, in_features], frozen once adapted; empty once quantised
  std::optional<var<T, Dev>> bias;  // [out_features]
  std::optional<low_rank> lora;
  bool merged = false;
  std::shared_ptr<const ops::nf4::nf4_weight> qweight;  // the NF4 base (nf4_base, after quantize())

  lora_linear() = default;
  // The base layer as nn::linear initialises it.
  lora_linear(std::int64_t in_features, std::int64_t out_features, bool with_bias = true) {
    linear<T, Dev> base(in_features, out_features, with_bias);
    weight = base.weight;
    bias = base.bias;
  }
  std::int64_t in_features() const { return qweight ? qweight->dims[1] : weight.size(1); }
  std::int64_t out_features() const { return qweight ? qweight->dims[0] : weight.size(0); }
  std::int64_t rank() const { return lora ? lora->A.size(0) : 0; }
  bool quantized() const { return qweight != nullptr; }

  // Replaces the dense base weight by its NF4 form and releases it (nf4_base only).
  void quantize() requires nf4_base {
    if (qweight) return;
    const auto w = host_copy(weight.value());
    qweight = std::make_shared<const ops::nf4::nf4_weight>(ops::nf4::quantize(w.data(), w.shape()));
    weight = var<T, Dev>();
  }

  // Adds a fresh adapter (A uniform, B zero): the layer's output is unchanged.
  void attach(std::int64_t r, double scaling, float dropout_p) {
    KILN_CHECK(!lora, "lora_linear: an adapter is already attached");
    KILN_CHECK(r > 0, "lora_linear: rank must be positive, got ", r);
    const double bound = 1.0 / std::sqrt(static_cast<double>(in_features()));
    low_rank a;
    a.A = var<T, Dev>(to_device<Dev>(init::uniform<T>(shape{r, in_features()}, bound)), true);
    a.B = var<T, Dev>(to_device<Dev>(tensor<T>::zeros(shape{out_features(), r})), true);
    a.scaling = scaling;
    a.drop = nn::dropout(dropout_p);
    lora = std::move(a);
  }

  // One node (ops::lora_linear): the base GEMM and the low-rank path, s·(x·Aᵀ) kept for
  // the backward, which never forms W's gradient while W is frozen.
  var<T, Dev> operator()(const var<T, Dev>& x) {
    if constexpr (nf4_base) {
      if (qweight) {
        if (!lora) return ops::nf4_linear(x, qweight, bias);
        return ops::qlora_linear(x, qweight, bias, lora->drop(x), lora->A, lora->B, lora->scaling);
      }
    }
    if (!lora || merged) return ops::linear(x, weight, bias);
    return ops::lora_linear(x, weight, bias, lora->drop(x), lora->A, lora->B, lora->scaling);
  }

  // W += sign · s · B·A, accumulated in f64 on the host, rounded once to T; rows split
  // across the CPU's threads.
  void fold(double sign) {
    const auto a = host_copy(lora->A.value()), b = host_copy(lora->B.value());
    auto w = host_copy(weight.value());
    const std::int64_t in = in_features(), r = rank();
    const double s = sign * lora->scaling;
    cpu_runtime::parallel_for(out_features(), 16, [&](std::int64_t o0, std::int64_t o1) {
      std::vector<double> row(static_cast<std::size_t>(in));
      for (std::int64_t o = o0; o < o1; ++o) {
        std::fill(row.begin(), row.end(), 0.0);
        for (std::int64_t k = 0; k < r; ++k) {
          const double bk = static_cast<double>(b.data()[o * r + k]);
          if (bk == 0.0) continue;
          const T* ak = a.data() + k * in;
          for (std::int64_t i = 0; i < in; ++i) row[static_cast<std::size_t>(i)] += bk * static_cast<double>(ak[i]);
        }
        T* wo = w.data() + o * in;
        for (std::int64_t i = 0; i < in; ++i)
          wo[i] = static_cast<T>(static_cast<double>(wo[i]) + s * row[static_cast<std::size_t>(i)]);
      }
    });
    copy_from_host(weight.value(), w);
  }

  template <class F>
  void for_each_child(F&& f) {
    if (!qweight) f("weight", weight);
    if (bias) f("bias", *bias);
    if (lora) {
      f("lora_A.weight", lora->A);
      f("lora_B.weight", lora->B);
      f("lora_dropout", lora->drop);
    }
  }
};

template <class M>
struct is_lora_linear : std::false_type {};
template <class T, class Dev, class Base>
struct is_lora_linear<lora_linear<T, Dev, Base>> : std::true_type {};

// The linear layer type a block uses under adapter policy A.
template <adapter_policy A, floating_element T, device Dev>
using adapted_linear = std::conditional_t<
    std::same_as<A, adapter::lora>, lora_linear<T, Dev>,
    std::conditional_t<std::same_as<A, adapter::qlora>, lora_linear<T, Dev, base_weight::nf4>, linear<T, Dev>>>;

// Calls f(name, layer) for every lora_linear under m.
template <class M, class F>
void visit_lora_layers(M& m, F&& f) {
  visit_modules(m, [&](const std::string& name, auto& sub) {
    if constexpr (is_lora_linear<std::remove_cvref_t<decltype(sub)>>::value) f(name, sub);
  });
}

// Quantises the base weight of every NF4-base layer under m that is still dense (a no-op
// for models without adapter::qlora). Returns how many layers it quantised.
template <class M>
std::int64_t quantize_nf4(M& m) {
  std::int64_t n = 0;
  visit_lora_layers(m, [&](const std::string&, auto& layer) {
    if constexpr (std::remove_cvref_t<decltype(layer)>::nf4_base)
      if (!layer.quantized()) {
        layer.quantize();
        ++n;
      }
  });
  return n;
}

// The names of the layers config targets; every target must name at least one layer.
template <class M>
std::vector<std::string> lora_targets(M& model, const lora_config& c, std::string_view who = "attach_lora") {
  c.validate(who);
  std::vector<std::string> all, chosen;
  visit_lora_layers(model, [&](const std::string& name, auto&) { all.push_back(name); });
  KILN_CHECK(!all.empty(), who,
             ": the model has no adaptable linear layers (instantiate it with the adapter policy "
             "kiln::nn::adapter::lora, e.g. nn::llama<Mask, Recompute, T, Dev, nn::adapter::lora>)");
  if (c.all_linear()) return all;
  for (const auto& t : c.target_modules) {
    KILN_CHECK(t != "all-linear", who, ": target_modules: \"all-linear\" must be the only entry");
    bool hit = false;
    for (const auto& n : all) hit = hit || name_matches(n, t);
    if (!hit) {
      std::string leaves;
      for (const auto& n : all) {
        const std::string leaf = n.substr(n.rfind('.') + 1);
        if (leaves.find("\"" + leaf + "\"") == std::string::npos)
          leaves += (leaves.empty() ? "\"" : ", \"") + leaf + "\"";
      }
      kiln::detail::fail(who, ": target_modules names \"", t, "\", which is no linear layer of the model (it has ",
                         leaves, ", or \"all-linear\")");
    }
  }
  for (const auto& n : all)
    for (const auto& t : c.target_modules)
      if (name_matches(n, t)) {
        chosen.push_back(n);
        break;
      }
  return chosen;
}

// Attaches fresh adapters to the layers `c` targets and freezes everything else but
// c.modules_to_save. Returns the adapted layers' names. Nothing changes if it throws.
template <class M>
std::vector<std::string> attach_lora(M& model, const lora_config& c) {
  const auto chosen = lora_targets(model, c);
  visit_lora_layers(model, [&](const std::string& name, auto& layer) {
    KILN_CHECK(!layer.lora, "attach_lora: layer '", name, "' already has an adapter");
  });
  for (const auto& s : c.modules_to_save) {
    bool hit = false;
    visit_modules(model, [&](const std::string& name, auto&) { hit = hit || name_matches(name, s); });
    KILN_CHECK(hit, "attach_lora: modules_to_save names \"", s, "\", which is no module of the model");
  }
  requires_grad(model, false);
  quantize_nf4(model);
  visit_lora_layers(model, [&](const std::string& name, auto& layer) {
    for (const auto& n : chosen)
      if (n == name) layer.attach(c.r, c.scaling(), c.dropout);
  });
  visit_modules(model, [&](const std::string& name, auto& sub) {
    for (const auto& s : c.modules_to_save)
      if (name_matches(name, s)) requires_grad(sub, true);
  });
  return chosen;
}

struct lora_counts {
  std::int64_t adapted = 0, merged = 0, adapter_parameters = 0;
  std::int64_t quantized = 0, quantized_elements = 0, quantized_bytes = 0;  // NF4 bases
};
template <class M>
lora_counts count_lora(M& model) {
  lora_counts c;
  visit_lora_layers(model, [&](const std::string&, auto& layer) {
    if (layer.qweight) {
      ++c.quantized;
      c.quantized_elements += layer.qweight->numel();
      c.quantized_bytes += layer.qweight->bytes();
    }
    if (!layer.lora) return;
    ++c.adapted;
    c.merged += layer.merged ? 1 : 0;
    c.adapter_parameters += layer.lora->A.numel() + layer.lora->B.numel();
  });
  return c;
}

// Folds every adapter into its base weight (see the spec). Throws, changing nothing, when
// the model has no adapter or one is merged already.
template <class M>
void merge_lora(M& model) {
  const auto c = count_lora(model);
  KILN_CHECK(c.adapted > 0, "merge_lora: the model has no LoRA adapters to merge");
  KILN_CHECK(c.quantized == 0, "merge_lora: ", c.quantized,
             " base weights are NF4; merge from the original 16-bit weights (load them with nn::adapter::lora, load "
             "this adapter with io::load_peft_adapter, then merge_lora), never from the dequantised NF4");
  KILN_CHECK(c.merged == 0, "merge_lora: ", c.merged, " of ", c.adapted,
             " adapted layers are merged already; merging again would add the adapters twice (unmerge_lora first)");
  visit_lora_layers(model, [](const std::string&, auto& layer) {
    if (!layer.lora) return;
    layer.fold(+1.0);
    layer.merged = true;
  });
}

// Takes the adapters back out of the base weights merge_lora folded them into.
template <class M>
void unmerge_lora(M& model) {
  const auto c = count_lora(model);
  KILN_CHECK(c.adapted > 0 && c.merged == c.adapted, "unmerge_lora: ", c.merged, " of ", c.adapted,
             " adapted layers are merged; only a merged model can be unmerged");
  visit_lora_layers(model, [](const std::string&, auto& layer) {
    if (!layer.lora) return;
    layer.fold(-1.0);
    layer.merged = false;
  });
}

}  // namespace kiln::nn
