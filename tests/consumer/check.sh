#!/bin/sh
# usage: check.sh BUILD_DIR SOURCE_DIR CXX
# Installs kiln into a scratch DESTDIR, then compiles and runs a consumer using only
# `pkg-config --cflags --libs kiln`, as another Meson or CMake project would.
set -eu
build="$1"; src="$2"; cxx="$3"
dest=$(mktemp -d)
trap 'rm -rf "$dest"' EXIT
meson install -C "$build" --destdir "$dest" --no-rebuild --quiet >/dev/null
pc=$(find "$dest" -name kiln.pc | head -1)
[ -n "$pc" ] || { echo "FAIL: kiln.pc was not installed"; exit 1; }
# Relocate only kiln.pc to the scratch prefix (--define-variable would also move eigen3's).
prefix=$(pkg-config --variable=prefix "$pc")
mkdir -p "$dest/pc"
sed "s|^prefix=.*|prefix=$dest$prefix|" "$pc" > "$dest/pc/kiln.pc"
flags=$(PKG_CONFIG_PATH="$dest/pc" pkg-config --cflags --libs kiln)
echo "pkg-config kiln: $flags"
# shellcheck disable=SC2086
"$cxx" $flags "$src/main.cpp" -o "$dest/consumer" $flags
"$dest/consumer"
echo "ok: consumer built with pkg-config flags against the installed kiln and ran"
if command -v cmake >/dev/null 2>&1; then
  PKG_CONFIG_PATH="$dest/pc" cmake -S "$src" -B "$dest/cmake-build" -DCMAKE_CXX_COMPILER="$cxx" >/dev/null
  cmake --build "$dest/cmake-build" >/dev/null
  "$dest/cmake-build/consumer"
  echo "ok: CMake project (pkg_check_modules) built against the installed kiln and ran"
fi
