"""Sinks: `submit` never blocks, the sink's own thread renders, what its queue drops is counted.

Real pipes, real writer threads; the events are built from sections.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.test_event_model import CountingEvent, counting_event, full_event
from tracer.event.rendered import Rendered
from tracer.event.text import one_line
from tracer.outputs.base import Delivery, undelivered_line
from tracer.outputs.stdout import NdjsonSink, TerminalSink
from tracer.outputs.writer import FdWriter, StreamOutput


@pytest.fixture
def pipe() -> Iterator[dict[str, int]]:
    r, w = os.pipe()
    fds = {"r": r, "w": w}
    yield fds
    for fd in fds.values():
        with contextlib.suppress(OSError):
            os.close(fd)


def read_all(fds: dict[str, int]) -> bytes:
    """What the writers wrote, once every write end is closed."""
    os.close(fds.pop("w"))
    chunks = []
    while chunk := os.read(fds["r"], 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


def blocked_writer(fds: dict[str, int], **kw: Any) -> FdWriter:
    """A writer whose pipe is full: its thread waits in poll() until the test reads."""
    os.set_blocking(fds["w"], False)
    fds["filled"] = 0
    with contextlib.suppress(BlockingIOError):
        while True:
            fds["filled"] += os.write(fds["w"], b"\0" * 4096)
    os.set_blocking(fds["w"], True)
    return FdWriter(fds["w"], name="t", **kw)


def drain_filler(fds: dict[str, int]) -> None:
    """Reads exactly what blocked_writer put in the pipe, so the writer can go on."""
    left = fds.pop("filled")
    while left:
        left -= len(os.read(fds["r"], min(left, 1 << 16)))


def test_two_sinks_one_rendering_each(pipe: dict[str, int]) -> None:
    """NDJSON and text sinks on one event: the ECS dict is made once, for the JSON line only."""
    json_sink = NdjsonSink(output=FdWriter(pipe["w"], name="json"))
    text_sink = TerminalSink(output=FdWriter(pipe["w"], name="text"), stack=True)
    event = counting_event()
    rendered = Rendered(event)
    json_sink.submit(rendered)
    text_sink.submit(rendered)
    assert json_sink.close(2) == Delivery(1, 1, 0)
    assert text_sink.close(2) == Delivery(1, 1, 0)
    assert len(event.renders) == 1  # the text line needs no ECS dict
    out = read_all(pipe)
    assert orjson.dumps(event.to_ecs()) + b"\n" in out
    assert (one_line(event) + "\n        nf_hook_slow+0xa1\n        ip_local_deliver+0xd6\n").encode() in out


def test_submit_returns_while_the_reader_is_stuck(pipe: dict[str, int]) -> None:
    sink = NdjsonSink(output=blocked_writer(pipe))
    began = time.monotonic()
    for _ in range(50):
        sink.submit(Rendered(full_event()))
    assert time.monotonic() - began < 1.0
    drain_filler(pipe)
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.extend(iter(lambda: os.read(pipe["r"], 1 << 16), b"")))
    reader.start()
    assert sink.close(2) == Delivery(50, 50, 0)
    os.close(pipe.pop("w"))
    reader.join(5)
    assert len(b"".join(got).splitlines()) == 50


def test_what_a_full_queue_refuses_is_counted_reported_and_never_rendered(pipe: dict[str, int]) -> None:
    """While the writer is stuck, a bounded queue of 2 takes 2 events and refuses the rest unrendered."""
    drops: list[tuple[int, int]] = []
    sink = NdjsonSink(output=blocked_writer(pipe, max_items=2, on_drop=lambda n, t: drops.append((n, t))))
    events = [counting_event() for _ in range(6)]
    for event in events:
        sink.submit(Rendered(event))
    assert [len(e.renders) for e in events] == [1, 1, 0, 0, 0, 0]
    drain_filler(pipe)
    d = sink.close(2)
    assert d == Delivery(accepted=2, written=2, dropped=4)
    assert drops == [(1, 1)]  # warned once a second, not once an event
    assert undelivered_line(d, "stdout") == (
        "4 events not delivered to stdout (4 dropped while its reader was not keeping up)")
    assert len(read_all(pipe).splitlines()) == 2


def test_an_event_that_cannot_be_rendered_is_lost_not_the_output(pipe: dict[str, int]) -> None:
    class Broken(CountingEvent):
        def to_ecs(self) -> dict[str, Any]:
            raise RuntimeError("a bug")

    broken = Broken(timestamp_ns=0, drop=full_event().drop)
    sink = NdjsonSink(output=FdWriter(pipe["w"], name="t"))
    sink.submit(Rendered(broken))
    sink.submit(Rendered(full_event()))
    d = sink.close(2)
    assert (d.written, d.dropped, d.pending, d.error) == (1, 1, 0, None)
    assert read_all(pipe) == Rendered(full_event()).json()


def test_stream_output_is_synchronous_and_in_order() -> None:
    """The demo prints its own lines between events on the same stream."""
    out = io.StringIO()
    sink = TerminalSink(out)
    out.write("before\n")
    sink.submit(Rendered(full_event()))
    out.write("after\n")
    assert out.getvalue() == f"before\n{one_line(full_event())}\nafter\n"
    raw = io.BytesIO()
    NdjsonSink(raw).submit(Rendered(full_event()))
    assert raw.getvalue() == Rendered(full_event()).json()
    text = io.StringIO()
    StreamOutput(text).put(Rendered(full_event()).json)  # bytes rendered on demand, decoded for a text stream
    assert text.getvalue() == Rendered(full_event()).json().decode()
