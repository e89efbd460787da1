"""Every event to every output: the one sink the engine sees in the daemon.

The set of outputs is replaced whole (`replace`), so a reload that adds an
output swaps the tuple in one assignment: each event goes either to the
old set or to the new one, never half. Each output has its own worker and
queue (tracer.outputs.queued), so a slow one costs only its own events.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog

from tracer.event.rendered import Rendered
from tracer.outputs.base import Sink

log = structlog.get_logger("tracer.output")


class Fanout:
    """A Sink that hands each event to every sink it holds."""

    def __init__(self, sinks: Iterable[Sink] = ()) -> None:
        self._sinks: tuple[Sink, ...] = tuple(sinks)
        self._failed: set[int] = set()

    @property
    def sinks(self) -> tuple[Sink, ...]:
        return self._sinks

    def replace(self, sinks: Iterable[Sink]) -> tuple[Sink, ...]:
        """The new set of sinks, from now on; returns the old one."""
        old, self._sinks = self._sinks, tuple(sinks)
        return old

    def submit(self, rendered: Rendered) -> None:
        for sink in self._sinks:  # one read of the tuple: a concurrent replace() is atomic here
            try:
                sink.submit(rendered)
            except Exception as exc:  # a sink's bug must not cost the other outputs their events
                if id(sink) not in self._failed:
                    self._failed.add(id(sink))
                    log.error("output failed to take an event", output=type(sink).__name__,
                              error=f"{type(exc).__name__}: {exc}")
