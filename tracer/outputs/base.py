"""What an output promises the pipeline, and what it reports when it is closed.

A `Sink` receives each event once, rendered lazily (tracer.event.rendered):
each form (the NDJSON line, the text line) is made at most once, whatever
the number of sinks, and only when a sink has room to queue it. `submit`
never waits for the output: the sink's own worker writes. Its queue is
bounded: a reader that stops reading costs events, counted in the sink's
`Delivery` and reported once on stderr at the end (`undelivered_line`),
never a blocked tracer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # the writers (and log.py, through them) need no event model
    from tracer.event.rendered import Rendered


class Sink(Protocol):
    """Where the pipeline hands its events."""

    def submit(self, rendered: Rendered) -> None:
        """Queues one event; never blocks, never raises for a slow or failed output."""


class OutputSink(Sink, Protocol):
    """A sink the command line closes, with a bound on how long delivery may take."""

    def hurry(self, seconds: float) -> None:
        """Gives up on the rest `seconds` from now at the latest (safe in a signal handler)."""

    def close(self, timeout: float) -> Delivery:
        """Lets the worker deliver what is queued for at most `timeout` seconds; the figures."""


@dataclass(frozen=True)
class Delivery:
    """What an output did with what it was given: the figures of the final report."""

    accepted: int  # queued for writing
    written: int  # completely written
    dropped: int  # refused: the queue was full, or the output had failed
    error: str | None = None  # why the output stopped working, e.g. "Broken pipe"

    @property
    def pending(self) -> int:
        """Queued (or half written) and never completed."""
        return self.accepted - self.written

    @property
    def undelivered(self) -> int:
        return self.dropped + self.pending


def undelivered_line(d: Delivery, name: str) -> str | None:
    """The final report on stderr: how many events never reached the output, and why."""
    n = d.undelivered
    events = f"{n} event{'s' if n != 1 else ''} not delivered to {name}"
    if d.error is not None:
        return f"{name} failed ({d.error}); {events}"
    if not n:
        return None
    why = []
    if d.dropped:
        why.append(f"{d.dropped} dropped while its reader was not keeping up")
    if d.pending:
        why.append(f"{d.pending} still queued when the tracer stopped")
    return f"{events} ({', '.join(why)})"
