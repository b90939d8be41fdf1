#!/bin/sh
# usage: hf_python_check.sh FIXTURE_BINARY SOURCE_ROOT
# transformers' from_pretrained loads what kiln trained and exported (GPT-2 with its
# Conv1D layout, Llama with GQA, a tied Llama) and reproduces kiln's logits to 1e-4.
# Skips (exit 77) when no Python with torch + transformers is found: $KILN_PYTHON,
# SOURCE_ROOT/bench/.venv/bin/python, python3. CI's test venv has no torch, so this runs
# where the bench venv exists (bench/setup_venv.sh).
set -eu
fixture="$1"; root="$2"
py=""
for cand in "${KILN_PYTHON:-}" "$root/bench/.venv/bin/python" python3; do
  [ -n "$cand" ] || continue
  if "$cand" -c "import torch, transformers, safetensors" >/dev/null 2>&1; then
    py="$cand"; break
  fi
done
if [ -z "$py" ]; then
  echo "SKIP: no Python with torch and transformers (bench/.venv/bin/pip install transformers, or set KILN_PYTHON)"
  exit 77
fi
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$fixture" "$root/tests/fixtures/hf" "$dir"
for case in gpt2_tiny llama_tiny llama_tiny_tied_sharded; do
  printf '%s: ' "$case"
  "$py" "$root/tests/fixtures/hf/check_kiln_export.py" "$dir/$case" "$dir/$case/expected.safetensors"
done
