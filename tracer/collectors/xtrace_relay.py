"""Sharing one namespace's iptables-legacy TRACE messages between several tracers.

Why this exists: iptables-legacy hands its TRACE lines to nfnetlink_log with
the default logging parameters, so always to group 0, and the kernel lets
one netlink socket (one port id) bind a group instance in a namespace. The
second tracer watching a namespace got EPERM and no rule text. So the tracer
that binds group 0 (the holder) serves what it reads on a unix stream
socket, `<state dir>/legacy-<netns inode>.sock`, and every other tracer
watching that namespace (a subscriber) connects to it and feeds the relayed
messages into the very trace state its own socket would have fed.

What goes over the wire, holder to subscriber, each frame length-prefixed:
  HELLO    protocol version, namespace inode and cookie (first frame only)
  MESSAGE  one raw NFULNL_MSG_PACKET netlink message, exactly as read
  DRAINED  "every message logged before monotonic time T has been sent":
           the holder's receive found the netlink queue empty at T.
           CLOCK_MONOTONIC is one clock for the whole system, so a
           subscriber's `sync(since)` keeps its exact ordering guarantee.
  LOST     messages are missing here (the kernel's ENOBUFS on the holder's
           socket, or this subscriber fell behind): forget and resync.
and subscriber to holder only DRAIN ("drain now and tell me"), so a
subscriber waiting for a verdict needs no more than one round trip.

Trust and robustness: the socket directory is root's and 0700, the socket
0600, and each end checks with SO_PEERCRED that the other is root. Frames
are bounded, and any frame that is not exactly what its type allows ends
the connection: nothing a broken or malicious peer sends can crash either
end or make it buffer without limit. The holder never blocks on a
subscriber: each has a bounded queue that is written without blocking, and
one that falls behind loses messages and is told so (like ENOBUFS).

When the holder stops (or dies), its subscribers read EOF, try to bind group
0 themselves, and the first that succeeds becomes the new holder; the
others subscribe to it. Socket files of dead holders are removed by whoever
finds them refusing connections.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import itertools
import math
import os
import secrets
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracer import loop as loop_mod
from tracer import netns as netns_mod
from tracer.loop import EventLoop, Reader
from tracer.netfilter.marking import file_lock
from tracer.netns import Netns
from tracer.nlmsg import NFGEN_ATTRS, NLMSG_HEADER

RELAY_VERSION = 1
#: Frame header: payload length, frame type.
FRAME_HEADER = struct.Struct("!IB")
#: The largest payload of any frame: one netlink message read with a 64 KiB receive.
MAX_PAYLOAD = (1 << 16) + 64
F_HELLO, F_MESSAGE, F_DRAINED, F_LOST, F_DRAIN = 1, 2, 3, 4, 5
_HELLO = struct.Struct("!BQQ")  # version, netns inode, netns cookie (0: unknown)
_DRAINED = struct.Struct("!d")
_MAX_LOST_TEXT = 256
#: Bytes queued for one subscriber before it starts losing messages (~3000 TRACE messages).
SUBSCRIBER_BUFFER = 1 << 20
#: More connections than tracers anyone runs; bounds the holder's memory.
MAX_SUBSCRIBERS = 32
#: Queued bytes that wake the sender before the reader's next drain does.
_EARLY_WAKE_BYTES = 64 << 10
_SO_NETNS_COOKIE = 71
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
RELAY_LOCK = "relay.lock"
SOCKET_GLOB = "legacy-*.sock"
_TMP_PREFIX = ".legacy-"


class RelayError(OSError):
    """A relay peer misbehaved, or the relay socket cannot be trusted."""


# --- small helpers ------------------------------------------------------------------------


def printable(text: str) -> str:
    """`text` with control and other non-printable characters escaped.

    For names a log line shows that another process chose (a comm, a chain):
    they must not be able to move the cursor or fake a line.
    """
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)


def netns_cookie(sock: socket.socket) -> int:
    """The namespace's cookie (unique per boot, unlike an inode), 0 where the kernel has none."""
    try:
        return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, _SO_NETNS_COOKIE, 8))[0]
    except OSError:
        return 0


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a unix socket."""
    return _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))


def relay_path(state_dir: Path, netns_inode: int) -> Path:
    return state_dir / f"legacy-{netns_inode}.sock"


def check_state_dir(state_dir: Path) -> None:
    """Creates the directory (0700) and checks nobody but root can put a socket in it.

    A subscriber trusts what the socket says about the namespace's traffic,
    so the directory must not be a symlink and must be root's alone.
    """
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    st = os.lstat(state_dir)
    if not stat.S_ISDIR(st.st_mode):
        raise RelayError(errno.ENOTDIR, f"{state_dir} is not a directory")
    if st.st_uid != 0 or st.st_mode & 0o077:
        raise RelayError(
            errno.EPERM, f"{state_dir} must be root's with mode 0700 (uid {st.st_uid}, mode {st.st_mode & 0o777:o})"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.settimeout(timeout)
        sock.connect(str(path))
    except BaseException:
        sock.close()
        raise
    return sock


def cleanup_stale_sockets(state_dir: Path, log: Any) -> int:
    """Removes socket files no process listens on any more (a holder that was killed).

    Under the relay lock, which holders also take to put their socket in
    place, so a refused connection means the file is really dead. Returns
    how many files were removed.
    """
    try:
        check_state_dir(state_dir)
    except OSError:
        return 0
    with file_lock(state_dir / RELAY_LOCK):
        paths = sorted(state_dir.glob(SOCKET_GLOB)) + sorted(state_dir.glob(f"{_TMP_PREFIX}*.tmp"))
        return sum(_remove_if_stale(path, log) for path in paths)


def remove_if_stale(state_dir: Path, path: Path, log: Any) -> bool:
    """Removes one socket file if nobody listens on it (cleanup_stale_sockets for one path)."""
    with contextlib.suppress(OSError), file_lock(state_dir / RELAY_LOCK):
        return _remove_if_stale(path, log)
    return False


def _remove_if_stale(path: Path, log: Any) -> bool:
    """With the relay lock held: a socket nobody accepts on, or a dead holder's half-made one."""
    if path.name.startswith(_TMP_PREFIX):
        parts = path.name.split(".")
        pid = int(parts[2]) if len(parts) > 2 and parts[2].isdigit() else 0
        if pid and _pid_alive(pid):
            return False
    else:
        try:
            _connect(path, 0.5).close()
            return False  # a live holder
        except ConnectionRefusedError:
            pass
        except OSError:
            return False  # busy, vanished or odd: not ours to judge
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    log.info("legacy.relay_stale_socket_removed", path=str(path))
    return True


# --- framing --------------------------------------------------------------------------------


def frame(kind: int, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"relay frame of {len(payload)} bytes")
    return FRAME_HEADER.pack(len(payload), kind) + payload


class FrameReader:
    """Cuts a byte stream into frames; holds at most one partial frame.

    Raises RelayError for a frame type the reading side does not accept
    or a length beyond what that type can have: the caller then ends the
    connection.
    """

    def __init__(self, allowed: dict[int, int]) -> None:
        self._allowed = allowed  # frame type -> largest payload
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        frames: list[tuple[int, bytes]] = []
        off = 0
        while len(self._buf) - off >= FRAME_HEADER.size:
            length, kind = FRAME_HEADER.unpack_from(self._buf, off)
            limit = self._allowed.get(kind)
            if limit is None:
                raise RelayError(errno.EPROTO, f"unexpected relay frame type {kind}")
            if length > limit:
                raise RelayError(errno.EPROTO, f"relay frame type {kind} of {length} bytes (at most {limit})")
            end = off + FRAME_HEADER.size + length
            if end > len(self._buf):
                break
            frames.append((kind, bytes(self._buf[off + FRAME_HEADER.size : end])))
            off = end
        del self._buf[:off]
        return frames


def check_packet_message(payload: bytes) -> int:
    """The netlink type of a relayed message; RelayError unless it is exactly one whole message."""
    if len(payload) < NFGEN_ATTRS:
        raise RelayError(errno.EPROTO, f"relayed netlink message of {len(payload)} bytes")
    length, mtype = NLMSG_HEADER.unpack_from(payload, 0)[:2]
    if length != len(payload):
        raise RelayError(errno.EPROTO, f"relayed netlink message says {length} bytes, carries {len(payload)}")
    return mtype


# --- who holds a group ------------------------------------------------------------------------------


@dataclass(frozen=True)
class GroupHolder:
    """The socket bound to an nfnetlink_log group, and the process that has it open."""

    group: int
    portid: int
    pid: int | None
    comm: str | None

    def describe(self, netns_label: str) -> str:
        who = f"pid {self.pid} ({printable(self.comm or '?')})" if self.pid is not None else "an unknown process"
        where = f"nfnetlink_log group {self.group} in netns {printable(netns_label)}"
        return f"{where} is held by {who}, port id {self.portid}"


def _group_portid(text: str, group: int) -> int | None:
    """Port id bound to `group` in /proc/net/netfilter/nfnetlink_log (group, portid, ...)."""
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0].isdigit() and words[1].isdigit() and int(words[0]) == group:
            return int(words[1])
    return None


def _socket_inode(text: str, protocol: int, portid: int) -> int | None:
    """Inode of the netlink socket with this port id in /proc/net/netlink."""
    for line in text.splitlines()[1:]:
        words = line.split()
        if len(words) >= 10 and words[1] == str(protocol) and words[2] == str(portid) and words[9].isdigit():
            return int(words[9])
    return None


def _process_with_socket(inode: int) -> tuple[int, str] | None:
    """(pid, comm) of a process that has socket `inode` open."""
    target = f"socket:[{inode}]"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.scandir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        with fds:
            for fd in fds:
                try:
                    if os.readlink(fd.path) != target:
                        continue
                except OSError:
                    continue
                try:
                    with open(f"/proc/{entry.name}/comm", "rb") as fh:
                        comm = fh.read().rstrip(b"\n").decode(errors="replace")
                except OSError:
                    comm = "?"
                return int(entry.name), comm
    return None


def group_holder(ns: Netns, group: int, protocol: int = 12) -> GroupHolder | None:
    """Who has nfnetlink_log `group` bound in the namespace, None when nobody does.

    The kernel lists group instances with their port id, netlink sockets
    with port id and inode (both files as seen from inside the namespace),
    and /proc/*/fd maps that inode to a process.
    """
    with netns_mod.entered(ns):
        try:
            with open("/proc/thread-self/net/netfilter/nfnetlink_log") as fh:
                groups = fh.read()
            with open("/proc/thread-self/net/netlink") as fh:
                sockets = fh.read()
        except FileNotFoundError:
            return None
    portid = _group_portid(groups, group)
    if portid is None:
        return None
    inode = _socket_inode(sockets, protocol, portid)
    found = _process_with_socket(inode) if inode else None
    return GroupHolder(group, portid, found[0] if found else None, found[1] if found else None)


# --- the holder's side ---------------------------------------------------------------------


@dataclass(eq=False)
class _Subscriber:
    sock: socket.socket
    pid: int
    frames: collections.deque[bytes] = field(default_factory=collections.deque)
    queued: int = 0  # bytes in `frames`
    sent: int = 0  # bytes of frames[0] already written
    last_is_marker: bool = False
    overflowed: bool = False
    dropped: int = 0  # messages dropped since the overflow began
    reader: FrameReader = field(default_factory=lambda: FrameReader({F_DRAIN: 0}))
    handle: Reader | None = None  # its connection on the event loop
    writing: bool = False  # the loop calls us back when the connection takes more


class RelayServer:
    """The holder's socket: forwards what its group-0 reader reads to every subscriber.

    Served by an event loop (tracer.loop; the process-wide one unless
    `loop` is given): the listener and every subscriber's connection are
    descriptors of that loop, which accepts, answers DRAIN requests by
    calling `wake_source` (which makes the reader drain and so send a fresh
    DRAINED marker) and writes the queues out without blocking, waiting
    for a full connection to take more. `message`, `drained` and `lost`
    may be called from any thread (the group-0 reader calls them on the
    loop thread) and never block.
    """

    def __init__(
        self,
        *,
        state_dir: Path,
        netns_inode: int,
        cookie: int,
        wake_source: Callable[[], None],
        log: Any,
        loop: EventLoop | None = None,
    ) -> None:
        self.path = relay_path(state_dir, netns_inode)
        self.state_dir = state_dir
        self.netns_inode = netns_inode
        self.cookie = cookie
        self.log = log
        self._wake_source = wake_source
        self._loop = loop or loop_mod.shared()
        self._lock = threading.Lock()  # _subs and their queues
        self._subs: list[_Subscriber] = []
        self._listener: socket.socket | None = None
        self._listening: Reader | None = None
        self._ident: tuple[int, int] | None = None
        self._flush_pending = False  # a flush is queued on the loop
        self._stopping = threading.Event()
        self._name = f"legacy-trace-relay-{netns_inode}"

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Puts the listening socket in place (replacing a dead holder's) and starts serving."""
        check_state_dir(self.state_dir)
        tmp = self.state_dir / f"{_TMP_PREFIX}{self.netns_inode}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        try:
            listener.bind(str(tmp))
            os.chmod(tmp, 0o600)
            listener.listen(MAX_SUBSCRIBERS)
            with file_lock(self.state_dir / RELAY_LOCK):
                # We hold group 0, so whatever socket file is there belongs to no live holder.
                os.replace(tmp, self.path)
                st = os.lstat(self.path)
            self._ident = (st.st_dev, st.st_ino)
            self._listening = self._loop.add_reader(listener.fileno(), self._guarded(self._on_accept), name=self._name)
        except BaseException:
            listener.close()
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._listener = listener
        self.log.info("legacy.relay_serving", path=str(self.path))

    def close(self) -> None:
        """Removes the socket file (if still ours) and closes every connection: subscribers see EOF."""
        self._stopping.set()
        if self._ident is not None:
            with contextlib.suppress(OSError), file_lock(self.state_dir / RELAY_LOCK):
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self._ident:
                    self.path.unlink()
            self._ident = None
        try:
            self._loop.run_sync(self._close_connections, 5.0, name=f"{self._name}.close")
        except TimeoutError:
            self.log.warning("legacy.relay_did_not_stop")
            self._close_connections()

    def _close_connections(self) -> None:
        if self._listening is not None:
            self._listening.close()
            self._listening = None
        with self._lock:
            subs, self._subs = self._subs, []
        for sub in subs:
            if sub.handle is not None:
                sub.handle.close()
            sub.sock.close()
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._subs)

    # --- called by the group-0 reader ------------------------------------------------------

    def message(self, msg: bytes) -> None:
        if not self._subs:  # the usual case: one tracer; no copy then (a racy read is harmless)
            return
        data = frame(F_MESSAGE, msg)
        with self._lock:
            wake = False
            for sub in self._subs:
                wake |= self._append(sub, data, marker=False)
        if wake:
            self._flush_soon()

    def drained(self, started: float) -> None:
        if not self._subs:
            return
        data = frame(F_DRAINED, _DRAINED.pack(started))
        with self._lock:
            for sub in self._subs:
                self._append(sub, data, marker=True)
            busy = bool(self._subs)
        if busy:
            self._flush_soon()

    def lost(self, reason: str) -> None:
        if not self._subs:
            return
        data = frame(F_LOST, reason.encode(errors="replace")[:_MAX_LOST_TEXT])
        with self._lock:
            for sub in self._subs:
                self._append(sub, data, marker=False)
            busy = bool(self._subs)
        if busy:
            self._flush_soon()

    def _append(self, sub: _Subscriber, data: bytes, *, marker: bool) -> bool:
        """Queues one frame (lock held); True when the queue should be written out now.

        A marker replaces an unsent marker right before it: the newer one
        says all the older one did. A subscriber whose queue is full loses
        frames until it has caught up half way, then hears LOST.
        """
        if sub.overflowed:
            if sub.queued > SUBSCRIBER_BUFFER // 2:
                sub.dropped += not marker
                return False
            lost = frame(F_LOST, f"relay queue full: {sub.dropped} messages dropped".encode())
            sub.frames.append(lost)
            sub.queued += len(lost)
            sub.overflowed, sub.dropped, sub.last_is_marker = False, 0, False
        if marker and sub.last_is_marker and (len(sub.frames) > 1 or sub.sent == 0):
            sub.frames[-1] = data  # same length: `queued` holds
            return False
        if sub.queued + len(data) > SUBSCRIBER_BUFFER:
            sub.overflowed, sub.dropped = True, int(not marker)
            return True
        sub.frames.append(data)
        sub.queued += len(data)
        sub.last_is_marker = marker
        return sub.queued >= _EARLY_WAKE_BYTES

    def _flush_soon(self) -> None:
        """Writes the queues out: at once on the loop thread, else queued there (once)."""
        if self._loop.in_loop():
            self._flush_all()
        elif not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._guarded(self._queued_flush), name=f"{self._name}.flush")

    def _queued_flush(self) -> None:
        self._flush_pending = False  # first: what is queued from now on asks again
        self._flush_all()

    # --- on the loop thread ----------------------------------------------------------------------

    def _guarded(self, call: Callable[[], None]) -> Callable[[], None]:
        """`call` such that a bug in it lets the subscribers go instead of leaving them waiting
        for markers that cannot come; the relay never takes the tracer down."""

        def run() -> None:
            try:
                call()
            except Exception as exc:
                self.log.warning("legacy.relay_failed", error=repr(exc), consequence="subscribers are let go")
                with self._lock:
                    subs, self._subs = self._subs, []
                for sub in subs:
                    if sub.handle is not None:
                        sub.handle.close()
                    sub.sock.close()  # they see EOF

        return run

    def _flush_all(self) -> None:
        if self._stopping.is_set():
            return
        with self._lock:
            for sub in list(self._subs):
                if sub.frames:
                    self._flush(sub)

    def _on_accept(self) -> None:
        listener = self._listener
        if listener is None or self._stopping.is_set():
            return
        if self._accept(listener):
            self._flush_all()
            self._wake_source()  # a new subscriber wants its first DRAINED marker soon

    def _on_readable(self, sub: _Subscriber) -> None:
        ok, asked = self._read_requests(sub)
        if ok and asked:
            self._wake_source()

    def _on_writable(self, sub: _Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._flush(sub)

    def _accept(self, listener: socket.socket) -> bool:
        try:
            conn, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self.log.debug("legacy.relay_accept_failed", error=str(exc))
            return False
        try:
            pid, uid, _ = peer_credentials(conn)
        except OSError:
            conn.close()
            return False
        if uid != 0:
            self.log.warning("legacy.relay_peer_refused", pid=pid, uid=uid, reason="not root")
            conn.close()
            return False
        conn.setblocking(False)
        sub = _Subscriber(conn, pid)
        hello = frame(F_HELLO, _HELLO.pack(RELAY_VERSION, self.netns_inode, self.cookie))
        with self._lock:
            if len(self._subs) >= MAX_SUBSCRIBERS:
                self.log.warning("legacy.relay_peer_refused", pid=pid, reason=f"{MAX_SUBSCRIBERS} subscribers already")
                conn.close()
                return False
            sub.handle = self._loop.add_reader(
                conn.fileno(), self._guarded(functools.partial(self._on_readable, sub)), name=f"{self._name}.sub"
            )
            sub.frames.append(hello)
            sub.queued = len(hello)
            self._subs.append(sub)
        self.log.debug("legacy.relay_subscriber", pid=pid)  # the subscriber logs it at info
        return True

    def _read_requests(self, sub: _Subscriber) -> tuple[bool, bool]:
        """(connection still up, a drain was asked for)."""
        try:
            data = sub.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return True, False
        except OSError as exc:
            self._drop(sub, str(exc))
            return False, False
        if not data:
            self._drop(sub, "closed")
            return False, False
        try:
            frames = sub.reader.feed(data)
        except RelayError as exc:
            self._drop(sub, str(exc), warn=True)
            return False, False
        return True, bool(frames)

    def _flush(self, sub: _Subscriber) -> None:
        """Writes what the socket takes now (lock held); never waits. What is left is
        written when the loop finds the connection writable again."""
        while sub.frames:
            batch: list[bytes | memoryview] = [memoryview(sub.frames[0])[sub.sent :]]
            batch += itertools.islice(sub.frames, 1, 64)
            try:
                n = sub.sock.sendmsg(batch, [], socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._drop_locked(sub, str(exc))
                return
            n += sub.sent
            sub.sent = 0
            while sub.frames and n >= len(sub.frames[0]):
                done = sub.frames.popleft()
                n -= len(done)
                sub.queued -= len(done)
            sub.sent = n
            if not sub.frames:
                sub.last_is_marker = False
        want = bool(sub.frames)
        if want != sub.writing and sub.handle is not None:
            sub.writing = want
            sub.handle.set_on_write(self._guarded(functools.partial(self._on_writable, sub)) if want else None)

    def _drop(self, sub: _Subscriber, reason: str, *, warn: bool = False) -> None:
        with self._lock:
            self._drop_locked(sub, reason, warn=warn)

    def _drop_locked(self, sub: _Subscriber, reason: str, *, warn: bool = False) -> None:
        """On the loop thread only: closing the subscriber's handle there never waits."""
        if sub in self._subs:
            self._subs.remove(sub)
        if sub.handle is not None:
            sub.handle.close()
        sub.sock.close()
        (self.log.warning if warn else self.log.debug)("legacy.relay_subscriber_gone", pid=sub.pid, reason=reason)


# --- the subscriber's side -----------------------------------------------------------------------


class RelayClient:
    """A connection to the holder of a namespace's group 0, read on an event loop (tracer.loop;
    the process-wide one unless `loop` is given).

    Frames are handed to the callbacks as a netlink reader would hand its
    own messages: `on_message(type, message)`, `on_drained(t)`,
    `on_lost(reason)`; `on_closed(reason)` once when the holder goes away
    or breaks the protocol (not after `close()`). Callbacks run on the loop
    thread and must not block.
    """

    #: Receives in one turn before other descriptors of the loop get theirs.
    BATCH = 16

    def __init__(
        self,
        path: Path,
        *,
        netns_inode: int,
        cookie: int,
        on_message: Callable[[int, bytes], None],
        on_drained: Callable[[float], None],
        on_lost: Callable[[str], None],
        on_closed: Callable[[str], None],
        log: Any,
        loop: EventLoop | None = None,
    ) -> None:
        self.path = path
        self.netns_inode = netns_inode
        self.cookie = cookie
        self.log = log
        self.holder_pid: int | None = None
        self._on_message = on_message
        self._on_drained = on_drained
        self._on_lost = on_lost
        self._on_closed = on_closed
        self._sock: socket.socket | None = None
        self._reader = FrameReader(
            {F_HELLO: _HELLO.size, F_MESSAGE: MAX_PAYLOAD, F_DRAINED: _DRAINED.size, F_LOST: _MAX_LOST_TEXT}
        )
        self._last_marker = 0.0
        self._stopping = threading.Event()
        self._loop = loop or loop_mod.shared()
        self._handle: Reader | None = None
        self._done = False  # the connection ended (loop thread)

    def connect(self, timeout: float = 0.5) -> int:
        """Connects, checks who answers, reads its HELLO and starts reading; returns the holder's pid.

        Raises FileNotFoundError / ConnectionRefusedError when nobody serves
        the namespace, RelayError when the socket or its holder is not to be trusted.
        """
        st = os.lstat(self.path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            raise RelayError(errno.EPERM, f"{self.path} is not a root-only socket")
        sock = _connect(self.path, timeout)
        try:
            pid, uid, _ = peer_credentials(sock)
            if uid != 0:
                raise RelayError(errno.EPERM, f"{self.path} is served by uid {uid}, not root")
            hello = self._read_hello(sock, time.monotonic() + timeout)
            version, inode, cookie = _HELLO.unpack(hello)
            if version != RELAY_VERSION:
                raise RelayError(errno.EPROTO, f"relay protocol {version}, we speak {RELAY_VERSION}")
            if inode != self.netns_inode or (cookie and self.cookie and cookie != self.cookie):
                raise RelayError(errno.ESTALE, f"{self.path} serves another namespace")
            sock.setblocking(False)
            self._sock = sock
            self.holder_pid = pid
            self._handle = self._loop.add_reader(
                sock.fileno(), self._readable, name=f"legacy-trace-sub-{self.netns_inode}"
            )
        except BaseException:
            self._sock = None
            sock.close()
            raise
        return pid

    def _read_hello(self, sock: socket.socket, deadline: float) -> bytes:
        """Reads exactly the HELLO frame; what follows is the loop's to read."""
        want = FRAME_HEADER.size + _HELLO.size
        data = b""
        while len(data) < want:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RelayError(errno.ETIMEDOUT, "relay holder did not say hello")
            sock.settimeout(left)
            chunk = sock.recv(want - len(data))
            if not chunk:
                raise ConnectionResetError(errno.ECONNRESET, "relay holder closed the connection")
            data += chunk
        length, kind = FRAME_HEADER.unpack_from(data)
        if kind != F_HELLO or length != _HELLO.size:
            raise RelayError(errno.EPROTO, "relay did not start with HELLO")
        return data[FRAME_HEADER.size :]

    def wake(self) -> None:
        """Asks the holder to drain now (it answers with a DRAINED marker)."""
        sock = self._sock
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.send(frame(F_DRAIN), socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)

    def close(self) -> None:
        """Stops reading and closes the connection; safe to call twice, from any thread.

        When it returns, no callback of this client runs any more.
        """
        self._stopping.set()
        handle = self._handle
        if handle is not None and not handle.close(5.0):
            self.log.warning("legacy.relay_client_did_not_stop")
        if self._sock is not None:
            self._sock.close()

    # --- on the loop thread -------------------------------------------------------------------

    def _readable(self) -> None:
        sock = self._sock
        if sock is None or self._done or self._stopping.is_set():
            return
        for _ in range(self.BATCH):
            try:
                data = sock.recv(1 << 17)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._finish(str(exc))
                return
            if not data:
                self._finish("holder closed the connection")
                return
            try:
                self._dispatch(self._reader.feed(data))
            except RelayError as exc:
                self.log.warning("legacy.relay_protocol_error", holder_pid=self.holder_pid, error=str(exc))
                self._finish(f"protocol error: {exc.strerror or exc}")
                return
            except Exception as exc:  # a callback failed: the state may be off, so start again
                self.log.warning("legacy.relay_client_failed", error=repr(exc))
                self._finish(f"failed: {exc!r}")
                return
            if self._stopping.is_set():
                return

    def _finish(self, reason: str) -> None:
        """The connection is over: stop reading it and tell the owner (unless it closed us)."""
        self._done = True
        if self._handle is not None:
            self._handle.close()
        if not self._stopping.is_set():
            self._on_closed(reason)

    def _dispatch(self, frames: list[tuple[int, bytes]]) -> None:
        for kind, payload in frames:
            if self._stopping.is_set():
                return
            if kind == F_MESSAGE:
                self._on_message(check_packet_message(payload), payload)
            elif kind == F_DRAINED:
                self._on_drained(self._marker(payload))
            elif kind == F_LOST:
                self._on_lost(payload.decode(errors="replace"))
            else:
                raise RelayError(errno.EPROTO, f"unexpected relay frame type {kind}")

    def _marker(self, payload: bytes) -> float:
        """The time of a DRAINED marker: finite, not going back, not in the future."""
        if len(payload) != _DRAINED.size:
            raise RelayError(errno.EPROTO, "DRAINED marker of the wrong size")
        (t,) = _DRAINED.unpack(payload)
        if not math.isfinite(t) or t < self._last_marker or t > time.monotonic() + 0.01:
            raise RelayError(errno.EPROTO, f"DRAINED marker at impossible time {t!r}")
        self._last_marker = t
        return t
