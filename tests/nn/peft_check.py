"""PEFT reads kiln's LoRA adapters and kiln reads PEFT's (tests/nn/peft_python_check.sh).

usage: peft_check.py DIR FIXTURE
DIR holds what `FIXTURE write DIR` made: base/ (an HF Llama), kiln_adapter/ and
kiln_logits.safetensors. Checks, each to 1e-4 relative to the largest logit:
  1. PeftModel.from_pretrained(base, kiln_adapter) reproduces kiln's logits;
  2. the same for a GPT-2 (Conv1D layers: fan_in_fan_out) from DIR/gpt2_*;
  3. an adapter PEFT initialises and trains (get_peft_model, a few AdamW steps) and saves
     to DIR/peft_adapter, read by kiln (`FIXTURE read DIR`), reproduces PEFT's logits.
"""
import subprocess
import sys

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import GPT2LMHeadModel, LlamaForCausalLM

TOL = 1e-4


def rel_diff(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    d, fixture = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    kiln = load_file(f"{d}/kiln_logits.safetensors")
    ids = kiln["input_ids"]

    base = LlamaForCausalLM.from_pretrained(f"{d}/base", torch_dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PeftModel.from_pretrained(base, f"{d}/kiln_adapter").eval()
    with torch.no_grad():
        logits = model(ids).logits
    diff = rel_diff(logits, kiln["logits"])
    moved = rel_diff(base_logits, kiln["logits"])
    print(f"PEFT applies kiln's adapter: max rel diff {diff:.2e} (the adapter moves the logits by {moved:.2e})")
    assert moved > 1e-3, "the kiln adapter should change the base model's logits"
    assert diff < TOL, f"PEFT's logits differ from kiln's by {diff}"

    gpt2 = GPT2LMHeadModel.from_pretrained(f"{d}/gpt2_base", torch_dtype=torch.float32).eval()
    gpt2 = PeftModel.from_pretrained(gpt2, f"{d}/gpt2_adapter").eval()
    kiln_gpt2 = load_file(f"{d}/gpt2_logits.safetensors")
    with torch.no_grad():
        logits = gpt2(kiln_gpt2["input_ids"]).logits
    diff = rel_diff(logits, kiln_gpt2["logits"])
    print(f"PEFT applies kiln's GPT-2 adapter: max rel diff {diff:.2e}")
    assert diff < TOL, f"PEFT's GPT-2 logits differ from kiln's by {diff}"

    base = LlamaForCausalLM.from_pretrained(f"{d}/base", torch_dtype=torch.float32)
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "gate_proj"],
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(base, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=2e-2)
    for _ in range(4):
        loss = peft_model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(f"{d}/peft_adapter")
    with torch.no_grad():
        peft_logits = peft_model(ids).logits
    save_file({"input_ids": ids, "logits": peft_logits.contiguous()}, f"{d}/peft_logits.safetensors")
    subprocess.run([fixture, "read", d], check=True)
    ours = load_file(f"{d}/kiln_logits_of_peft.safetensors")["logits"]
    diff = rel_diff(ours, peft_logits)
    print(f"kiln applies PEFT's trained adapter: max rel diff {diff:.2e}")
    assert diff < TOL, f"kiln's logits differ from PEFT's by {diff}"


if __name__ == "__main__":
    main()
