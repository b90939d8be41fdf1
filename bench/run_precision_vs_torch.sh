#!/usr/bin/env bash
# The Fashion-MNIST MLP (examples/03_mixed_precision) under fp32, bf16_mixed and f16_mixed
# in kiln, and the same model, data split, optimizer and schedule in PyTorch with
# torch.autocast (+ GradScaler for f16) on the CPU, interleaved round by round (the
# machine is shared and noisy). Prints per policy: training seconds (median), the
# torch/kiln time ratio, test accuracy and its gap to the same framework's fp32.
#   bash bench/run_precision_vs_torch.sh [ROUNDS=2] [EPOCHS=5] [THREADS=2]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-2}
epochs=${2:-5}
threads=${3:-2}
[ -f build/build.ninja ] || meson setup build --buildtype=release >/dev/null
ninja -C build examples/03_mixed_precision >/dev/null
bash bench/setup_venv.sh
mkdir -p bench/out
out=bench/out/precision.jsonl
: > "$out"
for r in $(seq "$rounds"); do
  echo "== round $r/$rounds" >&2
  build/examples/03_mixed_precision --epochs "$epochs" --threads "$threads" --json \
    --policies fp32,bf16_mixed,f16_mixed --out bench/out/runs_precision | grep '^{' | tee -a "$out"
  (cd bench && ../bench/.venv/bin/python torch_precision.py --epochs "$epochs" --threads "$threads") | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(impl, pol, key):
    return statistics.median(r[key] for r in rows if r["impl"] == impl and r["policy"] == pol)
print(f"{'policy':<12} {'kiln s':>8} {'torch s':>8} {'torch/kiln':>10} {'kiln acc':>9} {'gap':>6} {'torch acc':>9} {'gap':>6}")
for pol in ("fp32", "bf16_mixed", "f16_mixed"):
    ks, ts = med("kiln", pol, "seconds"), med("torch", pol, "seconds")
    ka, ta = med("kiln", pol, "test_acc"), med("torch", pol, "test_acc")
    kg = 100 * (ka - med("kiln", "fp32", "test_acc"))
    tg = 100 * (ta - med("torch", "fp32", "test_acc"))
    print(f"{pol:<12} {ks:8.2f} {ts:8.2f} {ts / ks:10.2f} {100 * ka:8.2f}% {kg:+6.2f} {100 * ta:8.2f}% {tg:+6.2f}")
PY
