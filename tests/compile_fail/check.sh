#!/bin/sh
# usage: check.sh CXX SOURCE EXPECTED_TEXT [FLAGS...]
# Passes when SOURCE fails to compile and the compiler's output contains EXPECTED_TEXT.
cxx="$1"; src="$2"; expect="$3"; shift 3
out=$("$cxx" -std=c++20 -fsyntax-only -fopenmp "$@" "$src" 2>&1)
if [ $? -eq 0 ]; then
  echo "FAIL: $src compiled, but it must not"; exit 1
fi
if printf '%s' "$out" | grep -qF -- "$expect"; then
  echo "ok: $src failed to compile with: $expect"; exit 0
fi
echo "FAIL: $src failed to compile, but the message lacks: $expect"
printf '%s\n' "$out" | head -40
exit 1
