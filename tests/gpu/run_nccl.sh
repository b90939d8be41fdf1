#!/usr/bin/env bash
# Runs test_nccl with one rank per visible GPU (skips, 77, where there is none).
# run_nccl.sh MPIRUN_SH TEST_NCCL
set -uo pipefail
run=$1 prog=$2
n=$(nvidia-smi -L 2>/dev/null | wc -l)
if ((n == 0)); then echo "run_nccl: no GPU visible, skipped"; exit 77; fi
exec "$run" "$n" "$prog"
