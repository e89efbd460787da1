"""What a service output's transport does: deliver batches of records, or say why it cannot.

The daemon's outputs (file, syslog, journald, Elasticsearch/OpenSearch,
Splunk HEC) are split in two:
- a `Transport` knows one destination's wire format and nothing else: it
  opens a connection, sends a batch, closes;
- the queued sink (tracer.outputs.queued) owns the worker thread, the bounded
  queue, the on-disk spool, retries with backoff and the figures, alike for
  every destination.

So a transport never sleeps, retries or buffers: it raises `OutputDown`
and the sink decides what happens next. A `Record` is what the queue and
the spool hold: the event's JSON and its one-line text, both made once,
so a record read back from the spool after a restart is the same as the
one that was queued.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson


class OutputDown(Exception):
    """The destination cannot take the batch now (unreachable, refused, timed out, 5xx).

    Nothing of the batch counts as delivered: the sink keeps every record
    (in its spool) and sends the batch again after a backoff. The message is
    the reason an operator reads ("connection refused", "HTTP 503").
    """


class Record:
    """One event as the queue and the spool hold it.

    `json` is the compact ECS document (UTF-8, no trailing newline);
    `text` the one-line view people read (tracer.event.text.one_line, or a
    notice's sentence), already escaped. `doc()` parses the JSON once, for
    transports that need fields (journald, Splunk's envelope).
    """

    __slots__ = ("_doc", "json", "text")

    def __init__(self, json: bytes, text: str) -> None:
        self.json = json
        self.text = text
        self._doc: dict[str, Any] | None = None

    def doc(self) -> dict[str, Any]:
        if self._doc is None:
            self._doc = orjson.loads(self.json)
        return self._doc

    def __repr__(self) -> str:
        return f"Record({self.json[:60]!r}...)"


@dataclass(frozen=True, slots=True)
class SendResult:
    """What became of a batch that reached its destination.

    By default every record was delivered. `retry` lists the indices (into
    the batch) of records the destination refused only for now (e.g. an
    Elasticsearch bulk item with status 429): they are sent again, in order,
    before anything newer. `rejected` lists records it will never take (a
    mapping error, a 400 for that item), with the reason: they are counted
    as lost and reported, never retried forever.
    """

    retry: tuple[int, ...] = ()
    rejected: tuple[tuple[int, str], ...] = ()


class Transport(Protocol):
    """One destination's wire format. Called from one worker thread only."""

    #: For logs and metrics: type and destination, never a secret ("syslog tcp://127.0.0.1:6514").
    name: str
    #: Records per `send` at most.
    max_batch: int

    def open(self) -> None:
        """Connects (or opens the file); raises OutputDown when that is impossible right now."""

    def send(self, records: Sequence[Record]) -> SendResult:
        """Delivers the batch, in order; OutputDown if none of it can be counted as delivered."""

    def close(self) -> None:
        """Releases the connection; never raises. `open` may be called again afterwards."""
