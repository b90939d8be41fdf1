"""PyTorch peer of examples/04_distributed: the same 784-256-256-10 MLP on Fashion-MNIST
(55,000 training images, global batch 128, AdamW lr 2e-3, weight decay 0.01) trained by
--ranks processes under torch.nn.parallel.DistributedDataParallel over gloo (TCP on
loopback), each with a DistributedSampler shard, batch 128 / ranks and --threads threads;
--ranks 1 trains one plain process (no DDP wrapper). Prints one JSON line: seconds of the
training loop (rank 0, after a barrier; data loading and process start excluded),
samples/s, test accuracy."""
import argparse, json, os, time
import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import fm_common as c


def parse():
    p = argparse.ArgumentParser()
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--limit-batches", type=int, default=-1)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--port", type=int, default=29533)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    return p.parse_args()


def worker(rank, a):
    torch.set_num_threads(a.threads)
    world = a.ranks
    if world > 1:
        os.environ["MASTER_ADDR"] = "127.0.0.1"
        os.environ["MASTER_PORT"] = str(a.port)
        dist.init_process_group("gloo", rank=rank, world_size=world)
    x = c.idx(f"{a.data}/train-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    y = c.idx(f"{a.data}/train-labels-idx1-ubyte.gz").astype(np.int64)
    tx = c.idx(f"{a.data}/t10k-images-idx3-ubyte.gz").reshape(-1, 784).astype(np.float32) / 255.0
    ty = c.idx(f"{a.data}/t10k-labels-idx1-ubyte.gz").astype(np.int64)
    perm = np.random.default_rng(a.seed).permutation(len(x))[:55000]
    ds = torch.utils.data.TensorDataset(torch.from_numpy(x[perm]), torch.from_numpy(y[perm]))
    sampler = torch.utils.data.DistributedSampler(ds, world, rank, shuffle=True, seed=a.seed, drop_last=True) \
        if world > 1 else None
    loader = torch.utils.data.DataLoader(ds, batch_size=a.batch // world, shuffle=sampler is None, sampler=sampler,
                                         drop_last=True, generator=torch.Generator().manual_seed(a.seed))
    torch.manual_seed(a.seed)
    net = c.model()
    model = torch.nn.parallel.DistributedDataParallel(net) if world > 1 else net
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()
    steps = 0
    if world > 1:
        dist.barrier()
    t0 = time.perf_counter()
    for e in range(a.epochs):
        if sampler is not None:
            sampler.set_epoch(e)
        for i, (xb, yb) in enumerate(loader):
            if 0 <= a.limit_batches <= i:
                break
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xb), yb)
            loss.backward()
            opt.step()
            steps += 1
    if world > 1:
        dist.barrier()
    seconds = time.perf_counter() - t0
    if rank == 0:
        with torch.no_grad():
            acc = (net(torch.from_numpy(tx)).argmax(1) == torch.from_numpy(ty)).float().mean().item()
        print(json.dumps({"impl": "torch", "strategy": "ddp" if world > 1 else "single", "ranks": world,
                          "threads": a.threads, "steps": steps, "batch": a.batch, "seconds": round(seconds, 4),
                          "samples_per_s": round(steps * a.batch / seconds, 1), "test_acc": round(acc, 6),
                          "torch": torch.__version__}), flush=True)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    a = parse()
    if a.ranks == 1:
        worker(0, a)
    else:
        mp.spawn(worker, args=(a,), nprocs=a.ranks, join=True)
