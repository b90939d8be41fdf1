#!/usr/bin/env bash
# tools/gpu-check.sh — every check that needs a GPU, in one command, for a lent device
# machine (a session gets about 15 minutes of one; see kernels/README.md).
#
#   bash tools/gpu-check.sh            # results under $OUT (the device tool's), else bench/out/gpu
#
# Builds with nvcc alone (no Meson: the device image has no Eigen or MPI packages) the
# kernels into build-gpu/libkiln_kernels.a, the gpu suite's test program and the GPU
# benchmarks, for sm_$KILN_GPU_ARCH (default 90); then runs
#   1. tests/gpu/test_kernels*.cu: every kernel against the CPU backend, the runtime, the
#      cuBLASLt GEMM (log: test_kernels.log);
#   2. the same under compute-sanitizer memcheck (memcheck.log), and the attention cases
#      under racecheck (racecheck.log);
#   2b. tests/gpu/test_training.cpp: a GPT trained on the GPU against the CPU, the
#      trainer's resume on the GPU and its checkpoints on the CPU (test_training.log);
#   2b'. tests/gpu/test_dist.cpp on 2 ranks sharing the GPU (ddp and zero<1|2> with the
#      model on the GPU against single_device; only where MPI is installed: test_dist.log);
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
# The programs build in parallel; the steps run in the order above (memcheck after the
# checks, before the benchmarks), each under what is left of KILN_GPU_BUDGET_S (560 s),
# and a step the budget cannot fit is named in skipped.txt. Each benchmark's JSON lines
# (kiln's, then torch's) end up in <name>.jsonl, their stderr in <name>.*.jsonl.err.
# Exits 1 if a build, a check, memcheck or a kiln benchmark failed (a torch peer that
# does not run is reported, not counted); 3 if everything that ran passed but something
# was skipped or ran out of time; 77 after the builds where no GPU is visible.
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
# The programs, built side by side: the kernel test and the GPU benchmarks by nvcc; the
# programs whose tensors live on the GPU by the host compiler (as Meson does), linked with
# the kernels, cuBLASLt and the CUDA runtime.
cudalib=$(dirname "$(command -v nvcc)")/../lib64
host=(-std=c++20 -O1 -fopenmp -fno-math-errno -DKILN_WITH_CUDA -DEIGEN_DONT_PARALLELIZE_INSIDE_OMP_REGIONS -Iinclude)
[ -d "$deps/include" ] && host+=(-isystem "$deps/include")
host+=(-isystem "$eigen")
hostlibs=("$b/libkiln_kernels.a" -L"$cudalib" -lcublasLt -lcudart -Wl,-rpath,"$cudalib" -l:libz.so.1)
names=() pids=()
build() {  # build NAME COMMAND...: in the background, log in $b/NAME.build.log
  local name=$1
  shift
  "$@" > "$b/$name.build.log" 2>&1 &
  names+=("$name")
  pids+=($!)
}
build test_kernels nvcc "${flags[@]}" -DKILN_WITH_CUDA -Xcompiler -fopenmp tests/gpu/test_kernels*.cu \
  "$b/libkiln_kernels.a" -lgomp -lcublasLt -o "$b/test_kernels"
build test_training g++ "${host[@]}" tests/gpu/test_training.cpp tests/test_main.cpp "${hostlibs[@]}" \
  -o "$b/test_training"
build 01_fashion_mnist_cuda g++ "${host[@]}" -O2 -DKILN_EXAMPLE_CUDA examples/01_fashion_mnist.cpp "${hostlibs[@]}" \
  -o "$b/01_fashion_mnist_cuda"
build gpu_gpt2_step g++ "${host[@]}" -O2 bench/gpu/gpt2_step.cpp "${hostlibs[@]}" -o "$b/gpu_gpt2_step"
# Two ranks training with their models on the GPU (tests/gpu/test_dist.cpp) need MPI, which
# the device image may lack: built only where mpicxx is found (NCCL's cases where libnccl is).
if command -v mpicxx > /dev/null && command -v mpirun > /dev/null; then
  read -ra mpiflags <<< "$(mpicxx --showme:compile) $(mpicxx --showme:link)"
  ncclflags=()
  ls "$cudalib"/libnccl.so* > /dev/null 2>&1 && ncclflags=(-DKILN_TEST_NCCL -I"$cudalib/../include" -lnccl)
  build test_dist g++ "${host[@]}" tests/gpu/test_dist.cpp tests/test_main.cpp "${hostlibs[@]}" "${ncclflags[@]}" \
    "${mpiflags[@]}" -o "$b/test_dist"
fi
for bench in adamw attention cross_entropy; do
  build "gpu_$bench" nvcc "${flags[@]}" "bench/gpu/$bench.cu" "$b/libkiln_kernels.a" -lcublasLt -o "$b/gpu_$bench"
done
failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    cat "$b/${names[$i]}.build.log"
    echo "gpu-check: ${names[$i]} did not build"
    failed=1
  fi
done
((failed)) && exit 1
echo "gpu-check: built in ${SECONDS} s"

if ! nvidia-smi -L > /dev/null 2>&1; then
  echo "gpu-check: built; no GPU visible here, nothing run"
  exit 77
fi
# Every step runs under what is left of the time budget (KILN_GPU_BUDGET_S, default 560 s,
# under the device tool's 600 s per command); a step that would start with less than 20 s
# left is skipped and named in skipped.txt, so one call returns whatever it could run.
deadline=$((${KILN_GPU_BUDGET_S:-560}))
status=0
incomplete=0
step() {  # step KIND NAME LOG COMMAND...; KIND: check (a test), bench (kiln's figures), peer (torch's)
  local kind=$1 name=$2 log=$3
  shift 3
  local left=$((deadline - SECONDS))
  if ((left < 20)); then
    echo "gpu-check: $name skipped: the time budget is spent" | tee -a "$out/skipped.txt"
    [ "$kind" = peer ] || incomplete=1
    return
  fi
  echo "gpu-check: $name (at ${SECONDS} s, ${left} s left)"
  local rc
  if [[ "$log" == *.jsonl ]]; then  # JSON lines only; diagnostics beside them
    timeout "$left" "$@" 2> "$log.err" | tee "$log"
    rc=${PIPESTATUS[0]}
  else
    timeout "$left" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
  fi
  if ((rc == 124)); then
    echo "gpu-check: $name ran out of time" | tee -a "$out/skipped.txt"
    [ "$kind" = peer ] || incomplete=1
  elif ((rc != 0)); then
    if [ "$kind" = peer ]; then echo "gpu-check: $name did not run (rc $rc; see $log.err)"; else status=1; fi
  fi
}
step check test_kernels "$out/test_kernels.log" "$b/test_kernels"
step check "test_training (GPU training against the CPU)" "$out/test_training.log" "$b/test_training"
step check 01_fashion_mnist_cuda "$out/fashion_mnist_cuda.log" "$b/01_fashion_mnist_cuda" --epochs 1 \
  --limit-batches 150 --min-accuracy 0.75 --no-progress --data "$fmnist" --out "$b/runs/01_fashion_mnist_cuda"
if [ -x "$b/test_dist" ]; then
  step check "test_dist (2 ranks, models on the GPU)" "$out/test_dist.log" mpirun -n 2 --oversubscribe \
    --allow-run-as-root --bind-to none -x KILN_COLLECTIVE_TIMEOUT=120 "$b/test_dist"
else
  echo "gpu-check: test_dist (2 ranks, models on the GPU) not built: no MPI on this machine" | tee -a "$out/skipped.txt"
  incomplete=1
fi
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$sanitizer" ]; then
  step check "compute-sanitizer memcheck" "$out/memcheck.log" "$sanitizer" --tool memcheck --error-exitcode 3 \
    "$b/test_kernels"
  # The tensor-core attention kernels hand tiles between phases through shared memory;
  # racecheck sees a missing barrier, which the host-thread tests cannot.
  step check "compute-sanitizer racecheck (attention)" "$out/racecheck.log" "$sanitizer" --tool racecheck \
    --error-exitcode 3 "$b/test_kernels" attention
else
  echo "gpu-check: no compute-sanitizer" | tee "$out/memcheck.log"
  incomplete=1
fi
for bench in adamw attention cross_entropy; do
  step bench "$bench (kiln)" "$out/$bench.kiln.jsonl" "$b/gpu_$bench"
  step peer "$bench (torch)" "$out/$bench.torch.jsonl" python3 "bench/gpu/torch_$bench.py"
  cat "$out/$bench.kiln.jsonl" "$out/$bench.torch.jsonl" > "$out/$bench.jsonl" 2> /dev/null
  python3 bench/gpu/ratios.py "$out/$bench.jsonl" | tee -a "$out/ratios.txt"
done
step bench "gpt2_step (kiln)" "$out/gpt2_step.kiln.jsonl" "$b/gpu_gpt2_step"
step peer "gpt2_step (torch eager, compiled)" "$out/gpt2_step.torch.jsonl" python3 bench/gpu/torch_gpt2_step.py \
  --kiln "$out/gpt2_step.kiln.jsonl"
cat "$out/gpt2_step.kiln.jsonl" "$out/gpt2_step.torch.jsonl" > "$out/gpt2_step.jsonl" 2> /dev/null
# 1: a build, a check or a benchmark failed; 3: all that ran passed, but a check or a
# benchmark was skipped or cut off by the time budget (skipped.txt says which).
((status == 0 && incomplete)) && status=3
echo "gpu-check: done at ${SECONDS} s (status $status); results in $out"
exit $status
