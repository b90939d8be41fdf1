#!/usr/bin/env bash
# Small-GPT training throughput on CPU: kiln (bench/gpt_train.cpp) against a plain
# PyTorch eager loop (bench/torch_gpt_train.py) on the same model, shapes, batch,
# optimizer, data and thread count, interleaved round by round on this machine.
# Prints tokens/s of each (median over rounds), the ratio, and peak memory. kiln runs
# twice at recompute none: split over 2 thread replicas ("kiln", the headline) and with
# every op threaded instead ("kiln_per_op"); the recompute rows use the latter.
#   bash bench/run_gpt_vs_torch.sh [ROUNDS=3] [STEPS=30] [extra flags for both...]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; steps=${2:-30}; shift $(( $# > 2 ? 2 : $# ))
[ -f build/build.ninja ] || meson setup build --buildtype=release >/dev/null
ninja -C build bench/bench_gpt_train >/dev/null
bash bench/setup_venv.sh
mkdir -p bench/out
out=bench/out/gpt_train.jsonl
: > "$out"
for r in $(seq "$rounds"); do
  echo "== round $r/$rounds" >&2
  # kiln: the batch split over 2 thread replicas, each taking its 8 sequences one at a
  # time (nn::thread_replicas::run_split); the same step as below, ops single-threaded.
  build/bench/bench_gpt_train --steps "$steps" --replicas 2 --chunks 8 "$@" 2>/dev/null | tee -a "$out"
  # kiln_per_op: every op split across the 2 threads, the whole batch at once.
  build/bench/bench_gpt_train --steps "$steps" "$@" 2>/dev/null | sed 's/"impl":"kiln"/"impl":"kiln_per_op"/' | tee -a "$out"
  bench/.venv/bin/python bench/torch_gpt_train.py --steps "$steps" "$@" 2>/dev/null | tee -a "$out"
  bench/.venv/bin/python bench/torch_gpt_train.py --steps "$steps" --attn naive "$@" 2>/dev/null | sed 's/"impl": *"torch"/"impl": "torch_naive"/' | tee -a "$out"
  build/bench/bench_gpt_train --steps "$steps" --recompute selective "$@" 2>/dev/null | sed 's/"impl":"kiln"/"impl":"kiln_selective"/' | tee -a "$out"
  build/bench/bench_gpt_train --steps "$steps" --recompute full "$@" 2>/dev/null | sed 's/"impl":"kiln"/"impl":"kiln_full"/' | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(impl, k):
    v = [r[k] for r in rows if r["impl"] == impl and k in r]
    return statistics.median(v) if v else float("nan")
def best(impl, k):
    return max(r[k] for r in rows if r["impl"] == impl)
r0 = next(r for r in rows if r["impl"] == "kiln")
print(f"small GPT ({r0['params']:,} params, {r0['tokens_per_step']} tokens/step, {r0['threads']} threads; kiln: {r0.get('replicas',1)} replicas x {r0.get('chunks',1)} pieces), median of {sum(r['impl']=='kiln' for r in rows)} rounds")
for impl in ("kiln", "kiln_per_op", "kiln_selective", "kiln_full", "torch", "torch_naive"):
    print(f"  {impl:15s} {med(impl, 'tokens_per_s'):9.0f} tokens/s  step {med(impl, 'step_ms_median'):7.1f} ms  "
          f"peak RSS {med(impl, 'peak_rss_mb'):6.1f} MB  final loss {med(impl, 'final_loss'):.3f}")
print(f"  kiln / torch (sdpa) tokens/s: {med('kiln','tokens_per_s') / med('torch','tokens_per_s'):.2f}x median, "
      f"{best('kiln','tokens_per_s') / best('torch','tokens_per_s'):.2f}x best-vs-best")
print(f"  kiln / torch (naive attention): {med('kiln','tokens_per_s') / med('torch_naive','tokens_per_s'):.2f}x")
print(f"  kiln_per_op / torch (sdpa) tokens/s: {med('kiln_per_op','tokens_per_s') / med('torch','tokens_per_s'):.2f}x median "
      f"(replicas over per-op threading: {med('kiln','tokens_per_s') / med('kiln_per_op','tokens_per_s'):.2f}x)")
print(f"  peak RSS torch/kiln: {med('torch','peak_rss_mb') / med('kiln','peak_rss_mb'):.2f}x; "
      f"kiln tensor peak {med('kiln','peak_tensor_mb'):.1f} MB (replicas, 1-sequence pieces); whole batch: "
      f"{med('kiln_per_op','peak_tensor_mb'):.1f} MB (recompute none), {med('kiln_selective','peak_tensor_mb'):.1f} MB (selective), "
      f"{med('kiln_full','peak_tensor_mb'):.1f} MB (full); torch saved activations {med('torch','saved_activation_mb'):.1f} MB")
PY
