#!/usr/bin/env bash
# Runs a program on N CPU ranks over loopback, as the mpi test suite and the multi-rank
# benchmarks do: mpirun.sh N program [args...]
# --oversubscribe: 3 ranks on a 2-core machine; one OpenMP thread per rank; TCP on lo
# (no network needed); root allowed (CI containers run as root).
set -euo pipefail
n=$1
shift
exec mpirun -n "$n" --oversubscribe --allow-run-as-root --bind-to none \
  --mca btl self,tcp --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo \
  -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" -x KILN_COLLECTIVE_TIMEOUT="${KILN_COLLECTIVE_TIMEOUT:-120}" "$@"
