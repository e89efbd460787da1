"""What the user asked to watch, and how that becomes nft match expressions.

The same filter scopes the BPF side (in the engine) and the nftrace marking
(here): marking only matching packets keeps the trace volume, and so the
cost of tracing, proportional to what the user wants to see.
"""

from __future__ import annotations

import ipaddress
import itertools
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Protocol names the filter accepts, as nft's `meta l4proto` spells them.
PROTO_NAMES: dict[str, str] = {
    "tcp": "tcp",
    "udp": "udp",
    "sctp": "sctp",
    "udplite": "udplite",
    "dccp": "dccp",
    "icmp": "icmp",
    "icmpv6": "ipv6-icmp",
    "ipv6-icmp": "ipv6-icmp",
}
#: Protocols whose first four transport bytes are source and destination port.
PORT_PROTOS = frozenset({"tcp", "udp", "sctp", "udplite", "dccp"})
_PORT_PROTO_NUMBERS = {"6": "tcp", "17": "udp", "132": "sctp", "136": "udplite", "33": "dccp"}
_NAMED_PROTO_NUMBERS = {"1": "icmp", "58": "icmpv6"}
#: IP protocol numbers of the names above (the BPF filter compares numbers).
PROTO_NUMBERS: dict[str, int] = {
    "tcp": 6, "udp": 17, "sctp": 132, "udplite": 136, "dccp": 33, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58,
}
_DIGITS = re.compile(r"^[0-9]{1,3}$")
# Linux refuses '/', ':' and white space in device names (dev_valid_name); ':' labels addresses.
_IFNAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,15}$")
_PROTO_NAME = re.compile(r"^[a-z][a-z0-9._+-]{0,63}$")
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,255}$")
_REASON = re.compile(r"^[A-Z0-9_]+$")

Hook = Literal["prerouting", "output"]


@dataclass
class WatchFilter:
    """Which packets to watch; an empty filter watches everything.

    `ports` match source or destination port, `hosts` match source or
    destination address. Strings are accepted for hosts, ports and proto and
    normalised, so CLI input can be passed straight in.
    """

    ports: tuple[int, ...] = ()
    hosts: tuple[IPNetwork, ...] = ()
    proto: str | None = None
    netns: str | None = None
    iface: str | None = None
    reasons: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        self.ports = _ports(self.ports)
        self.hosts = _hosts(self.hosts)
        self.proto = _proto(self.proto)
        if self.ports and self.proto is not None and self.proto not in PORT_PROTOS:
            raise ValueError(f"protocol {self.proto!r} has no ports; ports need one of {sorted(PORT_PROTOS)}")
        if self.iface is not None and (not _IFNAME.match(self.iface) or self.iface in (".", "..")):
            raise ValueError(f"interface name {self.iface!r} is not a valid Linux interface name "
                             "(1-15 characters, letters, digits and _.@+-)")
        if self.netns is not None and not _NETNS_NAME.match(str(self.netns)):
            raise ValueError(f"network namespace {self.netns!r} is not a valid name or inode number")
        self.reasons = _reasons(self.reasons)
        if self.hosts and self.proto in ("icmp", "icmpv6"):
            version = 4 if self.proto == "icmp" else 6
            if not any(h.version == version for h in self.hosts):
                raise ValueError(f"protocol {self.proto} never matches hosts {', '.join(map(str, self.hosts))}")

    @property
    def empty(self) -> bool:
        """True when the filter does not restrict packets (netns aside)."""
        return not (self.ports or self.hosts or self.proto or self.iface)

    def matches_netns(self, inode: int, name: str | None) -> bool:
        """Whether a namespace is in scope: by `ip netns` name or inode number."""
        if self.netns is None:
            return True
        return self.netns == name or self.netns == str(inode)


def _ports(ports: Iterable[int | str]) -> tuple[int, ...]:
    result: set[int] = set()
    for raw in ports:
        try:
            port = int(str(raw).strip(), 10)
        except ValueError:
            raise ValueError(f"port {raw!r} is not a number") from None
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 1-65535")
        result.add(port)
    return tuple(sorted(result))


def _hosts(hosts: Iterable[IPNetwork | str]) -> tuple[IPNetwork, ...]:
    result: list[IPNetwork] = []
    for raw in hosts:
        if isinstance(raw, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            net = raw
        else:
            try:
                net = ipaddress.ip_network(str(raw).strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"host {raw!r} is not an IPv4/IPv6 address or CIDR prefix (e.g. 198.18.0.0/24, 2001:db8::1)"
                ) from None
        if net not in result:
            result.append(net)
    return tuple(result)


def _proto(proto: str | int | None) -> str | None:
    if proto is None:
        return None
    text = str(proto).strip().lower()
    if text.isascii() and text.isdigit():
        text = text.lstrip("0") or "0"
        if not _DIGITS.match(text) or not 0 <= int(text) <= 255:
            raise ValueError(f"protocol number {text[:20]} is out of range 0-255")
        text = str(int(text))
        return _PORT_PROTO_NUMBERS.get(text) or _NAMED_PROTO_NUMBERS.get(text) or text
    if text == "ipv6-icmp":
        return "icmpv6"
    if text in PROTO_NAMES:
        return text
    number = _system_protocol(text)
    if number is None:
        names = sorted(set(PROTO_NAMES) - {"ipv6-icmp"})
        raise ValueError(f"protocol {proto!r} is not one of {names}, a name in /etc/protocols, "
                         "or a number 0-255")
    return _proto(number)


def _system_protocol(name: str) -> int | None:
    """The number /etc/protocols (through the C library) gives a name, if any.

    Other names become their number, which nft and the BPF filter both take,
    so the filter never depends on what names a tool happens to know.
    """
    if not _PROTO_NAME.match(name):
        return None
    try:
        number = socket.getprotobyname(name)
    except OSError:
        return None
    return number if 0 <= number <= 255 else None


def _reasons(reasons: Iterable[str]) -> tuple[str, ...]:
    result: list[str] = []
    for raw in reasons:
        name = str(raw).strip().upper().removeprefix("SKB_DROP_REASON_")
        if not _REASON.match(name):
            raise ValueError(f"drop reason {raw!r} is not a kernel drop-reason name such as NETFILTER_DROP")
        if name not in result:
            result.append(name)
    return tuple(result)


def _set(items: Iterable[str]) -> str:
    values = list(items)
    return values[0] if len(values) == 1 else "{ " + ", ".join(values) + " }"


def _proto_clause(f: WatchFilter) -> str | None:
    if f.proto is None:
        return "meta l4proto { tcp, udp, sctp, udplite, dccp }" if f.ports else None
    if f.ports:
        return None  # `tcp dport` carries its own protocol check
    return f"meta l4proto {PROTO_NAMES.get(f.proto, f.proto)}"


def _port_clauses(f: WatchFilter) -> list[str | None]:
    if not f.ports:
        return [None]
    ports = _set(str(p) for p in f.ports)
    # Without a protocol, `th` reads the ports of any port protocol and the
    # l4proto clause guards it.
    header = f.proto or "th"
    return [f"{header} sport {ports}", f"{header} dport {ports}"]


def _host_clauses(f: WatchFilter) -> list[str | None]:
    if not f.hosts:
        return [None]
    clauses: list[str | None] = []
    for version, keyword in ((4, "ip"), (6, "ip6")):
        if (f.proto == "icmp" and version == 6) or (f.proto == "icmpv6" and version == 4):
            continue
        nets = [str(h) for h in f.hosts if h.version == version]
        if nets:
            clauses += [f"{keyword} saddr {_set(nets)}", f"{keyword} daddr {_set(nets)}"]
    return clauses


def nft_match_rules(f: WatchFilter, hook: Hook = "prerouting") -> list[str]:
    """nft match expressions, one per marking rule; a packet matching any is traced.

    nft has no "saddr or daddr" match, so each either/or of the filter
    becomes separate rules: (saddr, daddr) x (sport, dport) per address
    family. Several ports or hosts go in one anonymous set. The interface
    is matched as `iifname` on prerouting and `oifname` on output. An empty
    filter gives one empty expression: a rule that matches every packet.
    """
    iface = None
    if f.iface is not None:
        iface = f'{"iifname" if hook == "prerouting" else "oifname"} "{f.iface}"'
    proto = _proto_clause(f)
    rules: list[str] = []
    for host, port in itertools.product(_host_clauses(f), _port_clauses(f)):
        parts = [p for p in (iface, host, proto, port) if p]
        rule = " ".join(parts)
        if rule not in rules:
            rules.append(rule)
    return rules
