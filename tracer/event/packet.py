"""Decoding of the raw IPv4/IPv6 and transport headers a drop carries.

Both the BPF drop event and the kernel's nftrace messages hand us raw header
bytes; decoding them in one place keeps the two views of a packet identical,
which is what lets `fingerprint` join a drop to the trace of the same packet.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from functools import lru_cache

ETH_P_IP = 0x0800
ETH_P_IPV6 = 0x86DD
ETH_P_ARP = 0x0806

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132
IPPROTO_UDPLITE = 136

#: ECS `network.transport` names (IANA keywords, lower case).
TRANSPORT_NAMES = {
    IPPROTO_ICMP: "icmp",
    2: "igmp",
    IPPROTO_TCP: "tcp",
    IPPROTO_UDP: "udp",
    41: "ipv6",
    47: "gre",
    50: "esp",
    51: "ah",
    IPPROTO_ICMPV6: "ipv6-icmp",
    IPPROTO_SCTP: "sctp",
    IPPROTO_UDPLITE: "udplite",
}

PORT_PROTOCOLS = frozenset({IPPROTO_TCP, IPPROTO_UDP, IPPROTO_SCTP, IPPROTO_UDPLITE})
ICMP_PROTOCOLS = frozenset({IPPROTO_ICMP, IPPROTO_ICMPV6})

# Bit order of the TCP flags byte, high to low; ECS spells them upper case.
_TCP_FLAG_NAMES = ("CWR", "ECE", "URG", "ACK", "PSH", "RST", "SYN", "FIN")

_IPV6_EXT_HEADERS = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_IPV6_FRAGMENT = 44
_IPV6_AH = 51

#: Extension headers walked before the transport header is given up on; the
#: BPF walk stops at the same number (TRACER_IPV6_MAX_EXT in bpf/tracer.h).
IPV6_MAX_EXT_HEADERS = 64

_IPV4_OFFSET_MASK = 0x1FFF

# First byte of a fingerprint: which kind of key follows, so keys of different
# kinds never compare equal whatever the packet bytes.
_TAG_V4, _TAG_V4_FRAGMENT, _TAG_V6, _TAG_V6_SHORT = b"\x04", b"\x14", b"\x06", b"\x16"


@dataclass(frozen=True, slots=True)
class PacketHeaders:
    """What the tracer reports about a packet's L3/L4 headers."""

    version: int  # 4 or 6
    src: str
    dst: str
    protocol: int
    sport: int | None = None
    dport: int | None = None
    tcp_flags: tuple[str, ...] = ()
    icmp_type: int | None = None
    icmp_code: int | None = None
    ip_id: int | None = None
    ttl: int | None = None
    length: int | None = None  # IP total length from the header
    l4: bytes = field(default=b"", repr=False)
    #: An ICMP/ICMPv6 error's quoted packet (the one that caused the error), as far as the
    #: error holds it: addresses, protocol, and ports when its first transport bytes are there.
    quoted: PacketHeaders | None = None

    @property
    def transport(self) -> str:
        return TRANSPORT_NAMES.get(self.protocol, str(self.protocol))


def protocol_of_transport(name: str) -> int:
    """The protocol number of a `network.transport` name (the inverse of PacketHeaders.transport)."""
    for number, known in TRANSPORT_NAMES.items():
        if known == name:
            return number
    if name.isascii() and name.isdigit() and 0 <= int(name) <= 255:
        return int(name)
    raise ValueError(f"transport {name!r} is neither a known protocol name nor a number 0-255")


#: ICMP types whose payload quotes the packet that caused them (RFC 792, RFC 4443): the
#: types the BPF filter looks into (icmp_error in bpf/tracer.bpf.c).
ICMP_ERROR_TYPES = {IPPROTO_ICMP: frozenset({3, 4, 5, 11, 12}), IPPROTO_ICMPV6: frozenset({1, 2, 3, 4})}
#: ICMPv6 neighbour discovery (RFC 4861): RS, RA, NS, NA, redirect.
ND_TYPES = frozenset(range(133, 138))


def is_icmp_error(protocol: int, icmp_type: int | None) -> bool:
    """Whether an ICMP/ICMPv6 message of this type quotes another packet."""
    return icmp_type is not None and icmp_type in ICMP_ERROR_TYPES.get(protocol, frozenset())


def decode_quoted(l3: bytes, l4: bytes, protocol: int) -> PacketHeaders | None:
    """The packet an ICMP error quotes, from its IP header and first transport bytes.

    `protocol` is the quoted packet's (the BPF side does not walk a quoted
    IPv6 packet's extension headers: it is then the first of them, with no
    ports). The quoted length is the original packet's, not what was quoted.
    """
    return decode(l3, l4, protocol)


@dataclass(frozen=True, slots=True)
class Neighbor:
    """What an ARP or IPv6 neighbour-discovery packet is about: whose link address is asked for.

    The diagnosis of a neighbour failure names `target`: the next hop that could not be resolved.
    """

    protocol: str  # "arp" or "nd"
    op: int  # ARP opcode (1 request, 2 reply); ND: the ICMPv6 type (133-137)
    sender: str | None  # ARP: the sender's IPv4 address; ND: the IPv6 source
    target: str | None  # ARP: the target IPv4 address; ND: the NS/NA/redirect target (None for RS/RA)


ARP_HEADER_BYTES = 28  # Ethernet/IPv4 ARP


def decode_arp(header: bytes) -> Neighbor | None:
    """An Ethernet/IPv4 ARP header (28 bytes) as a Neighbor; None for any other kind."""
    if len(header) < ARP_HEADER_BYTES:
        return None
    hrd, pro, hln, pln, op = struct.unpack_from("!HHBBH", header, 0)
    if hrd != 1 or pro != ETH_P_IP or hln != 6 or pln != 4:
        return None
    return Neighbor("arp", op, socket.inet_ntop(socket.AF_INET, header[14:18]),
                    socket.inet_ntop(socket.AF_INET, header[24:28]))


def tcp_flag_names(flags: int) -> tuple[str, ...]:
    """Names of the set TCP flags, SYN before ACK as people read them."""
    names = [name for bit, name in enumerate(_TCP_FLAG_NAMES) if flags & (0x80 >> bit)]
    order = ("SYN", "ACK", "FIN", "RST", "PSH", "URG", "ECE", "CWR")
    return tuple(sorted(names, key=order.index))


def ipv6_transport_offset(l3: bytes, extra: bytes = b"") -> tuple[int, int | None]:
    """Protocol number and transport offset of an IPv6 packet.

    `extra` holds bytes following the fixed header when the caller has them.
    The offset is None when the transport header is unreachable (a
    non-first fragment or a truncated extension header). Raises ValueError
    when `l3` is shorter than the 40-byte fixed header; never otherwise.
    """
    if len(l3) < 40:
        raise ValueError(f"an IPv6 header has 40 bytes, not {len(l3)}")
    data = l3[:40] + extra
    nexthdr = l3[6]
    off = 40
    for _ in range(IPV6_MAX_EXT_HEADERS):
        if nexthdr not in _IPV6_EXT_HEADERS and nexthdr not in (_IPV6_FRAGMENT, _IPV6_AH):
            return nexthdr, off
        if len(data) < off + 4:
            return nexthdr, None
        if nexthdr == _IPV6_FRAGMENT:
            if struct.unpack_from("!H", data, off + 2)[0] & 0xFFF8:
                return data[off], None
            nexthdr, off = data[off], off + 8
        elif nexthdr == _IPV6_AH:
            nexthdr, off = data[off], off + (data[off + 1] + 2) * 4
        else:
            nexthdr, off = data[off], off + (data[off + 1] + 1) * 8
    if nexthdr not in _IPV6_EXT_HEADERS and nexthdr not in (_IPV6_FRAGMENT, _IPV6_AH):
        return nexthdr, off  # exactly IPV6_MAX_EXT_HEADERS of them: the BPF walk reaches it too
    return nexthdr, None


@lru_cache(maxsize=4096)
def _ipv6_text(packed: bytes) -> str:
    """RFC 5952 text as ipaddress gives it (the schema checks that exact form), cached:
    drops come in runs of a few addresses, and ipaddress takes microseconds."""
    return ipaddress.IPv6Address(packed).compressed


def ipv4_later_fragment(l3: bytes) -> bool:
    """Whether an IPv4 header is that of a non-first fragment: its payload has no transport header."""
    return len(l3) >= 20 and bool(struct.unpack_from("!H", l3, 6)[0] & _IPV4_OFFSET_MASK)


def decode(l3: bytes, l4: bytes, protocol: int | None = None) -> PacketHeaders | None:
    """Decodes a network header and the first bytes of its transport header.

    `protocol` overrides the L4 protocol found in `l3` (the BPF side has
    already walked IPv6 extension headers). Returns None for anything that is
    not IPv4 or IPv6. `l4` of a non-first IPv4 fragment is payload, not a
    transport header, and is ignored: ports only where the packet has them.
    """
    if not l3:
        return None
    version = l3[0] >> 4
    if version == 4 and len(l3) >= 20:
        proto = l3[9] if protocol is None else protocol
        # inet_ntop: the dotted quad ipaddress prints, ten times faster (this runs per drop).
        src = socket.inet_ntop(socket.AF_INET, l3[12:16])
        dst = socket.inet_ntop(socket.AF_INET, l3[16:20])
        ip_id = struct.unpack_from("!H", l3, 4)[0]
        ttl = l3[8]
        length = struct.unpack_from("!H", l3, 2)[0]
        if ipv4_later_fragment(l3):
            l4 = b""
    elif version == 6 and len(l3) >= 40:
        proto = protocol if protocol is not None else ipv6_transport_offset(l3)[0]
        src = _ipv6_text(l3[8:24])
        dst = _ipv6_text(l3[24:40])
        ip_id = None
        ttl = l3[7]
        length = struct.unpack_from("!H", l3, 4)[0] + 40
    else:
        return None
    sport = dport = icmp_type = icmp_code = None
    flags: tuple[str, ...] = ()
    if proto in PORT_PROTOCOLS and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4, 0)
        if proto == IPPROTO_TCP and len(l4) >= 14:
            flags = tcp_flag_names(l4[13])
    elif proto in ICMP_PROTOCOLS and len(l4) >= 2:
        icmp_type, icmp_code = l4[0], l4[1]
    return PacketHeaders(
        version=version,
        src=src,
        dst=dst,
        protocol=proto,
        sport=sport,
        dport=dport,
        tcp_flags=flags,
        icmp_type=icmp_type,
        icmp_code=icmp_code,
        ip_id=ip_id,
        ttl=ttl,
        length=length,
        l4=bytes(l4),
    )


def fingerprint(l3: bytes, l4: bytes) -> bytes | None:
    """Bytes that tell one packet from another at a given moment.

    Used to join a BPF drop event with the nftrace verdict for the same
    packet (the kernel's trace id is a keyed hash we cannot compute). Fields
    that hooks rewrite in place (TTL, checksum) are left out; the IPv4 ID or
    IPv6 flow label, the addresses and the first 8 transport bytes (ports and
    TCP sequence, UDP length and checksum, ICMP type/code/id/sequence) stay.

    Both sides must get the same key from what each can see, so packets
    without a transport header are keyed by the network header alone:

    - A non-first IPv4 fragment: the trace hands over its payload as the
      "transport header", BPF reads none. The key takes the fragment offset
      and total length instead, so two fragments of one datagram differ.
    - IPv6 without transport bytes (a non-first fragment, an extension header
      chain too long or truncated). nftables finds no transport offset for a
      non-first fragment (ipv6_find_hdr leaves it 0), so its trace has no
      network header and the first 20 bytes of the IPv6 header as the
      transport header: `fingerprint(b"", th)` recognises that form. Those
      20 bytes end inside the source address, so the key is the flow label,
      payload length, next header and the first 12 bytes of the source,
      for the trace and for BPF alike. It is weaker: equal-sized fragments
      from one source /96 with the same flow label share it.
    """
    if not l3 and len(l4) >= 20 and l4[0] >> 4 == 6:
        return _ipv6_short_key(l4)
    if not l3:
        return None
    version = l3[0] >> 4
    if version == 4 and len(l3) >= 20:
        key = _TAG_V4 + bytes(l3[4:6]) + bytes(l3[9:10]) + bytes(l3[12:20])
        if ipv4_later_fragment(l3):
            return _TAG_V4_FRAGMENT + key[1:] + bytes(l3[2:4]) + bytes(l3[6:8])
    elif version == 6 and len(l3) >= 40:
        if not l4:
            return _ipv6_short_key(l3)
        key = _TAG_V6 + bytes([l3[1] & 0x0F]) + bytes(l3[2:4]) + bytes(l3[6:7]) + bytes(l3[8:40])
    else:
        return None
    return key + bytes(l4[:8])


def _ipv6_short_key(header: bytes) -> bytes:
    """The key of an IPv6 packet from the first 20 bytes of its header (see `fingerprint`)."""
    return _TAG_V6_SHORT + bytes([header[1] & 0x0F]) + bytes(header[2:4]) + bytes(header[4:7]) + bytes(header[8:20])
