#!/usr/bin/env bash
# kiln developer entry point.
#   tools/dev.sh run    install what is missing, build, train the main example
#   tools/dev.sh test   install what is missing, build, run every test suite, then the
#                       sanitizer build (cpu suite under ASan+UBSan) and the format check
#   tools/dev.sh build  install and build only
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
BUILD=${KILN_BUILD_DIR:-build}

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
    meson setup "$BUILD" --buildtype=release >/dev/null
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
    build
    status=0
    # The interop checks read our TensorBoard and safetensors files with the Python
    # packages (and write safetensors for us to read): give them a small venv (PyPI) unless
    # a Python with the packages is already at hand.
    PYPKGS_IMPORT="import tensorboard, safetensors.numpy, numpy, tokenizers"
    if [ -z "${KILN_PYTHON:-}" ] && ! python3 -c "$PYPKGS_IMPORT" 2>/dev/null; then
      if [ ! -x "$BUILD/pyvenv/bin/python" ] || ! "$BUILD/pyvenv/bin/python" -c "$PYPKGS_IMPORT" 2>/dev/null; then
        python3 -m venv "$BUILD/pyvenv" && "$BUILD/pyvenv/bin/pip" install -q tensorboard safetensors numpy tokenizers ||
          echo "kiln: could not install tensorboard/safetensors/tokenizers from PyPI; their interop tests will be skipped"
      fi
      KILN_PYTHON="$(cd "$BUILD" && pwd)/pyvenv/bin/python"  # absolute: meson runs tests elsewhere
      export KILN_PYTHON
    fi
    meson test -C "$BUILD" --print-errorlogs --num-processes 2 || status=1
    cp "$BUILD/meson-logs/testlog.json" /tmp/kiln-testlog-main.json
    if [ "${KILN_SKIP_SANITIZERS:-0}" != 1 ]; then
      echo "kiln: sanitizer build (AddressSanitizer + UndefinedBehaviorSanitizer), cpu suite"
      if [ ! -f build-asan/build.ninja ]; then
        meson setup build-asan --buildtype=debug -Db_sanitize=address,undefined -Db_lundef=false \
          -Dexamples=false -Dcuda=disabled >/dev/null
      fi
      meson compile -C build-asan
      UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 ASAN_OPTIONS=detect_leaks=1 \
        meson test -C build-asan --suite cpu --print-errorlogs --num-processes 2 || status=1
      cat build-asan/meson-logs/testlog.json >> /tmp/kiln-testlog-main.json
    fi
    format_check || status=1
    summarise /tmp/kiln-testlog-main.json || status=1
    exit $status
    ;;
  *)
    sed -n '2,7p' "$0"
    exit 2
    ;;
esac
