"""Summarises bench/out/fashion_mnist_epoch.jsonl: per implementation the median and best
epoch time (each run's first epoch is warm-up and left out), samples/s, the ratios, and
the trainer's overhead over kiln's hand-written loop."""
import json, statistics, sys

SAMPLES = 60000 // 128 * 128
rows, overhead = {}, None
for line in open(sys.argv[1]):
    d = json.loads(line)
    if d["impl"] == "kiln-overhead":
        overhead = d
        continue
    rows.setdefault(d["impl"], []).extend(d["epoch_seconds"][1:] or d["epoch_seconds"])

med = {k: statistics.median(v) for k, v in rows.items()}
best = {k: min(v) for k, v in rows.items()}
print(f"{'impl':14} {'median s/epoch':>15} {'best s/epoch':>13} {'samples/s (median)':>19}  epochs")
for k in ["kiln-hand", "kiln-trainer", "torch", "lightning"]:
    if k in med:
        print(f"{k:14} {med[k]:15.3f} {best[k]:13.3f} {SAMPLES / med[k]:19.0f}  {len(rows[k])}")
def ratio(a, b):
    if a in med and b in med:
        print(f"{a}/{b}: median {med[a] / med[b]:.2f}x, best {best[a] / best[b]:.2f}x")
ratio("torch", "kiln-trainer")
ratio("lightning", "kiln-trainer")
ratio("lightning", "torch")
if "kiln-hand" in med and "kiln-trainer" in med:
    d = med["kiln-trainer"] - med["kiln-hand"]
    print(f"kiln trainer vs hand loop (epoch medians): {1000 * d:+.1f} ms/epoch ({100 * d / med['kiln-hand']:+.2f}%), "
          "noise on this machine is larger than the difference")
if overhead:
    per = overhead["overhead_us_per_step"]
    steps = 60000 // 128
    print(f"trainer overhead per optimizer step (trivial model, {overhead['steps']:.0f} steps): {per:.2f} us "
          f"(hand {overhead['hand_us_per_step']:.2f} us, trainer {overhead['trainer_us_per_step']:.2f} us)")
    if "kiln-hand" in med:
        print(f"  = {per * steps / 1000:.2f} ms per {steps}-step epoch = "
              f"{100 * per * steps / 1e6 / med['kiln-hand']:.3f}% of kiln's hand-written epoch "
              f"(Lightning's parity test allows 300 ms per MNIST epoch)")
