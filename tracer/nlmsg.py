"""Netlink messages read by hand, and the reader that drains a netlink socket on the event loop.

Why by hand: both trace readers (nftables' NFT_MSG_TRACE, iptables-legacy's
nfnetlink_log packets) get several messages for each traced packet, so
thousands a second. Through a pyroute2 socket, the nftables traces of one
packet cost ~1 ms of CPU: the difference between keeping up and falling
behind. Read by hand, ~5 us a message. pyroute2 stays the definition of
every message (its `nla_map` classes name and number the attributes) and is
used where speed does not matter; tests check that the hand-written decoders
agree with it.

Why plain sockets: a pyroute2 socket reads the kernel's datagrams in an
event loop of the thread that uses it and keeps the decoded messages in its
own queue, so `poll()` on its descriptor can report nothing while messages
wait, and every message pays for the generic decoder. A plain AF_NETLINK
socket buffers nothing in user space: epoll on it (tracer.loop) is exact,
and one loop thread serves the sockets of every namespace.

Why the sender is checked: a netlink socket that the tracer opens inside a
namespace can be written to by anyone holding CAP_NET_ADMIN over that
namespace, and the owner of a user namespace holds it. Such a user can
unicast to the tracer's port id (listed in its own /proc/net/netlink) or
send to the multicast groups the tracer listens on, and forge traces that
name any rule. Only the kernel sends from port id 0, so `NetlinkReader`
reads each datagram with its sender and drops every one the kernel did not
send.

What bad bytes do: the framing functions here (`split_messages`,
`attributes`, `nfgen_family`) never raise, whatever the bytes: a
truncated message or attribute ends the run, and what came before it is
still handed out. Decoders built on them raise `DecodeError` when a
well-framed attribute cannot hold what its type says (a 2-byte be32).
`NetlinkReader` survives any exception a message handler raises.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import math
import os
import resource
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from tracer import loop as loop_mod
from tracer import netns as netns_mod
from tracer.loop import EventLoop, Reader, Timer
from tracer.netns import Netns

NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
#: struct nlmsghdr: length, type, flags, sequence number, port id.
NLMSG_HEADER = struct.Struct("=IHHII")
#: Where the attributes of an nfnetlink message start: after struct nfgenmsg
#: (family, version, res_id) that follows the netlink header.
NFGEN_ATTRS = NLMSG_HEADER.size + 4

_NLA_HEADER = struct.Struct("=HH")
_NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER

#: Room for bursts beyond net.core.rmem_max (root may force it).
RCVBUF_BYTES = 16 << 20
SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)

#: The port id of the kernel: the sender of every message we want to read.
KERNEL_PORT_ID = 0

#: A drain wanted within this many seconds is timed exactly (a verdict waits for it);
#: later ones are periodic and go on the _DRAIN_GRID.
_EXACT_WAIT = 0.1
_DRAIN_GRID = 0.05

#: glibc's select() limit: no descriptor libnftables uses may be this high (above_select_limit).
FD_SETSIZE = 1024
#: Descriptors the limit must allow beyond FD_SETSIZE before we put ours up there.
_FD_HEADROOM = 64


class DecodeError(ValueError):
    """A netlink message is well framed but an attribute cannot hold what its type says.

    The kernel never sends such a message: it means garbage or a forgery,
    so the whole message is refused rather than decoded in part.
    """


def fixed_size(buf: bytes, start: int, end: int, size: int) -> None:
    """Raises DecodeError unless the attribute payload `buf[start:end]` holds `size` bytes."""
    if end - start < size:
        raise DecodeError(f"attribute payload of {end - start} bytes where {size} are needed")


def split_messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, whole message) of each netlink message in a datagram.

    Never raises: a header that claims more bytes than the datagram holds, or
    fewer than a header, ends the run (the messages before it are yielded).
    """
    off = 0
    while off + NLMSG_HEADER.size <= len(data):
        length, mtype, _flags, seq, _pid = NLMSG_HEADER.unpack_from(data, off)
        if length < NLMSG_HEADER.size or off + length > len(data):
            return
        yield mtype, seq, data[off : off + length]
        off += (length + 3) & ~3


def attributes(buf: bytes, start: int, end: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in `buf[start:end]`.

    The type comes without the NLA_F_NESTED / NLA_F_NET_BYTEORDER flags.
    Offsets rather than slices, so that fixed-size values are unpacked in
    place; a nested attribute's payload is a run of attributes itself:
    `attributes(buf, payload_start, payload_end)`. Never raises: a
    truncated attribute, or one shorter than its own header, ends the run,
    and an `end` beyond the buffer is read as the buffer's end.
    """
    end = len(buf) if end is None else min(end, len(buf))
    off = max(start, 0)
    while off + _NLA_HEADER.size <= end:
        length, atype = _NLA_HEADER.unpack_from(buf, off)
        if length < _NLA_HEADER.size or off + length > end:
            return
        yield atype & _NLA_TYPE_MASK, off + _NLA_HEADER.size, off + length
        off += (length + 3) & ~3


def nfgen_family(msg: bytes) -> int:
    """struct nfgenmsg's family of an nfnetlink message (an NFPROTO_* number); 0 when too short."""
    return msg[NLMSG_HEADER.size] if len(msg) > NLMSG_HEADER.size else 0


def netfilter_socket(ns: Netns, groups: int = 0) -> socket.socket:
    """A NETLINK_NETFILTER socket of the namespace, bound to multicast `groups` (a bit mask),
    on a descriptor above FD_SETSIZE when the limit allows (see above_select_limit)."""
    with netns_mod.entered(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_NETFILTER)
    try:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, RCVBUF_BYTES)
        sock.bind((0, groups))
        return above_select_limit(sock)
    except BaseException:
        sock.close()
        raise


def above_select_limit(sock: socket.socket) -> socket.socket:
    """`sock` moved to a descriptor number >= FD_SETSIZE, if the process may have one.

    Why: libnftables waits for its own netlink socket with select(), and
    glibc aborts the whole process (FORTIFY_SOURCE) when that descriptor is
    1024 or more. Each watched namespace has a libnftables context open for
    good, so with hundreds of namespaces the low numbers must be kept for
    them: our own sockets, which only epoll sees, go above. Where the limit
    does not allow it (a soft RLIMIT_NOFILE of 1024), the process cannot get
    a number that high at all, and `sock` is returned as it is. The socket
    given is closed when it was moved.
    """
    fd = sock.fileno()
    if fd >= FD_SETSIZE or resource.getrlimit(resource.RLIMIT_NOFILE)[0] <= FD_SETSIZE + _FD_HEADROOM:
        return sock
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, FD_SETSIZE)
    except OSError:  # no free number up there: the low one works for us
        return sock
    try:
        moved = socket.socket(fileno=high)  # family, type and protocol read from the descriptor
    except BaseException:
        os.close(high)
        raise
    sock.close()
    return moved


class NetlinkReader:
    """Drains one netlink socket on the shared event loop (tracer.loop) until `close()`,
    which also closes the socket.

    Each message goes to `on_message(type, message)`. When the kernel
    dropped messages for lack of room (ENOBUFS), `on_lost(error)` is called
    first and reading goes on: the socket stays usable. `on_drained(t)` is
    called each time a receive started at monotonic time `t` finds the
    queue empty, so every message queued before `t` has been handed over.
    A drain runs when the socket is readable, on `wake()`, and at the
    latest `poll_timeout()` seconds after the previous one (never more
    than 1 s: owners rely on a drain at least every second).
    Messages that make `on_message` raise are skipped, and logged as
    `<event_prefix>.bad_message` at most every 5 s: a message the reader
    cannot handle usually comes in thousands. Datagrams that another
    process sent (any sender but the kernel, see the module docstring) are
    never handed over; they are counted in `foreign` and logged as
    `<event_prefix>.foreign_message` at most every 5 s.

    Every callback runs on the loop thread, one reader at a time, so none
    of them may block for long (see tracer.loop). A drain reads at most
    `BATCH` datagrams before other sockets get their turn; it goes on at
    the loop's next round, and `on_drained` comes only when the queue was
    found empty.
    """

    #: Datagrams read in one turn: a flood into one namespace must not starve the others.
    BATCH = 256

    def __init__(
        self,
        sock: socket.socket,
        *,
        name: str,
        on_message: Callable[[int, bytes], None],
        on_lost: Callable[[OSError], None],
        on_drained: Callable[[float], None],
        log: Any,
        event_prefix: str,
        poll_timeout: Callable[[], float] | None = None,
        loop: EventLoop | None = None,
    ) -> None:
        self.sock = sock
        self.name = name
        self.log = log
        self._on_message = on_message
        self._on_lost = on_lost
        self._on_drained = on_drained
        self._prefix = event_prefix
        self._poll_timeout = poll_timeout  # seconds until the owner wants a drain without data
        self._loop = loop or loop_mod.shared()
        self._stopping = threading.Event()
        self._reader: Reader | None = None
        self._timer: Timer | None = None  # the next drain without data; loop thread only
        self._wake_pending = False  # a wake's drain is queued: further wakes need not queue another
        self._closed = False  # loop thread only (or after the loop gave up, see close)
        self._broken = False
        self._bad = 0
        self._last_bad_log = 0.0
        #: Datagrams refused because a process, not the kernel, sent them (never reset).
        self.foreign = 0
        self._foreign_unlogged = 0
        self._last_foreign_log = 0.0

    def start(self) -> None:
        """Registers the socket with the loop; the first drain without data is due after
        `poll_timeout()` (at most 1 s), like every later one."""
        self._reader = self._loop.add_reader(self.sock.fileno(), self._readable, name=self.name)
        self._loop.call_soon(self._reschedule, name=f"{self.name}.arm")

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def reading(self) -> bool:
        """Started, not stopped, and its loop's thread alive: messages will be read."""
        thread = self._loop.thread
        return self._reader is not None and not self.stopping and thread is not None and thread.is_alive()

    def wake(self) -> None:
        """Makes the reader drain the socket now (from any thread)."""
        if self._wake_pending or self._stopping.is_set():
            return
        self._wake_pending = True
        self._loop.call_soon(self._woken, name=f"{self.name}.wake")

    def close(self, timeout: float = 5.0) -> None:
        """Stops reading, then closes the socket; safe to call twice, from any thread.

        The removal runs on the loop thread, between callbacks, so when this
        returns no callback of this reader is running on the socket it closes.
        """
        self._stopping.set()
        try:
            self._loop.run_sync(self._close_now, timeout, name=f"{self.name}.close")
        except TimeoutError:
            self.log.warning(f"{self._prefix}.reader_did_not_stop")
            self._close_now()  # a stuck callback may still hold the socket: as a joined-out thread did

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._reader is not None:
            self._reader.close()
        if self._timer is not None:
            self._timer.cancel()
        self.sock.close()

    # --- on the loop thread -------------------------------------------------------------

    def _readable(self) -> None:
        self._drain()
        self._reschedule()

    def _woken(self) -> None:
        self._wake_pending = False  # first: a wake from now on queues another drain
        self._drain()
        self._reschedule()

    def _timed(self) -> None:
        self._drain()
        self._reschedule()

    def _reschedule(self) -> None:
        """Keeps a drain due within `poll_timeout()` (at most 1 s) from now.

        A pending timer that comes earlier is kept: an extra drain is
        harmless, and moving the timer after every datagram would cost more.
        """
        if self._closed or self._broken or self._stopping.is_set():
            return
        wait = min(1.0, max(0.0, 1.0 if self._poll_timeout is None else self._guarded(self._poll_timeout, 1.0)))
        when = time.monotonic() + wait
        if wait > _EXACT_WAIT:
            # Nothing due soon, only the periodic drain: on a grid shared by every reader
            # (rounded down, so still within the second), one wake-up of the loop serves all
            # that are due at the same point instead of one each.
            when = math.floor(when / _DRAIN_GRID) * _DRAIN_GRID
        timer = self._timer
        if timer is None:
            self._timer = self._loop.call_at(when, self._timed, name=f"{self.name}.timer")
        elif not timer.pending or timer.when > when:
            timer.reschedule(when)

    def _drain(self) -> None:
        """Reads until the queue is empty (then on_drained) or BATCH datagrams were read."""
        if self._closed or self._broken:
            return
        for _ in range(self.BATCH):
            if self._stopping.is_set():
                return
            started = time.monotonic()
            try:
                data, sender = self.sock.recvfrom(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                self._guarded(functools.partial(self._on_drained, started), None)
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._guarded(functools.partial(self._on_lost, exc), None)
                    continue
                if not self._stopping.is_set():
                    self.log.warning(f"{self._prefix}.trace_socket_failed", error=str(exc))
                self._broken = True  # stop reading, as the reader thread of old did; close() still closes
                if self._reader is not None:
                    self._reader.close()
                if self._timer is not None:
                    self._timer.cancel()
                return
            if sender[0] != KERNEL_PORT_ID:
                self._foreign_message(sender)
                continue
            for mtype, _seq, msg in split_messages(data):
                try:
                    self._on_message(mtype, msg)
                except Exception as exc:
                    self._bad_message(exc, mtype)

    def _foreign_message(self, sender: tuple[int, int]) -> None:
        self.foreign += 1
        self._foreign_unlogged += 1
        now = time.monotonic()
        if now - self._last_foreign_log >= 5.0:
            self.log.warning(
                f"{self._prefix}.foreign_message",
                sender_port_id=sender[0],
                sender_groups=sender[1],
                note="a process in this namespace, not the kernel, wrote to the trace socket: ignored",
                since_last_warning=self._foreign_unlogged,
            )
            self._last_foreign_log, self._foreign_unlogged = now, 0

    def _guarded(self, call: Callable[[], Any], default: Any) -> Any:
        """Runs one of the owner's callbacks; a bug there is logged like a bad message, and the
        reader goes on: a thread that died would stop attribution in the namespace for good."""
        try:
            return call()
        except Exception as exc:
            self._bad_message(exc, -1)
            return default

    def _bad_message(self, exc: Exception, mtype: int) -> None:
        self._bad += 1
        now = time.monotonic()
        if now - self._last_bad_log >= 5.0:
            self.log.warning(
                f"{self._prefix}.bad_message", error=repr(exc), msg_type=mtype, since_last_warning=self._bad
            )
            self._last_bad_log, self._bad = now, 0
