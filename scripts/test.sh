#!/usr/bin/env bash
# Runs the test suite: the CPU suite (CUDA-only tests skip with a reason), then the Triton kernel tests on CPU under
# the interpreter (TRITON_INTERPRET=1 must be set before triton is imported, so it is a separate run).
set -uo pipefail
cd "$(dirname "$0")/.."
VPY=.venv/bin/python
# A file, folder or node id among the arguments selects the tests; otherwise the whole of python_tests runs.
# (The value of an option such as -k python_tests is not a selection.)
where=python_tests
previous=
for arg in "$@"; do
  case "$previous" in
    -k|-m|-p|-o|-c|-W|--deselect|--ignore|--rootdir|--confcutdir|--basetemp) ;;
    *) if [[ "$arg" != -* ]] && [ -e "${arg%%::*}" ]; then where=; fi ;;
  esac
  previous=$arg
done
status=0
$VPY -m pytest -q -m "not triton" $where "$@" || status=$?
TRITON_INTERPRET=1 $VPY -m pytest -q -m triton $where "$@"
triton_status=$?
if [ $status -eq 5 ] && [ $triton_status -eq 5 ]; then
  echo "test.sh: no tests collected in either session" >&2
  exit 5
fi
[ $status -eq 5 ] && status=0   # "no tests collected" in one session (e.g. a -k that selects only Triton tests)
[ $triton_status -eq 5 ] && triton_status=0
[ $status -ne 0 ] && exit $status
exit $triton_status
