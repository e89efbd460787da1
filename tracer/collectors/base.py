"""What a collector promises the pipeline, and the evidence collectors pass along.

A collector adds one kind of knowledge to a drop, from one source in the
kernel (nftrace messages, iptables-legacy TRACE logs, conntrack, links).
It can say why it cannot run on this host (the doctor shows that), follows
network namespaces as they come and go, and enriches each drop by filling
only its own part. Two kinds:

- a `Collector` fills one section of the event (conntrack, interfaces);
- a `TraceCollector` fills its slot of the drop's `Evidence`: raw material
  for attribution, which merges the nftrace and xtrace verdicts into the
  netfilter section before the event is built.

The pipeline calls them in a fixed order (trace collectors, attribution,
then collectors), so each may read what those before it filled, never
write it.
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


class _Lifecycle(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """Why this collector cannot run here (None: it can); shown by `tracer doctor`."""

    def start(self, namespaces: Sequence[Netns]) -> None:
        """Begins collecting in these namespaces; raises with a clear message when it cannot."""

    def namespaces_changed(self, namespaces: Sequence[Netns]) -> None:
        """The watched namespaces now: start in the new ones, let go of the vanished."""

    def stop(self) -> None:
        """Stops and undoes every change it made to the host."""


class Collector(_Lifecycle, Protocol):
    def enrich(self, event: DropEvent, evidence: Evidence) -> None:
        """Fills this collector's section of one drop's event."""


class TraceCollector(_Lifecycle, Protocol):
    def gather(self, evidence: Evidence) -> None:
        """Fills this collector's slot of one drop's evidence (before the event exists)."""


class OnDemand:
    """The lifecycle of a collector that looks things up when a drop needs them: it holds no
    socket or host change to start, follow or undo (the neighbours, the diagnosis)."""

    def unavailable(self) -> str | None:
        return None

    def start(self, namespaces: Sequence[Netns]) -> None:
        pass

    def namespaces_changed(self, namespaces: Sequence[Netns]) -> None:
        pass

    def stop(self) -> None:
        pass
