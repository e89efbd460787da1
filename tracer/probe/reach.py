"""`tracer probe`: is a port open, closed, filtered, prohibited or unreachable?

Each target gets marked probe packets (tracer/probe/marker.py) built with
scapy. They are sent through a raw IP socket, so they cross this host's own
OUTPUT chain like any application's packets (a local rule can drop them, and
then the drop event says which), and answers are read from a packet socket,
which sees them before this host's INPUT chain. An answer seen there may
still be dropped by this host's own firewall, as an application's would be:
the raw socket alone cannot tell, so the answer's fate is decided from the
drop engine's events (tracer/probe/explain.py) and a dropped answer makes
the verdict `answer_dropped`, never `open`.
"""

from __future__ import annotations

# Before any scapy import: scapy then warns only into the debug log (tracer/probe/quiet.py).
from tracer.probe import quiet  # noqa: F401

# isort: split

import errno
import ipaddress
import os
import random
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6DestUnreach,
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    ICMPv6PacketTooBig,
    IPerror6,
    IPv6,
)
from scapy.packet import Packet

from tracer.probe import marker

#: What the answer (or its absence) says; `answer_dropped`: an answer came, and this host dropped it.
VERDICTS = ("open", "closed", "filtered", "prohibited", "unreachable", "answer_dropped")
#: The fate on this host of an answer the raw socket saw.
FATES = ("delivered", "dropped", "unchecked")

ETH_P_ALL = 0x0003
PACKET_HOST = 0
IP_MTU_DISCOVER, IP_PMTUDISC_PROBE = 10, 3
IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE = 23, 3

#: ICMP destination-unreachable codes -> verdict (RFC 792, RFC 1812).
ICMP4_UNREACH = {0: "unreachable", 1: "unreachable", 2: "closed", 3: "closed", 5: "unreachable",
                 6: "unreachable", 7: "unreachable", 8: "unreachable", 9: "prohibited",
                 10: "prohibited", 11: "unreachable", 12: "unreachable", 13: "prohibited",
                 14: "prohibited", 15: "prohibited"}
#: ICMPv6 destination-unreachable codes -> verdict (RFC 4443).
ICMP6_UNREACH = {0: "unreachable", 1: "prohibited", 2: "unreachable", 3: "unreachable",
                 4: "closed", 5: "prohibited", 6: "prohibited"}


class ProbeError(Exception):
    """The probe could not run (bad target, no permission)."""


@dataclass(frozen=True)
class Target:
    host: str
    ip: str
    protocol: str  # tcp, udp, icmp
    port: int | None = None

    @property
    def version(self) -> int:
        return ipaddress.ip_address(self.ip).version

    def to_json(self) -> dict:
        out: dict = {"host": self.host, "ip": self.ip, "protocol": self.protocol}
        if self.port is not None:
            out["port"] = self.port
        return out

    def __str__(self) -> str:
        addr = f"[{self.ip}]" if self.version == 6 else self.ip
        return f"{self.protocol} {addr}:{self.port}" if self.port is not None else f"{self.protocol} {self.ip}"


@dataclass
class Answer:
    """What came back for a probe, and when."""

    packet: Packet
    rtt: float
    responder: str


@dataclass
class ProbeResult:
    target: Target
    verdict: str
    probe_id: str
    attempts: int
    detail: str
    rtt_ms: float | None = None
    responder: str | None = None
    icmp: tuple[int, int] | None = None
    local_drops: list[dict] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    #: The answer as the packet socket saw it (not serialised): what the engine's events are matched to.
    answer: Packet | None = field(default=None, repr=False, compare=False)
    #: The verdict the answer alone gives, kept when this host's fate for it changes `verdict`.
    answer_verdict: str | None = None
    #: delivered, dropped or unchecked (FATES); None when no answer came.
    answer_fate: str | None = None
    #: Where this host dropped the answer ("input rule: inet fw chain input rule 4 ..."), or why unchecked.
    answer_note: str | None = None

    def to_json(self) -> dict:
        out: dict = {
            "target": self.target.to_json(),
            "verdict": self.verdict,
            "detail": self.detail,
            "probe": {"id": self.probe_id, "attempts": self.attempts},
        }
        if self.rtt_ms is not None:
            out["rtt_ms"] = round(self.rtt_ms, 3)
        if self.responder is not None:
            out["responder"] = self.responder
        if self.icmp is not None:
            out["icmp"] = {"type": self.icmp[0], "code": self.icmp[1]}
        if self.answer_fate is not None:
            answer: dict = {"verdict": self.answer_verdict or self.verdict, "fate": self.answer_fate}
            if self.answer_note:
                answer["dropped_by" if self.answer_fate == "dropped" else "note"] = self.answer_note
            out["answer"] = answer
        if self.local_drops:
            out["local_drops"] = self.local_drops
        if self.next_steps:
            out["next_steps"] = self.next_steps
        return out


# ------------------------------------------------------------------ packets


def build(target: Target, n: int, size: int = 0, source: str = "") -> Packet:
    """The probe packet for `target`, carrying probe number `n`.

    `size` pads ICMP and UDP probes (and TCP SYNs, as SYN data) to that IP
    length, with DF set on IPv4, for path MTU probing.
    """
    src = source or None
    ip = IP(src=src, dst=target.ip, id=n & 0xFFFF, flags="DF") if target.version == 4 else \
        IPv6(src=src, dst=target.ip)
    hdr = len(ip)
    if target.protocol == "tcp":
        syn = TCP(sport=marker.source_port(n), dport=target.port, flags="S", seq=marker.tcp_sequence(n),
                  window=64240, options=[("MSS", 1460)])
        pad = max(0, size - hdr - len(syn))
        return ip / syn / (b"\0" * pad) if pad else ip / syn
    if target.protocol == "udp":
        udp = UDP(sport=marker.source_port(n), dport=target.port)
        return ip / udp / marker.payload(n, max(12, size - hdr - 8))
    echo = ICMP(type=8, id=marker.MAGIC, seq=n) if target.version == 4 else \
        ICMPv6EchoRequest(id=marker.MAGIC, seq=n)
    return ip / echo / marker.payload(n, max(12, size - hdr - 8))


def _quoted(answer: Packet) -> Packet | None:
    """The copy of our packet inside an ICMP error."""
    for layer in (IPerror, IPerror6):
        if answer.haslayer(layer):
            return answer[layer]
    return None


def syn_data(pkt: Packet) -> int:
    """Bytes of payload a probe SYN carries (pmtu pads SYNs to the size it tries)."""
    return len(pkt[TCP].payload) if pkt.haslayer(TCP) else 0


def _acks(n: int, data: int) -> set[int]:
    """Acknowledgement numbers that answer SYN `n` carrying `data` bytes.

    A SYN-ACK acknowledges the SYN alone (seq + 1: Linux does not accept SYN
    data without TCP Fast Open); a closed port's RST acknowledges every
    sequence number the segment used, SYN and data (RFC 9293 3.10.7.1:
    seq + 1 + data), and a TFO listener may ack the data too.
    """
    seq = marker.tcp_sequence(n)
    return {(seq + 1) & 0xFFFFFFFF, (seq + 1 + data) & 0xFFFFFFFF}


def matches(target: Target, n: int, answer: Packet, data: int = 0) -> bool:
    """Whether `answer` answers probe `n` (directly or as an ICMP error about it).

    `data` is the payload length of a padded TCP SYN (see `_acks`).
    """
    quoted = _quoted(answer)
    if quoted is not None:
        if target.protocol == "tcp":
            t = quoted.getlayer(TCPerror)
            return t is not None and t.sport == marker.source_port(n) and t.seq == marker.tcp_sequence(n)
        if target.protocol == "udp":
            u = quoted.getlayer(UDPerror)
            return u is not None and u.sport == marker.source_port(n) and u.dport == target.port
        raw = bytes(quoted.payload)
        return len(raw) >= 8 and raw[4:8] == bytes([marker.MAGIC >> 8, marker.MAGIC & 0xFF, n >> 8 & 0xFF, n & 0xFF])
    src = answer[IP].src if answer.haslayer(IP) else answer[IPv6].src
    if target.protocol == "tcp" and answer.haslayer(TCP):
        t = answer[TCP]
        return (src == target.ip and t.sport == target.port and t.dport == marker.source_port(n)
                and t.ack in _acks(n, data))
    if target.protocol == "udp" and answer.haslayer(UDP):
        u = answer[UDP]
        return src == target.ip and u.sport == target.port and u.dport == marker.source_port(n)
    if target.protocol == "icmp":
        if answer.haslayer(ICMP) and answer[ICMP].type == 0:
            return answer[ICMP].id == marker.MAGIC and answer[ICMP].seq == n
        if answer.haslayer(ICMPv6EchoReply):
            return answer[ICMPv6EchoReply].id == marker.MAGIC and answer[ICMPv6EchoReply].seq == n
    return False


def icmp_type_code(answer: Packet) -> tuple[int, int] | None:
    if answer.haslayer(ICMP):
        return answer[ICMP].type, answer[ICMP].code
    for layer in (ICMPv6DestUnreach, ICMPv6PacketTooBig, ICMPv6EchoReply):
        if answer.haslayer(layer):
            return answer[layer].type, answer[layer].code
    return None


def classify(target: Target, answer: Answer | None) -> tuple[str, str]:
    """Verdict and a sentence for a person, from the answer (None: nothing came back)."""
    if answer is None:
        if target.protocol == "udp":
            return "filtered", ("no answer: a firewall dropped the datagram, or the service "
                                "ignores this payload (UDP cannot tell them apart)")
        return "filtered", "no answer after retries: a firewall dropped the probe or its answer"
    pkt = answer.packet
    icmp = icmp_type_code(pkt)
    if _quoted(pkt) is not None and icmp is not None:
        kind, code = icmp
        table = ICMP4_UNREACH if target.version == 4 else ICMP6_UNREACH
        if (target.version == 4 and kind == 3) or (target.version == 6 and kind == 1):
            verdict = table.get(code, "unreachable")
            return verdict, f"ICMP destination unreachable (type {kind} code {code}) from {answer.responder}"
        return "unreachable", f"ICMP type {kind} code {code} from {answer.responder}"
    if target.protocol == "tcp" and pkt.haslayer(TCP):
        flags = pkt[TCP].flags
        if flags.S and flags.A:
            return "open", "SYN-ACK: something listens on this port"
        if flags.R:
            return "closed", "RST: the host answered, nothing listens on this port (or a reject rule sent it)"
    if target.protocol == "udp":
        return "open", "the service answered"
    if target.protocol == "icmp":
        return "open", "echo reply"
    return "unreachable", f"unexpected answer {pkt.summary()}"


# ------------------------------------------------------------------ sockets


class Wire:
    """Sends raw IP probes and receives what comes back, before the firewall."""

    def __init__(self, version: int) -> None:
        family = socket.AF_INET if version == 4 else socket.AF_INET6
        try:
            self.out = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self.inp = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
        except PermissionError as exc:
            raise ProbeError("probes need raw sockets: run as root (or with CAP_NET_RAW)") from exc
        # Probe at the size asked even after an ICMP "fragmentation needed"
        # lowered the route's cached path MTU: pmtu must see the path, not the cache.
        if version == 4:
            self.out.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_PROBE)
        else:
            self.out.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, IPV6_PMTUDISC_PROBE)
        self.inp.setblocking(False)
        self.version = version
        self.family = family
        # A socket made now, in the namespace the Wire belongs to, so later
        # route look-ups happen there even from another thread or namespace.
        self._netns_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        self._sources: dict[str, str] = {}

    def source_for(self, dst: str) -> str:
        """The address this host's routing picks to reach `dst` (as a connect() would).

        Set explicitly rather than left to scapy, whose routing table is the
        one of the namespace it was imported in.
        """
        if dst not in self._sources:
            route = self._route_socket()
            try:
                route.connect((dst, 9))
                self._sources[dst] = route.getsockname()[0]
            except OSError:
                return ""
            finally:
                route.close()
        return self._sources[dst]

    def send(self, pkt: Packet) -> int | None:
        """Sends; returns the errno when this host refused to send it."""
        dst = pkt[IP].dst if self.version == 4 else pkt[IPv6].dst
        try:
            self.out.sendto(bytes(pkt), (dst, 0))
        except OSError as exc:
            return exc.errno
        return None

    def receive(self, accept: Callable[[Packet], bool], timeout: float) -> Packet | None:
        """The first incoming packet `accept` likes, within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            ready, _, _ = select.select([self.inp], [], [], left)
            if not ready:
                return None
            while True:
                try:
                    data, addr = self.inp.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] != PACKET_HOST or not data:
                    continue
                version = data[0] >> 4
                if version != self.version:
                    continue
                pkt = IP(data) if version == 4 else IPv6(data)
                if accept(pkt):
                    return pkt

    def _route_socket(self) -> socket.socket:
        from tracer.netns import _setns

        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            _setns(self._netns_fd)
            return socket.socket(self.family, socket.SOCK_DGRAM)
        finally:
            _setns(saved)
            os.close(saved)

    def close(self) -> None:
        self.out.close()
        self.inp.close()
        os.close(self._netns_fd)


# ------------------------------------------------------------------ probing

_LOCAL_ERRORS = {
    errno.ENETUNREACH: ("unreachable", "this host has no route to the target"),
    errno.EHOSTUNREACH: ("unreachable", "this host cannot reach the target (no route or neighbour)"),
    errno.EPERM: ("filtered", "this host's own firewall refused to send the probe (output chain)"),
    errno.EACCES: ("prohibited", "this host refused to send the probe"),
    errno.EMSGSIZE: ("unreachable", "the probe is larger than the interface MTU"),
}


def next_number() -> int:
    """A random start, so probes of separate runs carry different ids."""
    return random.randrange(0, 0x10000)


def probe_one(wire: Wire, target: Target, n: int, *, retries: int = 2, timeout: float = 1.0) -> ProbeResult:
    """Sends probe `n` to `target` up to 1 + `retries` times and classifies the outcome."""
    attempts = 0
    for _ in range(retries + 1):
        attempts += 1
        pkt = build(target, n, source=wire.source_for(target.ip))
        sent = time.monotonic()
        err = wire.send(pkt)
        if err is not None:
            failed = f"sending failed: {errno.errorcode.get(err, err)}"
            verdict, detail = _LOCAL_ERRORS.get(err, ("unreachable", failed))
            return ProbeResult(target, verdict, marker.probe_id(n), attempts, detail, responder="local")
        got = wire.receive(lambda p: matches(target, n, p), timeout)
        if got is not None:
            responder = got[IP].src if got.haslayer(IP) else got[IPv6].src
            answer = Answer(got, time.monotonic() - sent, responder)
            verdict, detail = classify(target, answer)
            return ProbeResult(target, verdict, marker.probe_id(n), attempts, detail,
                               rtt_ms=answer.rtt * 1000, responder=responder, icmp=_icmp_of(got),
                               answer=got)
    verdict, detail = classify(target, None)
    return ProbeResult(target, verdict, marker.probe_id(n), attempts, detail)


def _icmp_of(pkt: Packet) -> tuple[int, int] | None:
    return icmp_type_code(pkt) if _quoted(pkt) is not None else None


def resolve(host: str, want_v6: bool) -> str:
    """The address to probe: a literal as given, else the first of the family asked."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    family = socket.AF_INET6 if want_v6 else socket.AF_INET
    try:
        infos = socket.getaddrinfo(host, None, family, socket.SOCK_RAW)
    except socket.gaierror as exc:
        raise ProbeError(f"cannot resolve {host!r}: {exc.strerror}") from None
    return str(infos[0][4][0])


def targets(host: str, ports: list[int], protocol: str, v6: bool) -> list[Target]:
    ip = resolve(host, v6)
    if protocol == "icmp":
        return [Target(host, ip, "icmp")]
    if not ports:
        raise ProbeError(f"--proto {protocol} needs at least one --port")
    return [Target(host, ip, protocol, port) for port in ports]
