"""Small GPT training throughput on CPU (f32), PyTorch eager — the peer of bench/gpt_train.cpp.

GPT-2 architecture (nanoGPT style): token + learned position embeddings, n_layer pre-norm
blocks (LayerNorm -> causal self-attention with fused qkv Linear(C, 3C) and Linear(C, C)
output projection -> residual; LayerNorm -> Linear(C, 4C) -> GELU(tanh) -> Linear(4C, C)
-> residual), final LayerNorm, lm_head tied to the token embedding. Dropout 0, f32, no
torch.compile. Attention is F.scaled_dot_product_attention(is_causal=True) by default
(PyTorch's fastest eager CPU path) or, with --attn naive, softmax(QK^T / sqrt(d)) V.

Training: AdamW(lr, betas (0.9, 0.95), eps 1e-8, weight_decay 0.1 on every parameter,
PyTorch's default foreach/fused choice), clip_grad_norm_(1.0), random byte windows of the
corpus (vocab 256) or of an llm.c .bin token file. The first --warmup steps are not timed.

Output: one JSON line on stdout (same fields as the kiln binary), progress on stderr.
peak_rss_mb is the whole process (import_rss_mb of it is the torch runtime before any
model exists); saved_activation_mb is what autograd saved for backward in step 0.
Usage: python torch_gpt_train.py [--threads 2] [--attn sdpa|naive] [--data PATH] ...
"""
import argparse
import json
import math
import os
import resource
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

IMPORT_RSS_MB = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # the torch runtime alone


def log(*a):
    print(*a, file=sys.stderr, flush=True)


def read_corpus(path: str) -> torch.Tensor:
    """1-D token tensor: an llm.c .bin token file, or the bytes of a file / every regular,
    non-symlink, non-.dat file of a directory (sorted by name) concatenated, as bytes."""
    if os.path.isfile(path) and path.endswith(".bin"):
        with open(path, "rb") as f:
            header = np.frombuffer(f.read(256 * 4), dtype=np.int32)
            if header[0] != 20240520 or header[1] != 1:
                raise SystemExit(f"{path}: not an llm.c token file (magic {header[0]}, version {header[1]})")
            n = int(header[2])
            toks = np.frombuffer(f.read(2 * n), dtype=np.uint16)
            if toks.size != n:
                raise SystemExit(f"{path}: header says {n} tokens, file holds {toks.size}")
        return torch.from_numpy(toks.astype(np.int32))
    if os.path.isfile(path):
        files = [path]
    else:
        files = sorted(e.path for e in os.scandir(path)
                       if e.is_file(follow_symlinks=False) and not e.is_symlink() and not e.name.endswith(".dat"))
    data = b"".join(open(f, "rb").read() for f in files)
    if len(data) <= 1000:
        raise SystemExit(f"{path}: corpus too small")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, block, attn):
        super().__init__()
        assert n_embd % n_head == 0
        self.n_head, self.attn = n_head, attn
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        if attn == "naive":
            self.register_buffer("mask", torch.tril(torch.ones(block, block, dtype=torch.bool)), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hd)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.attn == "sdpa":
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(~self.mask[:T, :T], float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, n_embd):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * n_embd, n_embd)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, n_embd, n_head, block, attn):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, block, attn)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = MLP(n_embd)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, vocab, block, n_layer, n_head, n_embd, attn):
        super().__init__()
        self.block = block
        self.wte = nn.Embedding(vocab, n_embd)
        self.wpe = nn.Embedding(block, n_embd)
        self.h = nn.ModuleList(Block(n_embd, n_head, block, attn) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied
        # GPT-2 / nanoGPT init: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer).
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * n_layer))

    def forward(self, idx):
        B, T = idx.shape
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))
        for blk in self.h:
            x = blk(x)
        return self.lm_head(self.ln_f(x))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vocab", type=int, default=256)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps before the timed ones")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--data", default="/usr/share/games/fortunes")
    ap.add_argument("--attn", choices=("sdpa", "naive"), default="sdpa")
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    data = read_corpus(a.data)
    N = data.numel()
    vmax = int(data.max())
    if vmax >= a.vocab:
        raise SystemExit(f"token {vmax} >= --vocab {a.vocab}")
    B, T = a.batch, a.block
    log(f"torch {torch.__version__}, {a.threads} threads, corpus {N} tokens, attn={a.attn}")

    model = GPT(a.vocab, T, a.n_layer, a.n_head, a.n_embd, a.attn)
    params = sum(p.numel() for p in model.parameters())  # unique: the tied weight counts once
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    log(f"params {params}")

    gen = torch.Generator().manual_seed(a.seed)
    ar = torch.arange(T + 1)

    def batch():
        offs = torch.randint(0, N - T - 1, (B,), generator=gen)
        w = data[offs[:, None] + ar].long()  # (B, T + 1)
        return w[:, :-1], w[:, 1:]

    # Bytes of the tensors autograd saves for backward in one step (deduplicated by storage):
    # a cheap estimate of activation memory, taken on the first (untimed) step only.
    saved = {}

    def pack(t):
        s = t.untyped_storage()
        saved[s.data_ptr()] = s.nbytes()
        return t

    step_ms, losses = [], []
    total = a.warmup + a.steps
    t0 = time.perf_counter()
    for s in range(total):
        if s == a.warmup:
            t0 = time.perf_counter()
        ts = time.perf_counter()
        x, y = batch()
        if s == 0:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                logits = model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        else:
            logits = model(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        l = loss.item()
        ms = (time.perf_counter() - ts) * 1e3
        losses.append(l)
        if s >= a.warmup:
            step_ms.append(ms)
        log(f"step {s:3d} loss {l:.4f} {ms:.1f} ms{'' if s >= a.warmup else ' (warm-up)'}")
    secs = time.perf_counter() - t0
    log(f"first loss {losses[0]:.4f}, last loss {losses[-1]:.4f}")

    print(json.dumps({
        "impl": "torch",
        "torch": torch.__version__,
        "attn": a.attn,
        "threads": a.threads,
        "params": params,
        "tokens_per_step": B * T,
        "steps_timed": a.steps,
        "seconds": round(secs, 4),
        "tokens_per_s": round(B * T * a.steps / secs, 1),
        "step_ms_median": round(statistics.median(step_ms), 3),
        "first_loss": round(losses[0], 4),
        "final_loss": round(losses[-1], 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "import_rss_mb": round(IMPORT_RSS_MB, 1),
        "saved_activation_mb": round(sum(saved.values()) / 2**20, 1),
    }), flush=True)


if __name__ == "__main__":
    main()
