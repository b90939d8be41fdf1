#!/usr/bin/env bash
# Benchmarks kiln's MLP training step against PyTorch eager in one run.
#   bash bench/run_mlp_vs_torch.sh [rounds] [threads]
# Builds the kiln benchmarks, installs torch into bench/.venv when missing, then runs
# kiln and torch alternately (the machine is shared and noisy) and prints the median
# samples/s of each and their ratio, for fwd+bwd+AdamW and for fwd+bwd.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
threads=${2:-2}
[ -f build/build.ninja ] || meson setup build --buildtype=release >/dev/null
ninja -C build bench/bench_gemm bench/bench_mlp_step >/dev/null
if ! bench/.venv/bin/python -c "import torch" 2>/dev/null; then
  python3 -m venv bench/.venv
  bench/.venv/bin/pip install -q torch numpy
fi
out=$(mktemp)
echo "== GEMM (kiln, $threads threads)"
build/bench/bench_gemm "$threads"
echo "== MLP step 784-256-256-10, batch 128, f32, $threads threads: $rounds interleaved rounds"
for r in $(seq "$rounds"); do
  build/bench/bench_mlp_step "$threads" | tee -a "$out"
  bench/.venv/bin/python bench/torch_mlp_step.py "$threads" | tee -a "$out"
done
python3 - "$out" <<'PY'
import re, statistics, sys
rows = {}
for line in open(sys.argv[1]):
    who, _, name, *kv = line.split()
    d = dict(x.split("=") for x in kv)
    rows.setdefault((who, name, "median"), []).append(float(d["samples_per_s"]))
    rows.setdefault((who, name, "best"), []).append(float(d["best_samples_per_s"]))
print("== summary (median over rounds of each round's median; best over rounds of each round's best)")
for name in ("fwd_bwd_adamw", "fwd_bwd"):
    km, tm = statistics.median(rows[("kiln", name, "median")]), statistics.median(rows[("torch", name, "median")])
    kb, tb = max(rows[("kiln", name, "best")]), max(rows[("torch", name, "best")])
    print(f"{name}: median kiln {km:.0f} vs torch eager {tm:.0f} samples/s = {km / tm:.2f}x; "
          f"best kiln {kb:.0f} vs torch eager {tb:.0f} samples/s = {kb / tb:.2f}x")
PY
rm -f "$out"
