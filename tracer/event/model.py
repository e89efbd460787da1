"""The drop event and its ECS form (docs/drop-event.md).

A `DropEvent` holds what the tracer knows about one dropped packet (or, as a
summary, many alike). `to_ecs()` is the only place that knows the JSON
layout: a fact the tracer did not learn is left out of the output rather
than guessed, as the schema requires.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import cache, lru_cache

import communityid

from tracer.collectors.conntrack import ConntrackInfo
from tracer.event.packet import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_SCTP,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PacketHeaders,
)

ECS_VERSION = "8.11.0"

INGRESS_HOOKS = frozenset({"prerouting", "input", "forward", "ingress"})
EGRESS_HOOKS = frozenset({"output", "postrouting", "egress"})


@dataclass(frozen=True)
class Rule:
    handle: int
    text: str | None  # None when the rule's text could not be known for certain
    comment: str | None = None
    iptables: str | None = None

    def to_ecs(self) -> dict:
        out: dict = {"handle": self.handle}
        if self.text is not None:
            out["text"] = self.text
        if self.comment is not None:
            out["comment"] = self.comment
        if self.iptables is not None:
            out["iptables"] = self.iptables
        return out


@dataclass(frozen=True)
class Netfilter:
    """Where in netfilter the packet was dropped and by what."""

    backend: str
    attribution: str
    family: str | None = None
    hook: str | None = None
    table: str | None = None
    chain: str | None = None
    base_chain: str | None = None
    rule: Rule | None = None
    policy: bool | None = None
    verdict: str | None = None

    def to_ecs(self) -> dict:
        out: dict = {"backend": self.backend}
        for key in ("family", "hook", "table", "chain", "base_chain"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.policy is True:
            out["rule"] = None
            out["policy"] = True
        elif self.rule is not None:
            out["rule"] = self.rule.to_ecs()
            out["policy"] = False
        if self.verdict is not None:
            out["verdict"] = self.verdict
        out["attribution"] = self.attribution
        return out


@dataclass(frozen=True)
class Interface:
    index: int
    name: str | None = None

    def to_ecs(self) -> dict:
        out: dict = {"id": str(self.index)}
        if self.name:
            out["name"] = self.name
        return out


@dataclass
class DropEvent:
    timestamp_ns: int
    reason: str
    location: str | None = None
    stack: list[str] | None = None
    action: str = "dropped"
    packet: PacketHeaders | None = None
    length: int | None = None
    mark: int | None = None
    ingress: Interface | None = None
    egress: Interface | None = None
    netns_inode: int | None = None
    netns_name: str | None = None
    netfilter: Netfilter | None = None
    conntrack: ConntrackInfo | None = None
    process: tuple[int, str] | None = None
    hook: str | None = None
    subsystem: str | None = None
    probe_id: str | None = None
    count: int = 1
    start_ns: int | None = None
    end_ns: int | None = None
    extra: dict = field(default_factory=dict)

    @property
    def direction(self) -> str | None:
        hook = self.netfilter.hook if self.netfilter and self.netfilter.hook else self.hook
        if hook in INGRESS_HOOKS:
            return "ingress"
        if hook in EGRESS_HOOKS:
            return "egress"
        return None

    def to_ecs(self) -> dict:
        summary = self.count > 1 or self.start_ns is not None
        ev: dict = {
            "@timestamp": iso_time(self.timestamp_ns),
            "ecs": {"version": ECS_VERSION},
            "event": {
                "kind": "event",
                "category": ["network"],
                "type": ["connection", "denied"],
                "action": self.action,
                "dataset": "tracer.drop.summary" if summary else "tracer.drop",
                "count": self.count,
            },
        }
        if summary:
            ev["event"]["start"] = iso_time(self.start_ns or self.timestamp_ns)
            ev["event"]["end"] = iso_time(self.end_ns or self.timestamp_ns)
        drop: dict = {"reason": self.reason}
        if self.location:
            drop["location"] = self.location
        if self.subsystem:
            drop["subsystem"] = self.subsystem
        if self.stack is not None:
            drop["stack"] = self.stack
        ev["drop"] = drop
        if self.netfilter is not None:
            ev["netfilter"] = self.netfilter.to_ecs()
        if self.conntrack is not None:
            ev["conntrack"] = self.conntrack.to_ecs()
        self._add_packet(ev)
        ev["observer"] = self._observer()
        if self.netns_inode:
            ns: dict = {"inode": self.netns_inode}
            if self.netns_name:
                ns["name"] = self.netns_name
            ev["netns"] = ns
        if self.process is not None:
            ev["process"] = {"pid": self.process[0], "name": self.process[1]}
        pkt: dict = {}
        if self.length is not None:
            pkt["length"] = self.length
        if self.mark is not None:
            pkt["mark"] = self.mark
        if pkt:
            ev["packet"] = pkt
        if self.probe_id:
            ev["probe"] = {"id": self.probe_id}
        ev.update(self.extra)
        return ev

    def _add_packet(self, ev: dict) -> None:
        p = self.packet
        network: dict = {}
        if p is not None:
            src: dict = {"ip": p.src}
            dst: dict = {"ip": p.dst}
            if p.sport is not None:
                src["port"] = p.sport
                dst["port"] = p.dport
            ev["source"], ev["destination"] = src, dst
            network = {
                "transport": p.transport,
                "type": f"ipv{p.version}",
                "iana_number": str(p.protocol),
            }
            if p.tcp_flags:
                ev["tcp"] = {"flags": list(p.tcp_flags)}
            if p.icmp_type is not None:
                # ECS has no ICMP fields; the spec puts such facts under `drop`.
                ev["drop"]["icmp"] = {"type": p.icmp_type, "code": p.icmp_code}
        if self.direction:
            network["direction"] = self.direction
        if p is not None:
            cid = community_id(p)
            if cid:
                network["community_id"] = cid
        if network:
            ev["network"] = network

    def _observer(self) -> dict:
        obs: dict = {"hostname": hostname(), "type": "host"}
        if self.ingress is not None:
            obs["ingress"] = {"interface": self.ingress.to_ecs()}
        if self.egress is not None:
            obs["egress"] = {"interface": self.egress.to_ecs()}
        return obs


def iso_time(ns: int) -> str:
    """RFC 3339 UTC with microseconds and Z, as the spec asks."""
    dt = datetime.fromtimestamp(ns // 1_000_000_000, tz=timezone.utc)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns // 1000) % 1_000_000:06d}Z"


@cache
def hostname() -> str:
    return socket.gethostname()


_cid = communityid.CommunityID(seed=0)


def community_id(p: PacketHeaders) -> str | None:
    """Community ID v1 of the packet's flow, or None where it is undefined.

    Cached per flow: computing one takes ~30 us (address parsing and a
    SHA-1 in the communityid package), and drops come in runs of one flow.
    The key is the flow's tuple, not the PacketHeaders, which also carry
    per-packet fields (IP id, TTL, length, transport bytes).
    """
    return _flow_community_id(p.protocol, p.src, p.dst, p.sport, p.dport, p.icmp_type, p.icmp_code)


@lru_cache(maxsize=4096)
def _flow_community_id(
    protocol: int, src: str, dst: str, sport: int | None, dport: int | None, icmp_type: int | None,
    icmp_code: int | None,
) -> str | None:
    try:
        if protocol == IPPROTO_TCP and sport is not None:
            tpl = communityid.FlowTuple.make_tcp(src, dst, sport, dport)
        elif protocol == IPPROTO_UDP and sport is not None:
            tpl = communityid.FlowTuple.make_udp(src, dst, sport, dport)
        elif protocol == IPPROTO_SCTP and sport is not None:
            tpl = communityid.FlowTuple.make_sctp(src, dst, sport, dport)
        elif protocol == IPPROTO_ICMP and icmp_type is not None:
            tpl = communityid.FlowTuple.make_icmp(src, dst, icmp_type, icmp_code)
        elif protocol == IPPROTO_ICMPV6 and icmp_type is not None:
            tpl = communityid.FlowTuple.make_icmp6(src, dst, icmp_type, icmp_code)
        else:
            tpl = communityid.FlowTuple(protocol, src, dst)
        return _cid.calc(tpl)
    except Exception:  # communityid rejects malformed tuples; the field is optional
        return None
