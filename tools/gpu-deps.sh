#!/usr/bin/env bash
# tools/gpu-deps.sh — fills .deps/ with what tools/gpu-check.sh needs on a device machine
# whose image has only the CUDA toolkit, a host compiler and Python: Eigen's headers, the
# Boost, doctest and zlib headers the host-compiled GPU programs include (found by asking the
# compiler which ones they include, so nothing else is copied), and the Fashion-MNIST
# files for 01_fashion_mnist_cuda. About 45 MB, under the device tool's 64 MiB carry.
#
#   bash tools/gpu-deps.sh       # then: run(carry: [".deps"], command: "bash tools/gpu-check.sh")
set -euo pipefail
cd "$(dirname "$0")/.."
d=.deps
mkdir -p "$d/include"
grep -qx '/.deps/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info && echo /.deps/ >> .git/info/exclude; }
rm -rf "$d/eigen3" && cp -r /usr/include/eigen3 "$d/"
# Every Boost/doctest header the GPU programs built by the host compiler include.
for src in tests/gpu/test_training.cpp examples/01_fashion_mnist.cpp; do
  g++ -std=c++20 -M -DKILN_WITH_CUDA -DKILN_EXAMPLE_CUDA -fopenmp -Iinclude -isystem /usr/include/eigen3 "$src"
done | tr ' \\' '\n\n' | grep -E '^/usr/include/(boost/|doctest/|zlib\.h$|zconf\.h$)' | sort -u | while read -r h; do
  rel=${h#/usr/include/}
  mkdir -p "$d/include/$(dirname "$rel")"
  cp "$h" "$d/include/$rel"
done
rm -rf "$d/fashion-mnist" && cp -r /usr/share/datasets/fashion-mnist "$d/"
du -sh "$d"
