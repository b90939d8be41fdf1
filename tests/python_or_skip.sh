# Sourced by the interop checks: python_or_skip ROOT IMPORTS WHAT sets $py to the first
# Python that can run IMPORTS — $KILN_PYTHON, ROOT/bench/.venv/bin/python, python3 — or
# prints "SKIP: no Python with WHAT ..." and exits 77 (Meson's skip code).
python_or_skip() {
  py=""
  for cand in "${KILN_PYTHON:-}" "$1/bench/.venv/bin/python" python3; do
    [ -n "$cand" ] || continue
    if "$cand" -c "$2" >/dev/null 2>&1; then
      py="$cand"
      return 0
    fi
  done
  echo "SKIP: no Python with $3 (run bench/setup_venv.sh, pip install it, or set KILN_PYTHON)"
  exit 77
}
