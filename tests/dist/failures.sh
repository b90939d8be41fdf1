#!/usr/bin/env bash
# Hangs become reports, well within a minute each:
# (1) rank 1 is stuck elsewhere: the watchdog on rank 0 names the collective it waits in
#     and aborts the job; (2) rank 1 enters a different collective: the job fails with an
#     error naming each rank's collective; (3) rank 1 exits mid-run: the job ends with an
#     error instead of rank 0 waiting forever.
# failures.sh MPIRUN_SH DIST_CHILD WORKDIR
set -uo pipefail
run=$1 child=$2 dir=$3
rm -rf "$dir" && mkdir -p "$dir" && cd "$dir"
expect_failure() {  # name, then the command
  local name=$1 t0=$SECONDS
  shift
  timeout 120 "$@" >"$name.log" 2>&1
  local status=$?
  cat "$name.log"
  if ((status == 0 || status == 124)); then echo "failures: $name: the job exited with status $status"; exit 1; fi
  echo "failures: $name: the job failed (status $status) after $((SECONDS - t0)) s"
}
need() {  # log, pattern, what
  grep -q -- "$2" "$1.log" || { echo "failures: $1: $3 (no '$2' in the output)"; exit 1; }
}
KILN_COLLECTIVE_TIMEOUT=2 expect_failure watchdog "$run" 2 "$child" watchdog
need watchdog "collective watchdog: rank 0 of 2" "no watchdog report from rank 0"
need watchdog "all_reduce #1 \[rank 1 is late for\] (1 f32, sum)" "the report does not name the collective"
need watchdog "the last collective it completed was all_reduce #0 \[warm-up\]" "the report does not name the last one"
KILN_COLLECTIVE_TIMEOUT=5 expect_failure mismatch "$run" 2 "$child" mismatch
need mismatch "comm::mpi: rank" "no error naming a rank"
expect_failure die "$run" 2 "$child" die
expect_failure throw "$run" 2 "$child" train --strategy ddp --epochs 1 --root throw --throw-at-step 5
need throw "rank 1 of 2: fit failed: kiln: dist_child: rank 1 throws at step 5" "rank 1 did not report its error"
need throw "aborting the job" "rank 1 did not end the job"
echo "failures: all four ended with a report"
