"""The packet as the rule evaluator and the cause classifier see it.

A drop event carries what the tracer learnt about a packet, spread over
sections (headers, interfaces, conntrack, netfilter). Rules ask questions
of a flat set of facts; `PacketFacts` is that set. A fact nobody learnt is
None (or, for `ct_status`, None as a whole), and an expression that needs it
evaluates to "unknown" rather than to a guess.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tracer.event.model import DropEvent

#: The hooks PacketFacts.hook can name (the netfilter section's spelling).
HOOKS = frozenset({"prerouting", "input", "forward", "output", "postrouting", "ingress", "egress"})


@dataclass(frozen=True)
class PacketFacts:
    """One packet: addresses, ports, flags, interfaces, conntrack state, hook.

    `tcp_flags` are upper-case names as PacketHeaders gives them ("SYN",
    "ACK"); an empty tuple on a TCP packet reads as "flags unknown" (the
    header was cut short), never as "no flags". `ct_mark` is the conntrack
    entry's mark (ConntrackInfo.mark), kept apart from the skb `mark`.
    Addresses may be None too: what `tracer diagnose` checks before it has
    seen a packet (any source).
    """

    family: int  # 4 or 6
    src: str | None  # canonical text (ipaddress); None unknown (a check before any packet was seen)
    dst: str | None
    l4proto: int  # IPPROTO_* (6 tcp, 17 udp, 1 icmp, 58 icmpv6, ...)
    sport: int | None = None
    dport: int | None = None
    icmp_type: int | None = None
    icmp_code: int | None = None
    tcp_flags: tuple[str, ...] = ()
    iif: str | None = None  # interface names, None unknown
    oif: str | None = None
    ct_state: str | None = None  # new/established/related/invalid/untracked; None unknown
    ct_status: tuple[str, ...] | None = None  # ConntrackInfo.status names; None unknown
    ct_direction: str | None = None  # original/reply
    mark: int | None = None
    length: int | None = None
    hook: str | None = None  # prerouting/input/forward/output/postrouting
    ct_mark: int | None = None

    def __post_init__(self) -> None:
        if self.family not in (4, 6):
            raise ValueError(f"family must be 4 or 6, not {self.family!r}")
        for name in ("src", "dst"):
            text = getattr(self, name)
            if text is None:
                continue
            addr = ipaddress.ip_address(text)
            if addr.version != self.family:
                raise ValueError(f"{name} {getattr(self, name)!r} is not an IPv{self.family} address")
            object.__setattr__(self, name, str(addr))  # canonical text, whatever was passed

    @classmethod
    def from_event(cls, event: DropEvent) -> PacketFacts | None:
        """The facts a drop event holds; None when it has no IP header to speak of."""
        packet = event.packet
        headers = packet.headers if packet is not None else None
        if packet is None or headers is None:
            return None
        interfaces = event.interfaces
        ingress = interfaces.ingress if interfaces is not None else None
        egress = interfaces.egress if interfaces is not None else None
        ct = event.conntrack
        hook = event.netfilter.hook if event.netfilter is not None else None
        if hook is None:
            hook = event.drop.hook
        try:
            return cls(
                family=headers.version,
                src=headers.src,
                dst=headers.dst,
                l4proto=headers.protocol,
                sport=headers.sport,
                dport=headers.dport,
                icmp_type=headers.icmp_type,
                icmp_code=headers.icmp_code,
                tcp_flags=tuple(headers.tcp_flags),
                iif=ingress.name if ingress is not None else None,
                oif=egress.name if egress is not None else None,
                ct_state=ct.state if ct is not None else None,
                ct_status=tuple(ct.status) if ct is not None else None,
                ct_direction=ct.direction if ct is not None else None,
                mark=packet.mark,
                length=packet.length if packet.length is not None else headers.length,
                hook=hook if hook in HOOKS else None,
                ct_mark=ct.mark if ct is not None else None,
            )
        except ValueError:
            return None  # addresses that are not of the header's version: nothing to reason on

    def with_(self, **changes: Any) -> PacketFacts:
        """A copy with some facts changed (the reply direction, the pre-NAT port...)."""
        return dataclasses.replace(self, **changes)
