#!/usr/bin/env bash
# Elastic restart: rank 1 of a 2-rank ddp job is SIGKILLed at step 13; kiln-elastic starts
# the job again, it resumes from last.ckpt (saved every 5 steps) and finishes with the
# same weights and losses as a run that was never interrupted, bit for bit.
# elastic.sh MPIRUN_SH DIST_CHILD KILN_ELASTIC WORKDIR
set -euo pipefail
run=$1 child=$2 elastic=$3 dir=$4
rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
"$run" 2 "$child" train --strategy ddp --epochs 2 --root ref --every 5 --out ref.txt
"$elastic" --max-restarts 2 -- "$run" 2 "$child" train --strategy ddp --epochs 2 --root job --every 5 \
  --resume last --fault-at-step 13 --fault-marker fault.txt --expect ref.txt --tol 0 2>&1 | tee elastic.log
grep -q "rank 1 killed at step 13" fault.txt
grep -q "restarting from the last checkpoint (1 of 2)" elastic.log
grep -q "resumed from" elastic.log
# The same under zero<2>, whose checkpoints are one file per rank beside last.ckpt.
rm -f fault.txt
"$run" 2 "$child" train --strategy zero2 --epochs 2 --root zref --every 5 --out zref.txt
"$elastic" --max-restarts 2 -- "$run" 2 "$child" train --strategy zero2 --epochs 2 --root zjob --every 5 \
  --resume last --fault-at-step 13 --fault-marker fault.txt --expect zref.txt --tol 0 2>&1 | tee zelastic.log
grep -q "restarting from the last checkpoint (1 of 2)" zelastic.log
ls zjob/checkpoints/last.ckpt.*.rank1-of-2.safetensors >/dev/null
echo "elastic: ddp and zero<2> killed at step 13, restarted once, final state bit-identical to the uninterrupted run"
