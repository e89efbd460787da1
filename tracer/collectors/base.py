"""What a collector promises the pipeline, and the evidence collectors pass along.

A collector adds one kind of knowledge to a drop, from one source in the
kernel (nftrace messages, iptables-legacy TRACE logs, conntrack, links).
It can say why it cannot run on this host (the doctor shows that), follows
network namespaces as they come and go, and enriches each drop by filling
only its own part: a section of the event, or its slot of `Evidence` when
its facts are raw material for another step (the nftrace and xtrace
verdicts, which attribution merges into the event's netfilter section).
The pipeline calls collectors in a fixed order, so a collector may read
the evidence of those before it, never write it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tracer.event.model import DropEvent
from tracer.netns import Netns
from tracer.sources.drop import KernelDrop

if TYPE_CHECKING:
    from tracer.collectors.nftrace import TraceVerdict
    from tracer.collectors.xtrace import LegacyVerdict
    from tracer.netfilter.nftables import Ruleset


@dataclass
class Evidence:
    """One drop's facts on their way to the event: each slot has one collector that fills it."""

    drop: KernelDrop
    netns: Netns | None
    #: xtrace: the iptables-legacy TRACE verdict of this packet, if it was traced.
    legacy: LegacyVerdict | None = None
    #: xtrace: whether the namespace has iptables-legacy tables at all.
    legacy_present: bool = False
    #: nftrace: the verdict of this packet's trace, and the ruleset of its namespace.
    verdict: TraceVerdict | None = None
    ruleset: Ruleset | None = None


class Collector(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """Why this collector cannot run here (None: it can); shown by `tracer doctor`."""

    def start(self, namespaces: Sequence[Netns]) -> None:
        """Begins collecting in these namespaces; raises with a clear message when it cannot."""

    def namespaces_changed(self, namespaces: Sequence[Netns]) -> None:
        """The watched namespaces now: start in the new ones, let go of the vanished."""

    def enrich(self, event: DropEvent, evidence: Evidence) -> None:
        """Fills this collector's part for one drop (its section, or its slot of evidence)."""

    def stop(self) -> None:
        """Stops and undoes every change it made to the host."""
