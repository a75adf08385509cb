#!/usr/bin/env bash
# The GPU checks as one prepared run, for a session lent a GPU machine (docs/testing.md, "On a GPU"): builds
# robust_ops._C in place against that machine's own torch (CPU + CUDA kernels), runs the CUDA-parametrized tests and
# the Triton tests on the GPU, then the GPU numbers docs/benchmarks.md lacks -- one IMA epoch compacted vs masked vs
# k-ary (issue 4's open measurement) and the op benchmarks. Logs and CSVs go to $OUT.
#
#   bash scripts/device_check.sh                       # stages: build tests ima ops
#   STAGES="build ima" bash scripts/device_check.sh    # a subset: groups build tests ima ops, or single stages
#                                                      # (tests_cuda tests_triton ima ima_deterministic bench_*)
#   DEVICE=cpu PYTHON=.venv/bin/python STAGES="tests ima" IMA_ARGS=--quick bash scripts/device_check.sh  # dry run
#
# BreastMNIST is read from $ROBUST_OPS_DATA (a folder or the file); ../shared does not travel to a device machine,
# so copy breastmnist.npz into an ignored folder of the checkout and carry it (docs/testing.md). Each stage's
# status is printed and the script exits non-zero if any failed; later stages still run. Each stage has its own time
# limit (STAGE_LIMITS) so one slow stage cannot eat a short lease, and the stages run in the order of what a lease
# most needs (the build, the CUDA kernels' tests, the IMA epoch, Triton, the op benchmarks). The device tool brings
# back at most 8 files, so the logs and CSVs are written to $WORK and packed into $OUT/device_check.tgz after every
# stage: a run cut short still returns what it finished.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/robust_ops_device}
WORK=${WORK:-/tmp/robust_ops_device_work}
STAGES=${STAGES:-build tests ima ops}
DEVICE=${DEVICE:-cuda}
# seconds per stage: build, each test stage, the IMA epochs, each op benchmark
read -r LIMIT_BUILD LIMIT_TESTS LIMIT_IMA LIMIT_OPS <<<"${STAGE_LIMITS:-240 150 200 60}"
mkdir -p "$OUT" "$WORK"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export ROBUST_OPS_BENCH_DIR="$WORK"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
# The GPU image sets CXX and CC to its own GCC (/opt/gcc), which links libstdc++ statically: such an extension
# crashed there on its first error message formatting a number (2026-12-04), and setup.py now refuses the build.
# The system GCC links the shared libstdc++.so.6 that torch loads. KEEP_CXX=1 keeps the caller's compilers.
if [ -z "${KEEP_CXX:-}" ]; then
  for candidate in /usr/bin/g++ /usr/bin/x86_64-linux-gnu-g++; do
    if [ -x "$candidate" ] && [ -x "${candidate%++}cc" ]; then
      export CXX=$candidate CC=${candidate%++}cc
      break
    fi
  done
fi

failed=()
stage() {  # stage NAME LIMIT_S COMMAND...: run it, its output in $WORK/NAME.log, one status line, repack $OUT
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "(stopped at its ${limit} s limit)" >>"$WORK/$name.log"
  echo "device_check: $name rc=$rc ($((SECONDS - start)) s; last lines of $name.log:)"
  tail -n 15 "$WORK/$name.log" | sed 's/^/    /'
  [ $rc -eq 0 ] || failed+=("$name")
  tar czf "$OUT/device_check.tgz.part" -C "$WORK" . && mv "$OUT/device_check.tgz.part" "$OUT/device_check.tgz"
}
wants() {  # wants STAGE GROUP: STAGES names the stage itself or its group
  [[ " $STAGES " == *" $1 "* || " $STAGES " == *" $2 "* ]]
}

"$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton',
  triton.__version__, 'gpu', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
echo "compilers: CXX=${CXX:-unset} CC=${CC:-unset}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv,noheader 2>/dev/null
if wants build build; then
  stage build "$LIMIT_BUILD" "$PY" setup.py build_ext --inplace
fi
# -k cuda: the ("cpu", "cuda") parametrizations' CUDA halves; the CPU suite is CI's job.
wants tests_cuda tests && stage tests_cuda "$LIMIT_TESTS" \
  "$PY" -m pytest -q -rfE -m "not triton" python_tests -k cuda -p no:cacheprovider
IMA_VARIANTS="compacted,compacted k=4,compacted unpadded"
wants ima ima && stage ima "$LIMIT_IMA" "$PY" benchmarks/bench_ima.py --device "$DEVICE" \
  --scenarios spread,cap,init --variants "$IMA_VARIANTS" ${IMA_ARGS:---repeats 2}
# The same with deterministic algorithms: whether compacted margins can equal masked ones on this device at all.
wants ima_deterministic ima && stage ima_deterministic "$LIMIT_IMA" "$PY" benchmarks/bench_ima.py \
  --device "$DEVICE" --deterministic --scenarios spread --variants "$IMA_VARIANTS" ${IMA_ARGS:---repeats 1}
# One pytest process per file: a crash (a segfault on 2026-12-04) or a device assert, which poisons the process's
# CUDA context, costs that file's results, not every later file's. Exit status 5: no test of the file selected.
TRITON_FILES=$(grep -l "pytest.mark.triton" python_tests/test_*.py | tr '\n' ' ')
wants tests_triton tests && stage tests_triton "$((2 * LIMIT_TESTS))" env PY="$PY" bash -c '
  failed=0
  for file in '"$TRITON_FILES"'; do
    echo "== $file"
    "$PY" -m pytest -q -rfE -m triton "$file" -p no:cacheprovider
    status=$?
    [ $status -eq 0 ] || [ $status -eq 5 ] || { echo "== $file: exit status $status"; failed=1; }
  done
  exit $failed'
for bench in pgd_step boundary_search; do
  wants "bench_$bench" ops && stage "bench_$bench" "$LIMIT_OPS" "$PY" "benchmarks/bench_$bench.py" --device "$DEVICE"
done
# $DEVICE only: its CPU half (the machine's CPU numbers, not the GPU's) ran past the stage's limit (2026-12-04)
wants bench_drop_max_pool2d ops && stage bench_drop_max_pool2d "$LIMIT_OPS" "$PY" benchmarks/bench_drop_max_pool2d.py \
  --device "$DEVICE"
if [ ${#failed[@]} -gt 0 ]; then
  echo "device_check: failed stages: ${failed[*]}"
  exit 1
fi
echo "device_check: all stages passed"
