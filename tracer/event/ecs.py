"""ECS values the sections share: timestamps, the observer's name and version, Community ID, direction.

Kept apart from the sections so that each value has one definition: the
text view cuts its time of day out of the same `iso_time` the JSON carries,
and `from_ecs` reads timestamps back with its exact inverse.
"""

from __future__ import annotations

import calendar
import importlib.metadata
import socket
import time
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any

import communityid

from tracer.event.packet import IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PacketHeaders

ECS_VERSION = "8.11.0"

#: ECS `observer.vendor` and `observer.product` of every event: the tracer names itself
#: (it is its own vendor, as open-source sensors are), so SIEM content can select its events.
OBSERVER_VENDOR = "tracer"
OBSERVER_PRODUCT = "tracer"
#: The distribution whose installed version is `observer.version`.
_DISTRIBUTION = "tracer"

INGRESS_HOOKS = frozenset({"prerouting", "input", "forward", "ingress"})
EGRESS_HOOKS = frozenset({"output", "postrouting", "egress"})


def direction_of(hook: str | None) -> str | None:
    """ECS `network.direction` of a netfilter hook: the host-based observer's values."""
    if hook in INGRESS_HOOKS:
        return "ingress"
    if hook in EGRESS_HOOKS:
        return "egress"
    return None


def info_event(kind: str, action: str, dataset: str) -> dict[str, Any]:
    """ECS `event` of what the tracer reports beside drops (notices, counter rises): network info."""
    return {"kind": kind, "category": ["network"], "type": ["info"], "action": action, "dataset": dataset}


def iso_time(ns: int) -> str:
    """RFC 3339 UTC with microseconds and Z, as the spec asks."""
    dt = datetime.fromtimestamp(ns // 1_000_000_000, tz=UTC)
    return dt.strftime("%Y-%m-%dT%H:%M:%S") + f".{(ns // 1000) % 1_000_000:06d}Z"


def parse_iso_time(text: str) -> int:
    """Nanoseconds since the epoch of an `iso_time` string (to the microsecond it keeps).

    ValueError for anything else: the schema's format is the only one read.
    """
    if len(text) != 27 or text[19] != "." or text[26] != "Z" or not text[20:26].isdigit():
        raise ValueError(f"not a drop-event timestamp: {text!r}")
    seconds = calendar.timegm(time.strptime(text[:19], "%Y-%m-%dT%H:%M:%S"))
    return seconds * 1_000_000_000 + int(text[20:26]) * 1000


@cache
def local_hostname() -> str:
    """`observer.hostname` of events this host observes (looked up once)."""
    return socket.gethostname()


@cache
def tracer_version() -> str | None:
    """`observer.version`: the installed tracer's version, None when it is not installed.

    Read from the distribution's metadata rather than `tracer.__version__`,
    because nothing in tracer.event imports anything else from tracer; the
    two are the same string (pyproject.toml, tests/test_event_model.py checks it).
    """
    try:
        return importlib.metadata.version(_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


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
        cid: str = _cid.calc(tpl)
        return cid
    except Exception:  # communityid rejects malformed tuples; the field is optional
        return None
