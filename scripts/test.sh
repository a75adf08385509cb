#!/usr/bin/env bash
# Runs the test suite: the CPU suite (CUDA-only tests skip with a reason), then the Triton kernel tests on CPU under
# the interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so it is a separate run).
set -uo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
status=0
$VPY -m pytest -q -m "not triton" python_tests "$@" || status=$?
[ $status -eq 5 ] && status=0   # "no tests collected" is not a failure
TRITON_INTERPRET=1 $VPY -m pytest -q -m triton python_tests "$@"
triton_status=$?
[ $triton_status -eq 5 ] && triton_status=0
[ $status -ne 0 ] && exit $status
exit $triton_status
