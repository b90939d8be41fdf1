"""kiln's NF4 quantisation against bitsandbytes' (tests/nn/bnb_python_check.sh).

usage: bnb_check.py DIR FIXTURE
Quantises random weights with bitsandbytes.functional.quantize_4bit(quant_type="nf4",
blocksize=64, compress_statistics=True) on the CPU and with kiln (`FIXTURE nf4 IN OUT`),
and requires:
  1. the packed 4-bit codes equal, byte for byte;
  2. the dynamic map equal, entry for entry;
  3. the offset (the mean of the block absmaxes) within 2 ulp: torch sums float32 in an
     order that depends on the CPU's vector width, kiln in f64;
  4. the second level — bitsandbytes' quantize_blockwise(absmax − offset, 256) run on
     kiln's offset — equal to kiln's scales bit for bit, and to kiln's scale codes up to
     the resolution of bitsandbytes' CPU search: kiln stores the code nearest to each
     scaled value v; bitsandbytes' lookup (BinSearch's Direct2) resolves v to about
     1.6e-5 (measured: over 4M random values in [-1, 1] its code is the nearest one to
     some v' with |v' − v| <= 1.52e-5), so where the two differ, kiln's code must be the
     nearer and bitsandbytes' at most 2 × 1.6e-5 further from v. Such cases are counted.
"""
import subprocess
import sys

import numpy as np
import torch
from bitsandbytes import functional as bnbf
from safetensors.torch import load_file, save_file

out, fixture = sys.argv[1], sys.argv[2]
g = torch.Generator().manual_seed(0)
cases = {
    "normal": torch.randn(128, 512, generator=g) * 0.02,  # a projection's scale
    "uneven": torch.randn(300, 71, generator=g),  # blocks across rows, a partial last block
    "outliers": torch.randn(64, 256, generator=g) * torch.where(torch.rand(64, 256, generator=g) < 0.01, 30.0, 1.0),
    "bf16": torch.randn(96, 192, generator=g).to(torch.bfloat16).float(),  # values a bf16 checkpoint holds
}
save_file({k + ".w": v.contiguous() for k, v in cases.items()}, f"{out}/weights.safetensors")
r = subprocess.run([fixture, "nf4", f"{out}/weights.safetensors", f"{out}/kiln_nf4.safetensors"], text=True,
                   capture_output=True)
if r.returncode != 0:
    sys.exit(f"FAIL: {fixture} nf4: {r.stderr}")
kiln = load_file(f"{out}/kiln_nf4.safetensors")

failures = []
for name, w in cases.items():
    w = w.contiguous().float()
    packed, state = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert state.nested, "bitsandbytes did not double-quantise the scales"
    codes = packed.reshape(-1)
    k_codes = kiln[name + ".codes"]
    n_codes = int((codes != k_codes).sum()) if codes.shape == k_codes.shape else -1
    k_off = float(kiln[name + ".offset"][0])
    b_off = float(state.offset)
    ulps = abs(np.float32(k_off).view(np.int32).astype(np.int64) - np.float32(b_off).view(np.int32).astype(np.int64))
    # bitsandbytes' own first-level absmax, then its second level on kiln's offset.
    _, plain = bnbf.quantize_4bit(w, blocksize=64, compress_statistics=False, quant_type="nf4")
    q2, s2 = bnbf.quantize_blockwise(plain.absmax - torch.tensor(k_off, dtype=torch.float32), blocksize=256)
    kc, bc = kiln[name + ".scale_codes"].long(), q2.reshape(-1).long()
    code8 = s2.code.float()
    n_scale = n_boundary = 0
    for i in (kc != bc).nonzero().flatten().tolist():
        v = float(((plain.absmax[i] - torch.tensor(k_off)) / s2.absmax[i // 256]).float())
        dk, db = abs(float(code8[kc[i]]) - v), abs(float(code8[bc[i]]) - v)
        if dk <= db <= dk + 2 * 1.6e-5:
            n_boundary += 1
        else:
            n_scale += 1
    n_abs = int((s2.absmax.reshape(-1).float() != kiln[name + ".scale_absmax"]).sum())
    # And as bitsandbytes ran it, on its own offset (ulp-level differences may move a few).
    n_scale_own = int((state.absmax.reshape(-1) != kiln[name + ".scale_codes"]).sum())
    back = bnbf.dequantize_4bit(packed, state)
    print(f"{name} {tuple(w.shape)}: code bytes differing {n_codes} of {codes.numel()}; offset {k_off:.9g} vs "
          f"{b_off:.9g} ({ulps} ulp); on kiln's offset, scale codes differing {n_scale} of {q2.numel()} "
          f"(and {n_boundary} within bitsandbytes' search resolution), "
          f"second-level scales differing {n_abs} of {s2.absmax.numel()}; on bitsandbytes' own offset "
          f"{n_scale_own} scale codes differ; bitsandbytes' round-trip mean |error| "
          f"{float((back - w).abs().mean()):.3e}")
    if n_codes != 0 or ulps > 2 or n_scale != 0 or n_abs != 0:
        failures.append(name)
    n_map = int((code8 != kiln["code8"]).sum())
    if n_map != 0:
        failures.append(f"dynamic map ({n_map} of 256 entries differ)")
if failures:
    sys.exit("FAIL: kiln's NF4 differs from bitsandbytes' in: " + ", ".join(failures))
print("PASS: kiln's NF4 codes, dynamic map and double-quantised scales equal bitsandbytes'")
