"""The standard output sinks: NDJSON for machines, one line per drop for people.

Both hand each event to their output as a function that renders it: an
FdWriter (the watch command) calls it only when its queue has room, so an
event a stuck reader would never get is never rendered, and its own thread
only writes. With a StreamOutput (the demo, tests) everything happens
synchronously, in order with whatever else the caller prints.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from typing import BinaryIO, TextIO

from tracer.event.model import DropEvent
from tracer.event.rendered import Rendered
from tracer.event.text import diagnosis_lines, stack_lines
from tracer.outputs.base import Delivery
from tracer.outputs.writer import FdWriter, Output, StreamOutput, stdout_output


class _SinkBase:
    """What both sinks do alike: hand hurrying and closing to their output."""

    output: Output

    def hurry(self, seconds: float) -> None:
        self.output.hurry(seconds)

    def close(self, timeout: float = 2.0) -> Delivery:
        return self.output.close(timeout)


class NdjsonSink(_SinkBase):
    """One ECS JSON object per line, each handed to the output as it comes: a
    SIEM pipe or a person running `| jq` sees a drop when it happens, not
    when a buffer fills."""

    def __init__(self, stream: BinaryIO | None = None, *, output: Output | None = None,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.output = output or (StreamOutput(stream) if stream is not None else stdout_output(on_error))

    def submit(self, rendered: Rendered) -> None:
        self.output.put(rendered.json)


class TerminalSink(_SinkBase):
    """One line per drop, its diagnosis (cause and first fix) indented under it when it has one,
    and its stack with --stack: one item per event, so the lines of an event stay together."""

    def __init__(self, stream: TextIO | None = None, *, stack: bool = False,
                 output: Output | None = None, on_error: Callable[[str], None] | None = None) -> None:
        self.output = output or (StreamOutput(stream) if stream is not None else stdout_output(on_error))
        self.stack = stack
        self._encoding = getattr(sys.stdout, "encoding", None) or "utf-8"

    def submit(self, rendered: Rendered) -> None:
        if isinstance(self.output, FdWriter):
            self.output.put(partial(self._encoded, rendered))
        else:
            self.output.put(self._text(rendered))

    def _text(self, rendered: Rendered) -> str:
        lines = [rendered.text()]
        if isinstance(rendered.event, DropEvent):
            lines += diagnosis_lines(rendered.event)
            if self.stack:
                lines += stack_lines(rendered.event)
        return "\n".join(lines) + "\n"

    def _encoded(self, rendered: Rendered) -> bytes:
        return self._text(rendered).encode(self._encoding, "backslashreplace")


def choose(json: bool, stack: bool = False, on_error: Callable[[str], None] | None = None) -> NdjsonSink | TerminalSink:
    """NDJSON unless stdout is a terminal; `on_error(why)` runs (in the writer's thread) if stdout fails."""
    if json or not sys.stdout.isatty():
        return NdjsonSink(on_error=on_error)
    return TerminalSink(stack=stack, on_error=on_error)
