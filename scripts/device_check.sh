#!/usr/bin/env bash
# The GPU checks as one prepared run, for a session lent a GPU machine (docs/testing.md, "On a GPU"): builds
# robust_ops._C in place against that machine's own torch (CPU + CUDA kernels), runs the CUDA-parametrized tests and
# the Triton tests on the GPU, then the GPU numbers docs/benchmarks.md lacks -- one IMA epoch compacted vs masked vs
# k-ary (issue 4's open measurement) and the op benchmarks. Logs and CSVs go to $OUT.
#
#   bash scripts/device_check.sh                       # stages: build tests ima ops
#   STAGES="build ima" bash scripts/device_check.sh    # a subset
#   DEVICE=cpu PYTHON=.venv/bin/python STAGES="tests ima" IMA_ARGS=--quick bash scripts/device_check.sh  # dry run
#
# BreastMNIST is read from $ROBUST_OPS_DATA (a folder or the file); ../shared does not travel to a device machine,
# so copy breastmnist.npz into an ignored folder of the checkout and carry it (docs/testing.md). Each stage's
# status is printed and the script exits non-zero if any failed; later stages still run.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/robust_ops_device}
STAGES=${STAGES:-build tests ima ops}
DEVICE=${DEVICE:-cuda}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export ROBUST_OPS_BENCH_DIR="$OUT"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi

failed=()
stage() {  # stage NAME COMMAND...: run it, its output in $OUT/NAME.log, one status line
  local name=$1 start=$SECONDS
  shift
  "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "device_check: $name rc=$rc ($((SECONDS - start)) s; last lines of $OUT/$name.log:)"
  tail -n 15 "$OUT/$name.log" | sed 's/^/    /'
  [ $rc -eq 0 ] || failed+=("$name")
}
wants() { [[ " $STAGES " == *" $1 "* ]]; }

"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu',
  torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
if wants build; then
  stage build "$PY" setup.py build_ext --inplace
fi
if wants tests; then
  # -k cuda: the ("cpu", "cuda") parametrizations' CUDA halves; the CPU suite is CI's job.
  stage tests_cuda "$PY" -m pytest -q -m "not triton" python_tests -k cuda -p no:cacheprovider
  stage tests_triton "$PY" -m pytest -q -m triton python_tests -p no:cacheprovider
fi
if wants ima; then
  stage ima "$PY" benchmarks/bench_ima.py --device "$DEVICE" --scenarios spread,cap,init \
    --variants "compacted,compacted k=4,compacted unpadded" ${IMA_ARGS:---repeats 1}
fi
if wants ops; then
  stage bench_pgd_step "$PY" benchmarks/bench_pgd_step.py --device "$DEVICE"
  stage bench_boundary_search "$PY" benchmarks/bench_boundary_search.py --device "$DEVICE"
  stage bench_drop_max_pool2d "$PY" benchmarks/bench_drop_max_pool2d.py  # CPU, then CUDA when visible
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "device_check: failed stages: ${failed[*]}"
  exit 1
fi
echo "device_check: all stages passed"
