"""Network namespaces: finding them, naming them, and working inside them.

Netfilter state (rulesets, traces, conntrack) is per network namespace, so
every collector has to open its sockets inside the namespace it watches.
A socket stays bound to the namespace it was created in, which is why
`entered()` only needs to hold the thread there while sockets are created.
"""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from tracer.libc import libc

NETNS_RUN_DIR = "/var/run/netns"
ROOT_NETNS_PATH = "/proc/1/ns/net"
# Kernel threads always live in the initial namespace; kthreadd is PID 2.
# Needed where PID 1 is not dumpable and its ns links refuse even root
# (seen with a firecracker init as PID 1).
_ROOT_FALLBACK_PATH = "/proc/2/ns/net"
_THREAD_NETNS = "/proc/thread-self/ns/net"
CLONE_NEWNET = 0x40000000


class NetnsGone(OSError):
    """The namespace disappeared (its last process exited or it was deleted)."""


@dataclass(frozen=True)
class Netns:
    """A network namespace and a path that opens it."""

    inode: int
    path: str
    name: str | None

    @property
    def label(self) -> str:
        """What logs call the namespace: its `ip netns` name, else its inode."""
        return self.name if self.name is not None else f"netns:[{self.inode}]"


def _setns(fd: int) -> None:
    """setns(2) for the calling thread only (glibc's wrapper is per thread)."""
    if libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns failed: {os.strerror(err)}")


def inode_of(path: str) -> int:
    """Inode of a namespace file; raises NetnsGone when it no longer exists."""
    try:
        return os.stat(path).st_ino
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NetnsGone(errno.ENOENT, f"network namespace {path} is gone") from exc


def current_inode() -> int:
    """Inode of the namespace the calling thread is in."""
    return os.stat(_THREAD_NETNS).st_ino


def root_path() -> str:
    """A path that opens the initial namespace: PID 1's, else kthreadd's."""
    for path in (ROOT_NETNS_PATH, _ROOT_FALLBACK_PATH):
        try:
            os.stat(path)
        except PermissionError:
            continue
        return path
    raise PermissionError(errno.EACCES, "cannot open the initial network namespace through PID 1 or 2")


def root() -> Netns:
    """The initial namespace: the one PID 1 lives in."""
    path = root_path()
    inode = inode_of(path)
    return Netns(inode=inode, path=path, name=_named().get(inode, (None, None))[0])


def _named() -> dict[int, tuple[str, str]]:
    """inode -> (name, path) for namespaces bind-mounted by `ip netns`."""
    found: dict[int, tuple[str, str]] = {}
    try:
        names = sorted(os.listdir(NETNS_RUN_DIR))
    except (FileNotFoundError, NotADirectoryError):
        return found
    for name in names:
        path = os.path.join(NETNS_RUN_DIR, name)
        try:
            st = os.stat(path)
        except OSError:
            continue  # deleted while we listed
        # An unmounted placeholder file lives on the tmpfs, not on nsfs.
        if st.st_dev == _nsfs_dev():
            found.setdefault(st.st_ino, (name, path))
    return found


def _nsfs_dev() -> int:
    return os.stat(_THREAD_NETNS).st_dev


def _held_by_processes() -> dict[int, str]:
    """inode -> /proc/PID/ns/net of the lowest PID in each namespace."""
    found: dict[int, str] = {}
    pids = sorted(int(p) for p in os.listdir("/proc") if p.isdigit())
    for pid in pids:
        path = f"/proc/{pid}/ns/net"
        try:
            inode = os.stat(path).st_ino
        except OSError:
            continue  # the process exited, or is a kernel thread we may not inspect
        found.setdefault(inode, path)
    return found


def discover() -> dict[int, Netns]:
    """Every namespace reachable by name or through a process, root included.

    A named path is preferred because it outlives any one process.
    """
    named = _named()
    result: dict[int, Netns] = {
        inode: Netns(inode=inode, path=path, name=name) for inode, (name, path) in named.items()
    }
    for inode, path in _held_by_processes().items():
        result.setdefault(inode, Netns(inode=inode, path=path, name=None))
    root_ns = root()
    result.setdefault(root_ns.inode, root_ns)
    return result


def name_of(inode: int) -> str | None:
    """The `ip netns` name of a namespace, None when it has none."""
    entry = _named().get(inode)
    return entry[0] if entry else None


def by_name(name: str) -> Netns:
    """A named namespace; raises NetnsGone when there is none by that name."""
    path = os.path.join(NETNS_RUN_DIR, name)
    return Netns(inode=inode_of(path), path=path, name=name)


def _open_checked(ns: Netns) -> int:
    """Opens ns.path and checks it is still the namespace we were given.

    A /proc/PID path can be reused by another process in another namespace;
    comparing inodes catches that.
    """
    try:
        fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise NetnsGone(errno.ENOENT, f"network namespace {ns.label} ({ns.path}) is gone") from exc
    if os.fstat(fd).st_ino != ns.inode:
        os.close(fd)
        raise NetnsGone(errno.ESTALE, f"network namespace {ns.label}: {ns.path} now opens another namespace")
    return fd


def exists(ns: Netns) -> bool:
    """Whether ns.path still opens this very namespace."""
    try:
        os.close(_open_checked(ns))
    except OSError:
        return False
    return True


@contextmanager
def entered(ns: Netns) -> Iterator[Netns]:
    """Runs the body with the calling thread inside `ns`.

    Only this thread moves, so other threads keep working in their own
    namespaces; sockets created in the body stay bound to `ns` after exit.
    """
    target = _open_checked(ns)
    saved = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _setns(target)
        finally:
            os.close(target)
        yield ns
    finally:
        try:
            _setns(saved)
        finally:
            os.close(saved)


def run_in(ns: Netns, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
    """Runs a command inside `ns` through nsenter (other namespaces unchanged).

    Keyword arguments go to subprocess.run; output is captured as text unless
    the caller says otherwise.
    """
    if not exists(ns):
        raise NetnsGone(errno.ENOENT, f"network namespace {ns.label} ({ns.path}) is gone")
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("check", False)
    return subprocess.run(["nsenter", f"--net={ns.path}", "--", *argv], **kw)  # noqa: PLW1510 (check is in kw)
