#!/bin/bash
# run-vm-tests.sh - run the tests marked `vm` inside the stock-kernel VM:
#   tests/vm/run-vm-tests.sh [PYTEST ARGS...]
# = python -m pytest -m vm tests/ -v -p no:cacheprovider [ARGS...] in the guest,
# from the repo root, with the project's venv; CI (and PYTHONPATH,
# PYTEST_ADDOPTS) pass through.  Exits with pytest's status; 124 = VM timeout,
# 125 = the VM failed.  Run `tests/vm/run-in-vm.sh setup` first (else it runs
# implicitly).  Results: stdout; for files, e.g. --junitxml=DIR/vm.xml, add DIR
# to TRACER_VM_RW (the guest's other writes are discarded).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
tests/vm/run-in-vm.sh -- .venv/bin/python -m pytest -m vm tests/ -v -p no:cacheprovider "$@"
rc=$?
case $rc in
  0) ;;
  5) echo "run-vm-tests: NO TESTS RAN (pytest exit 5): none marked vm, or all deselected" >&2 ;;
  124) echo "run-vm-tests: VM TIMED OUT (${TRACER_VM_TIMEOUT:-900} s)" >&2 ;;
  125) echo "run-vm-tests: VM FAILED (no exit status from the guest)" >&2 ;;
  *) echo "run-vm-tests: pytest exited $rc" >&2 ;;
esac
exit $rc
