#!/usr/bin/env bash
# LoRA fine-tuning on the CPU, kiln against transformers + PEFT on the same Llama-shaped
# model (bench/lora_train.cpp), interleaved round by round, in three configurations:
# f32 LoRA, bf16 LoRA, and kiln's QLoRA (NF4 base, f32 compute) against PEFT's f32 LoRA
# (the peer trains the same adapters on a 16-bit-free base; bitsandbytes' 4-bit GEMM is
# not part of the comparison). Prints the medians of tokens/s and peak RSS, the ratios,
# and the NF4 base's bytes against bf16's.
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
for cfg in "--dtype f32 --adapter lora" "--dtype bf16 --adapter lora" "--dtype f32 --adapter qlora"; do
  # torch's bf16 GEMMs on a CPU without bf16 instructions take ~100 s a step here: the
  # bf16 pair runs 2 timed steps after 1 warm-up (flags given to the script still win).
  [[ $cfg == *bf16* ]] && cfg="$cfg --steps 2 --warmup 1"
  for r in $(seq "$rounds"); do
    echo "== $cfg, round $r/$rounds" >&2
    # shellcheck disable=SC2086
    "$build"/bench/bench_lora_train $cfg "$@" | tee -a "$out"
    # shellcheck disable=SC2086
    "$py" bench/peft_lora_train.py $cfg "$@" | sed 's/^{/{"config": "'"$(echo "$cfg" | cut -d' ' -f1-4 | tr ' ' _)"'", /' | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for r in rows:
    r.setdefault("config", f"--dtype_{r['dtype']}_--adapter_{r.get('adapter', 'lora')}")
    if r["impl"] == "kiln":
        r["config"] = f"--dtype_{r['dtype']}_--adapter_{r['adapter']}"
for cfg in dict.fromkeys(r["config"] for r in rows):
    sel = [r for r in rows if r["config"] == cfg]
    def med(impl, k):
        return statistics.median(r[k] for r in sel if r["impl"] == impl)
    k = next(r for r in sel if r["impl"] == "kiln")
    print(f"{cfg.replace('_', ' ')}: {k['params']:,} parameters ({k['trainable']:,} trainable), {k['threads']} threads, "
          f"median of {sum(r['impl'] == 'kiln' for r in sel)} runs each")
    print(f"  tokens/s: kiln {med('kiln', 'tokens_per_s'):.0f}, PEFT {med('peft', 'tokens_per_s'):.0f}, "
          f"kiln/PEFT {med('kiln', 'tokens_per_s') / med('peft', 'tokens_per_s'):.2f}x")
    print(f"  peak RSS: kiln {med('kiln', 'peak_rss_mb'):.0f} MB, PEFT {med('peft', 'peak_rss_mb'):.0f} MB, "
          f"kiln/PEFT {med('kiln', 'peak_rss_mb') / med('peft', 'peak_rss_mb'):.2f}x")
    if k["nf4_base_bytes"]:
        print(f"  NF4 base weights: {k['nf4_base_bytes']:,} bytes, bf16 would be {k['nf4_base_bf16_bytes']:,}: "
              f"{k['nf4_base_bytes'] / k['nf4_base_bf16_bytes']:.3f}x")
PY
