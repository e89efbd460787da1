"""`tracer pmtu`: the path MTU to a host, and ICMP black holes on the way.

Path MTU discovery depends on routers answering an oversized packet with
ICMP "fragmentation needed" (IPv4, type 3 code 4) or "packet too big"
(ICMPv6 type 2). When a firewall drops those, large packets vanish while
small ones pass: connections hang after the handshake. We binary-search the
largest DF probe that gets an answer between the protocol minimum (68 for
IPv4, 1280 for IPv6) and the interface MTU, noting every ICMP error and who
sent it. A size that vanished without an ICMP error is the black hole.

TCP probes are SYNs padded with data to the size tried. An open port's
SYN-ACK acknowledges the SYN alone; a closed port's RST acknowledges the
SYN and its data (seq + 1 + len), and is just as good an answer: the
padded SYN reached the target at that size.
"""

from __future__ import annotations

# Before any scapy import: scapy then warns only into the debug log (tracer/probe/quiet.py).
from tracer.probe import quiet  # noqa: F401

# isort: split

import functools
import ipaddress
from dataclasses import dataclass, field

from pyroute2 import IPRoute
from scapy.layers.inet import ICMP, IP, TCP
from scapy.layers.inet6 import ICMPv6PacketTooBig, IPv6
from scapy.packet import Packet

from tracer.probe import marker
from tracer.probe import reach as probemod
from tracer.probe.reach import Target, Wire

MIN_MTU = {4: 68, 6: 1280}


@dataclass
class Step:
    size: int
    outcome: str  # answered, too_big, silent, local_error
    hop: str | None = None
    next_hop_mtu: int | None = None


@dataclass
class PmtuResult:
    target: Target
    method: str  # icmp or tcp
    verdict: str  # ok, reduced, black_hole, unreachable
    path_mtu: int | None
    interface_mtu: int | None
    route_mtu: int | None
    hop: str | None = None
    next_hop_mtu: int | None = None
    black_hole: bool = False
    detail: str = ""
    fix: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    probe_ids: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        out: dict = {
            "target": self.target.to_json(),
            "method": self.method,
            "verdict": self.verdict,
            "black_hole": self.black_hole,
            "detail": self.detail,
            "probes": [{"size": s.size, "outcome": s.outcome, **({"hop": s.hop} if s.hop else {}),
                        **({"next_hop_mtu": s.next_hop_mtu} if s.next_hop_mtu else {})} for s in self.steps],
            "probe_ids": self.probe_ids,
        }
        for key in ("path_mtu", "interface_mtu", "route_mtu", "hop", "next_hop_mtu"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.fix:
            out["fix"] = self.fix
        return out


def route_mtus(dst: str) -> tuple[int | None, int | None]:
    """(interface MTU, route MTU) for `dst`, as `ip route get` shows them.

    The route MTU is the kernel's cached path MTU when an earlier ICMP error
    lowered it, else the route's own mtu metric, else None.
    """
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=dst)
        except Exception:
            return None, None
        if not routes:
            return None, None
        route = routes[0]
        oif = route.get_attr("RTA_OIF")
        metrics = route.get_attr("RTA_METRICS")
        route_mtu = metrics.get_attr("RTAX_MTU") if metrics is not None else None
        iface_mtu = None
        if oif:
            links = ipr.get_links(oif)
            if links:
                iface_mtu = links[0].get_attr("IFLA_MTU")
    return iface_mtu, route_mtu


def _too_big(pkt: Packet) -> int | None:
    """The next-hop MTU of an ICMP fragmentation-needed / packet-too-big."""
    if pkt.haslayer(ICMP) and pkt[ICMP].type == 3 and pkt[ICMP].code == 4:
        return pkt[ICMP].nexthopmtu
    if pkt.haslayer(ICMPv6PacketTooBig):
        return pkt[ICMPv6PacketTooBig].mtu
    return None


def _src(pkt: Packet) -> str:
    return str(pkt[IP].src if pkt.haslayer(IP) else pkt[IPv6].src)


class _Search:
    """Sends DF probes of given sizes and records what each one did."""

    def __init__(self, wire: Wire, target: Target, n: int, timeout: float, retries: int) -> None:
        self.wire, self.target, self.n = wire, target, n
        self.timeout, self.retries = timeout, retries
        self.steps: list[Step] = []
        self.ids: list[str] = []
        self.resets = 0  # TCP answers that were RSTs: the port is closed, the path still measured

    def try_size(self, size: int) -> Step:
        for _ in range(self.retries + 1):
            self.n = (self.n + 1) & 0xFFFF
            self.ids.append(marker.probe_id(self.n))
            pkt = probemod.build(self.target, self.n, size, source=self.wire.source_for(self.target.ip))
            if self.wire.send(pkt) is not None:
                step = Step(size, "local_error")
                break
            accept = functools.partial(probemod.matches, self.target, self.n, data=probemod.syn_data(pkt))
            got = self.wire.receive(accept, self.timeout)
            if got is None:
                continue
            mtu = _too_big(got)
            if mtu is None and got.haslayer(TCP) and got[TCP].flags.R:
                self.resets += 1
            step = Step(size, "answered" if mtu is None else "too_big", _src(got), mtu)
            break
        else:
            step = Step(size, "silent")
        self.steps.append(step)
        return step


def discover(wire: Wire, target: Target, *, timeout: float = 0.5, retries: int = 1) -> PmtuResult:
    """Binary search of the path MTU with DF probes of `target.protocol` (icmp or tcp)."""
    version = ipaddress.ip_address(target.ip).version
    iface_mtu, route_mtu = route_mtus(target.ip)
    low, high = MIN_MTU[version], iface_mtu or 1500
    search = _Search(wire, target, probemod.next_number(), timeout, retries)
    result = PmtuResult(target, target.protocol, "unreachable", None, iface_mtu, route_mtu)
    first = search.try_size(low)
    if first.outcome != "answered":
        result.detail = f"even a {low}-byte probe got no answer: the target does not answer {target.protocol}"
        return _finish(result, search)
    top = search.try_size(high)
    if top.outcome == "answered":
        result.path_mtu = high
        return _finish(result, search)
    # Invariant: `low` was answered, `high` was not. A router's announced
    # next-hop MTU is tried first; once it is answered, larger sizes are known
    # not to fit (that router said so), which saves probes the router would
    # answer only as fast as its ICMP rate limit allows.
    hint = top.next_hop_mtu
    announced: set[int] = {hint} if hint else set()
    while high - low > 1:
        size = hint if hint and low < hint < high else (low + high) // 2
        hint = None
        step = search.try_size(size)
        if step.outcome == "answered":
            low = size
            if size in announced:
                high = size + 1
        else:
            high = size
            if step.outcome == "too_big" and step.next_hop_mtu:
                hint = step.next_hop_mtu
                announced.add(hint)
    result.path_mtu = low
    return _finish(result, search)


def _finish(result: PmtuResult, search: _Search) -> PmtuResult:
    result.steps, result.probe_ids = search.steps, search.ids
    too_big = [s for s in search.steps if s.outcome == "too_big"]
    silent = [s for s in search.steps if s.outcome == "silent" and result.path_mtu and s.size > result.path_mtu]
    if too_big:
        last = too_big[-1]
        result.hop, result.next_hop_mtu = last.hop, last.next_hop_mtu
    if result.path_mtu is None:
        result.fix = [("check that the target answers this protocol (try `tracer probe`), "
                       "or use --proto tcp with an open --port")]
        return result
    v6 = ipaddress.ip_address(result.target.ip).version == 6
    icmp_name = "ICMPv6 type 2 (packet too big)" if v6 else "ICMP type 3 code 4 (fragmentation needed)"
    if silent and not too_big:
        result.verdict, result.black_hole = "black_hole", True
        result.detail = (f"packets up to {result.path_mtu} bytes pass, larger DF packets vanish and no "
                         f"{icmp_name} comes back: ICMP is blocked on the path (a PMTU black hole)")
        accept = "icmpv6 type packet-too-big accept" if v6 else "icmp type destination-unreachable accept"
        result.fix = [
            f"allow {icmp_name} through every firewall on the path (nft: `{accept}`)",
            ("or clamp the TCP MSS to the path: "
             "`nft add rule inet filter forward tcp flags syn tcp option maxseg size set rt mtu`"),
            f"or lower the MTU of the route: `ip route change {result.target.ip} ... mtu {result.path_mtu}`",
        ]
    elif result.interface_mtu and result.path_mtu < result.interface_mtu:
        result.verdict = "reduced"
        via = f" ({result.hop} announced next-hop MTU {result.next_hop_mtu})" if result.hop else ""
        result.detail = (f"path MTU {result.path_mtu} is below the interface MTU {result.interface_mtu}"
                         f"{via}; path MTU discovery works")
        result.fix = [("nothing is broken; for tunnels or many small flows, clamping the TCP MSS avoids "
                       "the first round of retransmissions")]
    else:
        result.verdict = "ok"
        result.detail = f"the full interface MTU {result.path_mtu} passes"
    if result.route_mtu and result.route_mtu != result.path_mtu:
        result.detail += f"; the route's MTU says {result.route_mtu}"
    if search.resets:
        result.detail += (f"; port {result.target.port} is closed (RSTs answered the probes), "
                          "which measures the path as well as an open one")
    return result
