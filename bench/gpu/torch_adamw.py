"""torch.optim.AdamW(fused=True) over GPT-2 124M's parameter shapes, the peer of
bench/gpu/adamw.cu: the same 28 bytes per parameter, the same copy reference, one JSON
line. Run by tools/gpu-check.sh."""
import json

import torch
from timing import time_ms


def main():
    C = 768
    shapes = [50257 * C, 1024 * C]
    for _ in range(12):
        shapes += [C, C, C * 3 * C, 3 * C, C * C, C, C, C, C * 4 * C, 4 * C, 4 * C * C, C]
    shapes += [C, C]
    params = [torch.zeros(n, device="cuda", requires_grad=True) for n in shapes]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, fused=True)
    step_ms = time_ms(opt.step)
    src = torch.empty(1 << 28, device="cuda")  # 1 GiB of f32
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))
    total = sum(shapes)
    adamw_gbps = 28.0 * total / (step_ms * 1e-3) / 1e9
    copy_gbps = 2.0 * src.numel() * 4 / (copy_ms * 1e-3) / 1e9
    print(json.dumps({"impl": "torch", "torch": torch.__version__, "device": torch.cuda.get_device_name(),
                      "params": total, "tensors": len(shapes), "step_ms": round(step_ms, 4),
                      "adamw_gbps": round(adamw_gbps, 1), "copy_gbps": round(copy_gbps, 1),
                      "fraction_of_copy": round(adamw_gbps / copy_gbps, 3)}))


if __name__ == "__main__":
    main()
