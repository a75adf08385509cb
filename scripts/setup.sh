#!/usr/bin/env bash
# Sets up .venv on a fresh machine: pinned torch/torchvision, the other dependencies, torchattacks (tests only, for
# parity; --no-deps or it replaces torch), then builds robust_ops._C (CPU kernels always; CUDA kernels when torch is
# a CUDA build and a toolkit is present -- see setup.py). Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
VPY=.venv/bin/python
$VPY -m pip install -q --upgrade pip setuptools wheel 2>&1 | grep -v "^WARNING: Location" || true
# Pinned in pyproject.toml; listed here too so pip resolves torch from the pinned build before anything else.
$VPY -m pip install -q "torch==2.14.1" "torchvision==0.29.1" 2>&1 | grep -v "^WARNING: Location" || true
$VPY -m pip install -q numpy scikit-learn tqdm matplotlib pyyaml ninja \
  pytest pytest-benchmark hypothesis scipy requests 2>&1 | grep -v "^WARNING: Location" || true
$VPY -m pip install -q --no-deps "torchattacks==3.5.1" 2>&1 | grep -v "^WARNING: Location" || true
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export MAX_JOBS=${MAX_JOBS:-2}
$VPY -m pip install --no-build-isolation --no-deps -e . 2>&1 | grep -E "robust_ops:|Successfully|error|Error" || true
$VPY -c "import robust_ops; print('robust_ops', robust_ops.__version__, 'CUDA kernels:', robust_ops._extension.has_cuda_kernels())"
