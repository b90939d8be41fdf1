"""torch.nn.functional.scaled_dot_product_attention (causal, bf16) forward + backward on
the shapes of bench/gpu/attention.cu, its peer: the same FLOP count, one JSON line per
shape. Run by tools/gpu-check.sh."""
import json

import torch
import torch.nn.functional as F
from timing import time_ms


def run(B, T, H, D):
    g = torch.Generator(device="cuda").manual_seed(0)
    # SDPA takes [B, H, T, D]; kiln's layout [B, T, H, D] is the same data transposed.
    q, k, v, dout = (torch.rand(B, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g) * 2 - 1
                     for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    out = {}

    def fwd():
        out["o"] = F.scaled_dot_product_attention(q, k, v, is_causal=True)

    def bwd():
        torch.autograd.grad(out["o"], (q, k, v), dout, retain_graph=True)

    fwd_ms = time_ms(fwd, 10)
    fwd()
    bwd_ms = time_ms(bwd, 10)
    flops_fwd = 4.0 * B * H * T * T * D * 0.5
    print(json.dumps({"impl": "torch", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "dtype": "bf16", "mask": "causal", "B": B, "T": T, "H": H, "D": D,
                      "fwd_ms": round(fwd_ms, 4), "bwd_ms": round(bwd_ms, 4),
                      "fwd_bwd_tflops": round(3.5 * flops_fwd / ((fwd_ms + bwd_ms) * 1e-3) / 1e12, 2)}))


if __name__ == "__main__":
    run(4, 1024, 12, 64)
    run(2, 2048, 16, 128)
