"""The drop event: one dataclass of optional sections, and its ECS form (docs/drop-event.md).

A `DropEvent` holds what the tracer knows about one dropped packet (or, as a
summary, many alike): the time, the kernel's `Drop` section, and one
optional section per source of knowledge (tracer/event/sections.py). The
model knows no collector: a collector fills its section, `to_ecs()` puts
the sections' parts together in the documented order, and a fact nobody
learnt is left out rather than guessed, as the schema requires.

The event is mutable while the pipeline fills it (sections are frozen and
replaced whole); once handed to a sink it must not change, since its forms
are rendered once, lazily, in the sinks' threads (tracer.event.rendered).

Nothing in tracer.event imports anything else from tracer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tracer.event.ecs import ECS_VERSION, community_id, direction_of, iso_time, parse_iso_time
from tracer.event.sections import (
    ConntrackInfo,
    CtTuple,
    Diagnosis,
    Doc,
    Drop,
    Interface,
    Interfaces,
    Namespace,
    Neighbor,
    Netfilter,
    Observer,
    Packet,
    Probe,
    Process,
    Rule,
    Summary,
    this_observer,
)

__all__ = [
    "ECS_VERSION",
    "ConntrackInfo",
    "CtTuple",
    "Diagnosis",
    "Drop",
    "DropEvent",
    "Interface",
    "Interfaces",
    "Namespace",
    "Neighbor",
    "Netfilter",
    "Observer",
    "Packet",
    "Probe",
    "Process",
    "Rule",
    "Summary",
    "community_id",
    "iso_time",
]

#: What renders `network.direction` for an event whose packet carried no header.
_NO_PACKET = Packet()


@dataclass(slots=True, kw_only=True)
class DropEvent:
    """One drop (or one summary of many): the time, the kernel's reason, and the sections known.

    Build it from sections:

        DropEvent(timestamp_ns=..., drop=Drop(reason, location, stack, subsystem, hook),
                  packet=Packet(headers, length, mark), netns=Namespace(inode, name), ...)

    and let each collector set its own section afterwards (`event.netfilter = ...`).
    """

    timestamp_ns: int  # wall clock (ns since the epoch) of the drop, or of the summary
    drop: Drop
    action: str = "dropped"  # or rejected, when a reject rule answered the packet
    packet: Packet | None = None
    interfaces: Interfaces | None = None
    netns: Namespace | None = None
    netfilter: Netfilter | None = None
    conntrack: ConntrackInfo | None = None
    process: Process | None = None
    probe: Probe | None = None
    summary: Summary | None = None
    observer: Observer | None = None  # host.* and observer.*; None: this host, this tracer
    diagnosis: Diagnosis | None = None  # the cause and the fix, when the tracer can name them
    neighbor: Neighbor | None = None  # the next hop that did not resolve (neighbour failures)

    @property
    def direction(self) -> str | None:
        """ECS `network.direction`: from the netfilter hook, else from the hook the stack shows."""
        nf = self.netfilter
        return direction_of(nf.hook if nf is not None and nf.hook else self.drop.hook)

    def to_ecs(self) -> Doc:
        """The event as docs/drop-event.md lays it out (key order included: it is the wire order)."""
        summary = self.summary
        event: Doc = {
            "kind": "event",
            "category": ["network"],
            "type": ["connection", "denied"],
            "action": self.action,
            "dataset": "tracer.drop.summary" if summary is not None else "tracer.drop",
            "count": summary.count if summary is not None else 1,
        }
        if summary is not None:
            summary.add_ecs(event, self.timestamp_ns)
        doc: Doc = {"@timestamp": iso_time(self.timestamp_ns), "ecs": {"version": ECS_VERSION}, "event": event}
        doc["drop"] = self.drop.to_ecs()
        if self.netfilter is not None:
            doc["netfilter"] = self.netfilter.to_ecs()
            rule = self.netfilter.rule_ecs()
            if rule is not None:
                doc["rule"] = rule
        if self.conntrack is not None:
            doc["conntrack"] = self.conntrack.to_ecs()
        if self.neighbor is not None:
            doc["neighbor"] = self.neighbor.to_ecs()
        if self.diagnosis is not None:
            doc["diagnosis"] = self.diagnosis.to_ecs()
        (self.packet or _NO_PACKET).add_flow_ecs(doc, self.direction)
        observer = (self.observer or this_observer()).add_ecs(doc)
        if self.interfaces is not None:
            self.interfaces.add_ecs(observer)
        for key, section in (("netns", self.netns), ("process", self.process), ("packet", self.packet),
                             ("probe", self.probe)):
            part = section.to_ecs() if section is not None else None
            if part is not None:
                doc[key] = part
        return doc

    @classmethod
    def from_ecs(cls, doc: Mapping[str, Any]) -> DropEvent:
        """The model of an event read back from its JSON (a replay, a subprocess's output).

        Expects a valid event (tracer.event.schema.validate); a malformed one
        raises KeyError, TypeError or ValueError. `to_ecs()` gives the same
        document back, except for one fact the JSON does not keep: the
        kernel stack's hook, so a `network.direction` that no netfilter hook
        explains is lost. What only the kernel record has (IP id, TTL, raw
        transport bytes) is not in the JSON either. `rule` and `related` are
        not read: they are made from `netfilter` and the addresses.
        """
        ev = doc["event"]
        observer = doc["observer"]
        return cls(
            timestamp_ns=parse_iso_time(doc["@timestamp"]),
            drop=Drop.from_ecs(doc["drop"]),
            action=ev["action"],
            packet=Packet.from_ecs(doc),
            interfaces=Interfaces.from_ecs(observer),
            netns=Namespace.from_ecs(doc["netns"]) if "netns" in doc else None,
            netfilter=Netfilter.from_ecs(doc["netfilter"]) if "netfilter" in doc else None,
            conntrack=ConntrackInfo.from_ecs(doc["conntrack"]) if "conntrack" in doc else None,
            process=Process.from_ecs(doc["process"]) if "process" in doc else None,
            probe=Probe.from_ecs(doc["probe"]) if "probe" in doc else None,
            summary=Summary.from_ecs(ev) if ev["dataset"] == "tracer.drop.summary" else None,
            observer=Observer.from_ecs(doc),
            diagnosis=Diagnosis.from_ecs(doc["diagnosis"]) if "diagnosis" in doc else None,
            neighbor=Neighbor.from_ecs(doc["neighbor"]) if "neighbor" in doc else None,
        )
