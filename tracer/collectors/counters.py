"""Blind spots made visible: the drop counters of each watched namespace, polled, their rises reported.

A SYN-ACK with no route back, a SYN that a full accept queue turns away,
an ICMP error TCP ignores: the kernel gives these up without `kfree_skb`
(or consumes them), so the BPF program never sees them. Only the SNMP
counters of the namespace move. This collector reads /proc/net/snmp,
/proc/net/netstat and /proc/net/snmp6 of every watched namespace every
`interval` seconds and reports each rise of a counter of
tracer.event.counter.COUNTERS as a `CounterEvent` (`tracer.counter`).

How a namespace's files are read: the poller thread enters the namespace
once (setns, tracer.netns.entered), opens /proc/thread-self/net/<file>
(the *thread's* namespace, where /proc/self/net is the process's) and
leaves; an open /proc/net file stays bound to the namespace it was opened
in, so every round only seeks to 0 and reads again, with no setns, and a
file whose text did not change is not parsed again. An open file keeps its
namespace alive, so each round first checks that the namespace's path
still opens that very namespace: one gone (deleted, its last process
exited, or its /proc/PID path now another namespace's) has its files
closed at once, is skipped and logged once, without raising, and is read
again if its path opens it again (the same inode is the same namespace, so
its old values still count); `namespaces_changed` lets go of it for good.
docs/counter-event.md has the cost of a round over 100 namespaces.

Its own thread, like the conntrack pressure poller, rather than the
engine's tick: the join thread must not wait on a hundred namespaces'
files, and the tick only exists in the daemon. `poll()` is public and may
be called from any thread (rounds are serialised), so `tracer diagnose`
and tests can drive rounds themselves; `snapshot` and `increases` compare
a namespace before and after something without a collector at all.

Noise control: a counter's first rise after a quiet spell is reported at
the next round; while it keeps rising, at most one event per `repeat_s`
carries the whole rise since the previous one (`event.start` says since
when), so a flood is a line every 10 s, not one a second.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog

from tracer import netns as netns_mod
from tracer.event.counter import COUNTERS, NETSTAT, SNMP, SNMP6, CounterEvent, CounterSpec
from tracer.event.sections import Namespace
from tracer.netns import Netns, NetnsGone

#: While a counter keeps rising, at most one event per this many seconds (the rise since the last one).
REPEAT_S = 10.0
#: Events kept per namespace for `recent()` (the diagnosis' evidence).
RECENT = 64
#: The thread's own namespace view of /proc/net (/proc/self/net would be the process's).
_PROC_NET = "/proc/thread-self/net"
_READ_CHUNK = 1 << 16
#: Beyond this a file is not what the kernel writes: stop reading (a namespace cannot make it grow,
#: but a bound keeps a surprise from costing memory).
_MAX_FILE = 1 << 20


# --------------------------------------------------------------------------- reading


def _read_fd(fd: int) -> str:
    """The whole file. A /proc/net file fills the whole buffer of one read when it can, so a
    read shorter than the buffer is the end: no second read (which costs as much) to see EOF."""
    chunks, size = [], 0
    while size < _MAX_FILE:
        chunk = os.read(fd, _READ_CHUNK)
        chunks.append(chunk)
        size += len(chunk)
        if len(chunk) < _READ_CHUNK:
            break
    return b"".join(chunks).decode("ascii", "replace")


def _open_files(files: Sequence[str]) -> dict[str, int]:
    """Opens /proc/thread-self/net/<file> for each file that exists (snmp6 does not without IPv6)."""
    fds: dict[str, int] = {}
    try:
        for name in files:
            try:
                fds[name] = os.open(f"{_PROC_NET}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def read_files(ns: Netns, files: Sequence[str] = (SNMP, NETSTAT, SNMP6)) -> dict[str, str]:
    """The text of the namespace's /proc/net files; raises NetnsGone when the namespace is gone.

    Only opening needs the thread inside the namespace: an open /proc/net
    file keeps the namespace it was opened in, so reading happens back home.
    """
    with netns_mod.entered(ns):
        fds = _open_files(files)
    try:
        return {name: _read_fd(fd) for name, fd in fds.items()}
    finally:
        for fd in fds.values():
            os.close(fd)


class _Columns:
    """Which columns of snmp/netstat lines to keep, worked out once per header line.

    The header lines do not change while the kernel runs, so the names are
    split and looked up once; each round then only splits the value lines.
    """

    def __init__(self, wanted: Mapping[str, CounterSpec]) -> None:
        self._by_key = {(s.file, s.group, s.field): s.name for s in wanted.values() if s.file != SNMP6}
        self._cache: dict[tuple[str, str], tuple[str, list[tuple[int, str]]]] = {}

    def pick(self, file: str, header: str) -> tuple[str, list[tuple[int, str]]]:
        """(group, [(column, counter name)]) of one header line."""
        found = self._cache.get((file, header))
        if found is None:
            group, _, names = header.partition(":")
            cols = [(i, n) for i, f in enumerate(names.split()) if (n := self._by_key.get((file, group, f)))]
            found = self._cache[(file, header)] = (group, cols)
        return found


def parse_pairs(file: str, text: str, columns: _Columns) -> dict[str, int]:
    """snmp and netstat: a header line of names, then a line of values, per group."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    for header, values in zip(lines[0::2], lines[1::2], strict=False):
        group, cols = columns.pick(file, header)
        vgroup, _, rest = values.partition(":")
        if vgroup != group or not cols:
            continue  # misaligned or nothing wanted: never guess a column
        fields = rest.split()
        for i, name in cols:
            if i < len(fields):
                try:
                    out[name] = int(fields[i])
                except ValueError:
                    continue
    return out


def parse_snmp6(text: str, wanted: Mapping[str, CounterSpec]) -> dict[str, int]:
    """snmp6: one `Name value` line per counter."""
    out: dict[str, int] = {}
    lines = text.splitlines()
    words = text.split()
    if len(words) != 2 * len(lines):
        return out  # not `name value` lines: never pair a name with another's value
    pairs = iter(words)
    for name, value in zip(pairs, pairs, strict=True):
        if name in wanted:
            try:
                out[name] = int(value)
            except ValueError:
                continue
    return out


class Reader:
    """Reads the wanted counters of a namespace: `read(ns) -> {name: value}`."""

    def __init__(self, counters: Mapping[str, CounterSpec] = COUNTERS) -> None:
        self.counters = dict(counters)
        self._columns = _Columns(self.counters)
        self._snmp6 = {n: s for n, s in self.counters.items() if s.file == SNMP6}
        self._files = tuple(f for f in (SNMP, NETSTAT, SNMP6) if any(s.file == f for s in self.counters.values()))

    @property
    def files(self) -> tuple[str, ...]:
        return self._files

    def parse(self, file: str, text: str) -> dict[str, int]:
        return parse_snmp6(text, self._snmp6) if file == SNMP6 else parse_pairs(file, text, self._columns)

    def read(self, ns: Netns) -> dict[str, int]:
        """Once (nothing kept open); raises NetnsGone when the namespace is gone."""
        out: dict[str, int] = {}
        for file, text in read_files(ns, self._files).items():
            out.update(self.parse(file, text))
        return out


class OpenFiles:
    """A namespace's counter files, kept open between rounds and read again from the start.

    Reading an open file again costs half of opening it afresh (netstat's
    buffer is allocated at open), and needs no setns. The price: an open
    /proc/net file keeps its namespace alive, so `read` first checks that
    the namespace's path still opens it (NetnsGone, and the files closed,
    when it does not): a deleted namespace is held for one round at most.
    A file whose text did not change since the last round is not parsed again.
    """

    def __init__(self, ns: Netns, reader: Reader) -> None:
        self.ns = ns
        self.reader = reader
        with netns_mod.entered(ns):
            self.fds = _open_files(reader.files)
        self._texts: dict[str, str] = {}
        self._parsed: dict[str, dict[str, int]] = {}

    def read(self) -> dict[str, int]:
        if not netns_mod.exists(self.ns):
            self.close()
            raise NetnsGone(errno.ENOENT, f"network namespace {self.ns.label} is gone")
        out: dict[str, int] = {}
        for file, fd in self.fds.items():
            os.lseek(fd, 0, os.SEEK_SET)
            text = _read_fd(fd)
            if self._texts.get(file) != text:
                self._texts[file], self._parsed[file] = text, self.reader.parse(file, text)
            out.update(self._parsed[file])
        return out

    def close(self) -> None:
        fds, self.fds = self.fds, {}
        for fd in fds.values():
            os.close(fd)


@functools.cache
def _default_reader() -> Reader:
    """The reader of COUNTERS, made once: its column cache serves every snapshot."""
    return Reader()


# --------------------------------------------------------------------------- before / after


@dataclass(frozen=True, slots=True)
class Increase:
    """One counter's rise between two snapshots."""

    spec: CounterSpec
    delta: int
    value: int

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def meaning(self) -> str:
        return self.spec.meaning

    @property
    def cause(self) -> str | None:
        """The diagnosis cause this rise is evidence for (`no_route`, `rp_filter`...), if any."""
        return self.spec.cause

    def event(self, ns: Netns, *, timestamp_ns: int | None = None, start_ns: int | None = None) -> CounterEvent:
        """The counter event of this rise in `ns` (now, when no wall-clock time is given)."""
        return CounterEvent.of(self.spec, Namespace(ns.inode, ns.name),
                               timestamp_ns=time.time_ns() if timestamp_ns is None else timestamp_ns,
                               delta=self.delta, value=self.value, start_ns=start_ns)


def snapshot(ns: Netns) -> dict[str, int]:
    """The reported counters of one namespace now, by name (`IpOutNoRoutes`: 3).

    Raises NetnsGone when the namespace is gone. For `tracer diagnose`:
    a snapshot before and one after a probe, then `increases`.
    """
    return _default_reader().read(ns)


def increases(before: Mapping[str, int], after: Mapping[str, int],
              counters: Mapping[str, CounterSpec] = COUNTERS) -> list[Increase]:
    """The counters that rose from `before` to `after`, in COUNTERS order.

    A counter missing from either side is left out (unknown is not zero),
    and so is one that went down (a namespace replaced under the same path).
    """
    out = []
    for name, spec in counters.items():
        b, a = before.get(name), after.get(name)
        if b is not None and a is not None and a > b:
            out.append(Increase(spec, a - b, a))
    return out


# --------------------------------------------------------------------------- the collector


@dataclass(slots=True)
class _Tracked:
    """One namespace: its open files, each counter's base (the value the next delta counts from)
    and when it was last reported. Written by the poller only (rounds are serialised)."""

    ns: Netns
    files: OpenFiles | None = None
    base: dict[str, int] | None = None  # None: not read yet, the first reading is the baseline
    last: dict[str, int] = field(default_factory=dict)  # the previous reading
    last_ns: int = 0  # monotonic ns of the previous reading
    pending: dict[str, int] = field(default_factory=dict)  # risen, not reported yet: since when
    reported_ns: dict[str, int] = field(default_factory=dict)
    failed: bool = False
    recent: deque[tuple[int, CounterEvent]] = field(default_factory=lambda: deque(maxlen=RECENT))

    def update(self, reading: dict[str, int], now_ns: int, repeat_ns: int,
               specs: Mapping[str, CounterSpec]) -> list[tuple[CounterSpec, int, int, int]]:
        """(spec, delta, value, start monotonic ns) of each rise to report now.

        A rise seen first in this round happened after the previous
        reading: that is its start. One held back (repeat_ns) keeps the
        start of its first rise, so the event that reports it covers it all.
        """
        try:
            if self.base is None:
                self.base = dict(reading)
                return []
            if not self.pending and reading == self.last:
                return []  # the common round: nothing moved
            return self._rises(reading, now_ns, repeat_ns, specs)
        finally:
            self.last, self.last_ns = reading, now_ns

    def _rises(self, reading: Mapping[str, int], now_ns: int, repeat_ns: int,
               specs: Mapping[str, CounterSpec]) -> list[tuple[CounterSpec, int, int, int]]:
        assert self.base is not None
        out = []
        for name, value in reading.items():
            base = self.base.get(name)
            if base is None or value < base:  # new, or went down (start over from here)
                self.base[name] = value
                self.pending.pop(name, None)
                continue
            if value == base:
                continue
            since = self.pending.setdefault(name, self.last_ns)
            last = self.reported_ns.get(name)
            if last is not None and now_ns - last < repeat_ns:
                continue  # keeps rising: the next event carries the whole rise
            out.append((specs[name], value - base, value, since))
            self.base[name], self.reported_ns[name] = value, now_ns
            del self.pending[name]
        return out

    def close(self) -> None:
        if self.files is not None:
            self.files.close()
            self.files = None


class CounterCollector:
    """Polls the watched namespaces' drop counters and emits a `CounterEvent` for each rise.

    `emit` is called from the thread "counters" (or the caller of `poll`)
    and should only queue (a sink's submit does). The first reading of a
    namespace is its baseline: rises from before the watch are not news.
    """

    name = "counters"

    def __init__(self, emit: Callable[[CounterEvent], None], interval: float = 1.0, *,
                 repeat_s: float = REPEAT_S, counters: Mapping[str, CounterSpec] = COUNTERS,
                 log: Any = None) -> None:
        if interval <= 0:
            raise ValueError(f"counter poll interval {interval!r} is not positive")
        if repeat_s < 0:
            raise ValueError(f"counter repeat interval {repeat_s!r} is negative")
        self.emit = emit
        self.interval = interval
        self.repeat_ns = int(repeat_s * 1e9)
        self.reader = Reader(counters)
        self.log = log if log is not None else structlog.get_logger("tracer.counters")
        self._wall_offset = time.time_ns() - time.monotonic_ns()
        self._tracked: dict[int, _Tracked] = {}
        self._lock = threading.Lock()  # the dict
        self._poll_lock = threading.Lock()  # one round at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def unavailable(self) -> str | None:
        """Why no counter event can come (`tracer doctor`), None when they can."""
        try:
            with open(f"{_PROC_NET}/{SNMP}", "rb") as f:
                f.read(1)
        except OSError as exc:
            return f"cannot read {_PROC_NET}/{SNMP}: {exc.strerror or exc}"
        return None

    # ------------------------------------------------------------ lifecycle

    def start(self, namespaces: Sequence[Netns]) -> None:
        """Follows these namespaces: reads their baseline now, then polls every `interval` s."""
        self.namespaces_changed(namespaces)
        self._stop.clear()
        self.poll()  # the baseline, so that the first round of the thread can already report
        self._thread = threading.Thread(target=self._run, name="counters", daemon=True)
        self._thread.start()

    def namespaces_changed(self, namespaces: Sequence[Netns]) -> None:
        """Follows these namespaces from now on (a new one's first reading is its baseline)."""
        wanted = {ns.inode: ns for ns in namespaces}
        with self._poll_lock, self._lock:  # not while a round reads their files
            for inode in [i for i in self._tracked if i not in wanted]:
                self._tracked.pop(inode).close()
            for inode, ns in wanted.items():
                tracked = self._tracked.get(inode)
                if tracked is None:
                    self._tracked[inode] = _Tracked(ns)
                elif tracked.ns != ns:  # same namespace, a new path or name (renamed, re-found)
                    tracked.close()
                    tracked.ns = ns

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        with self._poll_lock, self._lock:
            tracked, self._tracked = list(self._tracked.values()), {}
            for t in tracked:
                t.close()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.poll()
            except Exception as exc:  # the thread must outlive any one bad namespace
                self.log.warning("counters.poll_failed", error=repr(exc))

    # ------------------------------------------------------------ polling

    def poll(self) -> list[CounterEvent]:
        """One round over every watched namespace: emits (and returns) the events of the rises."""
        with self._poll_lock:
            with self._lock:
                tracked = list(self._tracked.values())
            events: list[CounterEvent] = []
            for t in tracked:
                if self._stop.is_set() and self._thread is not None:
                    break
                events.extend(self._poll_one(t))
        for event in events:
            try:
                self.emit(event)
            except Exception as exc:
                self.log.warning("counters.emit_failed", counter=event.name, error=repr(exc))
        return events

    def _poll_one(self, t: _Tracked) -> list[CounterEvent]:
        try:
            if t.files is None:
                t.files = OpenFiles(t.ns, self.reader)
            reading = t.files.read()
        except OSError as exc:
            t.close()
            if not t.failed:
                gone = isinstance(exc, NetnsGone) or exc.errno in (errno.ENOENT, errno.ESTALE)
                self.log.info("counters.netns_gone" if gone else "counters.read_failed",
                              netns=t.ns.label, error=str(exc))
            t.failed = True
            return []
        t.failed = False
        now = time.monotonic_ns()
        rises = t.update(reading, now, self.repeat_ns, self.reader.counters)
        off = self._wall_offset
        netns = Namespace(t.ns.inode, t.ns.name)
        out = []
        for spec, delta, value, since in rises:
            event = CounterEvent.of(spec, netns, timestamp_ns=now + off, delta=delta, value=value,
                                    start_ns=since + off)
            t.recent.append((now, event))
            out.append(event)
        return out

    # ------------------------------------------------------------ for the diagnosis

    def recent(self, netns_inode: int, since_mono_ns: int = 0) -> list[CounterEvent]:
        """The events of a namespace found by rounds at or after monotonic `since_mono_ns`
        (a drop's `KernelDrop.mono_ns`, say): evidence for a diagnosis. Any thread."""
        with self._lock:
            t = self._tracked.get(netns_inode)
        if t is None:
            return []
        return [event for at, event in list(t.recent) if at >= since_mono_ns]
