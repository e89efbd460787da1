"""The C library, loaded once for the whole process.

Python's own wrappers cannot do everything the tracer needs: setns(2) for
one thread, getsockopt(2) with an input buffer (iptables' table name),
vsnprintf for libbpf's va_list messages. One handle serves them all;
`use_errno` makes `ctypes.get_errno()` report the errno of the last call.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

_lock = threading.Lock()
_libc: ctypes.CDLL | None = None


def libc() -> ctypes.CDLL:
    """The process's C library (glibc's soname when find_library finds nothing)."""
    global _libc
    with _lock:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return _libc
