#!/bin/sh
# usage: run.sh SOURCE INCLUDE_DIR SECONDS CORPUS_DIR
# Builds a libFuzzer target with clang (+ASan/UBSan) and runs it for a bounded time,
# starting from the committed seed corpus (copied, so the tree stays clean).
set -eu
src="$1"; inc="$2"; secs="$3"; seeds="$4"
if ! command -v clang++ >/dev/null 2>&1; then
  echo "clang++ not found (apt-get install clang libclang-rt-14-dev); cannot fuzz"; exit 77
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
clang++ -std=c++20 -O1 -g -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -I"$inc" -isystem /usr/include/eigen3 "$src" -o "$work/fuzz" -lz
mkdir -p "$work/corpus"
cp "$seeds"/* "$work/corpus/"
status=0
"$work/fuzz" -max_total_time="$secs" -max_len=4096 -print_final_stats=1 -artifact_prefix="$work/" \
  "$work/corpus" > "$work/log" 2>&1 || status=$?
tail -25 "$work/log"
exit $status
