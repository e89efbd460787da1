#!/bin/bash
# run-systemd-tests.sh - tracer.service under real systemd, in the stock-kernel VM:
#   tests/vm/run-systemd-tests.sh [PYTEST ARGS...]
# = python -m pytest tests/vm/systemd_checks.py -v in a VM whose PID 1 is
# systemd (run-systemd-vm.sh), from the repo root, with the project's venv
# and build/tracer.bpf.o. About 3-5 minutes under TCG. Exits with pytest's
# status; 124 = VM timeout, 125 = the VM failed.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
tests/vm/run-systemd-vm.sh -- .venv/bin/python -m pytest tests/vm/systemd_checks.py -v -s -p no:cacheprovider "$@"
rc=$?
case $rc in
  0) ;;
  124) echo "run-systemd-tests: VM TIMED OUT (${TRACER_VM_TIMEOUT:-600} s)" >&2 ;;
  125) echo "run-systemd-tests: VM FAILED (no exit status from the guest)" >&2 ;;
  *) echo "run-systemd-tests: pytest exited $rc" >&2 ;;
esac
exit $rc
