// kiln/callbacks/model_summary.hpp — what the model is made of, before the first step.
//
// Spec: at on_fit_start (when trainer_options::enable_model_summary) prints a table like
// Lightning's ModelSummary: one row per submodule down to max_depth (its dotted name,
// type, parameter shapes, parameter count), then trainable, frozen and total parameter
// counts and the parameters' size in MB, then the model states the run holds (parameters,
// gradients, master weights, optimizer state: trainer.memory_states(), the formulas of
// train/memory_plan.hpp). summarize(module, max_depth) returns the table without the
// model states, for tests, docs and logs.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <typeinfo>
#include <vector>

#include "kiln/core/type_name.hpp"
#include "kiln/nn/module.hpp"
#include "kiln/train/hooks.hpp"

namespace kiln::callbacks {

namespace detail {
using kiln::short_type_name;
// Digits in groups of three, the sign kept apart. Built front to back: GCC 12's -Wrestrict
// misfires on std::string::insert here at -O3.
inline std::string with_commas(std::int64_t v) {
  const std::string digits = std::to_string(v);
  const std::size_t sign = digits.front() == '-' ? 1 : 0;
  std::string out;
  for (std::size_t i = 0; i < digits.size(); ++i) {
    if (i > sign && (digits.size() - i) % 3 == 0) out += ',';
    out += digits[i];
  }
  return out;
}
}  // namespace detail

template <class M>
std::string summarize(M& model, int max_depth = 1) {
  struct row {
    std::string name, type, shapes;
    std::int64_t params = 0;
  };
  std::vector<row> rows;
  nn::visit_modules(model, [&](const std::string& name, auto& sub) {
    if (name.empty()) return;
    const int depth = 1 + static_cast<int>(std::count(name.begin(), name.end(), '.'));
    if (depth > max_depth) return;
    row r{name, detail::short_type_name(typeid(sub).name()), "", 0};
    nn::visit_parameters(sub, [&](const std::string&, auto& p) {
      r.params += p.numel();
      if (!r.shapes.empty()) r.shapes += ", ";
      r.shapes += p.shape().str();
    });
    if (r.shapes.size() > 36) r.shapes = r.shapes.substr(0, 33) + "...";
    rows.push_back(std::move(r));
  });
  std::int64_t trainable = 0, frozen = 0, bytes = 0;
  nn::visit_parameters(model, [&](const std::string&, auto& p) {
    (p.requires_grad() ? trainable : frozen) += p.numel();
    bytes += p.numel() * static_cast<std::int64_t>(sizeof(typename std::remove_cvref_t<decltype(p)>::value_type));
  });
  std::size_t wn = 4, wt = 4, ws = 6;
  for (auto& r : rows) {
    wn = std::max(wn, r.name.size());
    wt = std::max(wt, r.type.size());
    ws = std::max(ws, r.shapes.size());
  }
  std::ostringstream os;
  char buf[512];
  std::snprintf(buf, sizeof buf, "  | %-*s | %-*s | %-*s | %12s\n", int(wn), "Name", int(wt), "Type", int(ws), "Shapes",
                "Params");
  os << buf << std::string(std::string(buf).size() - 1, '-') << '\n';
  for (std::size_t i = 0; i < rows.size(); ++i) {
    std::snprintf(buf, sizeof buf, "%zu | %-*s | %-*s | %-*s | %12s\n", i, int(wn), rows[i].name.c_str(), int(wt),
                  rows[i].type.c_str(), int(ws), rows[i].shapes.c_str(), detail::with_commas(rows[i].params).c_str());
    os << buf;
  }
  os << detail::with_commas(trainable) << "  trainable params\n"
     << detail::with_commas(frozen) << "  non-trainable params\n"
     << detail::with_commas(trainable + frozen) << "  total params\n";
  std::snprintf(buf, sizeof buf, "%.3f  total estimated model params size (MB)\n", double(bytes) / 1e6);
  os << buf;
  return os.str();
}

struct model_summary {
  using hooks = hook_list<hook::on_fit_start>;
  int max_depth = 1;
  std::FILE* stream = nullptr;  // nullptr: stdout

  void on_fit_start(auto& ctx) {
    if (!ctx.options().enable_model_summary || !ctx.is_global_zero()) return;  // rank 0 prints
    std::string s = summarize(ctx.model(), max_depth);
    if constexpr (requires { ctx.trainer().memory_states(); }) {
      const auto m = ctx.trainer().memory_states();
      char buf[256];
      std::snprintf(buf, sizeof buf,
                    "%.3f  model states (MiB, %s): parameters %.3f, gradients %.3f, master weights %.3f, optimizer "
                    "state %.3f\n",
                    double(m.model_states()) / 1048576.0, ctx.precision().name, double(m.parameters) / 1048576.0,
                    double(m.gradients) / 1048576.0, double(m.master_weights) / 1048576.0,
                    double(m.optimizer_state) / 1048576.0);
      s += buf;
    }
    std::fputs(s.c_str(), stream ? stream : stdout);
    std::fflush(stream ? stream : stdout);
  }
};

}  // namespace kiln::callbacks
