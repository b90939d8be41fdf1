#!/usr/bin/env bash
# tools/gpu-check.sh — every check that needs a GPU, in one command, for a lent device
# machine (a session gets about 15 minutes of one; see kernels/README.md).
#
#   bash tools/gpu-check.sh            # results under $OUT (the device tool's), else bench/out/gpu
#
# Builds with nvcc alone (no Meson: the device image has no Eigen or MPI packages) the
# kernels into build-gpu/libkiln_kernels.a, the gpu suite's test program and the GPU
# benchmarks, for sm_$KILN_GPU_ARCH (default 90); then runs
#   1. tests/gpu/test_kernels.cu: every kernel against the CPU backend, the runtime, the
#      cuBLASLt GEMM (log: test_kernels.log);
#   2. the same under compute-sanitizer memcheck (memcheck.log);
#   2b. tests/gpu/test_training.cpp: a GPT trained on the GPU against the CPU, the
#      trainer's resume on the GPU and its checkpoints on the CPU (test_training.log);
#   2c. examples/01_fashion_mnist.cpp built for cuda: one epoch of Fashion-MNIST with the
#      trainer on the GPU, against the CPU build's accuracy bar (fashion_mnist_cuda.log);
#   3. bench/gpu/adamw.cu against bench/gpu/torch_adamw.py (adamw.jsonl): fused AdamW GB/s
#      as a fraction of the measured copy bandwidth, kiln and torch(fused=True);
#   4. bench/gpu/attention.cu against bench/gpu/torch_attention.py (attention.jsonl):
#      causal bf16 attention forward + backward TFLOP/s, kiln and SDPA;
#   5. bench/gpu/cross_entropy.cu against bench/gpu/torch_cross_entropy.py
#      (cross_entropy.jsonl): fused cross-entropy time and memory beyond the logits;
#   6. bench/gpu/gpt2_step.cpp against bench/gpu/torch_gpt2_step.py (gpt2_step.jsonl):
#      a GPT-2 124M f32 training step, tokens/s, against PyTorch eager and torch.compile.
# Needs nvcc, a host g++, Eigen's headers, the Boost.Hana and doctest headers, the
# Fashion-MNIST files, and python3 with torch for the peers. The device image has only
# the toolkit and Python: `bash tools/gpu-deps.sh` here copies the rest into .deps/
# (~45 MB), which this script uses when present; carry [".deps"].
# Exits non-zero if a build, a check or memcheck failed; 77 after the builds where no
# GPU is visible.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/out/gpu}
arch=${KILN_GPU_ARCH:-90}
deps=${KILN_DEPS:-.deps}
eigen=${EIGEN_DIR:-/usr/include/eigen3}
[ -f "$deps/eigen3/Eigen/Core" ] && eigen=${EIGEN_DIR:-$deps/eigen3}
fmnist=/usr/share/datasets/fashion-mnist
[ -d "$deps/fashion-mnist" ] && fmnist=$deps/fashion-mnist
b=build-gpu
mkdir -p "$out" "$b"
[ -f "$eigen/Eigen/Core" ] || { echo "gpu-check: Eigen headers not found at $eigen (set EIGEN_DIR)"; exit 2; }
flags=(-std=c++20 -O3 --expt-relaxed-constexpr -diag-suppress 20012,20011,20014 -Iinclude -isystem "$eigen"
       -gencode "arch=compute_$arch,code=sm_$arch")
nvidia-smi -L 2>&1 | tee "$out/device.txt"

echo "gpu-check: building the kernels for sm_$arch"
pids=()
for k in kernels/*.cu; do
  nvcc -c "$k" -o "$b/$(basename "$k" .cu).o" "${flags[@]}" -Xcompiler -fPIC > "$b/$(basename "$k" .cu).log" 2>&1 &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=1; done
if ((failed)); then cat "$b"/*.log; echo "gpu-check: a kernel did not compile"; exit 1; fi
rm -f "$b/libkiln_kernels.a"
ar rcs "$b/libkiln_kernels.a" "$b"/*.o
nvcc "${flags[@]}" -DKILN_WITH_CUDA -Xcompiler -fopenmp tests/gpu/test_kernels.cu "$b/libkiln_kernels.a" \
  -lgomp -lcublasLt -o "$b/test_kernels" || { echo "gpu-check: test_kernels did not build"; exit 1; }
# The programs whose tensors live on the GPU, built by the host compiler (as Meson does)
# and linked with the kernels, cuBLASLt and the CUDA runtime.
cudalib=$(dirname "$(command -v nvcc)")/../lib64
host=(-std=c++20 -O1 -fopenmp -fno-math-errno -DKILN_WITH_CUDA -DEIGEN_DONT_PARALLELIZE_INSIDE_OMP_REGIONS -Iinclude)
[ -d "$deps/include" ] && host+=(-isystem "$deps/include")
host+=(-isystem "$eigen")
hostlibs=("$b/libkiln_kernels.a" -L"$cudalib" -lcublasLt -lcudart -Wl,-rpath,"$cudalib" -l:libz.so.1)
g++ "${host[@]}" tests/gpu/test_training.cpp tests/test_main.cpp "${hostlibs[@]}" -o "$b/test_training" ||
  { echo "gpu-check: test_training did not build"; exit 1; }
g++ "${host[@]}" -O2 -DKILN_EXAMPLE_CUDA examples/01_fashion_mnist.cpp "${hostlibs[@]}" -o "$b/01_fashion_mnist_cuda" ||
  { echo "gpu-check: 01_fashion_mnist_cuda did not build"; exit 1; }
g++ "${host[@]}" -O2 bench/gpu/gpt2_step.cpp "${hostlibs[@]}" -o "$b/gpu_gpt2_step" ||
  { echo "gpu-check: bench/gpu/gpt2_step.cpp did not build"; exit 1; }
for bench in adamw attention cross_entropy; do
  nvcc "${flags[@]}" "bench/gpu/$bench.cu" "$b/libkiln_kernels.a" -lcublasLt -o "$b/gpu_$bench" ||
    { echo "gpu-check: bench/gpu/$bench.cu did not build"; exit 1; }
done

if ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu-check: built; no GPU visible here, nothing run"
  exit 77
fi
status=0
echo "gpu-check: test_kernels"
"$b/test_kernels" 2>&1 | tee "$out/test_kernels.log" || status=1
echo "gpu-check: test_training (GPU training against the CPU)"
"$b/test_training" 2>&1 | tee "$out/test_training.log" || status=1
echo "gpu-check: 01_fashion_mnist_cuda"
"$b/01_fashion_mnist_cuda" --epochs 1 --limit-batches 150 --min-accuracy 0.75 --no-progress --data "$fmnist" \
  --out "$b/runs/01_fashion_mnist_cuda" 2>&1 | tee "$out/fashion_mnist_cuda.log" || status=1
echo "gpu-check: compute-sanitizer memcheck"
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$sanitizer" ]; then
  "$sanitizer" --tool memcheck --error-exitcode 3 "$b/test_kernels" > "$out/memcheck.log" 2>&1 || status=1
  tail -3 "$out/memcheck.log"
else
  echo "gpu-check: no compute-sanitizer" | tee "$out/memcheck.log"
fi
for bench in adamw attention cross_entropy; do
  echo "gpu-check: $bench, kiln and torch"
  : > "$out/$bench.jsonl"
  "$b/gpu_$bench" | tee -a "$out/$bench.jsonl" || status=1
  python3 "bench/gpu/torch_$bench.py" | tee -a "$out/$bench.jsonl" || echo "gpu-check: the torch peer of $bench did not run"
done
echo "gpu-check: gpt2_step, kiln and torch (eager, compiled)"
"$b/gpu_gpt2_step" | tee "$out/gpt2_step.jsonl" || status=1
python3 bench/gpu/torch_gpt2_step.py --kiln "$out/gpt2_step.jsonl" | tee -a "$out/gpt2_step.jsonl" ||
  echo "gpu-check: the torch peer of gpt2_step did not run"
echo "gpu-check: done (status $status); results in $out"
exit $status
