"""One event loop for every socket the collectors read: epoll in one daemon thread.

Why: each watched network namespace has its own netlink sockets (nftables
traces and ruleset changes, nfnetlink_log), and iptables-legacy relays add
unix sockets. A thread per socket cost two threads and about 2 MiB per
namespace, so a node with hundreds of namespaces ran hundreds of threads.
Here every such descriptor is registered with one `select.epoll`, whose
thread calls the owner's read callback when the descriptor is readable.

Who owns it: `shared()` is the process-wide loop, made and started on first
use; collectors take it by default, so the engine needs to know nothing
about it. Tests may make their own `EventLoop` and `close()` it.

What callbacks may do: they all run on the one loop thread, so a callback
that blocks holds up every namespace. Reading a socket until it would
block, decoding, a libnftables listing of one namespace's ruleset (a few
ms) are fine; waiting on another thread, a lock held across slow work, a
subprocess, or a sleep are not. Callbacks must read without blocking
(MSG_DONTWAIT or non-blocking descriptors) and tolerate being called with
nothing to read: epoll may report a descriptor that was drained meanwhile.

Thread rules:
- `add_reader`, `call_at`, `call_later`, `call_soon`, `run_sync` may be
  called from any thread; `call_soon` wakes the loop through an eventfd.
- `Reader.close()` from another thread runs the removal on the loop thread
  and waits for it, so when it returns no callback of that reader is
  running or will run: the owner may close the descriptor then. From the
  loop thread (inside a callback) it takes effect at once; no further
  callback of that reader runs, even one already reported by epoll.
- `Timer.cancel()` is meant for the loop thread (an owner that keeps its
  timers there, like `NetlinkReader`); from another thread it only stops
  runs that have not begun.
- An exception in a callback is logged (`loop.callback_failed`, at most
  every 5 s per callback name, with a count) and the loop goes on.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

T = TypeVar("T")
Callback = Callable[[], None]

#: Warnings about one failing callback (by name) are at least this far apart.
_FAIL_LOG_EVERY = 5.0
#: Cancelled timers left in the heap before it is rebuilt without them.
_STALE_TIMERS = 256
#: The longest epoll_wait with no timer due; only bounds how late a stop is seen.
_MAX_WAIT = 5.0
#: What makes the read callback run: data, or an error or hang-up a read reports.
_READ_EVENTS = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP


@dataclass(eq=False)
class Reader:
    """A descriptor registered with a loop; `close()` unregisters it (the descriptor stays open).

    `callback` runs when the descriptor is readable (or has an error or
    hang-up, which a read then reports); `on_write`, while set, when it is
    writable: for a sender whose socket was full.
    """

    loop: EventLoop
    fd: int
    callback: Callback
    name: str
    active: bool = True
    on_write: Callback | None = None

    def set_on_write(self, callback: Callback | None) -> None:
        """Also calls `callback` whenever the descriptor is writable (None: stop); any thread."""
        self.loop._set_on_write(self, callback)

    def close(self, timeout: float = 5.0) -> bool:
        """Unregisters; from another thread, waits until no callback of this reader runs.

        False when the loop did not get to it within `timeout` (a callback
        is stuck); the reader is then inactive, but a callback may still be
        running.
        """
        return self.loop.remove_reader(self, timeout)


@dataclass(eq=False)
class Timer:
    """A callback at a monotonic time; `reschedule()` moves it, `cancel()` drops it."""

    loop: EventLoop
    when: float
    callback: Callback
    name: str
    cancelled: bool = False
    _entry: int = 0  # which heap entry is the live one; older ones are skipped

    def cancel(self) -> None:
        self.cancelled = True

    @property
    def pending(self) -> bool:
        """Scheduled and not yet run or cancelled."""
        return bool(self._entry) and not self.cancelled

    def reschedule(self, when: float) -> None:
        """Runs the timer at `when` instead (also after it ran or was cancelled)."""
        self.loop._push(self, when)


@dataclass
class _Failures:
    count: int = 0
    logged_at: float = field(default=-_FAIL_LOG_EVERY)


class EventLoop:
    """epoll over many descriptors, timers and calls from other threads, in one daemon thread."""

    def __init__(self, name: str = "tracer-loop", log: Any = None) -> None:
        self.name = name
        self.log = log or structlog.get_logger("tracer.loop")
        self._lock = threading.Lock()
        self._epoll = select.epoll()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, select.EPOLLIN)
        self._readers: dict[int, Reader] = {}
        self._timers: list[tuple[float, int, int, Timer]] = []  # (when, seq, entry, timer)
        self._stale = 0
        self._seq = itertools.count()
        self._calls: deque[tuple[Callback, str]] = deque()
        self._woken = False  # an eventfd write is pending: later call_soon need not write again
        self._failures: dict[str, _Failures] = {}
        self._thread: threading.Thread | None = None
        self._closing = False

    # --- registration (any thread) -----------------------------------------------------

    def add_reader(self, fd: int, callback: Callback, *, name: str) -> Reader:
        """Calls `callback()` on the loop thread whenever `fd` is readable (level-triggered)."""
        reader = Reader(self, fd, callback, name)
        with self._lock:
            if self._closing:
                raise RuntimeError(f"event loop {self.name} is closed")
            if fd in self._readers:
                raise ValueError(f"fd {fd} is already registered ({self._readers[fd].name})")
            self._epoll.register(fd, select.EPOLLIN)
            self._readers[fd] = reader
        self._ensure_thread()
        return reader

    def remove_reader(self, reader: Reader, timeout: float = 5.0) -> bool:
        """See Reader.close()."""
        if self.in_loop() or self._thread is None:
            self._unregister(reader)
            return True
        try:
            self.run_sync(lambda: self._unregister(reader), timeout, name=f"remove {reader.name}")
        except TimeoutError:
            self._unregister(reader)  # no further callback starts; the running one may go on
            return False
        return True

    def _set_on_write(self, reader: Reader, callback: Callback | None) -> None:
        with self._lock:
            if not reader.active:
                return
            toggled = (reader.on_write is None) != (callback is None)
            reader.on_write = callback
            if toggled:
                mask = select.EPOLLIN | (select.EPOLLOUT if callback is not None else 0)
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.modify(reader.fd, mask)

    def _unregister(self, reader: Reader) -> None:
        with self._lock:
            if not reader.active:
                return
            reader.active = False
            if self._readers.get(reader.fd) is reader:
                del self._readers[reader.fd]
                with contextlib.suppress(OSError, ValueError):
                    self._epoll.unregister(reader.fd)

    def call_at(self, when: float, callback: Callback, *, name: str) -> Timer:
        """Calls `callback()` on the loop thread at monotonic time `when` (or soon after)."""
        timer = Timer(self, when, callback, name)
        self._push(timer, when)
        return timer

    def call_later(self, delay: float, callback: Callback, *, name: str) -> Timer:
        return self.call_at(time.monotonic() + max(0.0, delay), callback, name=name)

    def _push(self, timer: Timer, when: float) -> None:
        with self._lock:
            if timer._entry:
                self._stale += 1  # the previous entry stays in the heap until popped or rebuilt
            timer.cancelled = False
            timer.when = when
            timer._entry = next(self._seq) + 1
            first = not self._timers or when < self._timers[0][0]
            heapq.heappush(self._timers, (when, timer._entry, timer._entry, timer))
            if self._stale > _STALE_TIMERS and self._stale > len(self._timers) // 2:
                self._timers = [e for e in self._timers if e[2] == e[3]._entry and not e[3].cancelled]
                heapq.heapify(self._timers)
                self._stale = 0
        self._ensure_thread()
        if first and not self.in_loop():
            self._wake()  # the loop may be sleeping past this timer

    def call_soon(self, callback: Callback, *, name: str) -> bool:
        """Runs `callback()` on the loop thread as soon as it gets to it (in call order).

        False (and nothing runs) once the loop is closed."""
        with self._lock:
            if self._closing:
                return False
            self._calls.append((callback, name))
            wake = not self._woken and not self.in_loop()
            self._woken |= wake
        self._ensure_thread()
        if wake:
            self._wake()
        return True

    def run_sync(self, fn: Callable[[], T], timeout: float = 5.0, *, name: str = "run_sync") -> T:
        """Runs `fn()` on the loop thread between callbacks and returns its result (or raises its
        exception); TimeoutError when the loop did not finish it in `timeout` seconds."""
        if self.in_loop():
            return fn()
        done = threading.Event()
        result: list[T] = []
        error: list[BaseException] = []

        def call() -> None:
            try:
                result.append(fn())
            except BaseException as exc:
                error.append(exc)
            finally:
                done.set()

        if not self.call_soon(call, name=name):
            # Closed: once its thread has finished, the caller is the only one left to run it.
            thread = self._thread
            if thread is not None:
                thread.join(timeout)
                if thread.is_alive():
                    raise TimeoutError(f"event loop {self.name} closing: {name} not run within {timeout:g}s")
            return fn()
        if not done.wait(timeout):
            raise TimeoutError(f"event loop {self.name} busy: {name} not run within {timeout:g}s")
        if error:
            raise error[0]
        return result[0]

    def in_loop(self) -> bool:
        """Whether the caller is the loop thread (inside a callback)."""
        return self._thread is threading.current_thread()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def close(self, timeout: float = 5.0) -> None:
        """Stops the thread and closes epoll; registered descriptors stay open (owners close them)."""
        with self._lock:
            self._closing = True
            thread = self._thread
        if thread is None:
            self._release()
            return
        self._wake()
        if thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                self.log.warning("loop.did_not_stop", loop=self.name)

    def _release(self) -> None:
        """Closes epoll and the eventfd, once: a second close of a number could hit a new file."""
        with self._lock:
            fd, self._wake_fd = self._wake_fd, -1
        self._epoll.close()
        if fd >= 0:
            with contextlib.suppress(OSError):
                os.close(fd)

    # --- the loop thread ---------------------------------------------------------------

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._start_thread()

    def _start_thread(self) -> None:
        with self._lock:
            if self._thread is None and not self._closing:
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()

    def _wake(self) -> None:
        with self._lock, contextlib.suppress(OSError):  # a full counter wakes the loop just as well
            if self._wake_fd >= 0:  # under the lock: _release cannot close it meanwhile
                os.eventfd_write(self._wake_fd, 1)

    def _run(self) -> None:
        try:
            self._serve()
        finally:
            self._release()

    def _serve(self) -> None:
        while not self._closing:
            try:
                events = self._epoll.poll(self._wait())
            except InterruptedError:
                continue
            except OSError as exc:  # epoll itself broke: nothing can be read any more
                self.log.error("loop.poll_failed", loop=self.name, error=str(exc))
                return
            with self._lock:
                ready = [(self._readers.get(fd), mask) for fd, mask in events if fd != self._wake_fd]
            if len(ready) != len(events):  # the eventfd was among them
                with contextlib.suppress(OSError):
                    os.eventfd_read(self._wake_fd)
            self._run_calls()
            for reader, mask in ready:
                if reader is None:
                    continue
                if mask & select.EPOLLOUT and reader.active and reader.on_write is not None:
                    self._call(reader.on_write, reader.name)
                if mask & _READ_EVENTS and reader.active:  # not closed by an earlier callback of this round
                    self._call(reader.callback, reader.name)
            self._run_timers()

    def _wait(self) -> float:
        with self._lock:
            if self._calls:
                return 0.0
            self._woken = False  # from here on a call_soon must write the eventfd again
            while self._timers and (self._timers[0][2] != self._timers[0][3]._entry or self._timers[0][3].cancelled):
                heapq.heappop(self._timers)
                self._stale = max(0, self._stale - 1)
            if not self._timers:
                return _MAX_WAIT
            return min(_MAX_WAIT, max(0.0, self._timers[0][0] - time.monotonic()))

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, deque()
        for callback, name in calls:
            self._call(callback, name)

    def _run_timers(self) -> None:
        now = time.monotonic()
        while True:
            with self._lock:
                if not self._timers or self._timers[0][0] > now:
                    return
                _when, _seq, entry, timer = heapq.heappop(self._timers)
                if entry != timer._entry or timer.cancelled:
                    self._stale = max(0, self._stale - 1)
                    continue
                timer._entry = 0  # ran: a reschedule from the callback adds a fresh entry
            self._call(timer.callback, timer.name)

    def _call(self, callback: Callback, name: str) -> None:
        try:
            callback()
        except Exception as exc:
            self._failed(name, exc)

    def _failed(self, name: str, exc: Exception) -> None:
        """Logs a failing callback at most every _FAIL_LOG_EVERY seconds per name, with a count."""
        record = self._failures.setdefault(name, _Failures())
        record.count += 1
        now = time.monotonic()
        if now - record.logged_at >= _FAIL_LOG_EVERY:
            self.log.warning(
                "loop.callback_failed", loop=self.name, callback=name, error=repr(exc), since_last_warning=record.count
            )
            record.count, record.logged_at = 0, now


_shared_lock = threading.Lock()
_shared: EventLoop | None = None


def shared() -> EventLoop:
    """The process-wide loop every collector uses unless given another; its thread starts on
    first use and lives as long as the process (a daemon thread)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = EventLoop()
        return _shared


class LoopSlot:
    """The loop a collector reads on: the one it was given, or its own, made on first use.

    A collector given the pipeline's loop shares it and never closes it; one
    used alone (tests, tools) gets a loop of its own, which `release` closes
    so its thread ends with the collector, and a later start makes another.
    """

    def __init__(self, given: EventLoop | None, name: str, log: Any) -> None:
        self._loop = given
        self._own = given is None
        self._name, self._log = name, log
        self._lock = threading.Lock()  # set-up workers may ask for it at once

    def get(self) -> EventLoop:
        with self._lock:
            if self._loop is None:
                self._loop = EventLoop(self._name, self._log)
            return self._loop

    def release(self) -> None:
        """Closes the loop if it is the collector's own (its readers must be gone)."""
        with self._lock:
            loop, self._loop = (self._loop, None) if self._own else (None, self._loop)
        if loop is not None:
            loop.close()
