"""The daemon's outputs: a transport behind a worker thread, a bounded queue and a spool.

Every daemon output (file, syslog, journald, Elasticsearch, Splunk) is a
`QueuedSink` around its `Transport` (tracer.outputs.transport): the
transport knows the wire format, the sink decides what happens when the
destination is slow or down, alike for every type.

- `submit` only appends to a bounded deque: a full queue costs the event
  (counted, reported through `on_loss`), never the caller's time.
- The worker takes what is queued, at most `max_batch` records, without
  waiting for more, and sends it. Events reach the destination in the order
  they were submitted, always.
- When the destination is down (`OutputDown` from `open` or `send`), the
  batch and everything after it go to the spool (tracer.outputs.spool),
  every loop iteration, in one transaction (of at most SPOOL_CHUNK): a
  SIGKILL loses at most what sat in memory for a few milliseconds. The spool is delivered oldest first
  after a backoff (0.5 s doubling up to 30 s, with jitter, reset by a
  success), and new events keep going to its end until it is empty again;
  only then do they go straight to the destination. A spool left by an
  earlier run (or a crash) is delivered before anything new.
- Records a `SendResult` asks to retry stay first in line, and the next
  try sends them alone, so nothing newer overtakes them; records it
  rejects are counted and dropped, never retried forever.
- Without a spool, the records of a failed batch wait in memory (with the
  queue behind them) for the next try; what the full queue then refuses is
  lost because the output is down (`output_down`).

State changes are logged through structlog (`tracer.output`): "output
down" once per outage, "output back" once its backlog is delivered; never a
line per event or per retry. Losses go to `on_loss(output, kind, n)` from
the worker thread, at most once a second (and once more at close), with
kind one of `queue`, `output_down`, `rejected`, `spool_full`,
`spool_corrupt`, `spool_error`, `shutdown`.
"""

from __future__ import annotations

import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from tracer.event.rendered import Rendered
from tracer.outputs.base import Delivery
from tracer.outputs.spool import Spool, SpoolError
from tracer.outputs.transport import OutputDown, Record, SendResult, Transport

log = structlog.get_logger("tracer.output")

#: Events held in memory per output by default.
QUEUE_EVENTS = 10_000
#: The first retry after a failure, and the longest wait between two (seconds).
RETRY_INITIAL = 0.5
RETRY_MAX = 30.0
#: Losses are handed to `on_loss` at most this often (seconds).
LOSS_REPORT_INTERVAL = 1.0
#: Refused records are logged at most this often (seconds): they are counted anyway.
REJECT_LOG_INTERVAL = 60.0
#: Events moved from the queue to the spool per transaction at most: rendering them takes
#: the worker ~40 us each (docs/performance.md), and until they are in the spool a SIGKILL would lose them.
SPOOL_CHUNK = 1000
#: How long `close` waits beyond its deadline for a worker that is not stuck to finish.
CLOSE_GRACE = 0.25
#: How long `close` waits for the spool while a worker stuck in its transport holds it.
SPOOL_LOCK_WAIT = 1.0

#: What `on_loss` receives: (output name, kind of loss, events).
LossCallback = Callable[[str, str, int], None]


@dataclass(frozen=True, slots=True)
class OutputStats:
    """One output's figures, for the metrics endpoint (read at each scrape).

    Counters are totals since the sink started; `spooled_now_*` and `queued_now`
    are levels. `spool_dropped` counts every event the spool lost (full, a
    corrupt file set aside, a write that failed); `down_dropped` the events
    of an output without a spool lost while it was down.
    """

    name: str
    accepted: int  # queued by submit()
    delivered: int  # taken by the destination (including spooled events of an earlier run)
    queue_dropped: int  # refused by submit(): the queue was full
    spooled_now_events: int
    spooled_now_bytes: int
    spool_dropped: int
    rejected: int  # refused for good by the destination (or that could not be rendered)
    up: bool  # the last attempt reached the destination
    last_error: str | None  # why the last attempt failed (kept after recovery)
    retries: int  # attempts made after a failure
    down_dropped: int = 0
    queued_now: int = 0
    carried_over: int = 0  # events found in the spool at start


class _Abandoned(Exception):
    """close() gave up on a worker stuck in its transport and took over the spool."""


class QueuedSink:
    """An `OutputSink` that delivers through `transport` from its own thread; see the module.

    `name` is the output's stable id (metrics label, spool file, loss
    reports); it defaults to the spool's name, else the transport's.
    """

    def __init__(self, transport: Transport, *, spool: Spool | None = None, queue_events: int = QUEUE_EVENTS,
                 on_loss: LossCallback | None = None, name: str | None = None,
                 retry_initial: float = RETRY_INITIAL, retry_max: float = RETRY_MAX) -> None:
        self.transport = transport
        self.name = name or (spool.name if spool is not None else str(getattr(transport, "name", "output")))
        self._spool = spool
        self._max_queue = max(1, queue_events)
        self._max_batch = max(1, int(getattr(transport, "max_batch", 1)))
        self._on_loss = on_loss
        self._retry_initial, self._retry_max = retry_initial, max(retry_initial, retry_max)

        # Shared with callers, under _cond.
        self._cond = threading.Condition(threading.Lock())
        self._queue: deque[Rendered | Record] = deque()
        self._closing = False
        self._reopen_wanted = False
        self._abandoned = False
        self._wants_items = False  # the worker waits for submit() to queue something
        self._accepted = self._queue_dropped = self._down_refused = self._closed_refused = 0
        self._pending_loss: Counter[str] = Counter()
        self._inflight: list[Record] | None = None  # being sent, and in no spool
        self._deadline = float("inf")  # set by hurry()/close(); a float store is signal-safe
        self._final: Delivery | None = None
        self._close_lock = threading.Lock()
        # The spool, between the worker and a close() that takes over from a stuck worker.
        self._spool_lock = threading.Lock()

        # The worker's own state (others only read it).
        self._delivered = self._rejected = self._down_lost = self._spool_lost = self._retries = 0
        self._carried = 0
        self._up = True
        self._down = False
        self._last_error: str | None = None
        self._opened = False
        self._spooling = False
        self._head: list[Record] = []  # without a spool: what failed, sent again first
        self._next_try = 0.0
        self._failures = 0
        self._retry_only = 0  # the next spool batch: only the records a SendResult asked to retry
        self._outage = False  # "output down" said, "output back" not yet
        self._outage_start = self._back_at = 0.0
        self._drained = 0  # delivered from the spool since it last started to fill
        self._carry_pending = False  # delivering an earlier run's spool, no outage meanwhile
        self._spool_seen = {"spool_full": 0, "spool_corrupt": 0}
        self._spool_failing = False
        self._last_report = 0.0
        self._rejects_unlogged = 0
        self._reject_logged_at = -REJECT_LOG_INTERVAL
        self._render_failed = False

        self._thread = threading.Thread(target=self._run, name=f"output-{self.name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ callers

    def submit(self, rendered: Rendered | Record) -> None:
        """Queues one event; never blocks. A full queue counts it lost (`queue`, or
        `output_down` for an output without a spool that is down)."""
        with self._cond:
            if self._closing:
                self._closed_refused += 1
                return
            if len(self._queue) >= self._max_queue:
                if self._down and self._spool is None:
                    self._down_refused += 1
                    self._pending_loss["output_down"] += 1
                else:
                    self._queue_dropped += 1
                    self._pending_loss["queue"] += 1
                return
            self._queue.append(rendered)
            self._accepted += 1
            if self._wants_items:
                self._wants_items = False
                self._cond.notify()

    def reopen(self) -> None:
        """Asks the worker to close and open its transport again (SIGHUP: a file that
        logrotate moved away is created anew)."""
        with self._cond:
            self._reopen_wanted = True
            self._cond.notify()

    def hurry(self, seconds: float) -> None:
        """Gives up on the rest `seconds` from now at the latest (safe in a signal handler)."""
        self._deadline = min(self._deadline, time.monotonic() + max(0.0, seconds))

    @property
    def spooled(self) -> bool:
        """Whether what this output cannot deliver is kept in a spool."""
        return self._spool is not None

    def close(self, timeout: float) -> Delivery:
        """Stops taking events; delivers the queue within `timeout` if the output is up;
        whatever is left goes to the spool (without one it is lost, and counted); then
        closes the transport and the spool. Idempotent.

        The figures: `accepted` = events queued plus those found in the spool at
        start; `written` = delivered plus those in the spool now (kept: not lost);
        `dropped` = refused by submit(); so `undelivered` counts exactly the events
        lost for good. `error` is the reason while the output is down.
        """
        self.hurry(timeout)
        with self._close_lock:
            if self._final is not None:
                return self._final
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            while self._thread.is_alive() and time.monotonic() < self._deadline:
                self._thread.join(min(0.05, max(0.0, self._deadline - time.monotonic())))
            self._thread.join(CLOSE_GRACE)
            self._take_over()
            self._report(force=True)
            if self._spool is not None and self._spool_lock.acquire(timeout=SPOOL_LOCK_WAIT):
                try:
                    self._spool.close()
                finally:
                    self._spool_lock.release()
            self._final = self._delivery()
            return self._final

    def stats(self) -> OutputStats:
        """The figures now (any thread; cheap: no I/O)."""
        events, size = self._spool.depth if self._spool is not None else (0, 0)
        spool_dropped = (self._spool.dropped if self._spool is not None else 0) + self._spool_lost
        with self._cond:
            accepted, queue_dropped, queued = self._accepted, self._queue_dropped, len(self._queue)
            down = self._down_lost + self._down_refused
        return OutputStats(name=self.name, accepted=accepted, delivered=self._delivered,
                           queue_dropped=queue_dropped, spooled_now_events=events, spooled_now_bytes=size,
                           spool_dropped=spool_dropped, rejected=self._rejected, up=self._up,
                           last_error=self._last_error, retries=self._retries, down_dropped=down,
                           queued_now=queued, carried_over=self._carried)

    def _delivery(self) -> Delivery:
        events = self._spool.depth[0] if self._spool is not None else 0
        with self._cond:
            accepted = self._accepted + self._carried
            dropped = self._queue_dropped + self._down_refused + self._closed_refused
        return Delivery(accepted, self._delivered + events, dropped, None if self._up else self._last_error)

    def _take_over(self) -> None:
        """After the worker ended, or while it is stuck in its transport: whatever it still
        holds is kept (spooled; at-least-once for a batch a stuck send may yet deliver).

        The spool's lock is taken first: the worker then either spooled its batch
        already (and cleared `_inflight`) or will find itself abandoned before it can."""
        spool = self._spool
        locked = spool is not None and self._spool_lock.acquire(timeout=SPOOL_LOCK_WAIT)
        try:
            with self._cond:
                self._abandoned = True
                items: list[Rendered | Record] = [*(self._inflight or ()), *self._head, *self._queue]
                self._inflight, self._head = None, []
                self._queue.clear()
                self._cond.notify_all()
            records = self._records(items)
            if not records:
                return
            if spool is None:
                self._lose(records, "output_down" if self._down else "shutdown")
            elif not locked:
                self._lose(records, "spool_error", spool=True)
            else:
                self._append_locked(records)
        finally:
            if locked:
                self._spool_lock.release()

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        try:
            if self._start():
                while self._step():
                    pass
        except _Abandoned:
            pass
        except Exception as exc:  # never a traceback from this thread; close() keeps what is left
            self._up, self._last_error = False, f"worker failed: {type(exc).__name__}: {exc}"
            log.error("output worker failed", output=self.name, error=self._last_error)
        finally:
            self._close_transport()

    def _start(self) -> bool:
        """Takes the spool (waiting while an old sink of this output still has it), then
        opens the destination; False if close() came first."""
        spool = self._spool
        if spool is not None and not spool.ready:
            log.info("waiting for the spool, held by another sink or process", output=self.name,
                     path=str(spool.path))
            while True:
                try:
                    with self._spool_lock:
                        if self._abandoned:
                            return False
                        if spool.wait_ready(0.5):
                            break
                except SpoolError as exc:
                    log.error("spool unusable; this output runs without one", output=self.name, error=str(exc))
                    self._spool = spool = None
                    break
                with self._cond:
                    if self._closing:
                        return False
        if spool is not None:
            self._collect_spool_losses()
            self._carried = spool.depth[0]
            if self._carried:
                log.info("delivering the spool of an earlier run first", output=self.name,
                         events=self._carried, bytes=spool.depth[1])
                self._start_spooling()
                self._carry_pending = True
        self._open_now()
        return True

    def _open_now(self) -> None:
        """Opens the transport at once (at start, on reopen), so that a down destination
        is known (and logged) before any event needs it."""
        try:
            self._attempt_open()
        except OutputDown as exc:
            self._failed(str(exc))
            if self._spool is not None:
                self._start_spooling()
            return
        if self._spooling:
            self._next_try = time.monotonic()  # reopened: no need to wait for the backoff

    def _take(self) -> tuple[list[Rendered | Record], bool, bool]:
        """Waits for work; returns (items taken from the queue, closing, reopen wanted)."""
        with self._cond:
            while True:
                now = time.monotonic()
                closing, reopen = self._closing, self._reopen_wanted
                late = closing and now >= self._deadline
                if self._abandoned or reopen or late:
                    break
                timeout: float | None
                wants = False
                if self._spooling:
                    if self._queue or closing or now >= self._next_try:
                        break
                    timeout, wants = self._next_try - now, True
                elif self._head:
                    if now >= self._next_try or (closing and self._down):
                        break
                    timeout = self._next_try - now
                else:
                    if self._queue or closing:
                        break
                    timeout, wants = None, True
                if self._pending_loss:
                    report_in = self._last_report + LOSS_REPORT_INTERVAL - now
                    if report_in <= 0:
                        break
                    timeout = report_in if timeout is None else min(timeout, report_in)
                if closing:
                    left = self._deadline - now
                    timeout = left if timeout is None else min(timeout, left)
                self._wants_items = wants
                self._cond.wait(timeout)
                self._wants_items = False
            self._reopen_wanted = False
            items: list[Rendered | Record] = []
            if self._abandoned or late:
                pass
            elif self._spooling:
                take = min(max(SPOOL_CHUNK, self._max_batch), len(self._queue))
                items = [self._queue.popleft() for _ in range(take)]
            elif not self._head:
                take = min(self._max_batch, len(self._queue))
                items = [self._queue.popleft() for _ in range(take)]
            return items, closing, reopen

    def _step(self) -> bool:
        """One turn of the worker; False when it is done."""
        items, closing, reopen = self._take()
        if self._abandoned:
            return False
        if reopen:
            self._close_transport()
            self._open_now()
        records = self._records(items)
        # Out of time, or down without a spool (no retries at close: nothing would keep
        # what they fail to deliver): what is left is spooled, or lost.
        if closing and (time.monotonic() >= self._deadline or (self._down and self._spool is None)):
            with self._cond:
                rest = [*self._head, *records, *self._queue]
                self._head = []
                self._queue.clear()
            self._give_up(self._records(rest))
            self._report(force=True)
            return False
        if self._spooling:
            if records:
                self._spool_append(records)
            if closing:
                with self._cond:
                    if self._queue:
                        return True  # more to spool first
                self._report(force=True)
                return False  # the queue is in the spool now, behind the older events
            if time.monotonic() >= self._next_try:
                self._deliver_spool()
        elif self._head or records:
            self._deliver_direct(records)
        self._report()
        if closing and not self._spooling and not self._head:
            with self._cond:
                if not self._queue:
                    return False
        return True

    # ------------------------------------------------------------------ delivery

    def _deliver_direct(self, records: list[Record]) -> None:
        """Sends what the queue gave (or what failed before): the output is up and nothing
        is spooled, so nothing older is waiting."""
        batch, self._head = (self._head or records), []
        with self._cond:
            self._inflight = batch
        try:
            try:
                result = self._attempt(batch)
            except OutputDown as exc:
                self._failed(str(exc))
                self._keep(batch)
                return
            retry = self._settle(batch, result)
            self._mark_up()
            if retry:
                self._keep([batch[i] for i in retry])
                self._retry_only = len(retry)
                self._schedule_retry()
            else:
                self._failures = 0
                self._maybe_back()
        finally:
            with self._cond:
                self._inflight = None

    def _deliver_spool(self) -> None:
        """Sends the spool's oldest batch; leaves spool mode once it is empty (and the
        destination has answered)."""
        spool = self._spool
        assert spool is not None
        try:
            with self._spool_lock:
                self._check_abandoned()
                rows = spool.oldest(self._retry_only or self._max_batch)
        except SpoolError as exc:
            self._spool_trouble(exc)
            self._schedule_retry()
            return
        finally:
            self._collect_spool_losses()
        if not rows:
            try:
                self._attempt_open()
            except OutputDown as exc:
                self._failed(str(exc))
                return
            self._spooling = False
            self._mark_up()
            self._failures = 0
            self._maybe_back()
            return
        batch = [record for _, record in rows]
        try:
            result = self._attempt(batch)
        except OutputDown as exc:
            self._failed(str(exc))
            return
        retry = self._settle(batch, result)
        self._mark_up()
        self._drained += len(batch) - len(retry)
        try:
            with self._spool_lock:
                self._check_abandoned()
                if retry:
                    keep = set(retry)
                    spool.delete(seq for k, (seq, _) in enumerate(rows) if k not in keep)
                else:
                    spool.delete_through(rows[-1][0])
        except SpoolError as exc:  # delivered, but still spooled: sent again later (a duplicate)
            self._spool_trouble(exc)
        finally:
            self._collect_spool_losses()
        self._retry_only = len(retry)  # alone next time: nothing newer overtakes them
        if retry:
            self._schedule_retry()
            return
        self._failures = 0
        if spool.depth[0] == 0:
            self._spooling = False
            self._maybe_back()

    def _attempt_open(self) -> None:
        if self._opened:
            return
        try:
            self.transport.open()
        except OutputDown:
            self._close_transport()
            raise
        except Exception as exc:  # a transport's bug: the output is down, the events are kept
            self._close_transport()
            raise OutputDown(f"{type(exc).__name__}: {exc}") from exc
        self._opened = True

    def _attempt(self, batch: Sequence[Record]) -> SendResult:
        """One try of one batch: opens the transport if need be, sends; OutputDown if
        none of it can be counted as delivered."""
        if self._failures:
            self._retries += 1
        self._attempt_open()
        try:
            result: object = self.transport.send(batch)  # a transport returning None means "all taken"
        except OutputDown:
            self._close_transport()
            raise
        except Exception as exc:
            self._close_transport()
            raise OutputDown(f"{type(exc).__name__}: {exc}") from exc
        return result if isinstance(result, SendResult) else SendResult()

    def _settle(self, batch: Sequence[Record], result: SendResult) -> list[int]:
        """Counts what the destination took and refused; returns the indices to retry."""
        n = len(batch)
        rejected: dict[int, str] = {}
        for index, why in result.rejected:
            if 0 <= index < n:
                rejected.setdefault(index, why)
        retry = sorted({i for i in result.retry if 0 <= i < n and i not in rejected})
        self._delivered += n - len(rejected) - len(retry)
        if rejected:
            self._rejected += len(rejected)
            self._add_loss("rejected", len(rejected))
            self._log_rejects(len(rejected), next(iter(rejected.values())))
        return retry

    def _keep(self, records: list[Record]) -> None:
        """Records that cannot go now: to the spool (everything after them follows them
        there), or, without one, first in line in memory."""
        if not records:
            return
        if self._spool is None:
            with self._cond:
                self._head, self._inflight = records, None
            return
        self._start_spooling()
        self._spool_append(records)

    def _give_up(self, records: list[Record]) -> None:
        """close() is out of time: the rest goes to the spool, or is lost."""
        if not records:
            return
        if self._spool is not None:
            self._spool_append(records)
        else:
            self._lose(records, "output_down" if self._down else "shutdown")

    def _start_spooling(self) -> None:
        if not self._spooling:
            self._spooling = True
            self._drained = 0
            self._next_try = max(self._next_try, time.monotonic()) if self._failures else time.monotonic()

    def _spool_append(self, records: list[Record]) -> None:
        with self._spool_lock:
            self._check_abandoned()
            self._append_locked(records)
            with self._cond:
                self._inflight = None  # whatever was being sent is spooled now, or sent

    def _append_locked(self, records: list[Record]) -> None:
        spool = self._spool
        assert spool is not None
        try:
            spool.append(records)
        except SpoolError as exc:
            self._spool_trouble(exc)
            self._lose(records, "spool_error", spool=True)
        else:
            if self._spool_failing:
                self._spool_failing = False
                log.info("spool writable again", output=self.name)
        finally:
            self._collect_spool_losses()

    def _check_abandoned(self) -> None:
        if self._abandoned:
            raise _Abandoned

    # ------------------------------------------------------------------ states

    def _failed(self, reason: str) -> None:
        """An attempt did not reach the destination: down (said once per outage), retry later."""
        self._up, self._last_error = False, reason
        now = time.monotonic()
        self._down = True
        if not self._outage:
            self._outage, self._outage_start = True, now
            log.warning("output down", output=self.name, destination=str(getattr(self.transport, "name", "")),
                        reason=reason, spool=self._spool is not None, **_hint(reason))
        self._schedule_retry()

    def _mark_up(self) -> None:
        """The destination answered."""
        self._up = True
        if self._down:
            self._down = False
            self._back_at = time.monotonic()

    def _maybe_back(self) -> None:
        """The backlog is delivered: the outage (or the earlier run's spool) is over."""
        if self._spooling or self._head:
            return
        now = time.monotonic()
        if self._outage:
            self._outage = False
            back = self._back_at if self._back_at >= self._outage_start else now
            log.info("output back", output=self.name, outage_s=round(back - self._outage_start, 1),
                     spooled_delivered=self._drained, catch_up_s=round(now - back, 1))
        elif self._carry_pending:
            log.info("spool of an earlier run delivered", output=self.name, events=self._drained)
        self._carry_pending = False
        self._drained = 0

    def _schedule_retry(self) -> None:
        """Exponential backoff with jitter: the nth wait is between half and all of
        min(retry_max, retry_initial * 2**n)."""
        delay = min(self._retry_max, self._retry_initial * 2 ** min(self._failures, 30))
        self._failures += 1
        self._next_try = time.monotonic() + delay * random.uniform(0.5, 1.0)

    def _close_transport(self) -> None:
        if self._opened:
            self._opened = False
            try:
                self.transport.close()
            except Exception as exc:  # close() must not raise; if it does, it is closed anyway
                log.debug("transport close failed", output=self.name, error=f"{type(exc).__name__}: {exc}")

    # ------------------------------------------------------------------ records and losses

    def _records(self, items: Sequence[Rendered | Record]) -> list[Record]:
        """Each event as the queue, the spool and the transports hold it: its JSON without the
        newline, its one-line text (valid UTF-8, whatever the event held)."""
        out: list[Record] = []
        for item in items:
            if isinstance(item, Record):
                out.append(item)
                continue
            try:
                data, text = item.json(), item.text()
            except Exception as exc:
                self._rendering_failed(exc)
                continue
            if not text.isascii():
                text = text.encode("utf-8", "backslashreplace").decode("utf-8")
            out.append(Record(data.rstrip(b"\n"), text))
        return out

    def _rendering_failed(self, exc: Exception) -> None:
        self._rejected += 1
        self._add_loss("rejected", 1)
        if not self._render_failed:
            self._render_failed = True
            log.error("event could not be rendered; it and any such later ones are dropped",
                      output=self.name, error=f"{type(exc).__name__}: {exc}")

    def _lose(self, records: Sequence[Record], kind: str, *, spool: bool = False) -> None:
        if spool:
            self._spool_lost += len(records)
        else:
            self._down_lost += len(records)
        self._add_loss(kind, len(records))

    def _add_loss(self, kind: str, n: int) -> None:
        if n > 0:
            with self._cond:
                self._pending_loss[kind] += n

    def _collect_spool_losses(self) -> None:
        spool = self._spool
        if spool is None:
            return
        for kind, total in (("spool_full", spool.dropped_full), ("spool_corrupt", spool.dropped_corrupt)):
            self._add_loss(kind, total - self._spool_seen[kind])
            self._spool_seen[kind] = total

    def _spool_trouble(self, exc: SpoolError) -> None:
        if not self._spool_failing:
            self._spool_failing = True
            log.error("spool cannot be used; events that need it are lost until it can",
                      output=self.name, error=str(exc))

    def _log_rejects(self, n: int, why: str) -> None:
        self._rejects_unlogged += n
        now = time.monotonic()
        if now - self._reject_logged_at >= REJECT_LOG_INTERVAL:
            log.warning("destination refused events; they are dropped", output=self.name,
                        events=self._rejects_unlogged, reason=why)
            self._rejects_unlogged, self._reject_logged_at = 0, now

    def _report(self, *, force: bool = False) -> None:
        """Hands the losses counted since the last report to on_loss, one call per kind."""
        now = time.monotonic()
        with self._cond:
            if not self._pending_loss or (not force and now - self._last_report < LOSS_REPORT_INTERVAL):
                return
            pending, self._pending_loss = self._pending_loss, Counter()
            self._last_report = now
        if self._on_loss is None:
            return
        for kind, n in sorted(pending.items()):
            try:
                self._on_loss(self.name, kind, n)
            except Exception as exc:
                log.error("loss report failed", output=self.name, error=f"{type(exc).__name__}: {exc}")


def _hint(reason: str) -> dict[str, str]:
    """What an operator should look at for a refusal that comes from this host, not the SIEM:
    EPERM on connect is the unit's IP allow-list (IPAddressAllow=) or a local firewall."""
    if "not permitted" in reason.lower():
        return {"hint": "this host refused the connection: allow the address in the unit "
                        "(systemctl edit tracer: IPAddressAllow=) or the local firewall"}
    return {}
