"""Header decoding and the drop/trace join fingerprint, on packets scapy builds."""

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop

from tracer.event.packet import (
    decode,
    fingerprint,
    ipv6_transport_offset,
    tcp_flag_names,
)


def split(pkt, l3_len):
    raw = bytes(pkt)
    return raw[:l3_len], raw[l3_len:l3_len + 20]


def test_ipv4_tcp_syn():
    l3, l4 = split(IP(src="198.18.0.1", dst="198.18.0.2", id=777) / TCP(sport=40000, dport=443, flags="S"), 20)
    h = decode(l3, l4)
    assert (h.version, h.src, h.dst, h.protocol) == (4, "198.18.0.1", "198.18.0.2", 6)
    assert (h.sport, h.dport, h.tcp_flags, h.ip_id, h.length) == (40000, 443, ("SYN",), 777, 40)
    assert h.transport == "tcp"


def test_ipv6_udp_compressed_lowercase():
    pkt = IPv6(src="2001:DB8::1", dst="2001:db8:0:0::2") / UDP(sport=5353, dport=53)
    l3, l4 = split(pkt, 40)
    h = decode(l3, l4)
    assert (h.src, h.dst, h.sport, h.dport, h.transport) == ("2001:db8::1", "2001:db8::2", 5353, 53, "udp")
    assert h.length == 48


def test_icmp_and_icmpv6_types():
    h4 = decode(*split(IP(src="198.18.0.1", dst="198.18.0.2") / ICMP(type=8), 20))
    assert (h4.icmp_type, h4.icmp_code, h4.sport) == (8, 0, None)
    h6 = decode(*split(IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6EchoRequest(), 40))
    assert (h6.transport, h6.icmp_type) == ("ipv6-icmp", 128)


def test_ipv6_extension_headers_are_walked():
    pkt = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrHopByHop() / TCP(dport=22)
    raw = bytes(pkt)
    assert ipv6_transport_offset(raw[:40], raw[40:]) == (6, 48)
    frag = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(offset=10) / UDP()
    raw = bytes(frag)
    assert ipv6_transport_offset(raw[:40], raw[40:])[1] is None


def test_tcp_flags_in_reading_order():
    assert tcp_flag_names(0x12) == ("SYN", "ACK")
    assert tcp_flag_names(0x14) == ("ACK", "RST")
    assert tcp_flag_names(0x00) == ()


def test_fingerprint_ignores_ttl_and_checksum_but_not_identity():
    a = IP(src="198.18.0.1", dst="198.18.0.2", id=1, ttl=64) / TCP(sport=1, dport=443, seq=5)
    b = IP(src="198.18.0.1", dst="198.18.0.2", id=1, ttl=63) / TCP(sport=1, dport=443, seq=5)
    c = IP(src="198.18.0.1", dst="198.18.0.2", id=2, ttl=64) / TCP(sport=1, dport=443, seq=5)
    fa, fb, fc = (fingerprint(*split(p, 20)) for p in (a, b, c))
    assert fa == fb
    assert fa != fc


def test_not_ip_is_none():
    assert decode(b"", b"") is None
    assert decode(b"\x00" * 40, b"") is None
    assert fingerprint(b"\x10" * 40, b"") is None
