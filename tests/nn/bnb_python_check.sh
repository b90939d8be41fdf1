#!/bin/sh
# usage: bnb_python_check.sh FIXTURE_BINARY SOURCE_ROOT
# kiln's NF4 codes and double-quantised scales equal bitsandbytes' quantize_4bit on the CPU
# (tests/nn/bnb_check.py). Skips (exit 77) only when no Python with torch + bitsandbytes
# is found; tools/dev.sh test installs bitsandbytes in the cached venv when PyPI has a
# build of it for this machine.
set -eu
fixture="$1"; root="$2"
. "$(dirname "$0")/../python_or_skip.sh"
python_or_skip "$root" "import torch, bitsandbytes, safetensors" "torch, bitsandbytes and safetensors"
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$py" "$root/tests/nn/bnb_check.py" "$dir" "$fixture"
