#!/bin/sh
# usage: hf_python_check.sh FIXTURE_BINARY SOURCE_ROOT
# transformers' from_pretrained loads what kiln trained and exported (GPT-2 with its
# Conv1D layout, Llama with GQA, a tied Llama) and reproduces kiln's logits to 1e-4.
# Skips (exit 77) when no Python with torch + transformers is found: $KILN_PYTHON,
# SOURCE_ROOT/bench/.venv/bin/python, python3. tools/dev.sh test gives CI a venv with torch
# and transformers (cached outside the clone), so this runs there.
set -eu
fixture="$1"; root="$2"
. "$(dirname "$0")/../python_or_skip.sh"
python_or_skip "$root" "import torch, transformers, safetensors" "torch and transformers"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$fixture" "$root/tests/fixtures/hf" "$dir"
for case in gpt2_tiny llama_tiny llama_tiny_tied_sharded; do
  printf '%s: ' "$case"
  "$py" "$root/tests/fixtures/hf/check_kiln_export.py" "$dir/$case" "$dir/$case/expected.safetensors"
done
