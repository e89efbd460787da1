"""Conntrack pressure: each watched namespace's table fill and conntrack's own drops, as alerts.

A conntrack table that fills up drops packets that no rule dropped: first
the kernel evicts unreplied entries early to make room (`early_drop`), and
once only ASSURED entries are left it refuses new connections (`drop`). No
firewall rule explains such drops, so the tracer says so itself:

- every `interval` seconds, for every watched namespace, it reads the
  namespace's entry count and the global limit (IPCTNL_MSG_CT_GET_STATS) and
  the statistics summed over CPUs (IPCTNL_MSG_CT_GET_STATS_CPU: drop,
  early_drop, insert_failed, invalid), through a ctnetlink socket opened
  inside the namespace (one per namespace, kept open: sockets stay bound to
  the namespace they were made in, see tracer.netns);
- it emits `tracer.conntrack` alerts (tracer.event.notice.Notice) with
  hysteresis, so a table that hovers at the threshold or an eviction that
  goes on for minutes makes a handful of alerts, not a storm;
- attribution asks `dropping(netns)` whether conntrack itself dropped
  packets around the time of a drop (tracer.pipeline.attribution.conntrack_full).

`nf_conntrack_count` is per namespace while `nf_conntrack_max` is global
(read-only inside a namespace). Where conntrack is not active (no rule uses
it since 6.x registers its hooks on demand) the count stays 0 and the
counters never move: nothing to alert on. Where the nf_conntrack module is
not loaded at all, no socket is opened (a ctnetlink request would load it).

Messages are read by hand (tracer.nlmsg says why): two small requests per
namespace and interval, a few microseconds each, where pyroute2's
`Conntrack` would start an asyncio loop per socket. Replies are accepted
only from the kernel (port id 0) and with our sequence number: the owner of
a user namespace may write to our socket (tracer.nlmsg's module docstring).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import structlog
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_stats, nfct_stats_cpu

from tracer import nlmsg
from tracer.event.notice import CONNTRACK_DATASET, Notice
from tracer.event.sections import Namespace
from tracer.netns import Netns

# --------------------------------------------------------------------------- tuning

#: A filling episode ends only once the fill level is this far below the
#: threshold: a table hovering at the threshold (every new flow adds an entry,
#: every timeout removes one) would otherwise raise and clear at every read.
CLEAR_MARGIN = 0.05
#: While a counter keeps rising, at most one alert per this many seconds,
#: carrying the rise since the previous alert: a sustained eviction is one
#: line every 10 s with its rate, not one a second.
REPEAT_S = 10.0
#: A counter episode ends after this long without a rise; a rise after that
#: starts a new episode and alerts at once. Longer than REPEAT_S, so the
#: rise since the last alert is always reported before the episode ends.
QUIET_S = 30.0
#: `dropping()` reads afresh when its newest reading is older than this (or
#: was taken before the drop asked about), but not more often than
#: REREAD_SPACING_S: under a flood of drops one reading serves a burst.
FRESH_S = 0.2
REREAD_SPACING_S = 0.02
#: Readings kept per namespace for `dropping()` (about a minute at 1 s).
HISTORY = 64
#: ECS event.severity (0-100) of each alert.
SEVERITY = {
    "conntrack_table_filling": 50,
    "conntrack_early_drop": 60,
    "conntrack_table_full_drop": 80,
    "conntrack_table_recovered": 20,
}

#: What exists only while nf_conntrack is loaded (built in here; a module on stock kernels).
CONNTRACK_LOADED_PATH = "/proc/sys/net/netfilter/nf_conntrack_max"

# --------------------------------------------------------------------------- ctnetlink

NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET_STATS_CPU = 4
IPCTNL_MSG_CT_GET_STATS = 5
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLM_F_DUMP = 0x300
NLMSG_DONE = 3


def _attr_type(nla_map: Sequence[tuple[str, str]], name: str) -> int:
    """An attribute's number, from pyroute2's definition of the message (its position in nla_map)."""
    return [n for n, _ in nla_map].index(name)


#: CTA_STATS_GLOBAL_* (the GET_STATS reply) and CTA_STATS_* (one reply per CPU): be32 each.
CTA_STATS_GLOBAL_ENTRIES = _attr_type(nfct_stats.nla_map, "CTA_STATS_GLOBAL_ENTRIES")
CTA_STATS_GLOBAL_MAX_ENTRIES = _attr_type(nfct_stats.nla_map, "CTA_STATS_GLOBAL_MAX_ENTRIES")
CTA_STATS = {name: _attr_type(nfct_stats_cpu.nla_map, f"CTA_STATS_{name.upper()}")
             for name in ("drop", "early_drop", "insert_failed", "invalid")}
_BE32 = struct.Struct(">I")
_ERRNO = struct.Struct("=i")
_NFGEN = struct.Struct("=BBH")  # family (AF_UNSPEC), version (NFNETLINK_V0), res_id
#: A reply that takes longer than this means the namespace's socket is unusable.
REPLY_TIMEOUT_S = 1.0
#: Reply messages read at most for one request (a dump has one per possible CPU).
_MAX_REPLIES = 16384


class CtnetlinkError(OSError):
    """A ctnetlink request failed (the kernel's errno) or got no complete reply."""


@dataclass(frozen=True, slots=True)
class Reading:
    """One namespace's table and counters at one moment (monotonic ns before and after the request)."""

    start_ns: int
    end_ns: int
    count: int
    max: int  # 0: no limit (nf_conntrack_max = 0)
    drop: int
    early_drop: int
    insert_failed: int
    invalid: int

    @property
    def ratio(self) -> float | None:
        return self.count / self.max if self.max > 0 else None

    @property
    def full(self) -> bool:
        return self.max > 0 and self.count >= self.max

    def table(self) -> dict[str, Any]:
        ratio = self.ratio
        return {"count": self.count, "max": self.max, "ratio": round(ratio, 4) if ratio is not None else None}

    def stats(self) -> dict[str, int]:
        return {"drop": self.drop, "early_drop": self.early_drop, "insert_failed": self.insert_failed,
                "invalid": self.invalid}


def _request(msg_type: int, flags: int, seq: int) -> bytes:
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
    header = nlmsg.NLMSG_HEADER.pack(nlmsg.NLMSG_HEADER.size + len(body),
                                     (NFNL_SUBSYS_CTNETLINK << 8) | msg_type, NLM_F_REQUEST | flags, seq, 0)
    return header + body


def _be32_attrs(msg: bytes) -> dict[int, int]:
    """The be32 attributes of one nfnetlink message, by type (others left out)."""
    out: dict[int, int] = {}
    for atype, start, end in nlmsg.attributes(msg, nlmsg.NFGEN_ATTRS):
        if end - start >= 4:
            out[atype] = _BE32.unpack_from(msg, start)[0]
    return out


def _replies(sock: socket.socket, seq: int) -> Iterator[bytes]:
    """Reply messages to request `seq` until NLMSG_DONE (a dump) or the ack; raises on an error.

    Gives up after REPLY_TIMEOUT_S in all, so that datagrams someone else
    keeps sending (skipped) cannot hold the caller.
    """
    seen = 0
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while True:
        if time.monotonic() > deadline:
            raise CtnetlinkError(errno.ETIMEDOUT, "ctnetlink: no complete reply in time")
        data, (sender, _groups) = sock.recvfrom(1 << 16)
        if sender != nlmsg.KERNEL_PORT_ID:
            continue  # not the kernel's: forged
        for mtype, mseq, msg in nlmsg.split_messages(data):
            if mseq != seq:
                continue  # a late reply to an earlier request that timed out
            if mtype == nlmsg.NLMSG_ERROR:
                err = _ERRNO.unpack_from(msg, nlmsg.NLMSG_HEADER.size)[0] if len(msg) >= 20 else -1
                if err:
                    raise CtnetlinkError(-err, f"ctnetlink: {os.strerror(-err)}")
                return  # the ack
            if mtype == NLMSG_DONE:
                return
            seen += 1
            if seen > _MAX_REPLIES:
                raise CtnetlinkError(0, "ctnetlink: reply without end")
            yield msg


class CtStatsSocket:
    """A ctnetlink socket inside one namespace that reads its table and counters."""

    def __init__(self, ns: Netns) -> None:
        self.sock = nlmsg.netfilter_socket(ns)
        self.sock.settimeout(REPLY_TIMEOUT_S)
        self._seq = itertools.count(1)

    def read(self) -> Reading:
        start = time.monotonic_ns()
        seq = next(self._seq)
        self.sock.send(_request(IPCTNL_MSG_CT_GET_STATS, NLM_F_ACK, seq))
        table: dict[int, int] = {}
        for msg in _replies(self.sock, seq):
            table.update(_be32_attrs(msg))
        seq = next(self._seq)
        self.sock.send(_request(IPCTNL_MSG_CT_GET_STATS_CPU, NLM_F_DUMP, seq))
        sums = dict.fromkeys(CTA_STATS, 0)
        for msg in _replies(self.sock, seq):
            attrs = _be32_attrs(msg)
            for name, atype in CTA_STATS.items():
                sums[name] += attrs.get(atype, 0)
        if CTA_STATS_GLOBAL_ENTRIES not in table:
            raise CtnetlinkError(0, "ctnetlink: statistics without an entry count")
        return Reading(start, time.monotonic_ns(), table[CTA_STATS_GLOBAL_ENTRIES],
                       table.get(CTA_STATS_GLOBAL_MAX_ENTRIES, 0), **sums)

    def close(self) -> None:
        self.sock.close()


def conntrack_loaded() -> bool:
    """Whether nf_conntrack is in the kernel (built in, or its module loaded)."""
    return os.path.exists(CONNTRACK_LOADED_PATH)


# --------------------------------------------------------------------------- alert logic


@dataclass(slots=True)
class CounterEpisode:
    """One counter's episode of rises (early_drop or drop), for the once-then-every-REPEAT_S rule."""

    active: bool = False
    alerted_ns: int = 0  # monotonic time of the last alert
    alerted_value: int = 0  # the counter's value that alert reported up to
    risen_ns: int = 0  # monotonic time of the last reading that saw it rise

    def update(self, previous: int, value: int, now_ns: int, since_ns: int) -> tuple[int, int] | None:
        """(rise to report, monotonic start of the period it covers), or None: no alert now."""
        if value < previous:  # a counter wrapped, or a CPU went away: start over from here
            self.alerted_value = value
            return None
        if value > previous:
            self.risen_ns = now_ns
            if not self.active:
                self.active, self.alerted_ns, self.alerted_value = True, now_ns, value
                return value - previous, since_ns
        if not self.active:
            return None
        if value > self.alerted_value and now_ns - self.alerted_ns >= REPEAT_S * 1e9:
            rise, start = value - self.alerted_value, self.alerted_ns
            self.alerted_ns, self.alerted_value = now_ns, value
            return rise, start
        if now_ns - self.risen_ns >= QUIET_S * 1e9:
            self.active = False
        return None


@dataclass(slots=True)
class NamespaceAlerts:
    """The alert state of one namespace: its filling episode and its two counter episodes."""

    ns: Netns
    threshold: float
    wall_offset_ns: int  # wall clock minus monotonic clock, for notice times
    filling_since_ns: int | None = None
    peak_ratio: float = 0.0
    previous: Reading | None = None
    early_drop: CounterEpisode = field(default_factory=CounterEpisode)
    drop: CounterEpisode = field(default_factory=CounterEpisode)

    @property
    def clear_mark(self) -> float:
        """Below this the filling episode ends (a threshold lower than twice the margin keeps half)."""
        return self.threshold - min(CLEAR_MARGIN, self.threshold / 2)

    def update(self, r: Reading) -> list[Notice]:
        """The alerts one new reading raises (most readings raise none)."""
        out = self._filling(r)
        prev = self.previous
        self.previous = r
        if prev is None:
            return out  # counters from before the watch began are not news
        for name, episode in (("early_drop", self.early_drop), ("drop", self.drop)):
            found = episode.update(getattr(prev, name), getattr(r, name), r.end_ns, prev.end_ns)
            if found is not None:
                out.append(self._counter_alert(name, r, *found))
        return out

    def _filling(self, r: Reading) -> list[Notice]:
        ratio = r.ratio
        if ratio is None:
            return []
        if self.filling_since_ns is None:
            if ratio < self.threshold:
                return []
            self.filling_since_ns, self.peak_ratio = r.end_ns, ratio
            return [self._notice("conntrack_table_filling", r, _filling_message(r, self.threshold))]
        self.peak_ratio = max(self.peak_ratio, ratio)
        if ratio >= self.clear_mark:
            return []
        since, self.filling_since_ns = self.filling_since_ns, None
        seconds = (r.end_ns - since) / 1e9
        message = (f"conntrack table back to {_pct(ratio)} ({r.count:,} of {r.max:,} entries) after "
                   f"{seconds:.0f} s at or above {_pct(self.threshold)} (peak {_pct(self.peak_ratio)})")
        return [self._notice("conntrack_table_recovered", r, message, {"peak_ratio": round(self.peak_ratio, 4)},
                             start_ns=since)]

    def _counter_alert(self, name: str, r: Reading, rise: int, since_ns: int) -> Notice:
        where = f"{r.count:,} of {r.max:,} entries" if r.max else f"{r.count:,} entries"
        if name == "early_drop":
            action = "conntrack_early_drop"
            message = (f"conntrack table full: {_many(rise, 'entry', 'entries')} evicted early to make room "
                       f"for new connections ({where})")
        elif r.full or (r.ratio or 0.0) >= self.clear_mark:
            action = "conntrack_table_full_drop"
            message = f"conntrack table full: {_many(rise, 'packet')} dropped, new connections refused ({where})"
        else:
            action = "conntrack_table_full_drop"
            message = f"conntrack dropped {_many(rise, 'packet')} ({where})"
        return self._notice(action, r, message, {"delta": {name: rise}}, start_ns=since_ns)

    def _notice(self, action: str, r: Reading, message: str, extra: dict[str, Any] | None = None,
                start_ns: int | None = None) -> Notice:
        details: dict[str, Any] = {"table": r.table(), "stats": r.stats(), "threshold": self.threshold}
        details.update(extra or {})
        off = self.wall_offset_ns
        return Notice(
            timestamp_ns=r.end_ns + off,
            dataset=CONNTRACK_DATASET,
            action=action,
            message=message,
            kind="alert",
            severity=SEVERITY[action],
            netns=Namespace(self.ns.inode, self.ns.name),
            section="conntrack",
            details=details,
            start_ns=None if start_ns is None else start_ns + off,
            end_ns=None if start_ns is None else r.end_ns + off,
        )


def _many(n: int, one: str, more: str | None = None) -> str:
    return f"{n:,} {one if n == 1 else (more or one + 's')}"


def _pct(ratio: float) -> str:
    return f"{ratio * 100:.0f}%"


def _filling_message(r: Reading, threshold: float) -> str:
    ratio = r.ratio or 0.0
    return (f"conntrack table {_pct(ratio)} full ({r.count:,} of {r.max:,} entries), "
            f"over the alert threshold of {_pct(threshold)}")


def rose_between(history: Sequence[Reading], at_ns: int) -> bool | None:
    """Whether `drop` rose from the last reading done before `at_ns` to the first begun after it.

    None when the readings do not enclose `at_ns`. The kernel counts a drop
    before it frees the packet, so a reading that ended before the free may
    already include it: `before` must have ended a millisecond earlier.
    """
    before = next((r for r in reversed(history) if r.end_ns < at_ns - 1_000_000), None)
    after = next((r for r in history if r.start_ns > at_ns), None)
    if before is None or after is None:
        return None
    return after.drop > before.drop


# --------------------------------------------------------------------------- the watcher


@dataclass(slots=True)
class _Watched:
    """One namespace: its socket, its recent readings (any thread, under `lock`), its alerts (poller only)."""

    ns: Netns
    alerts: NamespaceAlerts
    lock: threading.Lock = field(default_factory=threading.Lock)
    sock: CtStatsSocket | None = None
    history: deque[Reading] = field(default_factory=lambda: deque(maxlen=HISTORY))
    reread_ns: int = 0
    failed: bool = False  # the last read failed (logged once until one succeeds)

    def read(self) -> Reading:
        """A fresh reading, kept in the history; the caller holds `lock`."""
        if self.sock is None:
            self.sock = CtStatsSocket(self.ns)
        try:
            r = self.sock.read()
        except OSError:
            self.close()  # a timed-out request may still answer later: start on a new socket
            raise
        self.history.append(r)
        return r

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


class ConntrackPressure:
    """Follows the conntrack tables of the watched namespaces; emits alerts and answers `dropping()`.

    `emit` is called from the thread "conntrack-pressure" with each alert;
    it should only queue (a sink's submit does).
    """

    name = "conntrack-pressure"

    def __init__(self, *, threshold: float, emit: Callable[[Notice], None], interval: float = 1.0,
                 log: Any = None) -> None:
        if not 0.0 < threshold <= 1.0:
            raise ValueError(f"conntrack threshold {threshold!r} is not in (0, 1]")
        if interval <= 0:
            raise ValueError(f"conntrack poll interval {interval!r} is not positive")
        self.threshold = threshold
        self.emit = emit
        self.interval = interval
        self.log = log if log is not None else structlog.get_logger("tracer.ctpressure")
        self._wall_offset = time.time_ns() - time.monotonic_ns()
        self._watched: dict[int, _Watched] = {}
        self._watched_lock = threading.Lock()  # the dict itself
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def unavailable(self) -> str | None:
        """Why no alert can come (`tracer doctor`), None when they can."""
        if not conntrack_loaded():
            return "nf_conntrack is not loaded: no table to follow until a ruleset uses it"
        return None

    # ------------------------------------------------------------ lifecycle

    def start(self, namespaces: Sequence[Netns]) -> None:
        self.namespaces_changed(namespaces)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="conntrack-pressure", daemon=True)
        self._thread.start()

    def namespaces_changed(self, namespaces: Sequence[Netns]) -> None:
        """Follows these namespaces from now on; lets go of the others (their sockets closed,
        since a socket keeps its namespace alive)."""
        wanted = {ns.inode: ns for ns in namespaces}
        with self._watched_lock:
            gone = [w for inode, w in self._watched.items() if inode not in wanted]
            for inode, ns in wanted.items():
                if inode not in self._watched:
                    alerts = NamespaceAlerts(ns, self.threshold, self._wall_offset)
                    self._watched[inode] = _Watched(ns, alerts)
            for w in gone:
                del self._watched[w.ns.inode]
        for w in gone:
            with w.lock:
                w.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        self._thread = None
        with self._watched_lock:
            watched, self._watched = list(self._watched.values()), {}
        for w in watched:
            with w.lock:
                w.close()

    # ------------------------------------------------------------ polling

    def _run(self) -> None:
        while True:
            try:
                self.poll()
            except Exception as exc:  # the thread must outlive any one bad namespace
                self.log.warning("ctpressure.poll_failed", error=repr(exc))
            if self._stop.wait(self.interval):
                return

    def poll(self) -> None:
        """One round: reads every watched namespace and emits the alerts the readings raise."""
        if not conntrack_loaded():
            return
        with self._watched_lock:
            watched = list(self._watched.values())
        for w in watched:
            if self._stop.is_set():
                return
            for notice in self._poll_one(w):
                self._emit(notice)

    def _poll_one(self, w: _Watched) -> list[Notice]:
        with w.lock:
            try:
                r = w.read()
            except OSError as exc:
                if not w.failed:
                    self.log.info("ctpressure.read_failed", netns=w.ns.label, error=str(exc))
                w.failed = True
                return []
            w.failed = False
        return w.alerts.update(r)  # alerts are the poller's alone: no lock needed

    def _emit(self, notice: Notice) -> None:
        try:
            self.emit(notice)
        except Exception as exc:
            self.log.warning("ctpressure.emit_failed", action=notice.action, error=repr(exc))

    # ------------------------------------------------------------ for metrics

    def levels(self) -> list[tuple[int, str | None, int, int]]:
        """(inode, name, entries, max) from each watched namespace's newest reading. Any thread.

        What the poller last read, without a request of its own and without
        the namespace's lock, which a slow read holds for up to a second: a
        metrics scrape must not wait on it. A reading is appended whole, so
        the newest one is always complete. A namespace not read yet is left out.
        """
        with self._watched_lock:
            watched = list(self._watched.values())
        out = []
        for w in watched:
            try:
                r = w.history[-1]
            except IndexError:
                continue
            out.append((w.ns.inode, w.ns.name, r.count, r.max))
        return out

    # ------------------------------------------------------------ for attribution

    def dropping(self, netns_inode: int, at_ns: int | None = None) -> bool:
        """Whether conntrack of that namespace was dropping packets at monotonic time `at_ns`
        (a drop's `KernelDrop.mono_ns`; None: now).

        True when its `drop` counter rose between the readings around
        `at_ns`, reading afresh when the newest reading is older than
        FRESH_S or was begun before `at_ns`. Without a reading before
        `at_ns` to compare with, a full table counts as dropping. A full
        table whose counter stays put is not dropping: early eviction still
        makes room.
        """
        with self._watched_lock:
            w = self._watched.get(netns_inode)
        if w is None or not conntrack_loaded():
            return False
        now = time.monotonic_ns()
        at = now if at_ns is None else at_ns
        with w.lock:
            newest = w.history[-1] if w.history else None
            stale = newest is None or newest.start_ns <= at or now - newest.end_ns > FRESH_S * 1e9
            if stale and now - w.reread_ns >= REREAD_SPACING_S * 1e9:
                w.reread_ns = now
                with contextlib.suppress(OSError):
                    w.read()
            history = list(w.history)
        if not history:
            return False
        rose = rose_between(history, at)
        if rose is not None:
            return rose
        if len(history) >= 2 and history[-1].drop > history[-2].drop:
            return True  # no reading after `at` yet (spacing): the newest rise stands in
        return history[-1].full
