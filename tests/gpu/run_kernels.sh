#!/usr/bin/env bash
# Runs test_kernels (skips, 77, where no GPU is visible), then the same program under
# compute-sanitizer memcheck when the toolkit has it.
# run_kernels.sh TEST_KERNELS
set -uo pipefail
prog=$1
if ! nvidia-smi -L >/dev/null 2>&1; then echo "run_kernels: no GPU visible, skipped"; exit 77; fi
"$prog" || exit $?
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$sanitizer" ]; then
  "$sanitizer" --tool memcheck --error-exitcode 3 "$prog" || { echo "run_kernels: memcheck failed"; exit 3; }
  echo "run_kernels: compute-sanitizer memcheck clean"
fi
