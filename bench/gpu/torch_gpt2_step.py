"""GPT-2 124M training step in PyTorch, the peer of bench/gpu/gpt2_step.cpp: the same
model (token + position embeddings, 12 pre-norm blocks with fused-QKV causal attention
through scaled_dot_product_attention and a GELU-tanh MLP, final LayerNorm, LM head tied to
the embedding), cross-entropy over B*T rows, gradient clipping at 1.0 and fused AdamW,
exact f32 (TF32 off, as kiln's f32 GEMMs), no dropout. Runs eager and under
torch.compile, one JSON line each; with --kiln FILE (kiln's JSON line) it adds a line
with kiln's tokens/s over each. Run by tools/gpu-check.sh."""
import argparse
import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, c, h):
        super().__init__()
        self.h = h
        self.ln_1, self.ln_2 = nn.LayerNorm(c), nn.LayerNorm(c)
        self.c_attn, self.c_proj = nn.Linear(c, 3 * c), nn.Linear(c, c)
        self.c_fc, self.mlp_proj = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.h, C // self.h).transpose(1, 2) for t in (q, k, v))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(B, T, C)
        x = x + self.c_proj(a)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh"))


class GPT2(nn.Module):
    def __init__(self, vocab=50257, positions=1024, c=768, layers=12, heads=12):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, c), nn.Embedding(positions, c)
        self.h = nn.ModuleList(Block(c, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(c)
        for n, p in self.named_parameters():
            if n.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if n.endswith("proj.weight") else 0.02)

    def forward(self, ids):
        x = self.wte(ids) + self.wpe(torch.arange(ids.shape[1], device=ids.device))
        for b in self.h:
            x = b(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def run(args, compiled):
    torch.manual_seed(0)
    model = GPT2(positions=max(1024, args.seq), layers=args.layers).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1, fused=True)
    fwd = torch.compile(model) if compiled else model
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, 50257, (args.batch, args.seq + 1), device="cuda", generator=g)
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(fwd(x).view(-1, 50257), y.view(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()  # waits for the step, as kiln's logged loss does

    first = step()
    for _ in range(2):
        step()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        last = step()
    secs = time.perf_counter() - t0
    step_ms = 1e3 * secs / args.steps
    return {"bench": "gpt2_step", "impl": "torch-compile" if compiled else "torch-eager", "torch": torch.__version__,
            "device": torch.cuda.get_device_name(), "dtype": "f32", "B": args.batch, "T": args.seq,
            "layers": args.layers, "params": sum(p.numel() for p in model.parameters()), "steps": args.steps,
            "step_ms": round(step_ms, 2), "tokens_per_s": round(args.batch * args.seq / (step_ms / 1e3)),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2), "loss_first": round(first, 4),
            "loss_last": round(last, 4)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kiln", help="kiln's JSON line (bench_gpu_gpt2_step's output), for the ratios")
    args = p.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    results = []
    for compiled in (False, True):
        try:
            r = run(args, compiled)
        except Exception as e:  # torch.compile needs a working Triton; report and go on
            r = {"bench": "gpt2_step", "impl": "torch-compile" if compiled else "torch-eager", "error": str(e)[:300]}
        print(json.dumps(r), flush=True)
        results.append(r)
    if args.kiln:
        with open(args.kiln) as f:
            k = next(json.loads(l) for l in f if '"gpt2_step"' in l and '"kiln"' in l)
        ratios = {"bench": "gpt2_step", "ratio": "kiln tokens/s over torch"}
        for r in results:
            if "tokens_per_s" in r:
                ratios[r["impl"]] = round(k["tokens_per_s"] / r["tokens_per_s"], 3)
        print(json.dumps(ratios))


if __name__ == "__main__":
    main()
