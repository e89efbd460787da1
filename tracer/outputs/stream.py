"""Where drop events go: NDJSON for machines, one line per drop for people.

Events leave through a bounded queue drained by the output's own daemon
thread, which writes to the file descriptor with os.write after poll()
says it can take more. The watch loop only formats and enqueues, so a
reader that stops reading (a hung pipe, a stuck SIEM agent) fills the
queue, not the process: signals are still obeyed, the marking tables still
come off, and what could not be delivered is counted and reported.
O_NONBLOCK is never set: the file description may be shared (the user's
terminal, a pipe other processes write to), and the flag would change it
for all of them.
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
import unicodedata
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol, TextIO

import orjson
import structlog

log = structlog.get_logger("tracer.output")

#: A write of at most this many bytes to a pipe is atomic: whole lines, never half of one.
PIPE_BUF = select.PIPE_BUF
#: How long the writer waits in poll() before checking whether it was told to give up.
_POLL_MS = 100
#: Events queued at most; a stuck reader costs this much memory, not more.
QUEUE_EVENTS = 10_000
QUEUE_BYTES = 16 << 20


class Sink(Protocol):
    def write(self, event: dict) -> None: ...
    def flush(self) -> None: ...


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


class OutputSink(Sink, Protocol):
    """A sink the command line closes, with a bound on how long delivery may take."""

    def close(self, timeout: float) -> Delivery: ...
    def hurry(self, seconds: float) -> None: ...


_writers: weakref.WeakSet[FdWriter] = weakref.WeakSet()


class FdWriter:
    """Bytes to a file descriptor from a daemon thread; `put` never blocks.

    Each `put` is one item (one event, one log line). Items are written in
    chunks of whole items up to PIPE_BUF bytes (so a pipe's reader never
    sees half a line, unless one item alone is longer) after poll() reports
    POLLOUT, re-checking every 100 ms whether `close` has given up. Only
    this thread can block (a write to a terminal or socket may still wait
    after POLLOUT); being a daemon, it never holds up the process's exit.
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
        self._thread = threading.Thread(target=self._run, name=f"{name}-writer", daemon=True)
        self._thread.start()
        _writers.add(self)

    # ------------------------------------------------------------ callers

    def put(self, data: bytes) -> bool:
        """Queues one item; False (and counted) when the queue is full or the output failed."""
        report = 0
        with self._cond:
            if self.error is not None or self._closing:
                self.dropped += 1  # the failure itself was reported once, by on_error
                return False
            if len(self._items) >= self._max_items or self._bytes + len(data) > self._max_bytes:
                self.dropped += 1
                self._unreported += 1
                now = time.monotonic()
                if now - self._warned_at >= 1.0:
                    report, self._unreported, self._warned_at = self._unreported, 0, now
                total = self.dropped
            else:
                self._items.append(data)
                self._bytes += len(data)
                self.accepted += 1
                self._cond.notify()
                return True
        if report and self._on_drop is not None:
            self._on_drop(report, total)  # outside the lock: it logs
        return False

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
                batch = [self._items.popleft()]
                size = len(batch[0])
                while self._items and size + len(self._items[0]) <= self._chunk:
                    item = self._items.popleft()
                    batch.append(item)
                    size += len(item)
                self._bytes -= size
            if not self._write(poller, batch):
                return

    def _write(self, poller: select.poll, batch: list[bytes]) -> bool:
        """Writes one batch; counts each item once its last byte is out. False: stop."""
        data = memoryview(b"".join(batch))
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
    stuck reader blocks the caller here, so the watch command never uses it.
    """

    def __init__(self, stream: BinaryIO | TextIO) -> None:
        self.stream = stream
        self.accepted = self.written = 0
        self.error: str | None = None

    def put(self, data: bytes | str) -> bool:
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


class _SinkBase:
    """What both sinks do alike: hand flushing, hurrying and closing to their output."""

    output: Output

    def flush(self) -> None:
        self.output.flush()

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

    def write(self, event: dict) -> None:
        self.output.put(orjson.dumps(event) + b"\n")



def _endpoint(side: dict | None) -> str:
    if not side:
        return "?"
    ip = side.get("ip", "?")
    if ":" in ip and "port" in side:
        ip = f"[{ip}]"
    return f"{ip}:{side['port']}" if "port" in side else ip


_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", '"': '\\"'}


def printable(text: object) -> str:
    """A name or comment as the text view may print it: no byte can act on the terminal.

    Tables, chains, comments, interfaces and process names are chosen by
    whoever owns a namespace, so they may hold newlines (a fake second
    event), escape sequences (terminal control), bidirectional overrides (text
    that reads differently than it is) or quotes that close the quoting
    around them. Those are written as escapes, and so are backslashes, so an
    escape can never be faked by a literal one. The JSON carries the bytes.
    """
    s = str(text)
    if s.isprintable() and "\\" not in s and '"' not in s:
        return s
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif not ch.isprintable() or unicodedata.category(ch) == "Cf":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def describe_rule(nf: dict) -> str:
    """`inet fw input rule 4 "tcp dport 443 drop" (legacy block)` or the policy."""
    where = " ".join(printable(x) for x in (nf.get("family"), nf.get("table")) if x)
    chain = nf.get("chain") or nf.get("base_chain")
    if chain:
        where = f"{where} chain {printable(chain)}" if where else f"chain {printable(chain)}"
    if nf.get("policy"):
        return f"{where} policy {nf.get('verdict', 'drop')}".strip()
    rule = nf.get("rule")
    if rule:
        text = f'{where} rule {rule["handle"]}'
        if rule.get("text") is not None:
            text += f' "{printable(rule["text"])}"'
        if rule.get("comment"):
            text += f" ({printable(rule['comment'])})"
        return text
    return where


def one_line(event: dict) -> str:
    """The human view of an event: time, packet, reason, place, rule, state."""
    ts = event["@timestamp"][11:26]
    net = event.get("network", {})
    proto = net.get("transport", "")
    flags = ",".join(event.get("tcp", {}).get("flags", []))
    packet = f"{proto} {_endpoint(event.get('source'))} > {_endpoint(event.get('destination'))}"
    if flags:
        packet += f" [{flags}]"
    parts = [ts, event["event"]["action"].upper(), packet.strip(), event["drop"]["reason"]]
    ns = event.get("netns", {})
    if ns:
        parts.append(f"netns {printable(ns.get('name') or ns['inode'])}")
    nf = event.get("netfilter")
    if nf:
        hook = nf.get("hook")
        parts.append(f"{nf['backend']}{'/' + hook if hook else ''} {describe_rule(nf)}".strip())
    else:
        parts.append(f"at {event['drop'].get('location', '?')}")
    ct = event.get("conntrack")
    if ct:
        parts.append(f"ct {ct['state']}" + (f"/{ct['direction']}" if ct.get("direction") else ""))
    proc = event.get("process")
    if proc:
        parts.append(f"by {printable(proc['name'])}[{proc['pid']}]")
    if event.get("probe"):
        parts.append(f"probe {event['probe']['id']}")
    if event["event"]["count"] > 1:
        parts.append(f"x{event['event']['count']}")
    return "  ".join(parts)


class TerminalSink(_SinkBase):
    """One line per drop (and its stack with --stack), as one item per event."""

    def __init__(self, stream: TextIO | None = None, *, stack: bool = False,
                 output: Output | None = None, on_error: Callable[[str], None] | None = None) -> None:
        self.output = output or (StreamOutput(stream) if stream is not None else stdout_output(on_error))
        self.stack = stack
        self._encoding = getattr(sys.stdout, "encoding", None) or "utf-8"

    def write(self, event: dict) -> None:
        lines = [one_line(event)]
        if self.stack and event["drop"].get("stack"):
            lines += [f"        {frame}" for frame in event["drop"]["stack"]]
        text = "\n".join(lines) + "\n"
        if isinstance(self.output, FdWriter):
            self.output.put(text.encode(self._encoding, "backslashreplace"))
        else:
            self.output.put(text)



def choose(json: bool, stack: bool = False, on_error: Callable[[str], None] | None = None) -> NdjsonSink | TerminalSink:
    """NDJSON unless stdout is a terminal; `on_error(why)` runs (in the writer's thread) if stdout fails."""
    if json or not sys.stdout.isatty():
        return NdjsonSink(on_error=on_error)
    return TerminalSink(stack=stack, on_error=on_error)
