#!/usr/bin/env bash
# ddp with its all-reduce posted during backward (the default) against posting after
# backward (--no-overlap): examples/04_distributed, the Fashion-MNIST MLP, 2 CPU ranks of
# one thread, small buckets (--bucket-mb, 0.25 by default: the 784-256-256-10 MLP then
# has three buckets, the last layers' posted before fc1's backward), over shared memory
# and over loopback TCP, interleaved round by round (the machine is shared and noisy).
# Prints per transport the median samples/s of each and their ratio, overlap / after.
# The same run also checks the two give the same test accuracy (the same bits).
#   bash bench/run_ddp_overlap.sh [ROUNDS=5] [BUCKET_MB=0.25] [LIMIT_BATCHES=200]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-5}
bucket=${2:-0.25}
limit=${3:-200}
[ -f build/build.ninja ] || meson setup build --buildtype=release >/dev/null
ninja -C build examples/04_distributed >/dev/null
mkdir -p bench/out
out=bench/out/ddp_overlap.jsonl
: > "$out"
ex=build/examples/04_distributed
common=(--strategy ddp --epochs 1 --threads 1 --no-val --json --bucket-mb "$bucket" --limit-batches "$limit"
  --out bench/out/runs_ddp_overlap)
for r in $(seq "$rounds"); do
  echo "== round $r/$rounds" >&2
  for transport in shm tcp; do
    btl=()
    [ "$transport" = tcp ] && btl=(env KILN_MPI_BTL=self,tcp)
    for overlap in on off; do
      flag=()
      [ "$overlap" = off ] && flag=(--no-overlap)
      "${btl[@]}" tests/dist/mpirun.sh 2 "$ex" "${common[@]}" "${flag[@]}" | grep '^{' |
        sed "s/}\$/, \"transport\": \"$transport\"}/" | tee -a "$out"
    done
  done
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
for t in ("shm", "tcp"):
    on = [r["samples_per_s"] for r in rows if r["transport"] == t and r["overlap"]]
    off = [r["samples_per_s"] for r in rows if r["transport"] == t and not r["overlap"]]
    acc = {r["test_acc"] for r in rows if r["transport"] == t}
    m_on, m_off = statistics.median(on), statistics.median(off)
    print(f"{t}: overlap {m_on:,.0f} samples/s, after backward {m_off:,.0f} samples/s, "
          f"overlap / after = {m_on / m_off:.3f}x ({len(on)} rounds; test accuracies seen: {sorted(acc)})")
PY
