#!/usr/bin/env bash
# Runs the test suite: the CPU suite (CUDA-only tests skip with a reason), then the Triton kernel tests on CPU under
# the interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so it is a separate run).
set -uo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
status=0
$VPY -m pytest -q -m "not triton" python_tests "$@" || status=$?
TRITON_INTERPRET=1 $VPY -m pytest -q -m triton python_tests "$@"
triton_status=$?
if [ $status -eq 5 ] && [ $triton_status -eq 5 ]; then
  echo "test.sh: no tests collected in either session" >&2
  exit 5
fi
[ $status -eq 5 ] && status=0   # "no tests collected" in one session (e.g. a -k that selects only Triton tests)
[ $triton_status -eq 5 ] && triton_status=0
[ $status -ne 0 ] && exit $status
exit $triton_status
