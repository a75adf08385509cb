#!/usr/bin/env bash
# Bisects the torch-2.11 segmentation fault of the native CPU pgd_step_ seen on the H200 (2026-12-04, run 3).
# Run from anywhere: OUT=$OUT bash scripts/segv_probe.sh (about 2-4 minutes with the build). Each step's log is in
# $OUT/<step>.log, one status line per step in $OUT/summary.txt. On SIGSEGV torch prints the C++ stack of every
# thread (then faulthandler the Python one), which is what run 3 lacked.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT=${OUT:-/tmp/segv_probe}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONFAULTHANDLER=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
PLUGIN_DIR=$(mktemp -d)
echo "import torch; torch._C._set_print_stack_traces_on_fatal_signal(True)" > "$PLUGIN_DIR/segv_stacks.py"
export PYTHONPATH="$PLUGIN_DIR:$PWD"
step() {  # step NAME COMMAND...
  local name=$1; shift
  timeout --kill-after=5 "${LIMIT:-150}" "$@" > "$OUT/$name.log" 2>&1
  last_rc=$?
  echo "$name rc=$last_rc" | tee -a "$OUT/summary.txt"
}
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda',
  torch.cuda.is_available())" | tee "$OUT/summary.txt"
[ -f robust_ops/_C.so ] || LIMIT=300 step build "$PY" setup.py build_ext --inplace
CALL='import segv_stacks, torch, robust_ops
print("cuda kernels:", robust_ops._extension.has_cuda_kernels(), flush=True)
for norm in ("linf", "l2"):
    buf = torch.rand(4, 6)
    x_nat, grad, a = torch.rand(3, 6), torch.randn(3, 6), torch.full((3,), 0.1)
    try:
        torch.ops.robust_ops.pgd_step_(buf[1:], x_nat, grad, a, a, 0.0, 1.0, norm, buf[:3].unsqueeze(0), 0)
    except RuntimeError as e:
        print(norm, "raised:", str(e)[:70], flush=True)
print("direct C++ kernel, no Python kernels:", flush=True)
buf = torch.rand(4, 6)
try:
    torch.ops.robust_ops.pgd_step_.default.redispatch(torch._C.DispatchKeySet("CPU"), buf[1:], torch.rand(3, 6),
        torch.rand(3, 6), a, a, 0.0, 1.0, "linf", buf[:3].unsqueeze(0), 0)
except RuntimeError as e:
    print("raised:", str(e)[:70], flush=True)'
step call_alone "$PY" -c "$CALL"                          # the CPU call in a fresh process, GPU visible
CUDA_VISIBLE_DEVICES= step call_no_gpu "$PY" -c "$CALL"   # same build, no GPU visible
T="-q -rfE -p no:cacheprovider -p segv_stacks -m triton"
step test_alone "$PY" -m pytest $T python_tests/test_pgd_step_triton.py -k history_slot_partly
step test_file "$PY" -m pytest $T python_tests/test_pgd_step_triton.py
step suite "$PY" -m pytest $T python_tests                # the order of run 3
# gdb only when the suite failed: it repeats most of the suite, and a short lease has no time for it otherwise
if [ "$last_rc" -ne 0 ] && command -v gdb > /dev/null; then
  LIMIT=200 step suite_gdb gdb -q -batch -ex run -ex "thread apply all bt 40" --args "$PY" -m pytest $T python_tests \
    -k "drop_max or pgd_step"
fi
grep -h -A12 "SIGSEGV\|Fatal Python error" "$OUT"/*.log | head -150 > "$OUT/stacks.txt"
rm -rf "$PLUGIN_DIR"
