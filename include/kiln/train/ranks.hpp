// kiln/train/ranks.hpp — how the trainer keeps several ranks in step.
//
// Spec: ranks<Trainer> holds what the loop does differently when its strategy has more
// than one rank (all of it is the identity on one):
//   distribute(t, loader)      gives a loader that has distribute(rank, world) this rank's
//                              shard; loaders without it must shard themselves;
//   from_rank_zero(t, value)   rank 0's path or string on every rank (the run directory,
//                              the checkpoint to resume from);
//   agree(t)                   at each quiet point, one small all-reduce decides together:
//                              any rank's stop request (early stopping on its own metrics,
//                              a hook's control::stop) and max_time on any rank's clock stop
//                              every rank at the same batch; if rank 0 has checkpoint saves
//                              queued, its list is broadcast, so every rank joins the same
//                              captures.
#pragma once

#include <filesystem>
#include <optional>
#include <string>

#include "kiln/strategy/strategy.hpp"

namespace kiln::train {

template <class Trainer>
struct ranks {
  template <class L>
  static void distribute(Trainer& t, L& l) {
    if (t.strategy_.world_size() == 1) return;
    if constexpr (requires { l.distribute(0, 1); }) l.distribute(t.strategy_.rank(), t.strategy_.world_size());
  }

  static constexpr bool coordinates = strategy::traits<typename Trainer::strategy_type>::coordinates_ranks;

  static std::string from_rank_zero(Trainer& t, std::string s) {
    if constexpr (coordinates)
      if (t.strategy_.world_size() > 1) t.strategy_.broadcast_string(s);
    return s;
  }
  static std::optional<std::filesystem::path> from_rank_zero(Trainer& t, std::optional<std::filesystem::path> p) {
    const std::string s = from_rank_zero(t, p ? p->string() : std::string());
    return s.empty() ? std::nullopt : std::optional<std::filesystem::path>(s);
  }

  static void agree(Trainer& t) {
    auto& st = t.state_;
    if (t.strategy_.world_size() == 1) return;
    const auto& o = t.options_;
    const bool local_time = o.max_time && t.ctx_.elapsed_seconds() >= o.max_time->count();
    std::int64_t v[3] = {st.should_stop, local_time,
                         t.strategy_.is_global_zero() && !t.pending_saves_.empty() ? std::int64_t(1) : 0};
    if constexpr (coordinates) t.strategy_.agree(v, 3);
    t.agreed_time_up_ = v[1] > 0;
    if (v[0] > 0 && !st.should_stop) t.ctx_.stop("another rank requested a stop");
    if constexpr (coordinates) {
      std::string list;
      if (v[2] > 0) {
        for (auto& [p, w] : t.pending_saves_) list += (w ? "1" : "0") + p.string() + '\n';
        t.strategy_.broadcast_string(list);
      }
      t.pending_saves_.clear();
      for (std::size_t a = 0, b; a < list.size(); a = b + 1) {
        b = list.find('\n', a);
        t.pending_saves_.emplace_back(list.substr(a + 1, b - a - 1), list[a] == '1');
      }
    }
  }
};

}  // namespace kiln::train
