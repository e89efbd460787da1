"""This host's drops while probes run: the answer's fate, and `--explain`.

The drop engine runs in-process, filtered to the probed addresses (and this
host's own source addresses for them, so ICMP errors from routers count) and
to this network namespace. Two questions are answered from its events:

- the answer's fate. The packet socket sees an answer before this host's
  firewall; the engine's event for that very packet (same addresses,
  protocol, IPv4 ID and first transport bytes) says whether a rule, a
  policy or the kernel then dropped it (`answer_dropped`). The kernel's
  NO_SOCKET for it is the opposite: the answer passed every hook and
  reached a transport layer where no socket owns the raw probe's port (the
  kernel answers a SYN-ACK with an RST), which is the normal end of a probe.
- with `--explain`, every drop event of a probe packet (or of its answer)
  carries the probe's id, which is how a probe result finds the rule that
  killed it. The NO_SOCKETs of the probe's own handshake are left out.
"""

from __future__ import annotations

# Before any scapy import: scapy then warns only into the debug log (tracer/probe/quiet.py).
from tracer.probe import quiet  # noqa: F401

# isort: split

import threading
import time
from collections import defaultdict

from scapy.packet import Packet

from tracer import netns
from tracer.config import Config, Scope
from tracer.event.model import DropEvent
from tracer.event.packet import PacketHeaders, decode, ipv6_transport_offset
from tracer.event.rendered import Rendered
from tracer.event.sections import Netfilter
from tracer.event.text import printable
from tracer.pipeline.engine import Engine
from tracer.probe import marker
from tracer.probe.reach import ProbeResult

#: Drop reasons that prove an answer passed this host's firewall: the stack got it and no socket owns
#: the raw probe's port.
DELIVERED_REASONS = frozenset({"NO_SOCKET"})
#: Drop events kept for matching answers, at most (the BPF side sends only a flow's first drop anyway).
MAX_EVENTS = 10_000
#: Seconds an answer's fate may trail the verdict wait before the answer counts as delivered.
FATE_MARGIN = 0.7

PacketKey = tuple[int, str, str, int, "int | None", bytes]


def packet_key(h: PacketHeaders) -> PacketKey:
    """What tells one packet from another: addresses, protocol, IPv4 ID and the first 8 transport
    bytes (ports and sequence number, or ICMP type, code, checksum and id), all of which the
    packet socket and the kfree_skb tracepoint see alike."""
    return (h.version, h.src, h.dst, h.protocol, h.ip_id, bytes(h.l4[:8]))


def answer_key(pkt: Packet) -> PacketKey | None:
    """`packet_key` of an answer the packet socket received (from its raw bytes)."""
    raw = bytes(pkt.original) if getattr(pkt, "original", None) else bytes(pkt)
    if not raw:
        return None
    version = raw[0] >> 4
    protocol: int | None = None
    if version == 4 and len(raw) >= 20:
        offset: int | None = (raw[0] & 0x0F) * 4
    elif version == 6 and len(raw) >= 40:
        protocol, offset = ipv6_transport_offset(raw[:40], raw[40:])
    else:
        return None
    if offset is None:
        return None
    headers = decode(raw[:offset], raw[offset:offset + 20], protocol)
    return packet_key(headers) if headers is not None else None


def _event_key(event: DropEvent) -> PacketKey | None:
    headers = event.packet.headers if event.packet is not None else None
    return packet_key(headers) if headers is not None else None


class LocalDrops:
    """This host's drop events while probes run (`start` ... `stop`, or a context manager)."""

    def __init__(self, addresses: list[str]) -> None:
        from tracer.config import host_networks

        filt = Scope(hosts=host_networks(addresses), netns=str(netns.current_inode()))
        self.engine = Engine(Config(scope=filt), self)
        self.by_probe: dict[str, list[Rendered]] = defaultdict(list)
        self._events: list[Rendered] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    # the engine's sink: keeps drop events, rendered only when asked for
    def submit(self, rendered: Rendered) -> None:
        event = rendered.event
        if not isinstance(event, DropEvent):  # notices: alerts, loss reports
            return
        with self._cond:
            if event.probe is not None and event.probe.id:
                self.by_probe[event.probe.id].append(rendered)
            if len(self._events) < MAX_EVENTS:
                self._events.append(rendered)
            self._cond.notify_all()

    def start(self) -> None:
        """Loads and attaches the engine; raises as `tracer watch` would when it cannot."""
        self.engine.start()
        self._thread = threading.Thread(target=self.engine.run, name="probe-drops", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        # A drop's event can trail the probe by the engine's verdict wait.
        time.sleep(self.engine.config.verdict_wait + 0.2)
        self.engine.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> LocalDrops:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def drops(self, ids: list[str]) -> list[dict]:
        with self._cond:
            return [r.ecs() for i in ids for r in self.by_probe.get(i, [])]

    def _fate_locked(self, key: PacketKey) -> Rendered | None:
        for rendered in self._events:
            event = rendered.event
            if isinstance(event, DropEvent) and event.summary is None and _event_key(event) == key:
                return rendered
        return None

    def fate(self, answer: Packet) -> Rendered | None:
        """The drop event of this very answer packet, if this host dropped (or freed) it."""
        key = answer_key(answer)
        if key is None:
            return None
        with self._cond:
            return self._fate_locked(key)

    def wait_fates(self, answers: list[Packet]) -> None:
        """Until each answer has its drop event, or the verdict wait and a margin have passed.

        An answer nothing dropped (an echo reply the kernel consumed, an ICMP error it noted)
        never gets one: that is what the deadline is for.
        """
        keys = {k for k in map(answer_key, answers) if k is not None}
        deadline = time.monotonic() + self.engine.config.verdict_wait + FATE_MARGIN
        with self._cond:
            while keys:
                keys = {k for k in keys if self._fate_locked(k) is None}
                left = deadline - time.monotonic()
                if not keys or left <= 0:
                    return
                self._cond.wait(left)


def place(event: dict) -> str:
    """Where this host dropped a packet: `input rule: inet fw chain input rule 4 "tcp dport 443 drop"
    (comment)`, `the input policy: inet fw chain input policy drop`, or the kernel's reason.

    Names come from the namespace's owner, so they are escaped (Netfilter.describe, printable).
    """
    nf = event.get("netfilter")
    if nf is None:
        drop = event["drop"]
        return f"the kernel: {printable(drop['reason'])} at {printable(drop.get('location', '?'))}"
    hook = printable(nf.get("hook") or "")
    described = Netfilter.from_ecs(nf).describe()
    if nf.get("policy"):
        return f"the {hook} policy: {described}" if hook else f"the policy: {described}"
    if nf.get("rule"):
        return f"{hook} rule: {described}" if hook else f"rule: {described}"
    backend = printable(nf.get("backend") or "?")
    return f"netfilter ({backend} {hook})" if hook else f"netfilter ({backend})"


def _what(event: dict) -> str:
    return "rejected" if event["event"]["action"] == "rejected" else "dropped"


def sentence(event: dict) -> str:
    """"dropped here by input rule: inet fw chain input rule 4 "tcp dport 443 drop"", or the
    policy or the kernel's reason (see `place`)."""
    return f"{_what(event)} here by {place(event)}"


def delivered(event: DropEvent) -> bool:
    """Whether the kernel freed an answer only because no socket owns the raw probe's port."""
    return event.netfilter is None and event.drop.reason in DELIVERED_REASONS


def judge(result: ProbeResult, drops: LocalDrops) -> None:
    """Sets the fate of the result's answer from this host's drop event for it (if any)."""
    if result.answer is None:
        return
    rendered = drops.fate(result.answer)
    event = rendered.event if rendered is not None else None
    if not isinstance(event, DropEvent) or delivered(event):
        result.answer_fate = "delivered"
        return
    ecs = rendered.ecs() if rendered is not None else {}
    # The very packet that answered this probe: its event says so even where no marker shows it
    # (a UDP service's own answer).
    answer_dropped(result, ecs if "probe" in ecs else {**ecs, "probe": {"id": result.probe_id}})


def answer_dropped(result: ProbeResult, event: dict) -> None:
    """Turns a result whose answer this host dropped into `answer_dropped`, naming where."""
    by = place(event)
    result.answer_verdict, result.answer_fate, result.answer_note = result.verdict, "dropped", by
    result.verdict = "answer_dropped"
    firewall = "this host's firewall" if event.get("netfilter") else "this host"
    result.detail = (f"answer {_what(event)} here by {by}; the target answered ({result.detail}), "
                     f"but {firewall} drops that answer, so applications time out")
    result.local_drops = [event, *(d for d in result.local_drops if d is not event)]
    result.next_steps = [
        ("let the answer in on this host (accept established,related traffic before that rule, "
         "or change the rule), then probe again") if event.get("netfilter") else
        "see the drop event in local_drops (--json) for the kernel's reason, then probe again",
    ]


def own_handshake(event: dict, result: ProbeResult) -> bool:
    """The kernel's NO_SOCKET for an answer to the raw probe: no socket owns the probe's source
    port, so the kernel frees the SYN-ACK (and sends an RST) or the UDP answer. Every probe that
    gets through does that; it is no reason for anything."""
    if event["drop"]["reason"] not in DELIVERED_REASONS or event.get("netfilter") is not None:
        return False
    try:
        n = int(result.probe_id.removeprefix("tr-"), 16)
    except ValueError:
        return False
    src, dst = event.get("source", {}), event.get("destination", {})
    if dst.get("port") != marker.source_port(n):
        return False
    if result.target.port is not None and src.get("port") != result.target.port:
        return False
    flags = event.get("tcp", {}).get("flags", [])
    return result.target.protocol != "tcp" or "ACK" in flags or "RST" in flags


def explain(result: ProbeResult, drops: list[dict]) -> None:
    """Adds this host's drops of the probe (or of its answer) to the result."""
    drops = [d for d in drops if not own_handshake(d, result)]
    known = result.local_drops
    drops = [*known, *(d for d in drops if d not in known)]
    result.local_drops = drops
    if result.answer_fate == "dropped":  # judge() named the answer's drop already
        return
    # The probe's own drop says more than that of an answer it provoked.
    drops = sorted(drops, key=lambda ev: ev.get("source", {}).get("ip") == result.target.ip)
    result.local_drops = drops
    if drops:
        first = drops[0]
        flags = first.get("tcp", {}).get("flags", [])
        own = first.get("source", {}).get("ip") != result.target.ip
        packet = "your probe" if own else ("the answer " + ("(" + ",".join(flags) + ")" if flags else ""))
        result.detail = f"{packet.strip()} to {result.target} was {sentence(first)}"
        result.next_steps = ["change or remove that rule on this host, then probe again"]
        if first["event"]["action"] == "rejected":
            # A local reject rule answers like a closed port (RST) or an ICMP
            # error; the drop event is what tells it apart.
            result.verdict = "prohibited"
    elif result.verdict == "filtered":
        result.detail = ("the probe left this host (no drop here) and no answer came back: it was lost "
                         "upstream, at the remote host's firewall, a cloud security group or a network ACL")
        result.next_steps = [
            f"run `tracer watch --port {result.target.port}` on the target: its events carry "
            f"probe.id {result.probe_id}" if result.target.port else
            f"run `tracer watch --host <this host>` on the target: its events carry probe.id {result.probe_id}",
            "check the cloud security group / network ACL for this port",
            "traceroute to see where the path ends",
        ]
