"""The C library, loaded once for the whole process.

Python's own wrappers cannot do everything the tracer needs: setns(2) for
one thread, getsockopt(2) with an input buffer (iptables' table name),
vsnprintf for libbpf's va_list messages. One handle serves them all;
`use_errno` makes `ctypes.get_errno()` report the errno of the last call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import threading
import time

_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The process's C library (glibc's soname when find_library finds nothing)."""
    global _libc
    with _lock:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return _libc


#: membarrier(2) system call numbers (asm/unistd.h) and MEMBARRIER_CMD_GLOBAL.
_SYS_MEMBARRIER = {"x86_64": 324, "aarch64": 283, "ppc64le": 365, "s390x": 356, "riscv64": 283}
_MEMBARRIER_CMD_GLOBAL = 1
#: What `wait_for_rcu_readers` sleeps when membarrier cannot be used: far above
#: the few microseconds a BPF tracing program runs.
RCU_FALLBACK_SECONDS = 0.05


def wait_for_rcu_readers() -> bool:
    """Returns once every RCU read-side section running at the call has ended.

    membarrier(MEMBARRIER_CMD_GLOBAL) is synchronize_rcu() in the kernel
    (kernel/sched/membarrier.c), and BPF tracing programs run under
    rcu_read_lock(): afterwards no program run that read a map value before
    the call is still going. With nohz_full CPUs the command is refused; a
    sleep far longer than any program run stands in (returns False then).
    """
    nr = _SYS_MEMBARRIER.get(os.uname().machine)
    if nr is not None and libc().syscall(nr, _MEMBARRIER_CMD_GLOBAL, 0, 0) == 0:
        return True
    time.sleep(RCU_FALLBACK_SECONDS)
    return False
