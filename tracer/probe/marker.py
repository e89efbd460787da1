"""The marker that makes a probe packet recognisable wherever a tracer sees it.

A probe must look like ordinary traffic to the path (no odd flags, no IP
options), yet a tracer on this host or on the server must tell it from real
traffic and name the probe. The marker lives in fields every protocol has
and that middleboxes leave alone:

- TCP: source port 61000 + (n & 0xff) and sequence number 0x7472_0000 | n;
  the low byte of the sequence must equal the port offset. A random segment
  matches by chance once in about 2^32.
- UDP: source port as for TCP, payload starting with b"TRPROBE" + n (an echo
  service's answer, to that port with that payload, is recognised too).
- ICMP/ICMPv6 echo: identifier 0x7472, sequence n, payload b"TRPROBE" + n.

`n` is a 16-bit probe number; its text form `tr-XXXX` is the `probe.id` of
drop events and probe results.
"""

from __future__ import annotations

import struct

from tracer.event.packet import (
    IPPROTO_ICMP,
    IPPROTO_ICMPV6,
    IPPROTO_TCP,
    IPPROTO_UDP,
    PacketHeaders,
)

MAGIC = 0x7472  # "tr"
PORT_BASE = 61000
PAYLOAD_TAG = b"TRPROBE"
_ECHO_REQUEST = {IPPROTO_ICMP: 8, IPPROTO_ICMPV6: 128}
_ECHO_REPLY = {IPPROTO_ICMP: 0, IPPROTO_ICMPV6: 129}


def probe_id(n: int) -> str:
    return f"tr-{n & 0xFFFF:04x}"


def source_port(n: int) -> int:
    return PORT_BASE + (n & 0xFF)


def tcp_sequence(n: int) -> int:
    return (MAGIC << 16) | (n & 0xFFFF)


def payload(n: int, size: int = 12) -> bytes:
    """Probe payload of `size` bytes (at least the tag and the number)."""
    head = PAYLOAD_TAG + struct.pack("!H", n & 0xFFFF)
    return head + b"\0" * max(0, size - len(head))


def recognise(p: PacketHeaders | None) -> str | None:
    """The probe id carried by a packet, or None for ordinary traffic.

    Reads only the first 20 transport bytes, which is what the BPF side
    captures.
    """
    if p is None or len(p.l4) < 8:
        return None
    l4 = p.l4
    if p.protocol == IPPROTO_TCP and len(l4) >= 12 and p.sport is not None:
        seq, ack = struct.unpack_from("!II", l4, 4)
        n = seq & 0xFFFF
        if seq >> 16 == MAGIC and p.sport == source_port(n):
            return probe_id(n)
        # The answer to a probe (SYN-ACK, RST) acknowledges its sequence + 1.
        n = (ack - 1) & 0xFFFF
        if "ACK" in p.tcp_flags and (ack - 1) >> 16 == MAGIC and p.dport == source_port(n):
            return probe_id(n)
        return None
    if p.protocol == IPPROTO_UDP and p.sport is not None:
        if l4[8:15] == PAYLOAD_TAG and len(l4) >= 17:
            n = struct.unpack_from("!H", l4, 15)[0]
            # The probe itself, or an echo service's answer to it (the payload sent back).
            if p.sport == source_port(n) or p.dport == source_port(n):
                return probe_id(n)
        return None
    if p.protocol in _ECHO_REQUEST and l4[0] in (_ECHO_REQUEST[p.protocol], _ECHO_REPLY[p.protocol]):
        ident, n = struct.unpack_from("!HH", l4, 4)
        if ident == MAGIC and l4[8:15] == PAYLOAD_TAG:
            return probe_id(n)
    return None
