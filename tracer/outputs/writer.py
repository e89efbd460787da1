"""Bytes to a file descriptor from the output's own thread, through a bounded queue.

Events leave through a bounded queue drained by the output's own daemon
thread, which writes to the file descriptor with os.write after poll()
says it can take more. The join only enqueues (an event not even rendered
yet: the writer's thread renders it), so a reader that stops reading (a
hung pipe, a stuck SIEM agent) fills the queue, not the process: signals
are still obeyed, the marking tables still come off, and what could not be
delivered is counted and reported. O_NONBLOCK is never set: the file
description may be shared (the user's terminal, a pipe other processes
write to), and the flag would change it for all of them.
"""

from __future__ import annotations

import atexit
import io
import os
import select
import stat
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import BinaryIO, TextIO

import structlog

from tracer.outputs.base import Delivery

log = structlog.get_logger("tracer.output")

#: A write of at most this many bytes to a pipe is atomic: whole lines, never half of one.
PIPE_BUF = select.PIPE_BUF
#: How long the writer waits in poll() before checking whether it was told to give up.
_POLL_MS = 100
#: Events queued at most; a stuck reader costs this much memory, not more.
QUEUE_EVENTS = 10_000
QUEUE_BYTES = 16 << 20
#: What an item not rendered yet counts against the byte bound: a typical event line.
DEFERRED_BYTES = 1024

#: What `put` takes: the bytes, or a function that makes them (called only if they fit).
Item = bytes | Callable[[], bytes]

_writers: weakref.WeakSet[FdWriter] = weakref.WeakSet()


class FdWriter:
    """Bytes to a file descriptor from a daemon thread; `put` never blocks.

    Each `put` is one item (one event, one log line): bytes, or a function
    returning them, called only when the queue has room. Items are written in chunks
    of whole items up to PIPE_BUF bytes (so a pipe's reader never sees half
    a line, unless one item alone is longer) after poll() reports POLLOUT,
    re-checking every 100 ms whether `close` has given up. Only this thread
    can block (a write to a terminal or socket may still wait after
    POLLOUT); being a daemon, it never holds up the process's exit.
    """

    def __init__(self, fd: int, *, name: str = "stdout", max_items: int = QUEUE_EVENTS,
                 max_bytes: int = QUEUE_BYTES, on_error: Callable[[str], None] | None = None,
                 on_drop: Callable[[int, int], None] | None = None) -> None:
        mode = os.fstat(fd).st_mode  # a closed descriptor fails here, not in the thread
        # The thread writes to its own duplicate, closed when it ends: a write it
        # finishes after close() gave up can never land in a descriptor number the
        # caller has closed and reused meanwhile.
        self.fd, self.name = os.dup(fd), name
        self._chunk = PIPE_BUF if stat.S_ISFIFO(mode) else 64 << 10
        self._max_items, self._max_bytes = max_items, max_bytes
        self._on_error, self._on_drop = on_error, on_drop
        self._items: deque[bytes] = deque()
        self._bytes = 0
        self._cond = threading.Condition()
        self._closing = False
        self._deadline = float("inf")  # after close() or hurry(): when to give up
        self.accepted = self.written = self.dropped = 0
        self.error: str | None = None
        self._unreported = 0  # dropped since the last warning
        self._warned_at = 0.0
        self._render_failed = False  # said once; each such item is counted as dropped
        self._thread = threading.Thread(target=self._run, name=f"{name}-writer", daemon=True)
        self._thread.start()
        _writers.add(self)

    # ------------------------------------------------------------ callers

    def put(self, data: Item) -> bool:
        """Queues one item; False (and counted) when the queue is full or the output failed.

        A function is called here, in the caller's thread, and only when the
        queue has room for a typical item (DEFERRED_BYTES): an event the queue
        would refuse is never rendered, which is when rendering costs most (a
        reader not keeping up). Not in the writer's thread: under CPython's
        GIL a render there holds up the caller just as much, plus a thread
        switch per event; measured, it halved the events a watch could print.
        """
        if not isinstance(data, bytes):
            if self._refused(DEFERRED_BYTES):
                return False
            try:
                data = data()
            except Exception as exc:
                self._render_failure(exc)
                return False
        return not self._refused(len(data), data)

    def _refused(self, size: int, data: bytes | None = None) -> bool:
        """True (and counted) when the output failed or an item of `size` does not fit;
        else queues `data`, when given."""
        report = 0
        with self._cond:
            if self.error is not None or self._closing:
                self.dropped += 1  # the failure itself was reported once, by on_error
                return True
            if len(self._items) >= self._max_items or self._bytes + size > self._max_bytes:
                self.dropped += 1
                self._unreported += 1
                now = time.monotonic()
                if now - self._warned_at >= 1.0:
                    report, self._unreported, self._warned_at = self._unreported, 0, now
                total = self.dropped
            else:
                if data is not None:
                    self._items.append(data)
                    self._bytes += size
                    self.accepted += 1
                    self._cond.notify()
                return False
        if report and self._on_drop is not None:
            self._on_drop(report, total)  # outside the lock: it logs
        return True

    def _render_failure(self, exc: Exception) -> None:
        """An item whose rendering failed is lost, not the output: counted as dropped, said once."""
        with self._cond:
            self.dropped += 1
            first, self._render_failed = not self._render_failed, True
        if first:
            log.error("event could not be rendered; it and any such later ones are dropped",
                      output=self.name, error=f"{type(exc).__name__}: {exc}")

    def flush(self) -> None:
        """Never blocks: the thread writes as soon as the reader takes more; `close` waits."""

    def hurry(self, seconds: float) -> None:
        """Gives up on the rest `seconds` from now at the latest (safe in a signal handler)."""
        self._deadline = min(self._deadline, time.monotonic() + max(0.0, seconds))

    def close(self, timeout: float) -> Delivery:
        """Lets the thread write what is queued for at most `timeout` seconds; the figures."""
        self.hurry(timeout)
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        while self._thread.is_alive() and time.monotonic() < self._deadline:
            self._thread.join(min(0.05, max(0.0, self._deadline - time.monotonic())))
        # Waiting in poll(), it notices within _POLL_MS that it has to give up (and
        # closes its descriptor); stuck in a write to a terminal or socket, it may not.
        self._thread.join(2 * _POLL_MS / 1000)
        _writers.discard(self)
        return self.report()

    def report(self) -> Delivery:
        with self._cond:
            return Delivery(self.accepted, self.written, self.dropped, self.error)

    # ------------------------------------------------------------ the thread

    def _given_up(self) -> bool:
        return time.monotonic() >= self._deadline

    def _run(self) -> None:
        try:
            self._loop()
        except Exception as exc:  # never a traceback from this thread: the output just stops
            with self._cond:
                self.error = f"writer failed: {type(exc).__name__}: {exc}"
        finally:
            os.close(self.fd)

    def _loop(self) -> None:
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        while True:
            with self._cond:
                while not self._items and not self._closing:
                    self._cond.wait()
                if not self._items:
                    return  # closed and drained
                taken = [self._items.popleft()]
                size = len(taken[0])
                while self._items and size + len(self._items[0]) <= self._chunk:
                    item = self._items.popleft()
                    taken.append(item)
                    size += len(item)
                self._bytes -= size
            if not self._write(poller, taken):  # whole items, at most one chunk (or one longer item)
                return

    def _write(self, poller: select.poll, batch: list[bytes]) -> bool:
        """Writes one batch; counts each item once its last byte is out. False: stop."""
        data = memoryview(b"".join(batch))
        if not data:  # empty items: nothing to wait for, and no write would count them
            with self._cond:
                self.written += len(batch)
            return True
        ends = []
        end = 0
        for item in batch:
            end += len(item)
            ends.append(end)
        done = offset = 0
        while offset < len(data):
            if self._given_up():
                return False
            try:
                ready = poller.poll(_POLL_MS)
            except OSError as exc:
                return self._fail(exc.strerror or str(exc))
            if not ready or self._given_up():
                continue
            revents = ready[0][1]
            if revents & (select.POLLERR | select.POLLHUP | select.POLLNVAL) and not revents & select.POLLOUT:
                return self._fail("closed by its reader" if revents & select.POLLERR else "hung up"
                                  if revents & select.POLLHUP else "descriptor closed")
            try:
                offset += os.write(self.fd, data[offset:offset + self._chunk])
            except BlockingIOError:
                continue  # someone else made the description non-blocking: poll again
            except OSError as exc:
                return self._fail(exc.strerror or str(exc))
            while done < len(ends) and ends[done] <= offset:
                done += 1
                with self._cond:
                    self.written += 1
        return True

    def _fail(self, why: str) -> bool:
        with self._cond:
            self.error = why
            self._bytes = 0
            self._items.clear()  # never written: counted as pending (accepted - written)
        if self._on_error is not None:
            self._on_error(why)
        return False


class StreamOutput:
    """The same interface, writing synchronously to a Python stream.

    For callers that interleave their own text with events on the same
    stream (the demo) and for streams without a descriptor (tests); a
    stuck reader blocks the caller here, and an item to be rendered is
    rendered in the caller's thread, so the watch command never uses it.
    """

    def __init__(self, stream: BinaryIO | TextIO) -> None:
        self.stream = stream
        self.accepted = self.written = 0
        self.error: str | None = None

    def put(self, data: bytes | str | Callable[[], bytes | str]) -> bool:
        if callable(data):
            data = data()
        if isinstance(self.stream, io.TextIOBase) and isinstance(data, bytes):
            data = data.decode("utf-8", "backslashreplace")
        self.accepted += 1
        self.stream.write(data)  # type: ignore[arg-type]
        self.stream.flush()
        self.written += 1
        return True

    def flush(self) -> None:
        self.stream.flush()

    def hurry(self, seconds: float) -> None:
        pass

    def close(self, timeout: float) -> Delivery:
        return Delivery(self.accepted, self.written, 0, self.error)


Output = FdWriter | StreamOutput


def _warn_dropped(name: str) -> Callable[[int, int], None]:
    def warn(count: int, total: int) -> None:
        log.warning("output not keeping up: events dropped", output=name, dropped=count, dropped_total=total)
    return warn


def stdout_output(on_error: Callable[[str], None] | None = None) -> Output:
    """fd 1 through an FdWriter; a plain stream when stdout has no descriptor (embedded use)."""
    stream = sys.stdout
    try:
        fd = stream.fileno()
        stream.flush()  # whatever was printed before goes first, and nothing stays for exit
    except (AttributeError, ValueError, io.UnsupportedOperation):
        return StreamOutput(getattr(stream, "buffer", stream))
    return FdWriter(fd, name="stdout", on_error=on_error, on_drop=_warn_dropped("stdout"))


@atexit.register
def _drain_at_exit() -> None:
    """Writers nobody closed (embedded use) get a second to deliver; then exit goes on."""
    for writer in list(_writers):
        writer.close(1.0)
