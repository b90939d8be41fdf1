"""PyTorch peer of examples/03_mixed_precision: the same 784-256-256-10 MLP on Fashion-MNIST
(55,000 training images, batch 128, AdamW lr 2e-3 with weight decay 0.01 on matrices,
3% linear warmup then cosine to 5%) in fp32, under torch.autocast(bfloat16), and under
torch.autocast(float16) with torch.amp.GradScaler — PyTorch's mixed precision on the
CPU. One JSON line per policy: seconds of training, test accuracy, skipped steps."""
import argparse, json, math, sys, time
import numpy as np
import torch
import fm_common as c

p = argparse.ArgumentParser()
p.add_argument("--epochs", type=int, default=5)
p.add_argument("--threads", type=int, default=2)
p.add_argument("--seed", type=int, default=42)
p.add_argument("--policies", default="fp32,bf16_mixed,f16_mixed")
p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
a = p.parse_args()
torch.set_num_threads(a.threads)

x = c.idx(f"{a.data}/train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
y = c.idx(f"{a.data}/train-labels-idx1-ubyte.gz").astype(np.int64)
tx = c.idx(f"{a.data}/t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
ty = c.idx(f"{a.data}/t10k-labels-idx1-ubyte.gz").astype(np.int64)
perm = np.random.default_rng(a.seed).permutation(len(x))[:55000]
train = torch.utils.data.TensorDataset(torch.from_numpy(x[perm]), torch.from_numpy(y[perm]))
test_x, test_y = torch.from_numpy(tx), torch.from_numpy(ty)


def run(policy):
    torch.manual_seed(a.seed)
    net = c.model()
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=2e-3)
    loader = torch.utils.data.DataLoader(train, batch_size=128, shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(a.seed))
    total = len(loader) * a.epochs
    warm = max(1, total * 3 // 100)

    def factor(t):
        if t < warm:
            return (t + 1) / warm
        q = min(1.0, (t - warm) / max(1, total - warm))
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * q))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
    dtype = {"fp32": None, "bf16_mixed": torch.bfloat16, "f16_mixed": torch.float16}[policy]
    scaler = torch.amp.GradScaler("cpu", enabled=policy == "f16_mixed")
    loss_fn = torch.nn.CrossEntropyLoss()
    skipped = 0
    t0 = time.perf_counter()
    for e in range(a.epochs):
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
                loss = loss_fn(net(xb).float(), yb)
            if policy == "f16_mixed":
                before = scaler.get_scale()
                scaler.scale(loss).backward()
                scaler.step(opt)
                scaler.update()
                skipped += scaler.get_scale() < before
            else:
                loss.backward()
                opt.step()
            sched.step()
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        acc = (net(test_x).argmax(1) == test_y).float().mean().item()
    print(json.dumps({"impl": "torch", "policy": policy, "seconds": seconds, "test_acc": acc, "epochs": a.epochs,
                      "skipped_steps": int(skipped), "threads": a.threads, "torch": torch.__version__}))
    sys.stdout.flush()


for policy in a.policies.split(","):
    run(policy)
