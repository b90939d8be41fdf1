#!/usr/bin/env bash
# One Fashion-MNIST training epoch (784-256-256-10 MLP, AdamW, batch 128, 2 threads) in
# kiln's hand-written loop, kiln's trainer, a plain PyTorch loop and PyTorch Lightning,
# interleaved round by round (the machine is shared and noisy), then the trainer's
# per-step overhead measured on a trivial model.
#   bash bench/run_fashion_mnist_epoch.sh [ROUNDS=3] [EPOCHS=3] [THREADS=2]
# Writes every JSON line to bench/out/fashion_mnist_epoch.jsonl and prints the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
epochs=${2:-3}
threads=${3:-2}
[ -f build/build.ninja ] || meson setup build --buildtype=release >/dev/null
ninja -C build bench/bench_fashion_mnist_epoch >/dev/null
bash bench/setup_venv.sh
mkdir -p bench/out
out=bench/out/fashion_mnist_epoch.jsonl
: > "$out"
py=bench/.venv/bin/python
for r in $(seq "$rounds"); do
  echo "== round $r/$rounds" >&2
  build/bench/bench_fashion_mnist_epoch --mode hand --epochs "$epochs" --threads "$threads" | tee -a "$out"
  build/bench/bench_fashion_mnist_epoch --mode trainer --epochs "$epochs" --threads "$threads" | tee -a "$out"
  (cd bench && "../$py" torch_fashion_mnist.py --epochs "$epochs" --threads "$threads") | tee -a "$out"
  (cd bench && "../$py" lightning_fashion_mnist.py --epochs "$epochs" --threads "$threads" 2>/dev/null) | tee -a "$out"
done
build/bench/bench_fashion_mnist_epoch --mode overhead --threads "$threads" | tee -a "$out"
python3 bench/summarise_epoch.py "$out"
