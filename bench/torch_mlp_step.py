"""The same MLP training step as bench/mlp_step.cpp, in PyTorch eager (the peer).

784-256-256-10 ReLU MLP, batch 128, f32, cross-entropy, AdamW(lr=1e-3, wd=0.01),
torch.set_num_threads(N). Prints lines in the same format as the kiln binary.
Usage: python torch_mlp_step.py [threads]
"""
import statistics
import sys
import time

import torch
import torch.nn.functional as F

threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
torch.set_num_threads(threads)
torch.manual_seed(0)
B = 128
net = torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                          torch.nn.Linear(256, 10))
opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=0.01)
xs = [torch.rand(B, 784) for _ in range(4)]
ys = [torch.randint(0, 10, (B,)) for _ in range(4)]
k = 0


def fwd_bwd():
    global k
    loss = F.cross_entropy(net(xs[k % 4]), ys[k % 4])
    opt.zero_grad()
    loss.backward()
    k += 1


def full():
    fwd_bwd()
    opt.step()


def time_calls(f, warmup, reps, inner):
    """(median, best) seconds per call, as bench/common.hpp measures them."""
    for _ in range(warmup):
        f()
    t = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            f()
        t.append((time.perf_counter() - t0) / inner)
    return statistics.median(t), min(t)


n = 1024
a, b = torch.full((n, n), 0.5), torch.full((n, n), 0.25)
peak = 2 * n**3 / time_calls(lambda: torch.mm(a, b), 3, 7, 3)[0] / 1e9
flop = 6.0 * B * (784 * 256 + 256 * 256 + 256 * 10)
for name, f in (("fwd_bwd_adamw", full), ("fwd_bwd", fwd_bwd)):
    med, best = time_calls(f, 50, 21, 50)
    gf = flop / best / 1e9
    print(f"torch mlp_step {name} median_ms={med * 1e3:.4f} best_ms={best * 1e3:.4f} samples_per_s={B / med:.0f} "
          f"best_samples_per_s={B / best:.0f} best_gflops={gf:.1f} fraction_of_peak={gf / peak:.2f} peak_gflops={peak:.1f}")
