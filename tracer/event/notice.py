"""Events about the tracer's watch rather than about one drop: alerts and loss reports.

Two kinds share this shape (docs/drop-event.md, "Notices"):
- `tracer.conntrack` alerts (`event.kind: alert`): a namespace's conntrack
  table filling up, evicting early, or dropping packets because it is full;
- `tracer.loss` reports (`event.kind: event`): details the tracer could not
  deliver (ring buffer full, a queue full, the events-per-second ceiling),
  with counts, so that nothing is lost silently.

A notice goes down the same path as a drop event (tracer.event.rendered
wraps either), so every output carries both. Like the rest of
tracer.event, this module imports nothing else from tracer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tracer.event.ecs import ECS_VERSION, info_event, iso_time
from tracer.event.sections import Doc, Namespace, Observer, this_observer
from tracer.event.text import printable

#: `event.dataset` of each notice kind.
CONNTRACK_DATASET = "tracer.conntrack"
LOSS_DATASET = "tracer.loss"


@dataclass(slots=True, kw_only=True)
class Notice:
    """One notice: what happened (`action`), where (`netns`), and its figures (`details`).

    `details` goes into the document under `section` (`conntrack` for an
    alert, `tracer` for a loss report) as it is: plain JSON values, numbers
    mostly. `message` is the sentence a person reads, on a terminal and in
    ECS `message`.
    """

    timestamp_ns: int
    dataset: str
    action: str
    message: str
    kind: str = "event"
    severity: int | None = None  # ECS event.severity: 0 (none) .. 100 (worst), when it says something
    netns: Namespace | None = None
    section: str = "tracer"
    details: Mapping[str, Any] = field(default_factory=dict)
    start_ns: int | None = None
    end_ns: int | None = None
    observer: Observer | None = None  # host.* and observer.*; None: this host, this tracer

    def to_ecs(self) -> Doc:
        event: Doc = info_event(self.kind, self.action, self.dataset)
        if self.severity is not None:
            event["severity"] = self.severity
        if self.start_ns is not None:
            event["start"] = iso_time(self.start_ns)
        if self.end_ns is not None:
            event["end"] = iso_time(self.end_ns)
        doc: Doc = {
            "@timestamp": iso_time(self.timestamp_ns),
            "ecs": {"version": ECS_VERSION},
            "event": event,
            "message": self.message,
        }
        (self.observer or this_observer()).add_ecs(doc)
        if self.netns is not None:
            doc["netns"] = self.netns.to_ecs()
        if self.details:
            doc[self.section] = dict(self.details)
        return doc

    def text(self) -> str:
        """The terminal line: time, a tag that stands out from drop lines, the sentence."""
        tag = "ALERT" if self.kind == "alert" else "NOTICE"
        parts = [iso_time(self.timestamp_ns)[11:26], tag, printable(self.message)]
        if self.netns is not None and (ns := self.netns.text()):
            parts.append(ns)
        return "  ".join(parts)
