"""Which nftables / iptables-nft rule or chain policy dropped a packet.

How: a small table of our own (`inet tracer_mark`, hooked before raw and
right after conntrack) sets `meta nftrace` on packets the filter selects
that may be dropped: not on those of established connections, unless the
tracer saw that flow dropped (`NftCollector.trace_flow`), within a per-flow
and a per-namespace budget (tracer.netfilter.marking.mark_commands). The
kernel then reports every rule and policy those packets meet as
NFT_MSG_TRACE netlink messages. One reader per namespace listens to traces
and ruleset changes on the same socket, so a ruleset swap is always seen
before the traces evaluated under the new ruleset, and a cached rule text
can never be stale when a drop is reported.

The marking table is created with the `owner` flag through a libnftables
context we keep open: the kernel deletes it by itself when that socket
closes (tracer crash, SIGKILL), and a user's `flush ruleset` leaves it alone.
Which namespaces are marked, and when, the marking coordinator decides
(tracer.netfilter.marking): it also knows the iptables-legacy side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import ipaddress
import os
import struct
import subprocess
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import TracebackType
from typing import TYPE_CHECKING, Any

import structlog
from pyroute2.common import hexdump
from pyroute2.netlink.nfnetlink import (
    NFNL_SUBSYS_NFTABLES,
    NFNLGRP_NFTABLES,
    NFNLGRP_NFTRACE,
    nfgen_msg,
    nftsocket,
)

from tracer import netns as netns_mod
from tracer.config import Scope
from tracer.event import packet
from tracer.loop import EventLoop, LoopSlot
from tracer.netfilter.constants import (
    CT_DIRECTIONS,
    CT_STATE_BITS,
    NFPROTO_FAMILIES,
    NFPROTO_PACKET_FAMILIES,
    ct_status_names,
)
from tracer.netfilter.marking import (
    FLOW_TIMEOUT,
    MARK_TABLE,
    PORT_PROTOCOLS,
    FlowElement,
    FlowKey,
    MarkingCoordinator,
    add_flows_command,
    conntrack_in_use,
    flow_element,
)
from tracer.netfilter.nftables import (
    IPTABLES_FAMILIES,
    IPTABLES_TABLES,
    Chain,
    NftContext,
    NftError,
    Output,
    Rule,
    Ruleset,
    change_of,
    generation_of,
)
from tracer.netfilter.xtables import rule_comment, split_iptables_rules
from tracer.netns import Netns
from tracer.nlmsg import (
    FD_SETSIZE,
    NFGEN_ATTRS,
    NetlinkReader,
    attributes,
    fixed_size,
    netfilter_socket,
    nfgen_family,
)

if TYPE_CHECKING:
    from tracer.collectors.conntrack import ConntrackInfo

NFT_TRACETYPE_POLICY = 1
NFT_TRACETYPE_RETURN = 2
NFT_TRACETYPE_RULE = 3

_TRACE_STATE_TTL = 5.0
#: A drop comes microseconds after its trace (the same call chain frees the packet);
#: a candidate verdict read this long before the drop is an earlier packet's.
MAX_TRACE_AGE = 0.05
_MAX_VERDICT_KEYS = 65536
#: trace_flow: flows remembered as recently added (an LRU), flows waiting for the loop per
#: namespace, and flows per libnftables batch.
_RECENT_FLOWS = 8192
_MAX_QUEUED_FLOWS = 4096
_FLOW_BATCH = 64
_MAX_TRACE_PATH = 64


class nft_trace_msg(nfgen_msg):
    """NFT_MSG_TRACE, which pyroute2 0.9.7 does not decode.

    Attribute order is `enum nft_trace_attributes` (uapi nf_tables.h); the
    CT_* attributes exist since Linux 6.x and are simply absent on older
    kernels. CT_STATUS is left out by the kernel when no status bit is set.
    """

    prefix = "NFTA_TRACE_"
    nla_map = (
        ("NFTA_TRACE_UNSPEC", "none"),
        ("NFTA_TRACE_TABLE", "asciiz"),
        ("NFTA_TRACE_CHAIN", "asciiz"),
        ("NFTA_TRACE_RULE_HANDLE", "be64"),
        ("NFTA_TRACE_TYPE", "be32"),
        ("NFTA_TRACE_VERDICT", "verdict"),
        ("NFTA_TRACE_ID", "be32"),
        ("NFTA_TRACE_LL_HEADER", "cdata"),
        ("NFTA_TRACE_NETWORK_HEADER", "cdata"),
        ("NFTA_TRACE_TRANSPORT_HEADER", "cdata"),
        ("NFTA_TRACE_IIF", "be32"),
        ("NFTA_TRACE_IIFTYPE", "be16"),
        ("NFTA_TRACE_OIF", "be32"),
        ("NFTA_TRACE_OIFTYPE", "be16"),
        ("NFTA_TRACE_MARK", "be32"),
        ("NFTA_TRACE_NFPROTO", "be32"),
        ("NFTA_TRACE_POLICY", "be32"),
        ("NFTA_TRACE_PAD", "hex"),
        ("NFTA_TRACE_CT_ID", "uint32"),  # the kernel writes it in host order
        ("NFTA_TRACE_CT_DIRECTION", "uint8"),
        ("NFTA_TRACE_CT_STATUS", "be32"),
        ("NFTA_TRACE_CT_STATE", "be32"),
    )

    # The verdict nest is the one rules and set elements use.
    verdict = nftsocket.nft_data.nfta_data.verdict


# --- NFT_MSG_TRACE read by hand (tracer.nlmsg says why) ----------------------------------

#: Reads one attribute's value from (message, payload start, payload end).
_Decoder = Callable[[bytes, int, int], Any]


def _fixed(fmt: str) -> _Decoder:
    """A fixed-size value; raises DecodeError when the attribute is too short to hold it."""
    unpack, size = struct.Struct(fmt).unpack_from, struct.calcsize(fmt)

    def decode(buf: bytes, start: int, end: int) -> Any:
        fixed_size(buf, start, end, size)
        return unpack(buf, start)[0]

    return decode


def _verdict_nest(buf: bytes, start: int, end: int) -> int | None:
    """NFTA_VERDICT_CODE of a verdict nest: the only part trace handling uses."""
    for atype, vstart, vend in attributes(buf, start, end):
        if atype == _VERDICT_CODE:
            fixed_size(buf, vstart, vend, 4)
            return _BE32_SIGNED(buf, vstart)[0]
    return None


_VERDICT_CODE = [name for name, _ in nft_trace_msg.verdict.nla_map].index("NFTA_VERDICT_CODE")
_BE32_SIGNED = struct.Struct(">i").unpack_from  # verdict codes are negative for jump, goto, return...

#: What each attribute type of pyroute2's nla_map decodes to, as pyroute2 decodes it
#: (the verdict nest excepted: its code as a number instead of a name).
_DECODERS: dict[str, _Decoder] = {
    "uint8": _fixed("B"),
    "be16": _fixed(">H"),
    "be32": _fixed(">I"),
    "be64": _fixed(">Q"),
    "uint32": _fixed("=I"),
    "asciiz": lambda buf, start, end: buf[start:end].strip(b"\0").decode(errors="replace"),
    "cdata": lambda buf, start, end: buf[start:end],
    "hex": lambda buf, start, end: hexdump(buf[start:end]),
    "verdict": _verdict_nest,
}

#: Attribute number -> (name, decoder), from `nft_trace_msg.nla_map`: numbers and
#: types have that one definition. "none" (NFTA_TRACE_UNSPEC) is never sent.
_TRACE_ATTRS: dict[int, tuple[str, _Decoder]] = {
    number: (name, _DECODERS[kind]) for number, (name, kind) in enumerate(nft_trace_msg.nla_map) if kind != "none"
}


@dataclass(frozen=True, slots=True)
class TraceMessage:
    """One NFT_MSG_TRACE: the table's family and the attributes by their nla_map names.

    Values are what pyroute2 decodes, except NFTA_TRACE_VERDICT, which is
    the verdict code as a number (pyroute2: a nest whose code is a name, or
    None for codes it has no name for, such as NF_DROP_ERR's).
    """

    family: int  # nfgen_family: NFPROTO_* of the table (inet, ip, ip6, ...)
    attrs: dict[str, Any]


def parse_trace_message(msg: bytes) -> TraceMessage:
    """Decodes one NFT_MSG_TRACE (netlink header included) without pyroute2.

    Each traced packet makes five or six messages. Read through a pyroute2
    socket they cost ~1 ms of CPU per packet, so the default trace rate of
    1000 packets/s took a whole core (pyroute2's decoding of one message
    alone: ~25 us); this takes ~5 us a message.

    Never raises anything but `tracer.nlmsg.DecodeError` (a ValueError),
    and that only when a fixed-size attribute (or the verdict code in the
    verdict nest) is too short for its type. Unknown attributes are left
    out, and a truncated attribute ends the message: the attributes before
    it are decoded.
    """
    attrs: dict[str, Any] = {}
    for atype, start, end in attributes(msg, NFGEN_ATTRS):
        known = _TRACE_ATTRS.get(atype)
        if known is not None:
            name, decode = known
            attrs[name] = decode(msg, start, end)
    return TraceMessage(nfgen_family(msg), attrs)


@dataclass(frozen=True)
class TraceVerdict:
    """What nftrace says decided a packet's fate, for the drop event's
    `netfilter` and `conntrack` objects."""

    netns_inode: int
    time: float  # time.monotonic() when the verdict message was read
    family: str  # table family: ip, ip6, inet, bridge, arp, netdev
    table: str
    chain: str  # chain whose rule or policy decided (user chains included)
    base_chain: str | None  # hooked chain it was reached from
    hook: str | None
    handle: int | None  # None when the policy decided
    text: str | None  # rule in `nft list ruleset` syntax, no comment, no counter values
    comment: str | None
    policy: bool
    verdict: str  # drop, reject, ...
    backend: str  # nftables or iptables-nft
    iptables: str | None = None  # the `iptables -S` line of an iptables-nft rule
    #: Its line in `iptables -L --line-numbers` (1-based position in its chain), with `iptables`.
    iptables_number: int | None = None
    #: The table's `iptables -S` lines by chain (what the rule's line came from), for the
    #: diagnosis's evaluator: the xt matches nft cannot show (-m multiport, -m conntrack).
    iptables_lines: Mapping[str, list[str]] | None = None
    ct_state: str | None = None
    ct_direction: str | None = None
    ct_status: tuple[str, ...] | None = None
    ct_id: int | None = None
    nfproto: str | None = None  # packet protocol family: ipv4 / ipv6 / ...
    iif: int | None = None
    oif: int | None = None
    mark: int | None = None
    trace_id: int = 0
    fingerprint: bytes | None = None
    #: Lower bound of when the kernel emitted the trace: the start of the last receive
    #: that found the socket empty before the trace was read (monotonic seconds).
    queued_after: float = 0.0
    #: The nftables generation the trace was evaluated in (None: not known).
    generation: int | None = None
    #: The packet's flow, from the traced headers (None: not IP, or headers cut short): what
    #: `NftCollector.trace_flow` takes, so that a traced repeat can be matched to its drop key.
    flow: FlowKey | None = None

    @property
    def conntrack(self) -> ConntrackInfo | None:
        """The trace's conntrack facts in the form the drop event uses (None when absent)."""
        from tracer.collectors.conntrack import ConntrackInfo

        if self.ct_state is None:
            return None
        if self.ct_state in ("invalid", "untracked"):
            return ConntrackInfo(self.ct_state)
        return ConntrackInfo(self.ct_state, self.ct_direction, self.ct_status or ())


@dataclass
class _TraceState:
    """What earlier messages of one trace id told us about the packet."""

    updated: float
    path: list[tuple[str, str, str]] = field(default_factory=list)  # (family, table, chain)
    network_header: bytes = b""
    transport_header: bytes = b""
    iif: int | None = None
    oif: int | None = None
    mark: int | None = None
    ct: dict[str, Any] = field(default_factory=dict)


def _verdict_code(code: int | None) -> int | None:
    """The verdict without NF_DROP_ERR's errno, which it keeps in the upper bits."""
    if code is None or code < 0:
        return code
    return code & 0xFF


#: IPv6 extension headers a traced network header may hold before the transport header:
#: hop-by-hop, routing, fragment, destination options, AH (its length counts 4-byte words).
_IPV6_EXTENSIONS = frozenset({0, 43, 44, 60, 51})


def _ipv6_l4proto(nh: bytes) -> tuple[int, bool] | None:
    """(transport protocol, is a later fragment) of an IPv6 header and its extension headers
    (the kernel's network header runs up to the transport header)."""
    proto, off, later = nh[6], 40, False
    while proto in _IPV6_EXTENSIONS:
        if off + 8 > len(nh):
            return None
        if proto == 44:
            later = later or (int.from_bytes(nh[off + 2 : off + 4], "big") >> 3) != 0
            size = 8
        elif proto == 51:
            size = (nh[off + 1] + 2) * 4
        else:
            size = (nh[off + 1] + 1) * 8
        proto, off = nh[off], off + size
    return proto, later


def flow_of(nh: bytes, th: bytes) -> FlowKey | None:
    """The FlowKey of a traced packet from its network and transport headers (ports 0 for
    protocols without, and for fragments after the first); None when they are not IP or are
    cut short (a later IPv6 fragment's trace carries no network header)."""
    if len(nh) >= 20 and nh[0] >> 4 == 4:
        version, proto = 4, nh[9]
        later = (int.from_bytes(nh[6:8], "big") & 0x1FFF) != 0
        saddr, daddr = str(ipaddress.IPv4Address(nh[12:16])), str(ipaddress.IPv4Address(nh[16:20]))
    elif len(nh) >= 40 and nh[0] >> 4 == 6:
        found = _ipv6_l4proto(nh)
        if found is None:
            return None
        version, (proto, later) = 6, found
        saddr, daddr = str(ipaddress.IPv6Address(nh[8:24])), str(ipaddress.IPv6Address(nh[24:40]))
    else:
        return None
    ported = proto in PORT_PROTOCOLS and not later and len(th) >= 4
    sport, dport = (int.from_bytes(th[0:2], "big"), int.from_bytes(th[2:4], "big")) if ported else (0, 0)
    return FlowKey(version, saddr, daddr, proto, sport, dport)


def _ct_status(ct: dict[str, Any]) -> tuple[str, ...] | None:
    if ct.get("status") is not None:
        return ct_status_names(ct["status"])
    # The kernel omits a zero status; a connection (it has an id) with no bits set.
    return () if ct.get("id") is not None else None


#: Namespaces set up side by side when several appear at once (a start over hundreds): the
#: libnftables calls take turns (one at a time in the process), but what waits without them
#: (sockets made inside the namespace, /proc, the legacy side's nfnetlink_log binding and
#: iptables-legacy-save before marking) overlaps, so one slow namespace does not hold up the
#: rest. The threads live only while an update sets namespaces up.
_SETUP_WORKERS = 3

#: A command that needs neither the kernel nor a ruleset cache. Running it makes libnftables
#: (1.0.x) free the cache the command before it filled: about 512 KiB for every table listed or
#: changed (each table's four 8192-bucket hash tables), which the context we keep open per
#: namespace would otherwise hold until it is closed: 1-2 MiB a namespace, most of the RSS.
_CACHE_RELEASE = "describe meta nftrace"


def _nft_context(ns: Netns) -> NftContext:
    """A libnftables context inside `ns`, tried once more when it failed with EBADF:
    NftContext finds its new socket among all the process's descriptors, and one that
    another thread (another namespace's set-up) closed meanwhile makes it fail.

    Refused (OSError EMFILE) when its socket would get a descriptor of FD_SETSIZE or
    more: libnftables select()s on it, and glibc aborts the process for such a number.
    One namespace then goes unwatched, with a warning, instead of the tracer dying.
    """
    if _lowest_free_fd() >= FD_SETSIZE - _NFT_CONTEXT_FDS:
        raise OSError(errno.EMFILE, f"no descriptor below {FD_SETSIZE} left for libnftables (it uses select())")
    try:
        with netns_mod.entered(ns):
            return NftContext()
    except OSError as exc:
        if exc.errno != errno.EBADF:
            raise
    with netns_mod.entered(ns):
        return NftContext()


#: Descriptors a new NftContext takes: libnftables' socket and NftContext's own netlink socket.
_NFT_CONTEXT_FDS = 2


def _lowest_free_fd() -> int:
    """The number the next descriptor gets (the lowest free one), as of now."""
    fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
    os.close(fd)
    return fd


def _release_cache(ctx: NftContext) -> None:
    """Frees libnftables' ruleset cache of `ctx` (see _CACHE_RELEASE); the next command refills
    it from the kernel, which a listing of a new generation does anyway."""
    if not ctx.closed:
        with contextlib.suppress(ValueError):  # closed meanwhile
            ctx.run(_CACHE_RELEASE)


#: How long a drop verdict waits, after it was read, for a generation change that
#: would make it ambiguous. nftables switches packets to a new generation before it
#: announces it (nf_tables_commit flips the generation cursor, then sends NEWRULE...
#: NEWGEN), so a trace evaluated under the new rules can be read just before the
#: announcement; the gap is the rest of one commit, far below this.
GENERATION_GRACE = 0.005
#: Generations whose snapshot is kept for traces still being resolved.
_SNAPSHOTS_KEPT = 16
_DRAINS_KEPT = 256
#: Generations whose changes are remembered (what each commit touched).
_CHANGES_KEPT = 4096
#: How long a verdict may wait for a snapshot that can give its rule's text.
_MAX_PENDING = 0.1
#: Listings taken for waiting verdicts are at least this far apart (each costs milliseconds).
_LIST_EVERY = 0.02
#: A marked namespace's newest snapshot (backend, conntrack use) is refreshed at most this often.
_LATEST_EVERY = 1.0


@dataclass
class _Pending:
    """A drop verdict as read from the trace socket, before its rule is looked up.

    Resolution waits `GENERATION_GRACE` so that a generation announced right
    after the trace (`crossed`) is known: the trace may then belong to it.
    """

    trace_id: int
    family: str
    table: str
    chain: str
    handle: int | None
    nfproto: int | None
    path: list[tuple[str, str, str]]
    network_header: bytes
    transport_header: bytes
    iif: int | None
    oif: int | None
    mark: int | None
    ct: dict[str, Any]
    read_at: float
    queued_after: float
    generation: int | None
    crossed: int | None = None  # the first generation announced while this waited; -1: unknown (messages lost)


class _NetnsWatch:
    """Marking table, trace reader and ruleset snapshots of one namespace.

    Rule text is exact for the generation a trace was evaluated in: the
    reader follows NEWGEN announcements on the trace socket itself, so it
    knows which generation each trace message came in, and it snapshots the
    ruleset once per generation, proving the generation with a GETGEN before
    and after the listing. A trace whose generation has no snapshot, or that
    may belong to a generation announced just after it with a different rule
    under the same handle, keeps its handle but gets no text: never the text
    of another generation.
    """

    def __init__(self, ns: Netns, collector: NftCollector) -> None:
        self.ns = ns
        self.collector = collector
        self.log = collector.log.bind(netns=ns.label, netns_inode=ns.inode)
        self.marked: str | None = None
        self.stateful = False  # the marking table has the conntrack rules (conntrack_in_use)
        self._ctx: NftContext | None = None
        self._reader: NetlinkReader | None = None
        self._stopping = threading.Event()
        self._lock = threading.RLock()  # snapshots, marking, pending, drains
        self._snapshots: OrderedDict[int, Ruleset] = OrderedDict()
        self._latest: Ruleset | None = None
        self._generation: int | None = None  # the generation in force, as the socket announced it
        self._want_snapshot = True
        self._latest_at = 0.0
        self._listed_for_pending = 0.0
        self._touched: set[tuple[str, str, str, int | None]] = set()  # changes of the commit being announced
        self._changes: OrderedDict[int, frozenset[tuple[str, str, str, int | None]]] = OrderedDict()
        self._pending: list[_Pending] = []
        self._drains: deque[float] = deque(maxlen=_DRAINS_KEPT)  # starts of receives that found the queue empty
        self._resolved_upto = 0.0  # every verdict read at or before this time has been published
        self._traces: OrderedDict[int, _TraceState] = OrderedDict()
        self._discarding = False  # messages were lost: ignore traces until the queue is empty
        self._iptables_cache: OrderedDict[tuple[int, str, str], dict[str, list[str]] | None] = OrderedDict()
        self._socket_errors = 0
        self._last_error_log = 0.0

    # --- lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Subscribes first, then snapshots and marks: no trace of a marked packet can be missed."""
        self._ctx = _nft_context(self.ns)
        try:
            # A plain socket, not pyroute2's: its per-thread reader decodes every message
            # generically (~1 ms of CPU per traced packet) and buffers them where poll()
            # cannot see them; see tracer.nlmsg.
            sock = netfilter_socket(self.ns, (1 << (NFNLGRP_NFTRACE - 1)) | (1 << (NFNLGRP_NFTABLES - 1)))
        except OSError:
            self._ctx.close()
            raise
        self._reader = NetlinkReader(
            sock,
            name=f"nft-trace-{self.ns.inode}",
            on_message=self._handle,
            on_lost=self._lost,
            on_drained=self._drained,
            log=self.log,
            event_prefix="nft",
            poll_timeout=self._until_due,
            loop=self.collector.loop,
        )
        self._generation = self._current_generation()
        self._snapshot()
        rs = self._latest
        if rs is not None and self.collector.marking.remove_stale_tables(self._ctx, rs, self.log):
            self._generation = self._current_generation()
            self._snapshot()
        self._reader.start()
        self._mark_if_needed()

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            if self.marked and self._ctx is not None:
                self.collector.marking.unmark(self._ctx, self.marked, self.log)
                self.marked = None
        if self._reader is not None:
            self._reader.close()
        with self._lock:
            if self._ctx is not None:
                self._ctx.close()  # also makes the kernel drop the table if delete failed

    def wake(self) -> None:
        """Makes the reader drain now: resolution of pending verdicts happens at drains."""
        if self._reader is not None:
            self._reader.wake()

    # --- marking -------------------------------------------------------------------

    def _mark_if_needed(self) -> None:
        """Marks the namespace if the coordinator says it should be (MarkingCoordinator.mark)."""
        with self._lock:
            if self.marked or self._stopping.is_set() or self._ctx is None:
                return
            rs = self._latest
            if rs is None:
                return
            c = self.collector
            stateful = conntrack_in_use(self.ns, rs)
            try:
                name = c.marking.mark(self._ctx, self.ns, rs, scope=c.filter, rate=c.rate, burst=c.burst, log=self.log,
                                      stateful=stateful, flow_timeout=c.flow_timeout)
            finally:
                _release_cache(self._ctx)
            if name is None:
                return
            self.marked, self.stateful = name, stateful
            self._want_snapshot = True

    def _follow_conntrack_use(self) -> None:
        """Switches the marking table's rules when the ruleset started or stopped using
        conntrack: only a namespace that tracks connections gets our `ct` rules (they would
        turn conntrack on), and one that does is marked more selectively with them."""
        with self._lock:
            rs, ctx, table = self._latest, self._ctx, self.marked
            if table is None or rs is None or ctx is None or ctx.closed or self._stopping.is_set():
                return
            stateful = conntrack_in_use(self.ns, rs)
            if stateful == self.stateful:
                return
            if self.collector.marking.switch_mode(ctx, table, scope=self.collector.filter, stateful=stateful,
                                                  log=self.log):
                self.stateful = stateful

    def change_scope(self) -> None:
        """Puts the collector's (new) scope into this namespace's marking table, if marked."""
        with self._lock:
            ctx, table = self._ctx, self.marked
            if table is None or ctx is None or ctx.closed or self._stopping.is_set():
                return
            self.collector.marking.change_scope(ctx, table, scope=self.collector.filter, stateful=self.stateful,
                                                log=self.log)

    def add_flows(self, elements: list[FlowElement]) -> None:
        """Adds known flows to the marking table's sets (on the loop thread: trace_flow).

        One JSON batch per _FLOW_BATCH flows; a batch the kernel refuses (a
        full set fails it whole) is tried flow by flow, and what still fails
        is logged at debug: a full set is a flood's normal state.
        """
        with self._lock:
            ctx, table = self._ctx, self.marked
            if table is None or ctx is None or ctx.closed or self._stopping.is_set():
                self.log.debug("nft.trace_flow_not_marked", flows=len(elements))
                return
            timeout = self.collector.flow_timeout
            try:
                for i in range(0, len(elements), _FLOW_BATCH):
                    batch = elements[i : i + _FLOW_BATCH]
                    if self._add_batch(ctx, table, batch, timeout) or len(batch) == 1:
                        continue
                    for element in batch:
                        self._add_batch(ctx, table, [element], timeout)
            finally:
                _release_cache(ctx)  # the batch cached our table: ~512 KiB a namespace otherwise

    def _add_batch(self, ctx: NftContext, table: str, batch: list[FlowElement], timeout: int) -> bool:
        try:
            ctx.cmd(add_flows_command(table, batch, timeout), Output.JSON)
            return True
        except (NftError, ValueError) as exc:  # ValueError: the context was closed meanwhile
            if len(batch) == 1:
                self.log.debug("nft.trace_flow_not_added", set=batch[0][0], error=getattr(exc, "stderr", str(exc)))
            return False

    # --- generations and snapshots -----------------------------------------------------

    def _current_generation(self) -> int | None:
        """The namespace's nftables generation id now, None if it cannot be read."""
        if self._ctx is None or self._ctx.closed:
            return None
        try:
            return self._ctx.generation()
        except (OSError, ValueError) as exc:
            self.log.warning("nft.generation_unreadable", error=str(exc))
            return None

    def _snapshot(self) -> None:
        """Lists the ruleset, keeping it as the snapshot of the generation it proves to be.

        The listing brackets itself with the generation id (NftContext.ruleset);
        a listing during a commit proves nothing and is tried again. When the
        socket has not yet announced the generation listed, a later NEWGEN
        asks again.
        """
        if self._ctx is None or self._ctx.closed:
            return
        try:
            self._list_snapshot(self._ctx)
            self._follow_conntrack_use()
        finally:
            _release_cache(self._ctx)

    def _list_snapshot(self, ctx: NftContext) -> None:
        for _ in range(3):
            try:
                rs = ctx.ruleset()
            except (NftError, OSError, ValueError) as exc:
                self.log.warning("nft.ruleset_list_failed", error=str(exc))
                continue  # a listing cut short by a concurrent change: try again
            with self._lock:
                self._latest, self._latest_at = rs, time.monotonic()
            if rs.generation is None:
                continue
            self._snapshots[rs.generation] = rs
            self._snapshots.move_to_end(rs.generation)
            while len(self._snapshots) > _SNAPSHOTS_KEPT:
                self._snapshots.popitem(last=False)
            if rs.generation == self._generation:
                self._want_snapshot = False
            return

    def ruleset(self) -> Ruleset | None:
        """The newest snapshot (for drops no trace covered)."""
        with self._lock:
            return self._latest

    # --- on the loop thread (the reader's callbacks) --------------------------------

    def _lost(self, exc: OSError) -> None:
        """The kernel dropped messages (ENOBUFS: we fell behind): start over from a clean state.

        Generation announcements may have been among them, so the generation
        is read afresh at the next drain and every verdict still waiting may
        belong to an unknown later generation. Half-seen traces are
        forgotten, and traces are ignored until the queue is empty: what is
        still queued is older than what was lost, so a packet whose last
        messages were lost would be attributed from its earlier ones.
        Warnings are rate-limited: under a flood this happens many times a
        second.
        """
        self._traces.clear()
        self._discarding = True
        self._generation = None  # generations announced in what was lost have no change record
        self._touched.clear()
        self._want_snapshot = True
        for p in self._pending:
            if p.crossed is None:
                p.crossed = -1
        self._socket_errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:
            self.log.warning(
                "nft.trace_socket_error",
                error=repr(exc),
                messages_lost=True,
                errors_since_last_warning=self._socket_errors,
                hint="lower the trace rate or narrow the filter",
            )
            self._last_error_log, self._socket_errors = now, 0

    def _drained(self, started: float) -> None:
        """The queue was empty at `started`: publish the verdicts that are due.

        A verdict is due once no generation can be announced after it that it
        might belong to (GENERATION_GRACE). Its rule comes from a snapshot the
        change log proves equal for that rule; when none is at hand, one
        listing is taken now, and a verdict that still has none after
        _MAX_PENDING goes out without text.
        """
        published: list[TraceVerdict] = []
        self._discarding = False
        if self._generation is None:
            self._generation = self._current_generation()
        now = time.monotonic()
        stale_latest = self.marked is not None and now - self._latest_at >= _LATEST_EVERY
        snapped = self._want_snapshot and (self.marked is None or stale_latest)
        if snapped:
            self._snapshot()
        due = started - GENERATION_GRACE
        ready = [p for p in self._pending if p.read_at <= due]
        if self._may_list_for_pending(now) and any(
            self._snapshot_for(p) is None for p in ready if p.handle is not None
        ):
            self._listed_for_pending = now
            self._snapshot()
        keep: list[_Pending] = []
        for p in self._pending:
            if p.read_at > due:
                keep.append(p)
            elif p.handle is None or self._snapshot_for(p) is not None or now - p.read_at >= _MAX_PENDING:
                published.append(self._resolve(p))
            else:
                keep.append(p)
        self._pending = keep
        waiting = [p.read_at for p in keep]
        with self._lock:
            self._drains.append(started)
            # Nothing waits: everything read by `started` is out. Else up to the first that waits.
            self._resolved_upto = max(self._resolved_upto, min(waiting) - 1e-6 if waiting else started)
        unmarked = snapped and self.marked is None and not self._want_snapshot
        if unmarked:
            self._mark_if_needed()  # base chains may have appeared
        for v in published:
            self.collector._publish(v)
        self.collector._notify()  # waiters judge by drains too (all_published_before)

    def _until_due(self) -> float:
        """Seconds until a waiting verdict is due: the reader drains then even without data."""
        if not self._pending:
            return 1.0
        first = min(p.read_at for p in self._pending) + GENERATION_GRACE
        return max(0.0, min(first, time.monotonic() + _LIST_EVERY) - time.monotonic())

    def _may_list_for_pending(self, now: float) -> bool:
        """A listing for waiting verdicts helps only when a generation was announced since the
        newest snapshot, and costs milliseconds: at most _LIST_EVERY apart."""
        newest = next(reversed(self._snapshots), None)
        announced_later = self._generation is not None and (newest is None or self._generation > newest)
        return announced_later and now - self._listed_for_pending >= _LIST_EVERY

    def all_published_before(self, t: float) -> bool:
        """Whether every drop verdict the kernel emitted before monotonic time `t` is published.

        A receive that found the queue empty at S >= t proves everything
        emitted before t was read by S; it is published once the resolution
        horizon has passed S.
        """
        with self._lock:
            for s in self._drains:
                if s >= t:
                    return self._resolved_upto >= s
            return False

    def _handle(self, mtype: int, msg: bytes) -> None:
        if mtype >> 8 != NFNL_SUBSYS_NFTABLES:
            return
        sub = mtype & 0xFF
        if sub == nftsocket.NFT_MSG_TRACE:
            if not self._discarding:
                self._on_trace(parse_trace_message(msg))
        elif sub == nftsocket.NFT_MSG_NEWGEN:
            self._new_generation(generation_of(msg))
        else:
            change = change_of(sub, msg)
            if change is not None:
                self._touched.add(change)

    def _new_generation(self, gen: int | None) -> None:
        if gen is None or (self._generation is not None and gen <= self._generation):
            return
        for p in self._pending:
            if p.crossed is None:
                p.crossed = gen
        if self._generation is not None and gen == self._generation + 1:
            self._changes[gen] = frozenset(self._touched)
            while len(self._changes) > _CHANGES_KEPT:
                self._changes.popitem(last=False)
        self._touched = set()
        self._generation = gen
        self._want_snapshot = True

    # --- traces ------------------------------------------------------------------------

    def _trace_state(self, trace_id: int, now: float) -> _TraceState:
        state = self._traces.get(trace_id)
        if state is None:
            state = self._traces[trace_id] = _TraceState(updated=now)
        else:
            self._traces.move_to_end(trace_id)
        state.updated = now
        while self._traces:
            oldest = next(iter(self._traces.values()))
            if now - oldest.updated < _TRACE_STATE_TTL and len(self._traces) < 65536:
                break
            self._traces.popitem(last=False)
        return state

    def _on_trace(self, msg: TraceMessage) -> None:
        now = time.monotonic()
        get = msg.attrs.get
        trace_id = get("NFTA_TRACE_ID")
        table, chain = get("NFTA_TRACE_TABLE"), get("NFTA_TRACE_CHAIN")
        family = NFPROTO_FAMILIES.get(msg.family)
        if trace_id is None or table is None or chain is None or family is None:
            self.log.warning("nft.malformed_trace", trace_id=trace_id, table=table, chain=chain)
            return
        state = self._trace_state(trace_id, now)
        nh, th = get("NFTA_TRACE_NETWORK_HEADER"), get("NFTA_TRACE_TRANSPORT_HEADER")
        if nh is not None or th is not None:
            # The first message of each hook invocation carries the packet. A later IPv6
            # fragment has no transport offset: the kernel then sends no network header,
            # and the "transport" bytes are the start of the IPv6 header (packet.fingerprint
            # knows that form).
            nh, th = bytes(nh or b""), bytes(th or b"")
            if packet.fingerprint(nh, th) != packet.fingerprint(state.network_header, state.transport_header):
                state.path.clear()  # another packet reusing the id
            state.network_header, state.transport_header = nh, th
            state.iif, state.oif = get("NFTA_TRACE_IIF"), get("NFTA_TRACE_OIF")
            state.ct = {k: get(f"NFTA_TRACE_CT_{k.upper()}") for k in ("state", "direction", "status", "id")}
        state.mark = get("NFTA_TRACE_MARK")
        state.path.append((family, table, chain))
        del state.path[:-_MAX_TRACE_PATH]
        if table.startswith(MARK_TABLE):
            return
        ttype = get("NFTA_TRACE_TYPE")
        if ttype == NFT_TRACETYPE_POLICY:
            code = _verdict_code(get("NFTA_TRACE_POLICY"))
            handle = None
        elif ttype == NFT_TRACETYPE_RULE:
            code = _verdict_code(get("NFTA_TRACE_VERDICT"))
            handle = get("NFTA_TRACE_RULE_HANDLE")
        else:
            return
        if code != 0:  # only NF_DROP matters here; reject also ends in NF_DROP
            return
        self._pending.append(
            _Pending(
                trace_id=trace_id,
                family=family,
                table=table,
                chain=chain,
                handle=handle,
                nfproto=get("NFTA_TRACE_NFPROTO"),
                path=list(state.path),
                network_header=state.network_header,
                transport_header=state.transport_header,
                iif=state.iif,
                oif=state.oif,
                mark=state.mark,
                ct=dict(state.ct),
                read_at=now,
                queued_after=self._drains[-1] if self._drains else 0.0,
                generation=self._generation,
            )
        )

    @staticmethod
    def _touches(
        changes: frozenset[tuple[str, str, str, int | None]], family: str, table: str, handle: int | None
    ) -> bool:
        """Whether one commit's changes can have changed a rule's text or place
        (`handle` None: anything in the table)."""
        for kind, fam, tab, h in changes:
            if (fam, tab) == (family, table) and (handle is None or kind != "rule" or h == handle):
                return True
        return False

    def _unchanged_between(self, a: int, b: int, family: str, table: str, handle: int | None) -> bool:
        """Whether a rule (or a whole table) is the same in generations a and b, by the change log."""
        lo, hi = min(a, b), max(a, b)
        for gen in range(lo + 1, hi + 1):
            changes = self._changes.get(gen)
            if changes is None or self._touches(changes, family, table, handle):
                return False
        return True

    def _snapshot_for(self, p: _Pending) -> Ruleset | None:
        """A snapshot that certainly shows p's rule as it was when the packet met it.

        The generation the trace came in is known by the socket's order; a
        snapshot of another generation serves when no commit in between
        touched the rule, its chains or its table. A trace read just before a
        generation announcement (`crossed`) may belong to that generation:
        it is served only when that commit did not touch the rule either.
        """
        if p.generation is None:
            return None
        if p.crossed is not None:
            changes = self._changes.get(p.crossed) if p.crossed >= 0 else None
            if changes is None or self._touches(changes, p.family, p.table, p.handle):
                return None
        exact = self._snapshots.get(p.generation)
        if exact is not None:
            return exact
        for gen in reversed(self._snapshots):
            if self._unchanged_between(gen, p.generation, p.family, p.table, p.handle):
                return self._snapshots[gen]
        return None

    def _rule_of(self, p: _Pending) -> tuple[Ruleset | None, Rule | None]:
        """The snapshot to read p against, and its rule when that is certain."""
        rs = self._snapshot_for(p)
        if p.handle is None or rs is None:
            return rs, None
        rule = rs.rule(p.family, p.table, p.handle)
        if rule is None or rule.chain != p.chain:
            return rs, None
        return rs, rule

    def _resolve(self, p: _Pending) -> TraceVerdict:
        rs, rule = self._rule_of(p)
        if p.handle is not None and rule is None:
            self.log.info(
                "nft.rule_text_unknown", family=p.family, table=p.table, chain=p.chain, handle=p.handle,
                generation=p.generation, snapshot=rs is not None,
            )
        view = rs or self._latest
        base = self._base_chain(view, p.path, p.family, p.table, p.chain)
        backend = view.backend(p.family, p.table) if view else "nftables"
        iptables = None
        if backend == "iptables-nft" and rule is not None and rs is not None and rs.generation is not None:
            iptables = self._iptables_line(rs.generation, rs, rule)
        # The -S line is found by the rule's position in its chain, which is what
        # `iptables -L --line-numbers` counts (from 1): the nft handle is not that number.
        iptables_number = rule.position + 1 if iptables is not None and rule is not None else None
        lines = (self._iptables_cache.get((rs.generation, p.family, p.table))
                 if iptables is not None and rs is not None and rs.generation is not None else None)
        ct = p.ct
        return TraceVerdict(
            netns_inode=self.ns.inode,
            time=p.read_at,
            family=p.family,
            table=p.table,
            chain=p.chain,
            base_chain=base.name if base else None,
            hook=base.hook if base else None,
            handle=p.handle,
            text=rule.text if rule else None,
            # nft does not show iptables-nft's `-m comment`: take it from the -S line.
            comment=(rule.comment or (rule_comment(iptables) if iptables else None)) if rule else None,
            policy=p.handle is None,
            verdict="reject" if rule is not None and rule.reject else "drop",
            backend=backend,
            iptables=iptables,
            iptables_number=iptables_number,
            iptables_lines=lines,
            ct_state=CT_STATE_BITS.get(ct["state"]) if ct.get("state") is not None else None,
            ct_direction=CT_DIRECTIONS.get(ct["direction"]) if ct.get("direction") is not None else None,
            ct_status=_ct_status(ct),
            ct_id=ct.get("id"),
            nfproto=NFPROTO_PACKET_FAMILIES.get(p.nfproto) if p.nfproto is not None else None,
            iif=p.iif,
            oif=p.oif,
            mark=p.mark,
            trace_id=p.trace_id,
            fingerprint=packet.fingerprint(p.network_header, p.transport_header),
            queued_after=p.queued_after,
            generation=p.generation,
            flow=flow_of(p.network_header, p.transport_header),
        )

    @staticmethod
    def _base_chain(
        rs: Ruleset | None, path: list[tuple[str, str, str]], family: str, table: str, chain: str
    ) -> Chain | None:
        """The hooked chain the verdict was reached from.

        The trace shows the path: jumps and gotos are traced as rule verdicts
        in the calling chain, so the nearest earlier base chain of the same
        table is the entry point. Falls back to the ruleset's jump graph when
        that is unambiguous.
        """
        if rs is None:
            return None
        for fam, tab, name in reversed(path):
            if fam == family and tab == table:
                c = rs.chain(family, table, name)
                if c is not None and c.base:
                    return c
        candidates = rs.base_chains_reaching(family, table, chain)
        return candidates[0] if len(candidates) == 1 else None

    def _iptables_line(self, generation: int, rs: Ruleset | None, rule: Rule) -> str | None:
        """The `iptables -S` line of an iptables-nft rule, by its position in the chain.

        iptables is run with fixed words only: the tool, `-t` and a table name
        from IPTABLES_TABLES (the ruleset's backend check guarantees it), `-S`.
        No chain name reaches its argv, so a chain called `--modprobe=...` is
        just a line in its output. The listing is used only when the
        generation in force is the trace's before and after it, and only for
        a chain whose record count matches the snapshot's rules.
        """
        family, table = rule.family, rule.table
        if table not in IPTABLES_TABLES or family not in IPTABLES_FAMILIES or rs is None:
            return None
        key = (generation, family, table)
        if key not in self._iptables_cache:
            listing = self._list_iptables(generation, family, table)
            if listing is None:
                return None  # not kept: a later verdict may find the table quiet again
            self._iptables_cache[key] = listing
            while len(self._iptables_cache) > 4 * _SNAPSHOTS_KEPT:
                self._iptables_cache.popitem(last=False)
        chains = self._iptables_cache[key]
        chain = rs.chain(family, table, rule.chain)
        lines = chains.get(rule.chain) if chains is not None else None
        if lines is None or chain is None or len(lines) != len(chain.rules) or rule.position >= len(lines):
            return None
        return lines[rule.position]

    def _list_iptables(self, generation: int, family: str, table: str) -> dict[str, list[str]] | None:
        """`iptables -S` of a table, if it provably shows the table as it was in `generation`:
        the generation id is the same before and after it, and no commit since `generation`
        touched the table (by the change log)."""
        tool = IPTABLES_FAMILIES[family]
        now = self._current_generation()
        if now is None or not self._unchanged_between(generation, now, family, table, None):
            return None
        try:
            res = netns_mod.run_in(self.ns, [tool, "-t", table, "-S"], timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            self.log.warning("nft.iptables_list_failed", tool=tool, error=str(exc))
            return None
        if res.returncode != 0:
            self.log.warning("nft.iptables_list_failed", tool=tool, error=res.stderr.strip())
            return None
        if self._current_generation() != now:
            return None
        return split_iptables_rules(res.stdout)


class NftCollector:
    """Attributes netfilter drops to nftables / iptables-nft rules via nftrace.

    `rate` and `burst` bound how many packets per second and namespace are
    traced (one `limit` object per marking table, shared by its rules; each
    flow also has a budget of its own). `flow_timeout` is how long a flow
    given to `trace_flow` stays traced. `on_verdict` is called in
    the reader thread for every drop verdict, also those without packet
    headers, which wait_verdict cannot find. `marking` is the coordinator that
    adds and removes the marking tables and decides which namespaces get one
    (shared with the iptables-legacy collector, which then also gets
    namespaces marked that only have legacy tables); without one, the
    collector makes its own and works alone.

    Every namespace's trace socket is read by one event loop (tracer.loop):
    `loop` if given (its owner closes it), else one of the collector's own,
    made on first use and closed by stop(). Its thread, `nft-trace-loop`,
    is the "reader thread" above; no thread is started per namespace.
    """

    def __init__(
        self,
        filter: Scope,
        *,
        rate: int = 1000,
        burst: int | None = None,
        verdict_ttl: float = 5.0,
        on_verdict: Callable[[TraceVerdict], None] | None = None,
        marking: MarkingCoordinator | None = None,
        log: Any = None,
        loop: EventLoop | None = None,
        flow_timeout: int = FLOW_TIMEOUT,
    ) -> None:
        if rate < 1:
            raise ValueError(f"trace rate must be at least 1 packet/second, not {rate}")
        if type(flow_timeout) is not int or flow_timeout < 1:
            raise ValueError(f"flow timeout must be a whole number of seconds, at least 1, not {flow_timeout!r}")
        self.filter = filter
        self.rate = rate
        self.burst = burst if burst is not None else max(5, rate // 10)
        if self.burst < 1:
            raise ValueError(f"trace burst must be at least 1 packet, not {self.burst}")
        self.verdict_ttl = verdict_ttl
        self.on_verdict = on_verdict
        self.marking = marking if marking is not None else MarkingCoordinator()
        self.log = log or structlog.get_logger("tracer.nft")
        self._watches: dict[int, _NetnsWatch] = {}
        self._lock = threading.Lock()  # _watches
        self._update_lock = threading.Lock()  # one update_namespaces at a time
        self._cond = threading.Condition()  # _verdicts
        self._verdicts: OrderedDict[tuple[int, bytes], deque[TraceVerdict]] = OrderedDict()
        self._published = 0
        self._stopped = False
        self.flow_timeout = flow_timeout
        self._flows_lock = threading.Lock()  # _recent, _queued, _flush_scheduled
        self._recent: OrderedDict[tuple[int, FlowElement], float] = OrderedDict()  # -> monotonic "fresh until"
        self._queued: dict[int, list[FlowElement]] = {}
        self._flush_scheduled = False
        self.marking.attach_nft(self)
        self._loop = LoopSlot(loop, "nft-trace-loop", self.log)

    # --- lifecycle -------------------------------------------------------------------

    @property
    def loop(self) -> EventLoop:
        """The loop the trace sockets are read on (made on first use when none was given)."""
        return self._loop.get()

    def start(self, namespaces: Iterable[Netns]) -> None:
        """Starts watching namespaces (those the filter's `netns` selects)."""
        with self._update_lock:
            self._stopped = False
            self._update(namespaces)

    def update_namespaces(self, namespaces: Iterable[Netns]) -> None:
        """Watches new namespaces and drops the ones no longer listed (no error if gone).

        With a legacy collector at the coordinator, unmarked namespaces are
        checked again too: legacy tables announce no changes.
        Ignored after stop(), so a late namespace scan cannot re-add marking tables.
        """
        with self._update_lock:
            if not self._stopped:
                self._update(namespaces)

    def _update(self, namespaces: Iterable[Netns]) -> None:
        wanted = {ns.inode: ns for ns in namespaces if self.filter.matches_netns(ns.inode, ns.name)}
        with self._lock:
            gone = [w for inode, w in self._watches.items() if inode not in wanted]
            for w in gone:
                del self._watches[w.ns.inode]
            new = [ns for inode, ns in wanted.items() if inode not in self._watches]
        for w in gone:
            if netns_mod.exists(w.ns):
                w.log.info("nft.netns_unwatched", reason="not listed any more")
            else:
                w.log.warning("nft.netns_vanished", path=w.ns.path, action="watch stopped")
            w.stop()
        self._start_watches(new)
        if self.marking.legacy_attached:
            self._mark_unmarked(skip=new)

    def _start_watches(self, new: list[Netns]) -> None:
        """Sets up the new namespaces, several side by side (_SETUP_WORKERS), each watched
        from the moment its own set-up is done."""
        if len(new) <= 1:
            for ns in new:
                self._start_watch(ns)
            return
        workers = min(_SETUP_WORKERS, len(new))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nft-setup") as pool:
            for _ in pool.map(self._start_watch, new):
                pass  # re-raises what a set-up raised beyond the errors it reports itself

    def _start_watch(self, ns: Netns) -> None:
        watch = _NetnsWatch(ns, self)
        try:
            watch.start()
        except (OSError, NftError) as exc:
            self.log.warning("nft.netns_watch_failed", netns=ns.label, netns_inode=ns.inode, error=str(exc))
            return
        with self._lock:
            self._watches[ns.inode] = watch

    def change_scope(self, scope: Scope) -> None:
        """A new scope (ports, hosts, protocol, interface) for every marking table, each
        replaced in one atomic batch; which namespaces are watched does not change."""
        with self._update_lock:
            self.filter = dataclasses.replace(scope, netns=self.filter.netns)
            with self._lock:
                watches = list(self._watches.values())
            for w in watches:
                w.change_scope()

    def recheck_marking(self) -> None:
        """Marks the watched namespaces that should be marked by now and are not (the
        coordinator asks when legacy tables became worth tracing); ignored after stop()."""
        with self._update_lock:
            if not self._stopped:
                self._mark_unmarked(skip=())

    def _mark_unmarked(self, skip: Iterable[Netns]) -> None:
        """Asks each unmarked watch (but those just started, `skip`) to mark if it should."""
        skipped = set(skip)
        with self._lock:
            unmarked = [w for w in self._watches.values() if w.marked is None and w.ns not in skipped]
        for w in unmarked:
            w._mark_if_needed()

    def stop(self) -> None:
        """Removes marking tables, closes sockets, joins threads; safe to call twice."""
        with self._update_lock, self._lock:
            watches, self._watches = list(self._watches.values()), {}
            self._stopped = True
        for w in watches:
            try:
                w.stop()
            except Exception as exc:
                w.log.warning("nft.stop_failed", error=repr(exc))
        self._loop.release()  # its own loop's thread ends; a later start() makes another
        with self._flows_lock:
            self._recent.clear()
            self._queued.clear()
        with self._cond:
            self._cond.notify_all()

    def __enter__(self) -> NftCollector:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- flows to trace -----------------------------------------------------------------

    def trace_flow(self, netns_inode: int, flow: FlowKey) -> None:
        """Has the marking table of namespace `netns_inode` trace `flow`'s packets from now
        on, for `flow_timeout` seconds after the last call (within the per-flow budget).

        For flows seen dropped whose rule is not known: an established flow's
        packets are not traced otherwise. Never blocks and never raises: the
        flow is validated here (a bad one is refused, logged at debug) and
        added later on the netlink loop; a namespace not watched or not
        marked, or a full set, is logged at debug and ignored. A flow added
        less than half its timeout ago costs one dictionary lookup.
        """
        try:
            self._trace_flow(netns_inode, flow)
        except Exception as exc:  # the caller is the engine's hot path: nothing may escape
            self.log.debug("nft.trace_flow_failed", error=repr(exc))

    def _trace_flow(self, netns_inode: int, flow: FlowKey) -> None:
        try:
            if isinstance(netns_inode, bool) or not isinstance(netns_inode, int):
                raise ValueError(f"netns_inode must be an integer, not {netns_inode!r}")
            element = flow_element(flow)
        except ValueError as exc:
            self.log.debug("nft.trace_flow_refused", error=str(exc))
            return
        with self._lock:
            watched = netns_inode in self._watches
        if not watched:
            self.log.debug("nft.trace_flow_not_watched", netns_inode=netns_inode)
            return
        key = (netns_inode, element)
        now = time.monotonic()
        with self._flows_lock:
            fresh_until = self._recent.get(key)
            if fresh_until is not None and fresh_until > now:
                self._recent.move_to_end(key)
                return
            queue = self._queued.setdefault(netns_inode, [])
            if len(queue) >= _MAX_QUEUED_FLOWS:
                self.log.debug("nft.trace_flow_queue_full", netns_inode=netns_inode)
                return
            queue.append(element)
            # Re-added at half the timeout: on kernels that refresh an element's expiry, a
            # flow asked for again and again never drops out of the set.
            self._recent[key] = now + self.flow_timeout / 2
            self._recent.move_to_end(key)
            while len(self._recent) > _RECENT_FLOWS:
                self._recent.popitem(last=False)
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        if not self.loop.call_soon(self._add_queued_flows, name="nft-trace-flow"):
            with self._flows_lock:
                self._flush_scheduled = False

    def _add_queued_flows(self) -> None:
        """On the loop thread: hands the queued flows to their namespaces' watches."""
        with self._flows_lock:
            queued, self._queued = self._queued, {}
            self._flush_scheduled = False
        for inode, elements in queued.items():
            with self._lock:
                watch = self._watches.get(inode)
            if watch is None:
                self.log.debug("nft.trace_flow_netns_gone", netns_inode=inode, flows=len(elements))
                continue
            watch.add_flows(elements)

    # --- queries ---------------------------------------------------------------------

    @property
    def watched(self) -> dict[int, Netns]:
        with self._lock:
            return {inode: w.ns for inode, w in self._watches.items()}

    def marking_table(self, netns_inode: int) -> str | None:
        """Name of our marking table in a namespace, None if it is not marked."""
        with self._lock:
            w = self._watches.get(netns_inode)
        return w.marked if w else None

    def ruleset(self, netns_inode: int) -> Ruleset | None:
        """The namespace's current ruleset (for drops no trace covered)."""
        with self._lock:
            w = self._watches.get(netns_inode)
        return w.ruleset() if w else None

    def wait_verdict(
        self, netns_inode: int, fingerprint: bytes, timeout: float, *, dropped_at: float | None = None
    ) -> TraceVerdict | None:
        """The verdict for one dropped packet, waiting up to `timeout` seconds for its trace.

        The fingerprint (headers) finds candidates; the instance is told by
        time. `dropped_at` is the drop's kernel time (CLOCK_MONOTONIC
        seconds): its trace was emitted just before it, so a candidate read
        more than `MAX_TRACE_AGE` before the drop belongs to an earlier
        packet with the same headers (whose drop nobody claimed), and one
        queued after the drop belongs to a later one. Each verdict is given to
        one drop only. Without `dropped_at` (tests, tools) the oldest
        unclaimed candidate is taken. Returns early with None once every
        trace emitted before the drop has been read and none matched.
        """
        key = (netns_inode, fingerprint)
        deadline = time.monotonic() + timeout
        with self._lock:
            watch = self._watches.get(netns_inode)
        woken = False
        while True:
            with self._cond:
                v = self._claim(key, dropped_at)
                if v is not None:
                    return v
                now = time.monotonic()
                if now >= deadline or self._stopped or watch is None:
                    return None
                if dropped_at is not None and watch.all_published_before(dropped_at):
                    return None
                if woken:  # the reader notifies after every drain
                    self._cond.wait(deadline - now)
                    continue
            watch.wake()  # a drain after the drop proves what was emitted before it
            woken = True

    def _candidate(self, queue: deque[TraceVerdict], dropped_at: float | None) -> int | None:
        if dropped_at is None:
            return 0 if queue else None
        for i, v in enumerate(queue):
            if v.time < dropped_at - MAX_TRACE_AGE:
                continue  # an earlier packet's: its drop was never claimed
            if v.queued_after > dropped_at:
                return None  # this and the rest were emitted after the drop
            return i
        return None

    def _claim(self, key: tuple[int, bytes], dropped_at: float | None) -> TraceVerdict | None:
        """Takes the drop's verdict out of the queue (with the stale ones before it)."""
        queue = self._verdicts.get(key)
        if not queue:
            return None
        i = self._candidate(queue, dropped_at)
        if i is None:
            return None
        for _ in range(i):
            queue.popleft()
        v = queue.popleft()
        if not queue:
            del self._verdicts[key]
        return v

    def _notify(self) -> None:
        with self._cond:
            self._cond.notify_all()

    def _publish(self, verdict: TraceVerdict) -> None:
        if verdict.fingerprint is None:
            self.log.debug("nft.verdict_without_packet", table=verdict.table, chain=verdict.chain)
        self.log.debug(
            "nft.drop_verdict",
            netns_inode=verdict.netns_inode,
            table=verdict.table,
            chain=verdict.chain,
            handle=verdict.handle,
            policy=verdict.policy,
        )
        with self._cond:
            if verdict.fingerprint is not None:
                key = (verdict.netns_inode, verdict.fingerprint)
                self._verdicts.setdefault(key, deque()).append(verdict)
                self._verdicts.move_to_end(key)
                self._published += 1
            if self._published >= 1024 or len(self._verdicts) > _MAX_VERDICT_KEYS:
                self._expire(verdict.time)
            self._cond.notify_all()
        if self.on_verdict is not None:
            try:
                self.on_verdict(verdict)
            except Exception as exc:
                self.log.warning("nft.on_verdict_failed", error=repr(exc))

    def _expire(self, now: float) -> None:
        """Forgets verdicts no drop claimed within verdict_ttl (their drops were filtered or lost)."""
        self._published = 0
        for key in list(self._verdicts):
            queue = self._verdicts[key]
            while queue and now - queue[0].time > self.verdict_ttl:
                queue.popleft()
            if not queue:
                del self._verdicts[key]
        while len(self._verdicts) > _MAX_VERDICT_KEYS:
            self._verdicts.popitem(last=False)
