#!/bin/sh
# usage: peft_python_check.sh FIXTURE_BINARY SOURCE_ROOT
# PEFT loads the LoRA adapter kiln trained and reproduces kiln's logits; kiln loads an
# adapter PEFT trained and reproduces PEFT's (tests/nn/peft_check.py). Skips (exit 77)
# only when no Python with torch + transformers + peft is found; tools/dev.sh test
# installs them in the cached venv.
set -eu
fixture="$1"; root="$2"
. "$(dirname "$0")/../python_or_skip.sh"
python_or_skip "$root" "import torch, transformers, peft, safetensors" "torch, transformers and peft"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$fixture" write "$dir"
"$py" "$root/tests/nn/peft_check.py" "$dir" "$fixture"
