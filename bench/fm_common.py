"""Shared by the Fashion-MNIST epoch peers: flags, data, model (the same as kiln's bench)."""
import argparse, gzip, json, sys
import numpy as np
import torch


def parse(impl):
    p = argparse.ArgumentParser(description=f"Fashion-MNIST epoch benchmark, {impl} peer")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--no-log", action="store_true", help="lightning: do not call self.log in training_step")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    return a


def idx(path):
    with gzip.open(path, "rb") as f:
        b = f.read()
    rank = b[3]
    dims = [int.from_bytes(b[4 + 4 * i:8 + 4 * i], "big") for i in range(rank)]
    return np.frombuffer(b, dtype=np.uint8, offset=4 + 4 * rank).reshape(dims)


def train_data(a):
    x = idx(f"{a.data}/train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    y = idx(f"{a.data}/train-labels-idx1-ubyte.gz").astype(np.int64)
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x), torch.from_numpy(y))
    g = torch.Generator().manual_seed(a.seed)
    return torch.utils.data.DataLoader(ds, batch_size=a.batch, shuffle=True, drop_last=True, num_workers=0, generator=g)


def model():
    return torch.nn.Sequential(torch.nn.Linear(784, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256), torch.nn.ReLU(),
                               torch.nn.Linear(256, 10))


def optimizer(params):
    return torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def report(d):
    import pytorch_lightning
    d["versions"] = {"torch": torch.__version__, "lightning": pytorch_lightning.__version__}
    print(json.dumps(d))
    sys.stdout.flush()
