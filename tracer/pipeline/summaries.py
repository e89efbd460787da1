"""Summaries: repeated drops, counted in the kernel, reported as one exact event per key.

The kernel counts every drop the filter selects in a map, keyed by its flow
(bpf/tracer.h, struct flow_key), and sends a record only for the first drop
of a key, or for a sample Python asked for. Records can be lost (a full ring
buffer, a full queue) or held back (the events-per-second ceiling); counts
cannot, so each summary reports

    what the kernel counted for the key in the epoch
  - the drops of that key already shown one by one in that epoch.

Summed over every event, `event.count` is then exactly the number of drops
the kernel made that the filter selects, whatever was lost on the way.

Everything here runs in the engine's join thread: no locks.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tracer.bpf.layout import BtfStruct
from tracer.event.model import DropEvent, Namespace, Packet, Summary
from tracer.event.packet import PacketHeaders
from tracer.event.sections import Drop
from tracer.sources.base import EpochClosed
from tracer.sources.drop import DropDecoder, subsystem_from_stack

#: NF_INET_* hook numbers (include/uapi/linux/netfilter.h), for coarse keys' hooks.
_HOOKS = {0: "prerouting", 1: "input", 2: "forward", 3: "output", 4: "postrouting"}
_PORT_PROTOCOLS = {6, 17, 33, 132, 136}  # tcp, udp, dccp, sctp, udplite
_ICMP_PROTOCOLS = {1, 58}
#: How many keys a closed epoch asks samples of, at most: each costs one full record.
SAMPLES_PER_EPOCH = 512
#: Samples asked of one key before giving up on learning its attribution.
SAMPLE_TRIES = 3


class TokenBucket:
    """At most `rate` a second on average, `burst` at once."""

    def __init__(self, rate: float, burst: float | None = None) -> None:
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self.tokens = self.burst
        self.at = time.monotonic()

    def take(self, n: float = 1.0) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


@dataclass(slots=True)
class _Pending:
    """One summary in the making: a key's count and times in a closed epoch."""

    key: bytes
    count: int
    first_ns: int
    last_ns: int


class Summaries:
    """The join thread's bookkeeping of what was shown, and the summaries of the rest."""

    def __init__(self, decoder: DropDecoder, key_type: type[BtfStruct], *, max_rate: int,
                 interval: float, namespace_name: Callable[[int], str | None],
                 want_sample: Callable[[bytes], bool], capacity: int,
                 rule_holds: Callable[[DropEvent], bool] = lambda _event: True) -> None:
        self.decoder = decoder
        self.key_type = key_type
        consts = key_type.constants
        self._flow = consts.value("tracer_counted", "TRACER_COUNTED_FLOW")
        self._coarse = consts.value("tracer_counted", "TRACER_COUNTED_COARSE")
        self._overflow = consts.value("tracer_counted", "TRACER_COUNTED_OVERFLOW")
        self.interval = interval
        #: The events-per-second ceiling on first drops; the source asks it, in its own thread.
        self.ceiling = TokenBucket(max_rate)
        self.max_rate = max_rate
        self.namespace_name = namespace_name
        self.want_sample = want_sample
        self.capacity = capacity
        #: Whether a template's rule (or policy) is still in its namespace's ruleset.
        self.rule_holds = rule_holds
        #: Drops shown one by one, by (epoch, key): the summaries leave them out.
        self.shown: Counter[tuple[int, bytes]] = Counter()
        #: The event each key's summaries copy their attribution from (LRU).
        self.templates: OrderedDict[bytes, DropEvent] = OrderedDict()
        self._tries: Counter[bytes] = Counter()

    # ---------------------------------------------------------- records

    def showing(self, epoch: int, key: bytes, event: DropEvent) -> None:
        """A drop is being shown one by one: its key's summary must not count it again."""
        self.shown[(epoch, key)] += 1
        self.learn(key, event)
        if _wants_rule(event):
            self._ask(key)  # now, so the key's first summary already names its rule

    def learn(self, key: bytes, event: DropEvent) -> None:
        """Keeps `event` as the key's template unless the one kept already names a rule."""
        old = self.templates.get(key)
        if old is not None and _has_rule(old) and not _has_rule(event):
            self.templates.move_to_end(key)
            return
        self.templates[key] = event
        self.templates.move_to_end(key)
        while len(self.templates) > self.capacity:
            self.templates.popitem(last=False)

    def _template(self, key: bytes) -> DropEvent | None:
        """The key's template, unless its rule is gone: a reload replaced it (new handle or
        text), so the flow's drops may have another rule now. Then it is forgotten, and the
        summary says what the key says, without a rule, rather than a wrong one."""
        template = self.templates.get(key)
        if template is None or not _has_rule(template):
            return template
        if not self.rule_holds(template):
            del self.templates[key]
            self._tries.pop(key, None)  # worth new samples: the rule is to be learnt again
            return None
        return template

    # ---------------------------------------------------------- epochs

    def close(self, marker: EpochClosed) -> list[DropEvent]:
        """The summaries of a closed epoch: every count less what was shown of it."""
        for key in marker.forgotten:
            self.templates.pop(key, None)
            self._tries.pop(key, None)
        pending: list[_Pending] = []
        for c in marker.counts:
            n = c.count - self.shown.pop((marker.epoch, c.key), 0)
            if n > 0:
                pending.append(_Pending(c.key, n, c.first_ns, c.last_ns))
        for stale in [k for k in self.shown if k[0] == marker.epoch]:
            del self.shown[stale]  # counted nowhere: cannot happen, but never keep it forever
        pending = self._within_budget(pending)
        if not marker.final:
            self._ask_samples(pending)
        return [self._summary(p) for p in pending]

    def _within_budget(self, pending: list[_Pending]) -> list[_Pending]:
        """Summaries beyond what the ceiling allows an epoch fold into their coarse key's.

        The largest flows keep a summary of their own; the rest add up per
        (namespace, reason, location, hook), so the total stays exact.
        """
        budget = max(1, int(self.max_rate * self.interval))
        if len(pending) <= budget:
            return pending
        pending.sort(key=lambda p: p.count, reverse=True)
        keep, rest = pending[: budget // 2], pending[budget // 2:]
        merged: dict[bytes, _Pending] = {}
        for p in rest:
            coarse = self._coarse_key(p.key)
            m = merged.get(coarse)
            if m is None:
                merged[coarse] = _Pending(coarse, p.count, p.first_ns, p.last_ns)
            else:
                m.count += p.count
                m.first_ns, m.last_ns = min(m.first_ns, p.first_ns), max(m.last_ns, p.last_ns)
        return keep + list(merged.values())

    def _coarse_key(self, key: bytes) -> bytes:
        k = self.key_type.from_buffer_copy(key)
        if k.kind != self._flow:
            return key
        coarse = self.key_type()
        coarse.netns_ino, coarse.reason, coarse.location = k.netns_ino, k.reason, k.location
        coarse.l3proto, coarse.hook, coarse.kind = k.l3proto, k.hook, self._coarse
        return bytes(coarse)

    def _ask_samples(self, pending: list[_Pending]) -> None:
        """Asks the kernel for one more full record of keys whose attribution is unknown."""
        asked = 0
        for p in pending:
            if asked >= SAMPLES_PER_EPOCH:
                return
            template = self._template(p.key)
            if template is not None and not _wants_rule(template):
                continue
            if self.key_type.from_buffer_copy(p.key).kind == self._flow and self._ask(p.key):
                asked += 1

    def _ask(self, key: bytes) -> bool:
        """One more sample of a flow key, unless it was asked for too often already."""
        if self._tries[key] >= SAMPLE_TRIES:
            return False
        self._tries[key] += 1
        return self.want_sample(key)

    # ---------------------------------------------------------- events

    def _summary(self, p: _Pending) -> DropEvent:
        start, end = self.decoder.wall_ns(p.first_ns), self.decoder.wall_ns(p.last_ns)
        summary = Summary(p.count, start, end)
        template = self._template(p.key)
        if template is not None:
            packet = template.packet
            if packet is not None:
                packet = Packet(packet.headers)  # length and mark were one packet's
            return dataclasses.replace(
                template, timestamp_ns=end, summary=summary, process=None, packet=packet,
                drop=dataclasses.replace(template.drop, stack=None))
        return self._from_key(p.key, end, summary)

    def _from_key(self, key: bytes, end: int, summary: Summary) -> DropEvent:
        """A summary of a key whose every record was lost or held back: what the key says."""
        k = self.key_type.from_buffer_copy(key)
        if k.kind == self._overflow:  # the kernel kept nothing but the count
            return DropEvent(timestamp_ns=end, drop=Drop("NOT_SPECIFIED"), summary=summary)
        reason = self.decoder.reasons.name(k.reason)
        location = self.decoder.location(k.location)
        fn = location.split("+", 1)[0]  # the stack is not kept for a key: its call site must do
        ns = Namespace(k.netns_ino, self.namespace_name(k.netns_ino)) if k.netns_ino else None
        headers = _headers(k) if k.kind == self._flow else None
        return DropEvent(
            timestamp_ns=end,
            drop=Drop(reason, location or None, None, subsystem_from_stack([], location, reason) if fn else None,
                      _HOOKS.get(k.hook)),
            packet=Packet(headers) if headers is not None else None,
            netns=ns,
            summary=summary,
        )


def key_flow(key_type: type[BtfStruct], key: bytes) -> tuple[int, PacketHeaders] | None:
    """The namespace and headers of a flow key (None for coarse keys and non-IP drops)."""
    k = key_type.from_buffer_copy(key)
    if k.kind != key_type.constants.value("tracer_counted", "TRACER_COUNTED_FLOW"):
        return None
    headers = _headers(k)
    return None if headers is None else (k.netns_ino, headers)


def _has_rule(event: DropEvent) -> bool:
    nf = event.netfilter
    return nf is not None and (nf.rule is not None or nf.policy is True)


def _wants_rule(event: DropEvent) -> bool:
    """A netfilter drop whose rule (or policy) is not known yet: a sample may tell."""
    return not _has_rule(event) and (event.netfilter is not None or event.drop.reason == "NETFILTER_DROP")


def _headers(k: ctypes.Structure) -> PacketHeaders | None:
    """The packet headers a flow key holds (addresses, protocol, ports or ICMP type)."""
    if k.l3proto == 0x0800:
        version, size = 4, 4
    elif k.l3proto == 0x86DD:
        version, size = 6, 16
    else:
        return None
    src = str(ipaddress.ip_address(bytes(k.saddr[:size])))
    dst = str(ipaddress.ip_address(bytes(k.daddr[:size])))
    if k.later_fragment:  # sport is the fragment offset; there are no ports
        return PacketHeaders(version, src, dst, k.l4proto)
    if k.l4proto in _PORT_PROTOCOLS:
        return PacketHeaders(version, src, dst, k.l4proto, k.sport, k.dport)
    if k.l4proto in _ICMP_PROTOCOLS:
        return PacketHeaders(version, src, dst, k.l4proto, icmp_type=k.sport >> 8,
                             icmp_code=k.sport & 0xFF)
    return PacketHeaders(version, src, dst, k.l4proto)
