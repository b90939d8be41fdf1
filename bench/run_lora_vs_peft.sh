#!/usr/bin/env bash
# LoRA fine-tuning on the CPU, kiln against transformers + PEFT on the same Llama-shaped
# model (bench/lora_train.cpp), interleaved round by round. Prints the medians of tokens/s
# and peak RSS, and the ratios.
#   bash bench/run_lora_vs_peft.sh [ROUNDS=3] [extra flags for both sides, e.g. --steps 8]
# KILN_BUILD_DIR picks the build directory (default: build); the peer runs in the Python
# that tools/dev.sh test keeps (KILN_PYTHON, default ~/.cache/kiln/pyvenv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
shift || true
build=${KILN_BUILD_DIR:-build}
py=${KILN_PYTHON:-$HOME/.cache/kiln/pyvenv/bin/python}
"$py" -c "import torch, transformers, peft" || { echo "run_lora_vs_peft: $py lacks torch/transformers/peft (run tools/dev.sh test once)"; exit 1; }
[ -f "$build/build.ninja" ] || meson setup "$build" --buildtype=release >/dev/null
ninja -C "$build" bench/bench_lora_train >/dev/null
mkdir -p bench/out
out=bench/out/lora_vs_peft.jsonl
: > "$out"
for r in $(seq "$rounds"); do
  echo "== round $r/$rounds" >&2
  "$build"/bench/bench_lora_train "$@" | tee -a "$out"
  "$py" bench/peft_lora_train.py "$@" | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(impl, k):
    return statistics.median(r[k] for r in rows if r["impl"] == impl)
k = next(r for r in rows if r["impl"] == "kiln")
print(f"LoRA fine-tune, {k['params']:,} parameters ({k['trainable']:,} trainable), f32, {k['threads']} threads, "
      f"median of {sum(r['impl'] == 'kiln' for r in rows)} runs each")
print(f"  tokens/s: kiln {med('kiln', 'tokens_per_s'):.0f}, PEFT {med('peft', 'tokens_per_s'):.0f}, "
      f"kiln/PEFT {med('kiln', 'tokens_per_s') / med('peft', 'tokens_per_s'):.2f}x")
print(f"  peak RSS: kiln {med('kiln', 'peak_rss_mb'):.0f} MB, PEFT {med('peft', 'peak_rss_mb'):.0f} MB, "
      f"kiln/PEFT {med('kiln', 'peak_rss_mb') / med('peft', 'peak_rss_mb'):.2f}x")
PY
