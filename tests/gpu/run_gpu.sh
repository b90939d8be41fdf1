#!/usr/bin/env bash
# Runs a GPU program (skips, 77, where no GPU is visible).
# run_gpu.sh PROGRAM [ARGS...]
set -uo pipefail
if ! nvidia-smi -L >/dev/null 2>&1; then echo "run_gpu: no GPU visible, skipped"; exit 77; fi
exec "$@"
