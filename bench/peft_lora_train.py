"""LoRA fine-tuning throughput and memory on the CPU: transformers' Llama + PEFT, the peer
of bench/lora_train.cpp (same shapes, adapters, batch, optimizer; see its header).

Usage: python peft_lora_train.py [--threads 2] [--steps 5] [--warmup 2] [shape flags as the C++]
Prints one JSON line with the same fields as kiln's side.
"""
import argparse
import json
import resource
import sys
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    for k, v in dict(layers=6, hidden=512, heads=8, kv_heads=2, intermediate=1536, vocab=32000, batch=4, seq=256,
                     rank=16, steps=5, warmup=2, threads=2).items():
        ap.add_argument("--" + k.replace("_", "-"), type=int, default=v)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--adapter", choices=["lora", "qlora"], default="lora")  # qlora: kiln's side only
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=a.seq, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    if a.dtype == "bf16":
        model = model.to(torch.bfloat16)
    model = get_peft_model(model, LoraConfig(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    step_ms, losses = [], []
    for s in range(a.warmup + a.steps):
        g = torch.Generator().manual_seed(s)
        ids = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        x, y = ids[:, :-1], ids[:, 1:]
        t0 = time.perf_counter()
        logits = model(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, a.vocab), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ms = (time.perf_counter() - t0) * 1000
        losses.append(loss.item())
        print(f"step {s} loss {losses[-1]:.4f} {ms:.1f} ms", file=sys.stderr, flush=True)
        if s >= a.warmup:
            step_ms.append(ms)
    step_ms.sort()
    med = step_ms[len(step_ms) // 2]
    print(json.dumps({"impl": "peft", "dtype": a.dtype, "threads": a.threads, "params": params, "trainable": trainable,
                      "step_ms": round(med, 1), "tokens_per_s": round(a.batch * a.seq / (med / 1000), 1),
                      "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4),
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                      "torch": torch.__version__}))


if __name__ == "__main__":
    main()
