#!/usr/bin/env bash
# Data-parallel scaling on CPU ranks: the Fashion-MNIST MLP (examples/04_distributed,
# global batch 128, one thread per rank) on 1 process (single_device) and on 2 ranks under
# ddp, zero<1>, zero<2> and zero<3> in kiln (Open MPI: shared memory between the ranks, and ddp
# once more over loopback TCP, gloo's transport), and the same model, data and optimizer
# in PyTorch on 1 process and on 2 ranks under DistributedDataParallel (gloo, loopback
# TCP), interleaved round by round (the machine is shared and noisy). Prints per
# configuration: median samples/s, scaling over the same framework's 1-process run, and
# kiln / torch DDP throughput.
#   bash bench/run_dist_vs_torch.sh [ROUNDS=3] [EPOCHS=1]
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
epochs=${2:-1}
[ -f build/build.ninja ] || meson setup build --buildtype=release >/dev/null
ninja -C build examples/04_distributed >/dev/null
bash bench/setup_venv.sh
mkdir -p bench/out
out=bench/out/dist.jsonl
: > "$out"
ex=build/examples/04_distributed
common=(--epochs "$epochs" --threads 1 --no-val --json --out bench/out/runs_dist)
for r in $(seq "$rounds"); do
  echo "== round $r/$rounds" >&2
  OMP_NUM_THREADS=1 "$ex" --strategy single "${common[@]}" | grep '^{' | tee -a "$out"
  for s in ddp zero1 zero2 zero3; do
    tests/dist/mpirun.sh 2 "$ex" --strategy "$s" "${common[@]}" | grep '^{' | tee -a "$out"
  done
  KILN_MPI_BTL=self,tcp tests/dist/mpirun.sh 2 "$ex" --strategy ddp "${common[@]}" | grep '^{' |
    sed 's/"strategy": "ddp"/"strategy": "ddp_tcp"/' | tee -a "$out"
  (cd bench && ../bench/.venv/bin/python torch_ddp.py --ranks 1 --threads 1 --epochs "$epochs") | tee -a "$out"
  (cd bench && ../bench/.venv/bin/python torch_ddp.py --ranks 2 --threads 1 --epochs "$epochs") | tee -a "$out"
done
python3 - "$out" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
def med(impl, strat, key="samples_per_s"):
    v = [r[key] for r in rows if r["impl"] == impl and r["strategy"] == strat]
    return statistics.median(v) if v else float("nan")
ks, ts = med("kiln", "single"), med("torch", "single")
print(f"{'configuration':<24} {'samples/s':>10} {'scaling':>8} {'kiln/torch':>10} {'test acc':>9}")
print(f"{'kiln single (1 proc)':<24} {ks:10.0f} {1.0:8.2f} {ks / ts:10.2f} {100 * med('kiln', 'single', 'test_acc'):8.2f}%")
print(f"{'torch single (1 proc)':<24} {ts:10.0f} {1.0:8.2f} {'':>10} {100 * med('torch', 'single', 'test_acc'):8.2f}%")
tdd = med("torch", "ddp")
for s, label in (("ddp", "ddp shm"), ("zero1", "zero1 shm"), ("zero2", "zero2 shm"), ("zero3", "zero3 shm"), ("ddp_tcp", "ddp tcp")):
    k = med("kiln", s)
    print(f"{'kiln ' + label + ' (2 ranks)':<24} {k:10.0f} {k / ks:8.2f} {k / tdd:10.2f} {100 * med('kiln', s, 'test_acc'):8.2f}%")
print(f"{'torch ddp tcp (2 ranks)':<24} {tdd:10.0f} {tdd / ts:8.2f} {'':>10} {100 * med('torch', 'ddp', 'test_acc'):8.2f}%")
z = [r["optimizer_state_bytes_rank0"] for r in rows if r["impl"] == "kiln" and r["strategy"] in ("zero1", "zero2")]
d = [r["optimizer_state_bytes_rank0"] for r in rows if r["impl"] == "kiln" and r["strategy"] == "ddp"]
if z and d:
    print(f"optimizer state on rank 0 (plan): ddp {d[0]} B, zero {z[0]} B ({z[0] / d[0]:.3f}x)")
for s in ("single", "ddp", "zero1", "zero2", "zero3"):
    m = [r.get("model_state_bytes_rank0") for r in rows if r["impl"] == "kiln" and r["strategy"] == s]
    if m and m[0] is not None:
        print(f"model states (parameters + gradients + optimizer state) on rank 0 (plan), {s}: {m[0]} B")
PY
