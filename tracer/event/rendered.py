"""One event and its rendered forms, each computed at most once, when first asked for.

The pipeline wraps every event in a `Rendered` and hands the same object to
every sink. A sink asks, in its own worker thread, for the form it writes:
the ECS dict, the NDJSON line or the text line. Whichever sink asks first
pays for it; the others get the same object, so two JSON outputs cost one
`to_ecs()` and one `orjson.dumps()`, and a form nobody asks for costs
nothing. Sinks run in several threads, hence the lock: a form is never
computed twice, even when two sinks ask at the same moment.

What a form returns is shared between sinks: read it, never change it.
"""

from __future__ import annotations

import threading
from typing import Any

import orjson

from tracer.event.counter import CounterEvent
from tracer.event.model import DropEvent
from tracer.event.notice import Notice
from tracer.event.text import one_line


class Rendered:
    """An event (which must no longer change) and its forms, rendered lazily and once.

    The event is a drop (or drop summary), a notice (an alert, a loss report)
    or a counter event (tracer.counter): sinks treat them alike.
    """

    __slots__ = ("_ecs", "_json", "_lock", "_text", "event")

    def __init__(self, event: DropEvent | Notice | CounterEvent) -> None:
        self.event = event
        self._ecs: dict[str, Any] | None = None
        self._json: bytes | None = None
        self._text: str | None = None
        self._lock = threading.Lock()

    def ecs(self) -> dict[str, Any]:
        """The ECS document (docs/drop-event.md)."""
        if self._ecs is None:
            with self._lock:
                return self._ecs_locked()
        return self._ecs

    def json(self) -> bytes:
        """The NDJSON line: the ECS document as compact UTF-8 JSON, with its newline."""
        if self._json is None:
            with self._lock:
                if self._json is None:
                    self._json = orjson.dumps(self._ecs_locked()) + b"\n"
        return self._json

    def text(self) -> str:
        """The one-line text view, without a newline (tracer.event.text.one_line)."""
        if self._text is None:
            with self._lock:
                if self._text is None:
                    event = self.event
                    self._text = one_line(event) if isinstance(event, DropEvent) else event.text()
        return self._text

    def _ecs_locked(self) -> dict[str, Any]:
        if self._ecs is None:
            self._ecs = self.event.to_ecs()
        return self._ecs
