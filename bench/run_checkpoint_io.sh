#!/usr/bin/env bash
# Checkpoint save/load time, kiln against torch.save/torch.load on the same model and
# AdamW state, interleaved round by round. Prints medians and the ratios.
#   bash bench/run_checkpoint_io.sh [ROUNDS=3] [HIDDEN=2048] [LAYERS=4]
# KILN_BUILD_DIR picks the build directory (default: build).
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}; hidden=${2:-2048}; layers=${3:-4}
build=${KILN_BUILD_DIR:-build}
[ -f "$build/build.ninja" ] || meson setup "$build" --buildtype=release >/dev/null
ninja -C "$build" bench/bench_checkpoint_io >/dev/null
bash bench/setup_venv.sh
mkdir -p bench/out
out=bench/out/checkpoint_io.jsonl
: > "$out"
for r in $(seq "$rounds"); do
  echo "== round $r/$rounds" >&2
  "$build"/bench/bench_checkpoint_io --hidden "$hidden" --layers "$layers" --reps 3 | tee -a "$out"
  bench/.venv/bin/python bench/torch_checkpoint_io.py --hidden "$hidden" --layers "$layers" --reps 3 | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(impl, k):
    return statistics.median(r[k] for r in rows if r["impl"] == impl)
k, t = "kiln", "torch"
p = rows[0]["params"]
print(f"checkpoint of {p:,} parameters + AdamW state ({rows[0]['mb']} MB), median of {sum(r['impl']==k for r in rows)} saves/loads each")
for op in ("save_s", "load_s"):
    print(f"  {op[:-2]}: kiln {med(k, op):.3f} s, torch {med(t, op):.3f} s, torch/kiln {med(t, op) / med(k, op):.2f}x")
PY
