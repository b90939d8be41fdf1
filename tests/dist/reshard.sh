#!/usr/bin/env bash
# Reshard on load: a zero<1> checkpoint written by 3 ranks resumes on 2 ranks under
# zero<2>, and a zero<2> checkpoint of 3 ranks resumes on one process (single_device);
# both continue the uninterrupted 3-rank trajectory (f32 order: tolerance 1e-5); a zero<3>
# checkpoint of 3 ranks resumes on 2 ranks under zero<3> and on one process.
# Then kiln-consolidate turns the 3-rank zero<2> checkpoint into one plain safetensors
# file holding exactly the checkpoint's weights.
# reshard.sh MPIRUN_SH DIST_CHILD KILN_CONSOLIDATE WORKDIR
set -euo pipefail
run=$1 child=$2 consolidate=$3 dir=$4
rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
"$run" 3 "$child" train --strategy zero1 --epochs 2 --root full --out full.txt
"$run" 3 "$child" train --strategy zero1 --epochs 1 --root first --save z1_w3.ckpt
"$run" 2 "$child" train --strategy zero2 --epochs 2 --root w2 --resume z1_w3.ckpt --expect full.txt --tol 1e-5
"$run" 3 "$child" train --strategy zero2 --epochs 1 --root first2 --save z2_w3.ckpt
"$child" train --strategy single --epochs 2 --root single --resume z2_w3.ckpt --expect full.txt --tol 1e-5
"$run" 3 "$child" train --strategy zero3 --epochs 1 --root first3 --save z3_w3.ckpt
"$run" 2 "$child" train --strategy zero3 --epochs 2 --root w2z3 --resume z3_w3.ckpt --expect full.txt --tol 1e-5
"$child" train --strategy single --epochs 2 --root single3 --resume z3_w3.ckpt --expect full.txt --tol 1e-5
"$consolidate" z2_w3.ckpt z2_w3.safetensors
# With the optimizer: the three rank shards reassembled into whole tensors (2 slots x 4 parameters).
"$consolidate" z2_w3.ckpt z2_w3.full.safetensors --with-optimizer | tee consolidate.log
grep -q "4 weight tensors, 8 optimizer tensors" consolidate.log
"$child" weights --resume z2_w3.ckpt --out from_ckpt.txt
"$child" weights --resume z2_w3.safetensors --out from_st.txt
cmp from_ckpt.txt from_st.txt
if "$consolidate" z2_w3.ckpt z2_w3.masters.safetensors --masters 2>masters.err; then
  echo "reshard: --masters on an fp32 checkpoint should fail"; exit 1
fi
grep -q "no tensors under 'precision/master/'" masters.err
echo "reshard: 3 → 2 ranks (zero1 → zero2, zero3 → zero3) and 3 ranks → single_device (zero2, zero3) continue the run"
