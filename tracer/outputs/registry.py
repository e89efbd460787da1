"""The daemon's output types: the `type` of an `[[output]]` table, its options, its sink.

Each type lives in its own module with an `Options` dataclass (the table's
keys, with their defaults and `check()`) whose `transport()` makes the
destination's `Transport`; the queued sink (tracer.outputs.queued) puts the
worker, queue and spool around it, alike for every type. Modules are
imported only when their type is used, so a host that never talks to
Elasticsearch never imports urllib3.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tracer.config import ConfigError

if TYPE_CHECKING:
    from tracer.outputs.base import OutputSink

#: type -> module whose `Options` it uses.
TYPES: dict[str, str] = {
    "stdout": __name__,
    "file": "tracer.outputs.file",
    "syslog": "tracer.outputs.syslog",
    "journald": "tracer.outputs.journald",
    "elasticsearch": "tracer.outputs.elasticsearch",
    "splunk_hec": "tracer.outputs.splunk",
}


@dataclass(frozen=True)
class Options:
    """`type = "stdout"`: NDJSON on standard output (for a container's log driver, or a pipe).

    Under systemd the unit sends stdout to /dev/null (StandardOutput=null);
    this output is for `tracer run` in a container or a terminal. It has no
    spool: a reader that stops reading costs events, counted, as in `watch`.
    """

    def check(self) -> None:
        pass


def options_class(kind: str) -> type:
    options: type = _module(kind).Options
    return options


def spoolable(kind: str) -> bool:
    """Whether events of an output of this type that is down can wait in the spool."""
    return kind != "stdout"


def _module(kind: str) -> Any:
    return importlib.import_module(TYPES[kind])


def make_sink(kind: str, options: Any, *, spool_dir: Path | None, spool_max_bytes: int, name: str,
              queue: int, on_loss: Callable[[str, str, int], None] | None) -> OutputSink:
    """The running sink of one configured output (its worker started; the destination is
    connected by the worker, so an unreachable one spools instead of stopping the daemon)."""
    if kind == "stdout":
        from tracer.outputs.stdout import NdjsonSink

        return NdjsonSink()
    from tracer.outputs.queued import QueuedSink
    from tracer.outputs.spool import Spool, SpoolError

    try:
        transport = options.transport()
    except ConfigError as exc:  # e.g. a token file that vanished since the check
        raise ConfigError(f"output {name}: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"output {name}: {exc.strerror or exc}") from None
    try:
        spool = Spool.open(spool_dir, name, spool_max_bytes) if spool_dir is not None else None
    except SpoolError as exc:
        raise ConfigError(f"output {name}: its spool in {spool_dir} cannot be used: {exc}") from None
    sink: OutputSink = QueuedSink(transport, spool=spool, queue_events=queue, on_loss=on_loss, name=name)
    return sink
