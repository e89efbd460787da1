"""The next hop of a packet that died because ARP or neighbour discovery failed.

A NEIGH_FAILED drop (or, on paths that give no reason, NOT_SPECIFIED at
`neigh_invalidate` / `__neigh_event_send`) carries the packet's own
destination, which may be far away: what did not answer is the next hop,
the route's gateway or, on-link, the destination itself. This collector asks
the drop's namespace, through netlink (pyroute2, no tool run), which next
hop and device the route uses, and the state of that neighbour entry
(FAILED, INCOMPLETE...), and fills the event's `neighbor` section, so the
line says `next hop 2001:db8::1 dev eth0 FAILED` instead of leaving people
to guess which router vanished.

The route is asked for when the drop is processed, a few milliseconds after
the kernel gave up: a route that changed in between would name the new next
hop, so only drops the reasons above describe are looked at, and an answer
that cannot be had (namespace gone, no route) leaves the section out.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass

import structlog
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tracer.collectors.base import Evidence, OnDemand
from tracer.event.model import DropEvent
from tracer.event.reasons import is_neighbor_failure
from tracer.event.sections import Neighbor
from tracer.netns import Netns, NetnsGone, entered

log = structlog.get_logger("tracer.neighbors")

#: NUD_* bits of a neighbour entry (include/uapi/linux/neighbour.h), as `ip neigh` names them.
NUD_STATES = (
    (0x01, "INCOMPLETE"),
    (0x02, "REACHABLE"),
    (0x04, "STALE"),
    (0x08, "DELAY"),
    (0x10, "PROBE"),
    (0x20, "FAILED"),
    (0x40, "NOARP"),
    (0x80, "PERMANENT"),
)


def nud_state(bits: int) -> str:
    """`FAILED`, `INCOMPLETE`, ... (`NONE` for an entry with no state bit; joined by `|` if several)."""
    names = [name for bit, name in NUD_STATES if bits & bit]
    return "|".join(names) if names else "NONE"


@dataclass(frozen=True, slots=True)
class NextHop:
    """Where the route sends a destination: the neighbour to resolve and the device."""

    ip: str
    ifindex: int


def next_hop(ipr: IPRoute, dst: str, oif: int = 0) -> NextHop | None:
    """The route's gateway for `dst` (else `dst` itself, on-link) and its device, in the namespace
    `ipr` was opened in; `oif` (the drop's device, 0 unknown) is tried first, since the queued
    packet was already bound to it. None when there is no route."""
    family = socket.AF_INET6 if ipaddress.ip_address(dst).version == 6 else socket.AF_INET
    attempts = ({"oif": oif}, {}) if oif else ({},)
    for extra in attempts:
        try:
            routes = ipr.route("get", dst=dst, family=family, **extra)
        except NetlinkError:
            continue
        for route in routes:
            ifindex = route.get_attr("RTA_OIF")
            if ifindex:
                gateway = route.get_attr("RTA_GATEWAY")
                return NextHop(str(ipaddress.ip_address(gateway or dst)), int(ifindex))
    return None


def neighbor_state(ipr: IPRoute, hop: NextHop) -> str | None:
    """The NUD state of the next hop's entry on its device, None when it has no entry (anymore)."""
    family = socket.AF_INET6 if ipaddress.ip_address(hop.ip).version == 6 else socket.AF_INET
    try:
        entries = ipr.get_neighbours(family=family, ifindex=hop.ifindex)
    except NetlinkError:
        return None
    for entry in entries:
        dst = entry.get_attr("NDA_DST")
        if dst is not None and ipaddress.ip_address(dst) == ipaddress.ip_address(hop.ip):
            return nud_state(int(entry["state"]))
    return None


def link_name(ipr: IPRoute, ifindex: int) -> str | None:
    try:
        links = ipr.get_links(ifindex)
    except NetlinkError:
        return None
    return links[0].get_attr("IFLA_IFNAME") if links else None


def lookup(ns: Netns, dst: str, oif: int = 0) -> Neighbor | None:
    """The `Neighbor` section for a packet to `dst` in namespace `ns`, None when no route names one."""
    with entered(ns), IPRoute() as ipr:
        hop = next_hop(ipr, dst, oif)
        if hop is None:
            return None
        return Neighbor(hop.ip, neighbor_state(ipr, hop), link_name(ipr, hop.ifindex))


class NeighborsCollector(OnDemand):
    """The neighbor section: the next hop that did not resolve, for neighbour-failure drops.

    No state and no host change: each such drop is looked up in its own
    namespace when it comes. Construct with no argument: `NeighborsCollector()`.
    """

    name = "neighbors"  # netlink route and neighbour queries work wherever the tracer runs

    def enrich(self, event: DropEvent, evidence: Evidence) -> None:
        """Fills `event.neighbor` for a neighbour failure with an IP destination; otherwise nothing."""
        drop = evidence.drop
        if not is_neighbor_failure(drop.reason, drop.location):
            return
        headers = event.packet.headers if event.packet is not None else None
        if headers is None or evidence.netns is None:
            return
        try:
            event.neighbor = lookup(evidence.netns, headers.dst, drop.ifindex)
        except (NetnsGone, OSError, NetlinkError, ValueError) as exc:
            log.debug("neighbor lookup failed", netns=evidence.netns.label, dst=headers.dst, error=str(exc))
