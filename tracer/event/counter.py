"""Counter events: a namespace's SNMP/netstat drop counter went up (`event.dataset: tracer.counter`).

Some drops never pass `kfree_skb`, so the BPF program never sees them: a
SYN-ACK with no route back is given up before any packet exists (only
`IpOutNoRoutes` and `TcpExtListenDrops` move), a SYN a full accept queue
turns away is *consumed*, an ICMP error TCP ignores as out of window is
consumed too. Others do pass `kfree_skb` but hide behind a filter or an
unhelpful reason. The kernel counts all of them in /proc/net/snmp,
/proc/net/netstat and /proc/net/snmp6 of the namespace;
tracer.collectors.counters polls those files and reports each rise of the
counters in `COUNTERS` as one `CounterEvent` (docs/counter-event.md).

Like the rest of tracer.event, this module imports nothing else from tracer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tracer.event.ecs import ECS_VERSION, info_event, iso_time, parse_iso_time
from tracer.event.sections import Doc, Namespace, Observer, this_observer
from tracer.event.text import printable

#: `event.dataset` and `event.action` of every counter event.
COUNTER_DATASET = "tracer.counter"
COUNTER_ACTION = "counter-increased"

#: The files, as /proc/net/<file> names them.
SNMP, NETSTAT, SNMP6 = "snmp", "netstat", "snmp6"


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """One kernel counter worth reporting: where it lives and what its rise means.

    `name` is the counter as people write it (nstat, netstat -s, kernel
    docs): the group and the kernel's field name joined, `IpOutNoRoutes`,
    `TcpExtListenDrops`, `Ip6InDiscards`. `field` is the column in the file
    (snmp, netstat) or the whole key (snmp6, whose keys carry the group).
    `cause` is the diagnosis cause (docs/drop-event.md, `diagnosis.cause`)
    its rise is evidence for, when there is one.
    """

    file: str
    group: str
    field: str
    meaning: str
    cause: str | None = None

    @property
    def name(self) -> str:
        return self.field if self.file == SNMP6 else self.group + self.field


def _specs(file: str, group: str, table: Mapping[str, str | tuple[str, str]]) -> dict[str, CounterSpec]:
    out = {}
    for fld, about in table.items():
        meaning, cause = (about, None) if isinstance(about, str) else about
        spec = CounterSpec(file, group, (group + fld) if file == SNMP6 else fld, meaning, cause)
        out[spec.name] = spec
    return out


_NO_ROUTE_BACK = "often a reply with no route back (masquerade missing or a wrong return route)"

#: The counters the collector reports, by name. Each meaning is one sentence: what the
#: counted packets are and what usually causes them (docs/counter-event.md lists them).
COUNTERS: dict[str, CounterSpec] = {
    **_specs(SNMP, "Ip", {
        "InHdrErrors": "received IPv4 packets with a bad header, or whose TTL ran out while being forwarded "
                       "(a routing loop, or a TTL too small for the path)",
        "InAddrErrors": (("received IPv4 packets for an address that is not local and may not be forwarded: "
                         "often net.ipv4.ip_forward=0 on a router, or a martian address"), "ip_forward_disabled"),
        "InUnknownProtos": "received IPv4 packets for a protocol nothing on this host handles",
        "InDiscards": "received IPv4 packets given up for local reasons, usually memory, not for an error in them",
        "OutDiscards": "outgoing IPv4 packets given up for local reasons (no memory, no neighbour entry, "
                       "a device that refused them)",
        "OutNoRoutes": ("IPv4 packets this namespace could not route out: " + _NO_ROUTE_BACK, "no_route"),
        "ReasmFails": "IPv4 fragments given up because their datagram could not be reassembled "
                      "(a fragment lost or dropped on the way, or a reassembly timeout)",
        "FragFails": "IPv4 packets too big for the next link that could not be fragmented (DF set): an ICMP "
                     "fragmentation-needed went back, and PMTU discovery breaks if it is dropped",
    }),
    **_specs(SNMP, "Icmp", {
        "InErrors": "received ICMP messages with an error in them (bad checksum, truncated)",
        "OutRateLimitGlobal": "ICMP errors not sent because of the global ICMP rate limit: the sender of a "
                              "dropped packet got no unreachable or fragmentation-needed",
        "OutRateLimitHost": "ICMP errors not sent because of the per-host ICMP rate limit "
                            "(net.ipv4.icmp_ratelimit): a peer got no unreachable or fragmentation-needed",
    }),
    **_specs(SNMP, "Tcp", {
        "InErrs": "TCP segments received with an error (bad checksum, bad header)",
    }),
    **_specs(SNMP, "Udp", {
        "NoPorts": ("UDP datagrams for a port nothing listens on (the sender got a port unreachable)",
                    "closed_port"),
        "InErrors": "received UDP datagrams dropped: full receive buffer, bad checksum or no memory",
        "RcvbufErrors": "UDP datagrams dropped because the socket's receive buffer was full: "
                        "the application reads too slowly or SO_RCVBUF is too small",
        "SndbufErrors": "UDP datagrams the application could not send: send buffer full or the device queue "
                        "refused them",
        "InCsumErrors": "received UDP datagrams with a bad checksum",
        "MemErrors": "UDP datagrams dropped because the host ran short of socket memory (net.ipv4.udp_mem)",
    }),
    **_specs(NETSTAT, "IpExt", {
        "InNoRoutes": (("received IPv4 packets with no route to their destination: often a missing route "
                       "on a router"), "no_route"),
        "InTruncatedPkts": "received IPv4 packets shorter than their header says",
        "InCsumErrors": "received IPv4 packets with a bad header checksum",
    }),
    **_specs(NETSTAT, "TcpExt", {
        "SyncookiesFailed": "ACKs with an invalid SYN cookie: the handshake of a connection made under "
                            "a SYN flood or a full SYN queue failed",
        "OutOfWindowIcmps": "ICMP errors for a TCP connection ignored as out of window: a fragmentation-needed "
                            "among them is lost, and the connection stalls on large segments",
        "LockDroppedIcmps": "ICMP errors for a TCP connection dropped because its socket was busy",
        "ListenOverflows": "connections refused because a listener's accept queue was full: the application "
                           "accepts too slowly or its listen() backlog is too small",
        "ListenDrops": "SYNs or handshake ACKs a listener dropped: a full accept queue, or a SYN-ACK with "
                       "no route back, or no memory",
        "TCPBacklogDrop": "TCP segments dropped because the socket's backlog was full while the application "
                          "held it",
        "PFMemallocDrop": "TCP segments dropped because they were allocated from emergency memory reserves",
        "TCPMinTTLDrop": "TCP segments dropped for a TTL below the socket's IP_MINTTL",
        "TCPDeferAcceptDrop": "handshake ACKs without data dropped by a TCP_DEFER_ACCEPT listener",
        "IPReversePathFilter": (("packets dropped by reverse path filtering (rp_filter): the route back to "
                                "their source leaves by another interface"), "rp_filter"),
        "TCPReqQFullDrop": "SYNs dropped because a listener's SYN queue was full and SYN cookies are off "
                           "(net.ipv4.tcp_syncookies=0)",
        "TCPReqQFullDoCookies": "SYN queue full: SYN cookies sent instead of keeping state (a SYN flood or a "
                                "listener that accepts too slowly)",
        "TCPRetransFail": "TCP retransmissions that could not be sent: often an output firewall rule or no route",
        "TCPFastOpenListenOverflow": "TCP Fast Open requests refused because the listener's TFO queue was full",
        "TCPAODroppedIcmps": "ICMP errors dropped for a TCP-AO connection",
    }),
    **_specs(SNMP6, "Ip6", {
        "InHdrErrors": "received IPv6 packets with a bad header, or whose hop limit ran out while being "
                       "forwarded (a routing loop)",
        "InTooBigErrors": "IPv6 packets too big for the next link: a packet too big went back, and PMTU "
                          "discovery breaks if it is dropped",
        "InNoRoutes": (("received IPv6 packets with no route to their destination: often a missing route on a "
                       "router"), "no_route"),
        "InAddrErrors": (("received IPv6 packets for an address that is not local and may not be forwarded: "
                         "often net.ipv6.conf.all.forwarding=0 on a router"), "ip_forward_disabled"),
        "InUnknownProtos": "received IPv6 packets for a protocol nothing on this host handles",
        "InTruncatedPkts": "received IPv6 packets shorter than their header says",
        "InDiscards": "received IPv6 packets given up for local reasons (memory, IPv6 disabled on the device)",
        "OutDiscards": "outgoing IPv6 packets given up for local reasons (no memory, IPv6 disabled on the "
                       "device, a device that refused them)",
        "OutNoRoutes": ("IPv6 packets this namespace could not route out: " + _NO_ROUTE_BACK, "no_route"),
        "ReasmFails": "IPv6 fragments given up because their packet could not be reassembled",
        "FragFails": "IPv6 packets that could not be fragmented on output",
    }),
    **_specs(SNMP6, "Icmp6", {
        "InErrors": "received ICMPv6 messages with an error in them (bad checksum, truncated, not allowed)",
        "OutErrors": "ICMPv6 messages that could not be sent",
        "InCsumErrors": "received ICMPv6 messages with a bad checksum",
        "OutRateLimitHost": "ICMPv6 errors not sent because of the per-host rate limit (net.ipv6.icmp.ratelimit)",
    }),
    **_specs(SNMP6, "Udp6", {
        "NoPorts": ("UDP datagrams over IPv6 for a port nothing listens on (the sender got a port unreachable)",
                    "closed_port"),
        "InErrors": "received UDP datagrams over IPv6 dropped: full receive buffer, bad checksum or no memory",
        "RcvbufErrors": "UDP datagrams over IPv6 dropped because the socket's receive buffer was full: "
                        "the application reads too slowly or SO_RCVBUF is too small",
        "SndbufErrors": "UDP datagrams over IPv6 the application could not send: send buffer full or the device "
                        "queue refused them",
        "InCsumErrors": "received UDP datagrams over IPv6 with a bad checksum",
        "MemErrors": "UDP datagrams over IPv6 dropped because the host ran short of socket memory",
    }),
}


@dataclass(frozen=True, slots=True)
class CounterEvent:
    """One counter's rise in one namespace between two readings.

    `value` is the counter now, `delta` how much it rose since the reading
    at `start_ns` (wall clock, ns; None: unknown). `name` is as people write
    it (`IpOutNoRoutes`); `group` and `file` say where the kernel keeps it.
    """

    timestamp_ns: int
    netns: Namespace
    file: str
    group: str
    name: str
    delta: int
    value: int
    meaning: str
    start_ns: int | None = None
    observer: Observer | None = None  # host.* and observer.*; None: this host, this tracer

    #: What the sinks and metrics read from any notice-like event.
    dataset = COUNTER_DATASET
    action = COUNTER_ACTION
    kind = "event"

    @classmethod
    def of(cls, spec: CounterSpec, netns: Namespace, *, timestamp_ns: int, delta: int, value: int,
           start_ns: int | None = None, observer: Observer | None = None) -> CounterEvent:
        return cls(timestamp_ns, netns, spec.file, spec.group, spec.name, delta, value, spec.meaning,
                   start_ns, observer)

    @property
    def message(self) -> str:
        """The sentence for ECS `message`: the rise, then what it means."""
        where = f" in netns {self.netns.name or self.netns.inode}" if self.netns.inode else ""
        return f"{self.name} +{self.delta} (now {self.value}){where}: {self.meaning}"

    def to_ecs(self) -> Doc:
        event: Doc = info_event(self.kind, self.action, self.dataset)
        if self.start_ns is not None:
            event["start"] = iso_time(self.start_ns)
            event["end"] = iso_time(self.timestamp_ns)
        doc: Doc = {
            "@timestamp": iso_time(self.timestamp_ns),
            "ecs": {"version": ECS_VERSION},
            "event": event,
            "message": self.message,
            "counter": {"file": self.file, "group": self.group, "name": self.name, "delta": self.delta,
                        "value": self.value, "meaning": self.meaning},
        }
        (self.observer or this_observer()).add_ecs(doc)
        if (ns := self.netns.to_ecs()) is not None:
            doc["netns"] = ns
        return doc

    @classmethod
    def from_ecs(cls, doc: Mapping[str, Any]) -> CounterEvent:
        """Reads back what `to_ecs` wrote (the timestamps as wall-clock ns)."""
        c = doc["counter"]
        start = doc["event"].get("start")
        ns = doc.get("netns")
        return cls(parse_iso_time(doc["@timestamp"]), Namespace.from_ecs(ns) if ns else Namespace(0),
                   c["file"], c["group"], c["name"], c["delta"], c["value"], c["meaning"],
                   None if start is None else parse_iso_time(start), Observer.from_ecs(doc))

    def text(self) -> str:
        """`12:00:01.000000  COUNTER  netns lab-srv  TcpExtListenDrops +3 (now 10): SYNs ...`."""
        parts = [iso_time(self.timestamp_ns)[11:26], "COUNTER"]
        if ns := self.netns.text():
            parts.append(ns)
        parts.append(f"{printable(self.name)} +{self.delta} (now {self.value}): {printable(self.meaning)}")
        return "  ".join(parts)
