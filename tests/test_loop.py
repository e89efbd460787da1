"""The event loop every collector's sockets are read on (tracer.loop): no root needed."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tracer.loop import EventLoop


class Log:
    """Records warnings as (event, fields)."""

    def __init__(self) -> None:
        self.warnings: list[tuple[str, dict[str, Any]]] = []

    def warning(self, event: str, **kw: Any) -> None:
        self.warnings.append((event, kw))

    def error(self, event: str, **kw: Any) -> None:
        self.warnings.append((event, kw))


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    lp = EventLoop("test-loop", Log())
    yield lp
    lp.close()


def wait_until(pred: Any, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.005)
    return bool(pred())


def test_reader_is_called_when_readable_on_the_loop_thread(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    got: list[tuple[bytes, bool]] = []

    def readable() -> None:
        got.append((a.recv(100, socket.MSG_DONTWAIT), loop.in_loop()))

    with a, b:
        reader = loop.add_reader(a.fileno(), readable, name="pair")
        b.send(b"one")
        assert wait_until(lambda: got == [(b"one", True)])
        reader.close()
        b.send(b"two")
        time.sleep(0.1)
        assert got == [(b"one", True)]  # closed: not called again
    assert loop.thread is not None and loop.thread.daemon


def test_close_from_another_thread_waits_for_a_running_callback(loop: EventLoop) -> None:
    """When close() returns, the callback is not running: the owner may close the descriptor."""
    a, b = socket.socketpair()
    inside, release = threading.Event(), threading.Event()
    state = {"running": False, "calls": 0}

    def readable() -> None:
        state["running"] = True
        state["calls"] += 1
        inside.set()
        release.wait(2)
        a.recv(100, socket.MSG_DONTWAIT)
        state["running"] = False

    with a, b:
        reader = loop.add_reader(a.fileno(), readable, name="slow")
        b.send(b"x")
        assert inside.wait(2)
        threading.Timer(0.2, release.set).start()
        started = time.monotonic()
        assert reader.close()
        assert time.monotonic() - started >= 0.15
        assert state == {"running": False, "calls": 1}
        b.send(b"y")
        time.sleep(0.1)
        assert state["calls"] == 1


def test_a_failing_callback_is_logged_rate_limited_and_the_loop_goes_on(loop: EventLoop) -> None:
    def boom() -> None:
        raise RuntimeError("bug")

    for _ in range(20):
        loop.call_soon(boom, name="boom")
    assert loop.run_sync(lambda: 42) == 42
    failures = [kw for event, kw in loop.log.warnings if event == "loop.callback_failed"]
    assert len(failures) == 1 and failures[0]["callback"] == "boom" and "bug" in failures[0]["error"]
    with pytest.raises(ValueError, match="given back"):
        loop.run_sync(lambda: (_ for _ in ()).throw(ValueError("given back")))


def test_calls_from_other_threads_run_in_order(loop: EventLoop) -> None:
    seen: list[int] = []
    for i in range(100):
        loop.call_soon(lambda i=i: seen.append(i), name="append")
    loop.run_sync(lambda: None)
    assert seen == list(range(100))


def test_timers_fire_move_and_cancel(loop: EventLoop) -> None:
    fired: list[str] = []
    early = loop.call_later(0.05, lambda: fired.append("early"), name="early")
    moved = loop.call_later(5.0, lambda: fired.append("moved"), name="moved")
    dropped = loop.call_later(0.05, lambda: fired.append("dropped"), name="dropped")
    dropped.cancel()
    moved.reschedule(time.monotonic() + 0.1)  # from another thread: wakes the sleeping loop
    assert wait_until(lambda: fired == ["early", "moved"], 1.0)
    time.sleep(0.1)
    assert fired == ["early", "moved"]
    assert not early.pending and not moved.pending and not dropped.pending


def test_write_interest(loop: EventLoop) -> None:
    a, b = socket.socketpair()
    writable = threading.Event()
    with a, b:
        reader = loop.add_reader(a.fileno(), lambda: None, name="w")
        reader.set_on_write(writable.set)
        assert writable.wait(1)
        reader.set_on_write(None)
        reader.close()


def test_closed_loop_refuses_new_descriptors(loop: EventLoop) -> None:
    loop.close()
    a, b = socket.socketpair()
    with a, b, pytest.raises(RuntimeError, match="closed"):
        loop.add_reader(a.fileno(), lambda: None, name="late")
