"""torch.nn.functional.cross_entropy forward + backward on bf16 logits [8192, 50257], the
peer of bench/gpu/cross_entropy.cu: time, and the peak memory the op allocates beyond its
logits and targets (torch.cuda.max_memory_allocated). One JSON line; run by
tools/gpu-check.sh."""
import json

import torch
import torch.nn.functional as F


def main():
    rows, vocab = 8 * 1024, 50257
    g = torch.Generator(device="cuda").manual_seed(5)
    base = (torch.rand(rows, vocab, device="cuda", generator=g) * 4 - 2).to(torch.bfloat16)
    targets = (torch.arange(rows, device="cuda") * 7919) % vocab
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    total, reps, peak_extra = 0.0, 10, 0
    for r in range(reps + 1):  # the first is the warm-up
        logits = base.clone().requires_grad_(True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        a.record()
        loss = F.cross_entropy(logits, targets)
        loss.backward()
        b.record()
        b.synchronize()
        peak_extra = max(peak_extra, torch.cuda.max_memory_allocated() - start)
        if r:
            total += a.elapsed_time(b)
        del logits, loss
    print(json.dumps({"impl": "torch", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "rows": rows, "vocab": vocab, "dtype": "bf16", "fwd_bwd_ms": round(total / reps, 4),
                      "logits_mb": round(rows * vocab * 2 / 1e6, 1), "extra_mb": round(peak_extra / 1e6, 2)}))


if __name__ == "__main__":
    main()
