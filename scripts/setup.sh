#!/usr/bin/env bash
# Sets up .venv on a fresh machine: pinned torch/torchvision, the other dependencies, torchattacks (tests only, for
# parity; --no-deps or it replaces torch), onnx/onnxscript/onnxruntime (tests only, pinned, --no-deps), then builds
# robust_ops._C (CPU kernels always; CUDA kernels when torch is a CUDA build and a toolkit is present -- see
# setup.py). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
# pip, without the machine-config noise about absent local package folders; keeps pip's exit status.
quiet_pip() {
  "$VPY" -m pip "$@" 2>&1 | { grep -v "^WARNING: Location" || true; }
  return "${PIPESTATUS[0]}"
}
quiet_pip install -q --upgrade pip setuptools wheel
# Pinned in pyproject.toml; installed first so nothing else can pull another torch build.
quiet_pip install -q "torch==2.14.1" "torchvision==0.29.1"
quiet_pip install -q "torch==2.14.1" numpy scikit-learn tqdm matplotlib pyyaml ninja \
  pytest pytest-benchmark hypothesis scipy requests
quiet_pip install -q --no-deps "torchattacks==3.5.1"
# ONNX export tests (tests only; they skip without these): pinned and --no-deps like torchattacks. Their own
# requirements (numpy, packaging, sympy, typing_extensions) are installed above with torch and pytest.
quiet_pip install -q --no-deps "onnx==1.23.2" "onnxscript==0.7.2" "onnx-ir==1.1.0" "onnxruntime==1.32.0" \
  "ml_dtypes==0.7.0" "protobuf==7.36.2" "flatbuffers==25.12.19"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}
# The ninja installed above: pip puts no venv's scripts on PATH for a --no-build-isolation build, and torch, finding
# no ninja there, falls back to compiling one file at a time (MAX_JOBS unused).
export PATH="$PWD/.venv/bin:$PATH"
log=$(mktemp)
if ! $VPY -m pip install -v --no-build-isolation --no-deps -e . >"$log" 2>&1; then
  # `|| true`: under `set -e -o pipefail` a log without matches, or head closing the pipe (SIGPIPE, 141), would end
  # the script here, before it says where the log is. setup.py's own reasons to stop (a toolkit of another CUDA
  # version, an unknown switch value, an old setuptools) are `robust_ops: ...` lines without the word error.
  grep -E "error|Error|^ *robust_ops: " "$log" | head -40 || true
  echo "robust_ops: build failed (full log: $log)"
  exit 1
fi
grep -E "^ *robust_ops: building" "$log" | head -1 || true
rm -f "$log"  # kept only when the build failed, for its path printed above
$VPY -c "import robust_ops; print('robust_ops', robust_ops.__version__, 'CUDA kernels:', robust_ops._extension.has_cuda_kernels())"
