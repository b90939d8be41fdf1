#!/usr/bin/env bash
# kiln developer entry point.
#   tools/dev.sh run    install what is missing, build, train the main example
#   tools/dev.sh test   install what is missing, build (the cpu suite under ASan+UBSan),
#                       run every test suite, then the format check
#   tools/dev.sh build  install and build only
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${KILN_BUILD_DIR:-build}
# What outlives a clone: the Python peers' venv (torch alone is several GB).
PYVENV=${KILN_PYVENV:-${XDG_CACHE_HOME:-$HOME/.cache}/kiln/pyvenv}

DEB_PACKAGES=(meson ninja-build g++ pkg-config cmake libeigen3-dev libboost-dev zlib1g-dev doctest-dev libdnnl-dev
              libopenmpi-dev openmpi-bin clang-format clang libclang-rt-14-dev dataset-fashion-mnist fortunes)

install_deps() {
  local missing=()
  for p in "${DEB_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    echo "kiln: installing Debian packages: ${missing[*]}"
    local sudo=""
    [ "$(id -u)" -ne 0 ] && sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

configure() {
  if [ ! -f "$BUILD/build.ninja" ]; then
    meson setup "$BUILD" --buildtype=release "$@" >/dev/null
  fi
}

build() {
  install_deps
  configure
  meson compile -C "$BUILD"
}

# Prints "kiln: N passed, N failed, N skipped" from a meson test log.
summarise() {
  python3 - "$1" <<'PY'
import json, sys
p = f = s = 0
for line in open(sys.argv[1]):
    r = json.loads(line)["result"]
    if r in ("OK", "EXPECTEDFAIL"): p += 1
    elif r == "SKIP": s += 1
    else: f += 1
print(f"kiln: {p} passed, {f} failed, {s} skipped")
sys.exit(1 if f else 0)
PY
}

format_check() {
  local files
  files=$(git ls-files '*.hpp' '*.cpp' '*.cu' '*.cuh' 2>/dev/null || find include tests examples bench kernels -name '*.[ch]pp')
  # shellcheck disable=SC2086
  # (called as `format_check || status=1`, where set -e is off: return the status explicitly)
  if ! clang-format --dry-run -Werror $files; then
    echo "kiln: format check FAILED (run clang-format -i on the files above)"
    return 1
  fi
  echo "kiln: format check passed ($(echo "$files" | wc -w) files)"
}

cmd=${1:-help}
case "$cmd" in
  build) build ;;
  run)
    # Builds only the example it runs (one translation unit, no tests, no CUDA kernels);
    # KILN_RUN_DEVICE=cuda runs the same example on the GPU (and builds the kernels for it).
    install_deps
    configure
    example=01_fashion_mnist
    [ "${KILN_RUN_DEVICE:-cpu}" = cuda ] && example=01_fashion_mnist_cuda
    meson compile -C "$BUILD" "examples/$example"
    "$BUILD/examples/$example" --out "$ROOT/runs/01_fashion_mnist" "${@:2}"
    ;;
  test)
    install_deps
    # The Python peers the interop tests run (TensorBoard, safetensors, tokenizers, and torch
    # + transformers + peft for the Hugging Face checks, bitsandbytes for QLoRA's NF4): one
    # venv per machine, outside the clone, made while the build runs. Without the package
    # registry their tests skip.
    PYPKGS=(tensorboard safetensors numpy tokenizers torch transformers peft)
    PYPKGS_IMPORT="import tensorboard, safetensors.numpy, numpy, tokenizers, torch, transformers, peft"
    venv_pid=""
    if [ -z "${KILN_PYTHON:-}" ]; then
      KILN_PYTHON="$PYVENV/bin/python"
      export KILN_PYTHON
      if ! "$KILN_PYTHON" -c "$PYPKGS_IMPORT" 2>/dev/null; then
        echo "kiln: installing the Python peers into $PYVENV (once per machine), beside the build"
        mkdir -p "$(dirname "$PYVENV")"
        ( { [ -x "$KILN_PYTHON" ] || python3 -m venv "$PYVENV"; } && "$PYVENV/bin/pip" install -q "${PYPKGS[@]}" &&
          { "$PYVENV/bin/pip" install -q bitsandbytes || echo "kiln: bitsandbytes did not install here"; } ) \
          >"$(dirname "$PYVENV")/pyvenv-install.log" 2>&1 &
        venv_pid=$!
      elif ! "$KILN_PYTHON" -c "import bitsandbytes" 2>/dev/null; then
        # bitsandbytes (the QLoRA NF4 check) where PyPI has a build of it for this machine.
        "$PYVENV/bin/pip" install -q bitsandbytes >"$(dirname "$PYVENV")/pyvenv-bnb.log" 2>&1 &
        venv_pid=$!
      fi
    fi
    # The single-process test programs are built with ASan + UBSan (-Dsanitize_tests), in
    # the same build as the optimised examples: one compile and one run of the cpu suite.
    sanitize=true
    [ "${KILN_SKIP_SANITIZERS:-0}" = 1 ] && sanitize=false
    # Without a GPU the GPU programs cannot run here: they are compile checks, built at -O0.
    check_only=true
    command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && check_only=false
    configure -Dsanitize_tests=$sanitize -Dgpu_programs_check_only=$check_only
    meson configure "$BUILD" -Dsanitize_tests=$sanitize -Dgpu_programs_check_only=$check_only
    status=0
    meson compile -C "$BUILD" || status=1
    if [ -n "$venv_pid" ] && ! wait "$venv_pid"; then
      echo "kiln: could not install the Python peers from PyPI (see $(dirname "$PYVENV")/pyvenv-install.log); their interop tests will be skipped"
    fi
    if [ $status -eq 0 ]; then
      meson test -C "$BUILD" --print-errorlogs --num-processes 2 || status=1
      cp "$BUILD/meson-logs/testlog.json" /tmp/kiln-testlog-main.json
      summarise /tmp/kiln-testlog-main.json || status=1
    fi
    format_check || status=1
    exit $status
    ;;
  *)
    sed -n '2,7p' "$0"
    exit 2
    ;;
esac
