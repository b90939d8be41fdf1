#!/usr/bin/env bash
# Runs a program on N CPU ranks of this machine, as the mpi test suite and the multi-rank
# benchmarks do: mpirun.sh N program [args...]
# Transport: Open MPI's shared-memory BTL (vader, without the single-copy mechanism that
# needs ptrace rights containers often lack) between ranks, TCP on loopback as the
# fallback; KILN_MPI_BTL=self,tcp forces loopback TCP (what gloo uses). --oversubscribe:
# 3 ranks on a 2-core machine; one OpenMP thread per rank; root allowed (CI containers).
set -euo pipefail
n=$1
shift
exec mpirun -n "$n" --oversubscribe --allow-run-as-root --bind-to none \
  --mca btl "${KILN_MPI_BTL:-self,vader,tcp}" --mca btl_vader_single_copy_mechanism none \
  --mca btl_tcp_if_include lo --mca oob_tcp_if_include lo \
  -x OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" -x KILN_COLLECTIVE_TIMEOUT="${KILN_COLLECTIVE_TIMEOUT:-120}" "$@"
