"""The PyTorch peer of bench_checkpoint_io: the same MLP and AdamW state, saved with
torch.save (+ flush and fsync, as kiln does) and loaded with torch.load +
load_state_dict. Prints one JSON line per repetition."""
import argparse, json, os, time
import torch

p = argparse.ArgumentParser()
p.add_argument("--hidden", type=int, default=2048)
p.add_argument("--layers", type=int, default=4)
p.add_argument("--reps", type=int, default=5)
p.add_argument("--dir", default="/tmp/kiln_bench_ckpt")
a = p.parse_args()
torch.set_num_threads(2)
os.makedirs(a.dir, exist_ok=True)
dims = [784] + [a.hidden] * (a.layers - 1) + [10]
mods = []
for i in range(len(dims) - 1):
    mods.append(torch.nn.Linear(dims[i], dims[i + 1]))
    if i + 2 < len(dims):
        mods.append(torch.nn.ReLU())
net = torch.nn.Sequential(*mods)
opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
net(torch.ones(4, 784)).sum().backward()
opt.step()
params = sum(p.numel() for p in net.parameters())
path = os.path.join(a.dir, "bench.pt")
for _ in range(a.reps):
    t0 = time.perf_counter()
    with open(path + ".tmp", "wb") as f:
        torch.save({"model": net.state_dict(), "optimizer": opt.state_dict()}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    save = time.perf_counter() - t0
    t0 = time.perf_counter()
    ck = torch.load(path, weights_only=True)
    net.load_state_dict(ck["model"])
    opt.load_state_dict(ck["optimizer"])
    load = time.perf_counter() - t0
    print(json.dumps({"impl": "torch", "params": params, "mb": round(params * 12 / 1e6, 1), "save_s": round(save, 4),
                      "load_s": round(load, 4), "file_bytes": os.path.getsize(path), "torch": torch.__version__}),
          flush=True)
os.remove(path)
