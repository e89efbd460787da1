"""Which iptables-legacy rule or chain policy dropped a packet.

Why this works without kprobes or fentry: ip_tables and ip6_tables trace
every packet whose `skb->nf_trace` bit is set. The nftables collector's
marking table sets that bit (`meta nftrace set 1`) at priority -350, before
any legacy table, and `ipt_do_table` then calls `nf_log_trace()` for each
rule the packet matches, with a prefix such as `TRACE: filter:INPUT:rule:3 `
(or `:policy:N` / `:return:N`). `nf_log_trace()` hands that to whatever
logger is bound for the protocol family in that namespace
(`/proc/sys/net/netfilter/nf_log/2` for IPv4, `/10` for IPv6); we bind
`nfnetlink_log` there and listen on its group 0, which is where the trace's
default logging parameters send it, with the packet copied from its network
header. The last TRACE message of a dropped packet names table, chain and
rule number; `iptables-legacy-save` in the namespace turns that into the rule.

Several tracers at once: only one socket can bind group 0 in a namespace,
so the one that has it (the holder) relays every message it reads to the
others over a unix socket under /run/tracer, with its drain and loss
markers, and they read them as if from their own socket
(`legacy_relay`). When the holder stops, one of them binds group 0 and
serves the rest. A group held by some other program is named in the
warning (pid and command), and retried on every poll.

The nf_log binding is host state, so it is journalled under /run/tracer
before it is changed and put back on stop, but only by the last running
tracer that uses it; a tracer that starts after a crash puts back what the
crashed one left (tracer.netfilter.marking, whose coordinator also decides
with the nftables collector which namespaces are marked). Legacy rules are
only ever read (tracer.netfilter.xtables): the listing tool runs in the
namespace with no name in its argv, and what it prints is checked against
the kernel's own chain layout.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import subprocess
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import structlog
from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, nla
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_ULOG, nfgen_msg

from tracer import netns as netns_mod
from tracer.collectors.xtrace_relay import (
    RelayClient,
    RelayServer,
    check_state_dir,
    cleanup_stale_sockets,
    group_holder,
    netns_cookie,
    printable,
    relay_path,
    remove_if_stale,
)
from tracer.config import Scope
from tracer.event import packet
from tracer.loop import EventLoop, LoopSlot
from tracer.netfilter.constants import IPTABLES_CHAINS, NF_INET_HOOKS
from tracer.netfilter.marking import STATE_DIR, MarkingCoordinator
from tracer.netfilter.xtables import (
    FAMILIES,
    PF_FAMILIES,
    TABLE_ORDER,
    TableLayout,
    XtFamily,
    XtTable,
    loaded_tables,
    parse_save,
    rule_comment,
    table_layout,
)
from tracer.netns import Netns
from tracer.nlmsg import (
    NFGEN_ATTRS,
    NLMSG_ERROR,
    NetlinkReader,
    attributes,
    netfilter_socket,
    nfgen_family,
    split_messages,
)

# --- kernel constants (uapi/linux/netfilter/nfnetlink_log.h, netfilter.h) ---------

NFULNL_MSG_PACKET = 0
NFULNL_MSG_CONFIG = 1
NFULNL_CFG_CMD_BIND = 1
NFULNL_COPY_PACKET = 2

#: nf_log_trace() logs with the nfnetlink_log defaults: group 0, whole packet, flush at once.
TRACE_GROUP = 0
#: Enough for an IPv4 header with options or IPv6 with extension headers, plus ports.
COPY_RANGE = 256
TRACE_PREFIX = "TRACE: "
_TRACE_STATE_TTL = 5.0
_MAX_TRACES = 65536
_PACKET_TYPE = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_PACKET
_KERNEL_PORT_ID = 0  # the sender of every message we want; anyone else's is ignored
#: Binding group 0 or subscribing to its holder: tries, and the pause between them.
_CONNECT_ATTEMPTS = 3
_CONNECT_PAUSE = 0.1
#: After a holder left: how long, and how often, to retry before the normal poll takes over.
_FAST_RETRY_WINDOW = 5.0
_FAST_RETRY_INTERVAL = 0.2


# --- nfnetlink_log messages -----------------------------------------------------------


class nfulnl_packet_msg(nfgen_msg):
    """NFULNL_MSG_PACKET, which pyroute2 0.9.7 does not decode.

    Attribute order is `enum nfulnl_attr_type`; the kernel leaves out what
    it does not know (a mark of 0, interfaces of a local packet). The
    reader uses `parse_packet_message` for speed; this is the full layout,
    for tools and for checking that parser.
    """

    prefix = "NFULA_"
    nla_map = (
        ("NFULA_UNSPEC", "none"),
        ("NFULA_PACKET_HDR", "packet_hdr"),
        ("NFULA_MARK", "be32"),
        ("NFULA_TIMESTAMP", "hex"),
        ("NFULA_IFINDEX_INDEV", "be32"),
        ("NFULA_IFINDEX_OUTDEV", "be32"),
        ("NFULA_IFINDEX_PHYSINDEV", "be32"),
        ("NFULA_IFINDEX_PHYSOUTDEV", "be32"),
        ("NFULA_HWADDR", "hex"),
        ("NFULA_PAYLOAD", "cdata"),
        ("NFULA_PREFIX", "asciiz"),
        ("NFULA_UID", "be32"),
        ("NFULA_SEQ", "be32"),
        ("NFULA_SEQ_GLOBAL", "be32"),
        ("NFULA_GID", "be32"),
        ("NFULA_HWTYPE", "be16"),
        ("NFULA_HWHEADER", "hex"),
        ("NFULA_HWLEN", "be16"),
        ("NFULA_CT", "hex"),
        ("NFULA_CT_INFO", "be32"),
        ("NFULA_VLAN", "hex"),
        ("NFULA_L2HDR", "hex"),
    )

    class packet_hdr(nla):
        """struct nfulnl_msg_packet_hdr: the hook number is what we need."""

        fields = (("hw_protocol", ">H"), ("hook", "B"), ("_pad", "B"))


class nfulnl_config_msg(nfgen_msg):
    """NFULNL_MSG_CONFIG: binds a group and sets how much of each packet is copied."""

    prefix = "NFULA_CFG_"
    nla_map = (
        ("NFULA_CFG_UNSPEC", "none"),
        ("NFULA_CFG_CMD", "uint8"),  # struct nfulnl_msg_config_cmd
        ("NFULA_CFG_MODE", "mode"),
        ("NFULA_CFG_NLBUFSIZ", "be32"),
        ("NFULA_CFG_TIMEOUT", "be32"),
        ("NFULA_CFG_QTHRESH", "be32"),
        ("NFULA_CFG_FLAGS", "be16"),
    )

    class mode(nla):
        """struct nfulnl_msg_config_mode (packed)."""

        fields = (("copy_range", ">I"), ("copy_mode", "B"), ("_pad", "B"))


_NFULA_PACKET_HDR, _NFULA_PAYLOAD, _NFULA_PREFIX = 1, 9, 10


@dataclass(frozen=True, slots=True)
class LoggedPacket:
    """The parts of an NFULNL_MSG_PACKET a trace needs."""

    pf: int  # nfgen_family: NFPROTO_IPV4 / NFPROTO_IPV6
    hook: int | None
    prefix: str
    payload: bytes


def parse_packet_message(msg: bytes) -> LoggedPacket:
    """Reads hook, prefix and payload of one NFULNL_MSG_PACKET (netlink header included).

    Same layout as `nfulnl_packet_msg`, read by hand: pyroute2 takes about
    70 us per message, and every marked packet makes one message per rule
    it matches in every legacy table, so the reader must keep up with
    thousands per second. Never raises: what is missing or truncated is
    left at None / "" / b"".
    """
    hook: int | None = None
    prefix, payload = "", b""
    for atype, start, end in attributes(msg, NFGEN_ATTRS):
        if atype == _NFULA_PACKET_HDR and end - start >= 3:
            hook = msg[start + 2]  # struct nfulnl_msg_packet_hdr: __be16 hw_protocol, __u8 hook
        elif atype == _NFULA_PREFIX:
            prefix = msg[start:end].split(b"\0", 1)[0].decode(errors="replace")
        elif atype == _NFULA_PAYLOAD:
            payload = msg[start:end]
    return LoggedPacket(pf=nfgen_family(msg), hook=hook, prefix=prefix, payload=payload)


def config_message(seq: int, attrs: list[tuple[str, Any]], group: int = TRACE_GROUP) -> bytes:
    """An acknowledged NFULNL_MSG_CONFIG for `group` (res_id carries the group number)."""
    msg = nfulnl_config_msg()
    msg["header"]["type"] = (NFNL_SUBSYS_ULOG << 8) | NFULNL_MSG_CONFIG
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = seq
    msg["nfgen_family"] = 0  # AF_UNSPEC: the group serves every protocol family
    msg["version"] = 0
    msg["res_id"] = group
    msg["attrs"] = attrs
    msg.encode()
    return bytes(msg.data)


# --- what one TRACE line says ---------------------------------------------------------


@dataclass(frozen=True)
class TracePoint:
    """One `TRACE: table:chain:kind:number` line: where the packet was in the ruleset."""

    table: str
    chain: str
    kind: str  # rule, return or policy
    number: int  # 1-based position in the chain; for policy/return one past the last rule


def parse_trace_prefix(prefix: str) -> TracePoint | None:
    """Parses the prefix ipt_do_table gives nf_log_trace(); None for anything else.

    Table names never contain a colon, chain names might: split the table
    off the front and kind and number off the back. Never raises: the
    number must be ASCII digits that fit a u32 (`str.isdigit` also takes
    "²", which `int` refuses), anything else is not a trace.
    """
    if not prefix.startswith(TRACE_PREFIX):
        return None
    table, sep, rest = prefix[len(TRACE_PREFIX) :].strip().partition(":")
    parts = rest.rsplit(":", 2)
    if not sep or len(parts) != 3 or parts[1] not in ("rule", "return", "policy"):
        return None
    if not (parts[2].isascii() and parts[2].isdigit() and len(parts[2]) <= 10):
        return None
    return TracePoint(table=table, chain=parts[0], kind=parts[1], number=int(parts[2]))


def payload_fingerprint(payload: bytes) -> bytes | None:
    """`packet.fingerprint` of a packet copied from its network header.

    Mirrors what the BPF side reads: no transport bytes for a non-first
    fragment or when fewer than four are there. Never raises; None for
    what is not an IPv4 or IPv6 packet.
    """
    if not payload:
        return None
    version = payload[0] >> 4
    if version == 4 and len(payload) >= 20:
        ihl = (payload[0] & 0x0F) * 4
        first = not struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        l4 = payload[ihl : ihl + 20] if first else b""
    elif version == 6 and len(payload) >= 40:
        _, off = packet.ipv6_transport_offset(payload[:40], payload[40:])
        l4 = payload[off : off + 20] if off is not None else b""
    else:
        return None
    return packet.fingerprint(payload[:40], l4 if len(l4) >= 4 else b"")


# --- verdicts -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LegacyVerdict:
    """The iptables-legacy rule or policy that dropped a packet, from its TRACE lines."""

    netns_inode: int
    time: float  # time.monotonic() when the TRACE message was read
    family: str  # ip or ip6
    table: str
    chain: str  # chain whose rule or policy decided (user chains included)
    base_chain: str | None  # the built-in chain of the hook it was reached from
    hook: str | None
    rule_number: int | None  # 1-based position in `chain`; None when the policy decided
    text: str | None  # the rule without its leading `-A CHAIN `: `-p tcp -m tcp --dport 443 -j DROP`
    iptables: str | None  # the whole line as `iptables -S` prints it: `-A INPUT -p tcp ...`
    comment: str | None
    policy: bool
    verdict: str  # drop or reject
    fingerprint: bytes


@dataclass(frozen=True)
class _Trace:
    """The latest TRACE line seen for one packet."""

    family: str
    point: TracePoint
    hook: str | None
    time: float


# --- one namespace ------------------------------------------------------------------------------


class GroupBusy(OSError):
    """Group 0 is bound by another socket and nobody relays it to us; says who has it."""


class _TraceSocket:
    """The TRACE messages of one namespace and what they say, read from group 0 or relayed.

    Fed one of two ways, into one state: as the holder, by a NetlinkReader on
    our own group-0 socket, with a RelayServer passing every message, drain
    and loss on to other tracers; as a subscriber, by a RelayClient on the
    holder's socket (see legacy_relay). Either way the same `_handle`,
    `_drained` and `_lost` run, so `sync()` and `last_trace()` mean the same.

    Synchronising with the kernel needs no round trip: nfnetlink_log queues
    each TRACE message on the socket before ipt_do_table returns, so before
    the packet is freed. A receive that finds the queue empty at time t
    therefore proves every message logged before t has been read (or was
    lost, which the kernel reports). `sync()` waits for such a drain; a
    subscriber gets the holder's drains as markers, in order with the
    messages, and CLOCK_MONOTONIC is the same clock in every process.
    """

    def __init__(self, owner: _LegacyNetns) -> None:
        self.owner = owner
        self.log = owner.log
        self.role: str | None = None  # holder, subscriber, or None while detached
        self.holder_pid: int | None = None
        self._reader: NetlinkReader | None = None
        self._relay: RelayServer | None = None
        self._client: RelayClient | None = None
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._drained_at = 0.0  # monotonic time before a receive that found the queue empty
        self._discarding = False  # messages were lost: ignore traces until the queue is empty
        self._traces: OrderedDict[bytes, _Trace] = OrderedDict()
        self._errors = 0
        self._last_error_log = 0.0

    @property
    def attached(self) -> bool:
        return self.role is not None

    # --- attaching to a source --------------------------------------------------------------

    def connect(self) -> str:
        """Binds group 0, else subscribes to the tracer that has it; returns the role.

        A holder that just stopped may be replaced by another subscriber a
        moment later, so both are tried a few times before giving up with
        GroupBusy, which names the process holding the group.
        """
        self._detach()
        if self._stopping.is_set():
            raise OSError(errno.ESHUTDOWN, "stopping")
        why = ""
        for attempt in range(_CONNECT_ATTEMPTS):
            if attempt:
                time.sleep(_CONNECT_PAUSE)
            sock = netfilter_socket(self.owner.ns)
            cookie = netns_cookie(sock)
            try:
                self._bind_group(sock)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EPERM:
                    raise
            else:
                try:
                    self._start_holder(sock, cookie)
                except BaseException:
                    sock.close()
                    raise
                return "holder"
            try:
                self._subscribe(cookie)
                return "subscriber"
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                why = f"no tracer relays it ({exc.strerror or exc})"
                if isinstance(exc, ConnectionRefusedError):  # a killed holder's file
                    path = relay_path(self.owner.collector.state_dir, self.owner.ns.inode)
                    remove_if_stale(self.owner.collector.state_dir, path, self.log)
            except OSError as exc:
                why = f"its relay failed: {exc}"
                break
        raise GroupBusy(errno.EPERM, self._busy_message(why))

    def _busy_message(self, why: str) -> str:
        ns = self.owner.ns
        try:
            holder = group_holder(ns, TRACE_GROUP)
        except OSError as exc:
            holder, why = None, f"{why}; holder unknown: {exc}"
        if holder is None:
            where = f"nfnetlink_log group {TRACE_GROUP} in netns {printable(ns.label)}"
            return f"{where}: {os.strerror(errno.EPERM)}; {why}"
        return f"{holder.describe(ns.label)}; {why}"

    def _bind_group(self, sock: socket.socket) -> None:
        """Binds group 0 on `sock`; OSError(EPERM) when another socket has it."""
        sock.send(
            config_message(
                1,
                [
                    ("NFULA_CFG_CMD", NFULNL_CFG_CMD_BIND),
                    ("NFULA_CFG_MODE", {"copy_range": COPY_RANGE, "copy_mode": NFULNL_COPY_PACKET, "_pad": 0}),
                    ("NFULA_CFG_QTHRESH", 1),
                ],
            )
        )
        self._await_ack(sock, 1)

    @staticmethod
    def _await_ack(sock: socket.socket, seq: int) -> None:
        sock.settimeout(2.0)
        try:
            while True:
                data, sender = sock.recvfrom(65536)
                if sender[0] != _KERNEL_PORT_ID:
                    continue  # only the kernel acknowledges
                for mtype, mseq, msg in split_messages(data):
                    if mtype == NLMSG_ERROR and mseq == seq and len(msg) >= 20:
                        code = struct.unpack_from("=i", msg, 16)[0]
                        if code:
                            raise OSError(-code, f"nfnetlink_log group {TRACE_GROUP}: {os.strerror(-code)}")
                        return
        finally:
            sock.settimeout(None)

    def _start_holder(self, sock: socket.socket, cookie: int) -> None:
        """Reads group 0 ourselves and serves it to other tracers (without a relay if that fails)."""
        ns = self.owner.ns
        server = RelayServer(
            state_dir=self.owner.collector.state_dir,
            netns_inode=ns.inode,
            cookie=cookie,
            wake_source=self._wake_reader,
            log=self.log,
            loop=self.owner.collector.loop,
        )
        relay: RelayServer | None = server
        try:
            server.start()
        except OSError as exc:
            relay = None
            self.log.warning(
                "legacy.relay_unavailable",
                error=str(exc),
                consequence="other tracers watching this namespace get no legacy rule text",
            )
        reader = NetlinkReader(
            sock,
            name=f"legacy-trace-{ns.inode}",
            on_message=self._group_message,
            on_lost=self._group_lost,
            on_drained=self._group_drained,
            log=self.log,
            event_prefix="legacy",
            loop=self.owner.collector.loop,
        )
        with self._cond:
            self._reader, self._relay = reader, relay
            self.role, self.holder_pid = "holder", os.getpid()
            self._discarding = False  # a new stream: everything in it comes after what we forgot
        reader.start()

    def _subscribe(self, cookie: int) -> None:
        ns = self.owner.ns
        client = RelayClient(
            relay_path(self.owner.collector.state_dir, ns.inode),
            netns_inode=ns.inode,
            cookie=cookie,
            on_message=self._handle,
            on_drained=self._drained,
            on_lost=lambda reason: self._lost(OSError(errno.ENOBUFS, f"relayed: {reason}")),
            on_closed=lambda reason: self._source_closed(client, reason),
            log=self.log,
            loop=self.owner.collector.loop,
        )
        check_state_dir(self.owner.collector.state_dir)
        with self._cond:
            self._client = client
            self.role, self.holder_pid = "subscriber", None
            self._discarding = False  # a new stream: everything in it comes after what we forgot
        try:
            pid = client.connect()
        except BaseException:
            with self._cond:
                self._client, self.role = None, None
            client.close()
            raise
        self.holder_pid = pid

    def _source_closed(self, client: RelayClient, reason: str) -> None:
        """The holder went away (on the loop thread): forget what we have, let the owner reconnect."""
        with self._cond:
            if self._client is not client or self._stopping.is_set():
                return
            self.role = None
            self._traces.clear()
            self._discarding = True
            self._cond.notify_all()
        self.log.info("legacy.relay_holder_gone", holder_pid=client.holder_pid, reason=reason)
        self.owner.source_lost()

    def _detach(self) -> None:
        """Closes whatever fed us before (a subscriber reconnecting after its holder left)."""
        with self._cond:
            reader, relay, client = self._reader, self._relay, self._client
            self._reader = self._relay = self._client = None
            self.role = None
            self._traces.clear()
            self._cond.notify_all()
        if reader is not None:
            reader.close()  # group 0 is free once its socket is closed...
        if relay is not None:
            relay.close()  # ...so subscribers that now see EOF can bind it
        if client is not None:
            client.close()

    def close(self) -> None:
        """Stops reading; as the holder, frees group 0 (the kernel destroys the instance) and
        then closes the relay, whose subscribers take over."""
        self._stopping.set()
        self._detach()

    # --- queries (caller threads) ---------------------------------------------------------

    def sync(self, since: float, timeout: float) -> bool:
        """Waits until every TRACE message logged before `since` has been read."""
        deadline = time.monotonic() + timeout
        with self._cond:
            if self._drained_at >= since:
                return True
            if self.role is None:
                return False
            self._wake_source()
            while self._drained_at < since:
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set() or self.role is None:
                    return False
                self._cond.wait(left)
            return True

    def _wake_source(self) -> None:
        if self._reader is not None:
            self._reader.wake()
        elif self._client is not None:
            self._client.wake()

    def _wake_reader(self) -> None:
        reader = self._reader
        if reader is not None:
            reader.wake()

    def last_trace(self, fingerprint: bytes) -> _Trace | None:
        with self._cond:
            return self._traces.get(fingerprint)

    # --- our own group-0 socket (loop thread) ---------------------------------------------------

    def _group_message(self, mtype: int, msg: bytes) -> None:
        if mtype != _PACKET_TYPE:
            return
        relay = self._relay
        if relay is not None:
            relay.message(msg)
        self._handle(mtype, msg)

    def _group_drained(self, started: float) -> None:
        relay = self._relay
        if relay is not None:
            relay.drained(started)
        self._drained(started)

    def _group_lost(self, exc: OSError) -> None:
        relay = self._relay
        if relay is not None:
            relay.lost(str(exc))
        self._lost(exc)

    # --- either source ---------------------------------------------------------------------

    def _drained(self, started: float) -> None:
        with self._cond:
            self._drained_at = max(self._drained_at, started)
            self._discarding = False
            self._cond.notify_all()

    def _lost(self, exc: OSError) -> None:
        """Messages were dropped: forget traces and ignore the rest of the backlog.

        The lost messages are newer than everything read so far and than
        what is still queued, so any packet whose last message was lost has
        its earlier ones among those. Attributing it from them would be
        wrong; leaving it out is not. The kernel reports no further loss
        until the queue has been empty once, so discarding lasts until then.
        A relay says LOST at the place in its stream where it dropped
        messages, and its next DRAINED marker ends the discarding the same way.
        """
        with self._cond:
            self._traces.clear()
            self._discarding = True
        self._errors += 1
        now = time.monotonic()
        if now - self._last_error_log >= 5.0:
            self.log.warning(
                "legacy.trace_messages_lost",
                error=str(exc),
                role=self.role,
                errors_since_last_warning=self._errors,
                hint="lower the trace rate or narrow the filter",
            )
            self._last_error_log, self._errors = now, 0

    def _handle(self, mtype: int, msg: bytes) -> None:
        if mtype != _PACKET_TYPE or self._discarding:
            return
        logged = parse_packet_message(msg)
        point = parse_trace_prefix(logged.prefix)
        fam = PF_FAMILIES.get(logged.pf)
        if point is None or fam is None:
            return  # an NFLOG rule of the user's logging to group 0, or conntrack's invalid log
        fp = payload_fingerprint(logged.payload)
        if fp is None:
            return
        hook_no = logged.hook
        hook = NF_INET_HOOKS[hook_no] if hook_no is not None and 0 <= hook_no < len(NF_INET_HOOKS) else None
        now = time.monotonic()
        with self._cond:
            if self._discarding:
                return
            self._traces.pop(fp, None)
            self._traces[fp] = _Trace(fam.name, point, hook, now)
            while self._traces:
                oldest = next(iter(self._traces.values()))
                if now - oldest.time < _TRACE_STATE_TTL and len(self._traces) <= _MAX_TRACES:
                    break
                self._traces.popitem(last=False)


class _LegacyNetns:
    """Legacy tables, nf_log bindings and trace socket of one namespace."""

    def __init__(self, ns: Netns, collector: LegacyCollector) -> None:
        self.ns = ns
        self.collector = collector
        self.log = collector.log.bind(netns=ns.label, netns_inode=ns.inode)
        self.lock = threading.RLock()
        self.nft_marked = False  # the nftables side marks (or is about to mark) this namespace
        self.trace: _TraceSocket | None = None
        self.bound: dict[int, str] = {}  # pf -> logger that was bound before us
        self.trace_failed: str | None = None  # set when tracing can never work here (not retried)
        self.unavailable: str | None = None  # why the last attempt to attach failed (retried)
        self.retry_fast_until = 0.0  # monotonic: retry often until then (a holder just left)
        self.closed = False
        self._probe: dict[str, socket.socket] = {}
        self._cache: dict[str, tuple[Any, dict[str, XtTable]]] = {}

    # --- tables -----------------------------------------------------------------------------

    def tables(self, family: str) -> dict[str, XtTable]:
        """The namespace's legacy tables of a family, listed again only when they changed.

        The listing tool runs inside the namespace with no name of the
        namespace's in its argv (nsenter --net=PATH -- iptables-legacy-save);
        its output, hostile names and all, is checked against the kernel's
        own chain layout (parse_save).
        """
        fam = FAMILIES[family]
        names = loaded_tables(self.ns).get(family, ())
        if not names:
            return {}
        with self.lock:
            layouts = self._layouts(fam, names)
            generation = self._generation_of(layouts)
            cached = self._cache.get(family)
            if cached is not None and generation is not None and cached[0] == generation:
                return cached[1]
            try:
                res = netns_mod.run_in(self.ns, [fam.save], timeout=10, text=False)
            except subprocess.TimeoutExpired:
                self.log.warning("legacy.list_failed", tool=fam.save, error="timed out")
                return cached[1] if cached else {}
            if res.returncode != 0:
                error = printable(res.stderr.decode(errors="replace").strip())
                self.log.warning("legacy.list_failed", tool=fam.save, error=error)
                return cached[1] if cached else {}
            tables = parse_save(res.stdout.decode(errors="replace"), family, layouts)
            if generation is not None and self._generation_of(self._layouts(fam, names)) != generation:
                generation = None  # changed while listed: list again next time
            self._cache[family] = (generation, tables)
            return tables

    @staticmethod
    def _generation_of(layouts: dict[str, TableLayout] | None) -> tuple[tuple[str, bytes], ...] | None:
        return None if layouts is None else tuple((name, layout.digest) for name, layout in layouts.items())

    def _layouts(self, fam: XtFamily, names: tuple[str, ...]) -> dict[str, TableLayout] | None:
        try:
            sock = self._probe.get(fam.name)
            if sock is None:
                with netns_mod.entered(self.ns):
                    sock = socket.socket(fam.sock_family, socket.SOCK_RAW | socket.SOCK_CLOEXEC, socket.IPPROTO_RAW)
                self._probe[fam.name] = sock
            return {name: table_layout(sock, fam, name) for name in names}
        except OSError as exc:
            self.log.debug("legacy.generation_unavailable", error=str(exc))
            return None  # then every lookup lists again, unchecked

    def can_drop(self) -> bool:
        return any(t.can_drop for family in FAMILIES for t in self.tables(family).values())

    # --- tracing -------------------------------------------------------------------------------

    def ensure_tracing(self, force: bool) -> bool:
        """Reads TRACE messages and binds nfnetlink_log for every family with legacy tables,
        when they can drop something or `force` (the namespace is marked anyway).

        True if newly tracing (also after a lost holder was replaced). An
        attempt that fails because group 0 is taken is retried by the poll.
        """
        with self.lock:
            if self.closed or self.trace_failed is not None:
                return False
            loaded = loaded_tables(self.ns)
            if not loaded:
                return False
            if self.trace is None and not (force or self.can_drop()):
                return False
            fresh = self.trace is None or not self.trace.attached
            if fresh and not self._attach():
                return False
            assert self.trace is not None
            for family in loaded:
                pf = FAMILIES[family].pf
                if pf not in self.bound:
                    self._bind_pf(pf)
            if fresh and not self.bound:  # no family could be bound: the socket would hear nothing
                self.trace.close()
                self.trace = None
                self._give_up(OSError(errno.EPERM, "could not bind nfnetlink_log for any family"))
                return False
            if fresh:
                self.log.info(
                    "legacy.tracing",
                    families=sorted(loaded),
                    nf_log_bound=sorted(self.bound),
                    role=self.trace.role,
                    holder_pid=self.trace.holder_pid,
                )
            return fresh

    def _attach(self) -> bool:
        """Binds group 0 or subscribes to its holder; False (and says why, once) when neither works."""
        if self.trace is None:
            try:
                self.collector.journal.check_writable()
            except OSError as exc:
                self._give_up(exc)
                return False
            self.trace = _TraceSocket(self)
        try:
            role = self.trace.connect()
        except OSError as exc:
            self._unavailable(exc)
            if not self.bound:  # never traced here: leave nothing behind
                self.trace.close()
                self.trace = None
            return False
        if self.unavailable is not None:
            self.log.warning("legacy.trace_recovered", role=role, holder_pid=self.trace.holder_pid)
            self.unavailable = None
        self.retry_fast_until = 0.0
        return True

    def _unavailable(self, exc: OSError) -> None:
        """Says why there is no trace, when that changes; quiet while a holder is being replaced."""
        message = str(exc) if exc.strerror is None else exc.strerror
        if message == self.unavailable or time.monotonic() < self.retry_fast_until:
            self.log.debug("legacy.trace_still_unavailable", error=message)
            return
        self.unavailable = message
        self.log.warning(
            "legacy.trace_unavailable",
            error=message,
            consequence="iptables-legacy drops here get at most the table, from the rules",
            retry=f"every {self.collector.poll_interval:g} s",
            note="if nftables marks this namespace anyway, legacy TRACE lines go to its bound "
            "logger (the kernel log in the initial namespace)",
        )

    def source_lost(self) -> None:
        """Our holder left (called on the loop thread): retry soon and often for a while."""
        self.retry_fast_until = time.monotonic() + _FAST_RETRY_WINDOW
        self.collector.kick()

    def _give_up(self, exc: OSError) -> None:
        """Not retried: this namespace can never be traced by us (no journal, no binding)."""
        self.trace_failed = str(exc)
        self.log.warning(
            "legacy.trace_unavailable",
            error=str(exc),
            consequence="iptables-legacy drops here get at most the table, from the rules",
            note="if nftables marks this namespace anyway, legacy TRACE lines go to its bound "
            "logger (the kernel log in the initial namespace)",
        )

    def _bind_pf(self, pf: int) -> None:
        """Journal first, then bind (marking.BindingJournal.bind): a crash in between leaves nothing
        unrecorded."""
        try:
            self.bound[pf] = self.collector.journal.bind(self.ns, pf)
        except OSError as exc:
            self.log.warning("legacy.nf_log_bind_failed", pf=pf, error=str(exc))

    def wants_marking(self) -> bool:
        with self.lock:
            return bool(self.bound) and self.can_drop()

    def tracing(self) -> bool:
        trace = self.trace
        return trace is not None and trace.attached and bool(self.bound)

    def refresh(self) -> bool:
        """Periodic check: tables loaded or rules added since, or a lost holder. True if newly tracing."""
        if self.collector.trace_enabled:
            try:
                return self.ensure_tracing(force=self.nft_marked)
            except OSError as exc:
                self.log.debug("legacy.refresh_failed", error=str(exc))
        return False

    def close(self) -> None:
        """Puts every binding back (unless another tracer still needs it), then closes the
        trace socket and probes."""
        with self.lock:
            self.closed = True
            gone = not netns_mod.exists(self.ns)
            for pf, previous in list(self.bound.items()):
                try:
                    self.collector.journal.release(self.ns, pf, previous, gone=gone, log=self.log)
                except OSError as exc:
                    self.log.warning("legacy.nf_log_restore_failed", pf=pf, error=str(exc), journal_kept=True)
                del self.bound[pf]
            if self.trace is not None:
                self.trace.close()
                self.trace = None
            for sock in self._probe.values():
                sock.close()
            self._probe.clear()


# --- the collector --------------------------------------------------------------------------------


class LegacyCollector:
    """Attributes netfilter drops to iptables-legacy rules and policies.

    Works together with the nftables collector, which sets the trace bit,
    through a `MarkingCoordinator` given to both (without one, it makes its
    own and works alone). Namespaces are traced when the watch covers them,
    legacy tables are loaded there, and those tables can drop a packet (or
    nftables marks the namespace anyway). When a namespace becomes traced
    after start, the coordinator hears of it (outside any lock here) and has
    nftables check its marking again. Its journal records the nf_log
    bindings; `state_dir`, if given, must be the coordinator's.

    Trace sockets and relay connections of every namespace are read by one
    event loop (tracer.loop): `loop` if given (its owner closes it), else
    one of the collector's own, `legacy-trace-loop`, made on first use and
    closed by stop(). The one other thread is `legacy-poll`, which looks
    for new legacy tables: listing them runs iptables-legacy-save, too slow
    for the loop.
    """

    def __init__(
        self,
        filter: Scope,
        *,
        log: Any = None,
        trace: bool = True,
        poll_interval: float = 2.0,
        state_dir: Path | None = None,
        marking: MarkingCoordinator | None = None,
        loop: EventLoop | None = None,
    ) -> None:
        if marking is None:
            marking = MarkingCoordinator(state_dir=state_dir or STATE_DIR)
        elif state_dir is not None and state_dir != marking.state_dir:
            raise ValueError(f"state_dir {state_dir} is not the marking coordinator's ({marking.state_dir})")
        self.filter = filter
        self.log = log or structlog.get_logger("tracer.iptables")
        self.trace_enabled = trace
        self.poll_interval = poll_interval
        self.marking = marking
        self.state_dir = marking.state_dir
        self.journal = marking.journal
        self._namespaces: dict[int, _LegacyNetns] = {}
        self._lock = threading.Lock()  # _namespaces
        self._update_lock = threading.Lock()
        self._stop = threading.Event()
        self._kick = threading.Event()  # wakes the poller early (a holder left)
        self._poller: threading.Thread | None = None
        self._stopped = False
        self._loop = LoopSlot(loop, "legacy-trace-loop", self.log)
        marking.attach_legacy(self)

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def loop(self) -> EventLoop:
        """The loop trace sockets and relays are read on (made on first use when none was given)."""
        return self._loop.get()

    def start(self, namespaces: Iterable[Netns]) -> None:
        """Undoes what a crashed tracer left, then starts on the namespaces the filter covers."""
        if self.trace_enabled:
            self.marking.restore_stale_bindings(self.log)
            cleanup_stale_sockets(self.state_dir, self.log)
        with self._update_lock:
            with self._lock:
                self._stopped = False
            self._stop.clear()
            ready = self._update(namespaces)
        if ready:
            self._notify_ready()
        if self.trace_enabled and self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="legacy-poll", daemon=True)
            self._poller.start()

    def update_namespaces(self, namespaces: Iterable[Netns]) -> None:
        """Adds new namespaces, restores and drops the ones no longer listed."""
        with self._update_lock:
            ready = False if self._stopped else self._update(namespaces)
        if ready:
            self._notify_ready()  # outside the lock: it calls back into the nftables collector

    def _update(self, namespaces: Iterable[Netns]) -> bool:
        """Returns whether a namespace became traced that nftables has not marked."""
        wanted = {ns.inode: ns for ns in namespaces if self.filter.matches_netns(ns.inode, ns.name)}
        with self._lock:
            gone = [n for inode, n in self._namespaces.items() if inode not in wanted]
            for n in gone:
                del self._namespaces[n.ns.inode]
            new = [_LegacyNetns(ns, self) for inode, ns in wanted.items() if inode not in self._namespaces]
            for n in new:
                self._namespaces[n.ns.inode] = n
        for n in gone:
            n.close()
        became_ready = [n.refresh() and not n.nft_marked for n in new]  # every one, no short cut
        return any(became_ready)

    def stop(self) -> None:
        """Restores every nf_log binding and closes sockets; safe to call twice."""
        with self._update_lock:
            self._stop.set()
            self._kick.set()
            with self._lock:
                self._stopped = True
                namespaces, self._namespaces = list(self._namespaces.values()), {}
        if self._poller is not None and self._poller is not threading.current_thread():
            self._poller.join(10)
        self._poller = None
        for n in namespaces:
            try:
                n.close()
            except Exception as exc:
                n.log.warning("legacy.stop_failed", error=repr(exc))
        self._loop.release()  # its own loop's thread ends; a later start() makes another
        if self.trace_enabled and namespaces:
            with contextlib.suppress(OSError):
                cleanup_stale_sockets(self.state_dir, self.log)

    def __enter__(self) -> LegacyCollector:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _poll(self) -> None:
        """Legacy iptables announces nothing: look for new tables and rules now and then.

        Also where a namespace whose group 0 was taken, or whose holder
        left, is attached again: every `poll_interval`, and every
        _FAST_RETRY_INTERVAL for a few seconds after a holder left.
        """
        while True:
            self._kick.wait(self._poll_wait())
            self._kick.clear()
            if self._stop.is_set():
                return
            with self._lock:
                namespaces = list(self._namespaces.values())
            ready = False
            for n in namespaces:
                if self._stop.is_set():
                    return
                ready |= n.refresh() and not n.nft_marked
            if ready:
                self._notify_ready()

    def _poll_wait(self) -> float:
        now = time.monotonic()
        with self._lock:
            hurry = any(n.retry_fast_until > now for n in self._namespaces.values())
        return min(self.poll_interval, _FAST_RETRY_INTERVAL) if hurry else self.poll_interval

    def kick(self) -> None:
        """Makes the poller look at every namespace now."""
        self._kick.set()

    def _notify_ready(self) -> None:
        self.marking.legacy_ready()

    def _get(self, inode: int) -> _LegacyNetns | None:
        with self._lock:
            return self._namespaces.get(inode)

    # --- what the marking coordinator asks, for the nftables collector -------------------------

    def wants_marking(self, ns: Netns) -> bool:
        """Whether to mark a namespace with no nftables base chains: we trace legacy tables
        there that can drop packets."""
        n = self._get(ns.inode)
        try:
            return n is not None and n.wants_marking()
        except OSError:
            return False

    def before_marking(self, ns: Netns) -> None:
        """Called just before nftables marks a namespace: bind nfnetlink_log there first,
        so no TRACE line of a marked packet reaches the kernel log."""
        if not self.trace_enabled or not self.filter.matches_netns(ns.inode, ns.name):
            return
        with self._lock:
            if self._stopped:
                return
            n = self._namespaces.get(ns.inode)
            if n is None:  # nftables saw the namespace before we did
                n = self._namespaces[ns.inode] = _LegacyNetns(ns, self)
        n.nft_marked = True
        try:
            n.ensure_tracing(force=True)
        except OSError as exc:
            n.log.warning("legacy.prepare_failed", error=str(exc))

    # --- queries ---------------------------------------------------------------------------------

    def tracing(self, netns_inode: int) -> bool:
        """Whether TRACE messages of this namespace are being read."""
        n = self._get(netns_inode)
        return n is not None and n.tracing()

    def wait_verdict(
        self, netns_inode: int, fingerprint: bytes, timeout: float, *, since: float | None = None
    ) -> LegacyVerdict | None:
        """The rule or policy that dropped a packet, or None when its trace does not show one.

        `since`: a time.monotonic() by which the packet had already been
        dropped (default: now); traces logged before it are waited for, at
        most `timeout` seconds.
        """
        n = self._get(netns_inode)
        trace = n.trace if n is not None else None
        if n is None or trace is None:
            return None
        if not trace.sync(time.monotonic() if since is None else since, timeout):
            # The reader is behind: what it has may not be the packet's last trace.
            n.log.debug("legacy.sync_timeout", timeout=timeout)
            return None
        last = trace.last_trace(fingerprint)
        if last is None:
            return None
        try:
            return self._resolve(n, last, fingerprint)
        except OSError as exc:
            n.log.warning("legacy.resolve_failed", error=str(exc))
            return None

    def _resolve(self, n: _LegacyNetns, last: _Trace, fingerprint: bytes) -> LegacyVerdict | None:
        point = last.point
        table = n.tables(last.family).get(point.table)
        if table is None:
            return None
        chain = table.chains.get(point.chain)
        if chain is None or not chain.trusted:
            return None
        base = IPTABLES_CHAINS.get(last.hook or "")
        common: dict[str, Any] = {
            "netns_inode": n.ns.inode,
            "time": last.time,
            "family": last.family,
            "table": point.table,
            "chain": point.chain,
            "base_chain": base,
            "hook": last.hook,
            "fingerprint": fingerprint,
        }
        if point.kind != "rule" and point.number > len(chain.rules):
            # The chain's end: its policy, or (user chain) the return to its caller.
            if point.kind == "return" or point.number != len(chain.rules) + 1 or chain.policy != "DROP":
                return None
            return LegacyVerdict(
                **common, rule_number=None, text=None, iptables=None, comment=None, policy=True, verdict="drop"
            )
        # A `policy`/`return` trace with a rule's number: the kernel traces an unconditional
        # rule with a plain verdict (`-A INPUT -j DROP`) as if it were the chain's end.
        line = table.rule(point.chain, point.number)
        verdict = table.verdict_of(line) if line is not None else None
        if line is None or verdict is None:
            # The rule list changed since, or the last traced rule let the packet go on
            # (something after it dropped the packet without a trace): no claim.
            n.log.debug("legacy.last_trace_not_a_drop", table=point.table, chain=point.chain, rule=point.number)
            return None
        return LegacyVerdict(
            **common,
            rule_number=point.number,
            text=line.split(" ", 2)[2] if line.count(" ") >= 2 else None,
            iptables=line,
            comment=rule_comment(line, table.spaced),
            policy=False,
            verdict=verdict,
        )

    def table(self, netns_inode: int, family: str, name: str) -> XtTable | None:
        """One legacy table of a watched namespace, as `tables` lists it (None: not there, or unknown)."""
        n = self._get(netns_inode)
        if n is None or family not in FAMILIES:
            return None
        try:
            return n.tables(family).get(name)
        except OSError as exc:
            n.log.warning("legacy.list_failed", error=str(exc))
            return None

    def table_candidates(self, netns_inode: int, hook: str, family: str) -> list[str]:
        """Legacy tables of the namespace whose chain for `hook` can drop a packet.

        The fallback when no trace is available: exactly one candidate names
        the table of a legacy drop. Chains reached by jump/goto count.
        """
        n = self._get(netns_inode)
        chain = IPTABLES_CHAINS.get(hook)
        if n is None or chain is None or family not in FAMILIES:
            return []
        try:
            tables = n.tables(family)
        except OSError as exc:
            n.log.warning("legacy.list_failed", error=str(exc))
            return []
        found = [t.name for t in tables.values() if t.can_drop_from(chain)]
        return sorted(found, key=lambda name: (TABLE_ORDER.index(name) if name in TABLE_ORDER else 99, name))

    @property
    def watched(self) -> dict[int, Netns]:
        with self._lock:
            return {inode: n.ns for inode, n in self._namespaces.items()}

