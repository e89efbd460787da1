"""The queued sink and its spool: order, retries, a full spool, SIGKILL, restarts, stuck outputs.

Real SQLite files, real threads, real processes. The destination is a
`Switch`: a small in-test transport that keeps what it is sent in a list
and that the test turns off (OutputDown) and on, or holds (a send that
blocks until the test lets it go). The real transports have tests of
their own (tests/test_out_file.py for the file output).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import orjson
import pytest
import structlog

from tracer.event.notice import Notice
from tracer.event.rendered import Rendered
from tracer.outputs.file import FileTransport
from tracer.outputs.queued import OutputStats, QueuedSink
from tracer.outputs.spool import Spool, SpoolError, record_size
from tracer.outputs.transport import OutputDown, Record, SendResult

ROOT = Path(__file__).resolve().parent.parent
#: Fast retries, so that an outage of a test lasts tenths of a second.
FAST = {"retry_initial": 0.02, "retry_max": 0.1}


def event(i: int) -> Rendered:
    """A notice carrying its number: what a sink gets from the pipeline."""
    return Rendered(Notice(timestamp_ns=1_700_000_000_000_000_000 + i, dataset="tracer.test", action="test",
                           message=f"event {i}", details={"seq": i}))


def fixed(i: int) -> Record:
    """A record of a fixed size (for exact spool arithmetic)."""
    return Record(b'{"tracer":{"seq":%6d}}' % i, f"event {i:06d}")


def seq_of(data: bytes) -> int:
    return int(orjson.loads(data)["tracer"]["seq"])


class Switch:
    """A destination the test turns off and on; it keeps the numbers of what it took.

    `plan(ids)` may answer a batch with a SendResult (retry, rejected);
    `gate`, when cleared, holds every send until the test sets it.
    """

    name = "switch test"

    def __init__(self, max_batch: int = 16, up: bool = True) -> None:
        self.max_batch = max_batch
        self.up = up
        self.gate = threading.Event()
        self.gate.set()
        self.sending = threading.Event()  # set while a send waits at the gate
        self.plan: Callable[[list[int]], SendResult] | None = None
        self.lock = threading.Lock()
        self.got: list[int] = []
        self.batches: list[list[int]] = []
        self.opens = self.closes = 0

    def open(self) -> None:
        self.opens += 1
        if not self.up:
            raise OutputDown("switched off")

    def send(self, records: Sequence[Record]) -> SendResult:
        self.sending.set()
        self.gate.wait()
        if not self.up:
            raise OutputDown("switched off")
        ids = [seq_of(r.json) for r in records]
        result = self.plan(ids) if self.plan is not None else SendResult()
        skip = set(result.retry) | {i for i, _ in result.rejected}
        with self.lock:
            self.batches.append(ids)
            self.got.extend(n for k, n in enumerate(ids) if k not in skip)
        return result

    def close(self) -> None:
        self.closes += 1

    def taken(self) -> list[int]:
        with self.lock:
            return list(self.got)


class Losses:
    """on_loss: every call, from whichever thread."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []
        self.lock = threading.Lock()

    def __call__(self, output: str, kind: str, n: int) -> None:
        with self.lock:
            self.calls.append((output, kind, n))

    def total(self, kind: str) -> int:
        with self.lock:
            return sum(n for _, k, n in self.calls if k == kind)


def wait_for(what: Callable[[], bool], timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while not what():
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(0.005)


@pytest.fixture
def sinks() -> Iterator[list[QueuedSink]]:
    """Sinks a test made; closed at the end, failed or not."""
    made: list[QueuedSink] = []
    yield made
    for sink in made:
        sink.close(0.5)


# ---------------------------------------------------------------- the spool alone


def test_spool_file_modes_and_names(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path / "spool", "out-1.a_b", 1 << 20)
    try:
        spool.append([fixed(i) for i in range(10)])
        assert stat.S_IMODE(os.stat(tmp_path / "spool").st_mode) == 0o700
        assert stat.S_IMODE(os.stat(spool.path).st_mode) == 0o600
        assert spool.path == tmp_path / "spool" / "out-1.a_b.sqlite"
        wal = Path(f"{spool.path}-wal")
        assert wal.exists() and stat.S_IMODE(wal.stat().st_mode) == 0o600
        assert not Path(f"{spool.path}-shm").exists()  # exclusive lock: the WAL index is in memory
        with sqlite3.connect(f"file:{spool.path}?mode=ro", uri=True, timeout=0) as other, \
                pytest.raises(sqlite3.OperationalError, match="locked"):
            other.execute("SELECT count(*) FROM spool").fetchone()
    finally:
        spool.close()
    for bad in ("", "../x", "a/b", "x y", ".", "..", "é", "x" * 201):
        with pytest.raises(SpoolError, match="spool name"):
            Spool.open(tmp_path / "spool", bad, 1 << 20)


def test_a_spool_is_held_against_other_sinks_and_processes(tmp_path: Path) -> None:
    """Its lock holds while a second sink of this process waits for it (and tries again):
    another process can neither write nor read it."""
    held = Spool.open(tmp_path, "held", 1 << 20)
    try:
        held.append([fixed(1)])
        waiting = Spool.open(tmp_path, "held", 1 << 20)
        assert not waiting.ready and not waiting.wait_ready(0.1) and not waiting.wait_ready(0.1)
        probe = ("import sqlite3, sys\n"
                 "db = sqlite3.connect(sys.argv[1], timeout=0)\n"
                 "try:\n    db.execute('BEGIN IMMEDIATE')\nexcept sqlite3.OperationalError as e:\n    print(e)\n")
        out = subprocess.run([sys.executable, "-c", probe, str(held.path)], capture_output=True, text=True,
                             timeout=60, check=True)
        assert out.stdout.strip() == "database is locked"
        held.append([fixed(2)])
    finally:
        held.close()
    assert waiting.wait_ready(1.0)
    try:
        assert [seq_of(r.json) for _, r in waiting.oldest(5)] == [1, 2]
    finally:
        waiting.close()


def test_spool_keeps_order_and_depth_across_reopen(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "o", 1 << 20)
    spool.append([fixed(i) for i in range(100)])
    spool.append([fixed(i) for i in range(100, 150)])
    rows = spool.oldest(10)
    assert [seq_of(r.json) for _, r in rows] == list(range(10))
    assert rows[3][1].text == "event 000003"
    spool.delete_through(rows[-1][0])
    spool.delete([rows[-1][0] + 1, rows[-1][0] + 3])  # numbers 10 and 12
    size = record_size(fixed(0))
    assert spool.depth == (138, 138 * size)
    spool.close()
    again = Spool.open(tmp_path, "o", 1 << 20)
    try:
        assert again.depth == (138, 138 * size)
        assert [seq_of(r.json) for _, r in again.oldest(3)] == [11, 13, 14]
    finally:
        again.close()


def test_full_spool_drops_the_oldest_and_counts_them(tmp_path: Path) -> None:
    size = record_size(fixed(0))
    spool = Spool.open(tmp_path, "o", 100 * size)
    try:
        assert spool.append([fixed(i) for i in range(60)]) == 0
        assert spool.append([fixed(i) for i in range(60, 150)]) == 50
        assert spool.depth == (100, 100 * size) and spool.dropped_full == 50
        assert [seq_of(r.json) for _, r in spool.oldest(1)] == [50]
        # a batch larger than the whole spool: its own oldest go too
        assert spool.append([fixed(i) for i in range(1000, 1250)]) == 250
        assert spool.dropped_full == 300
        assert [seq_of(r.json) for _, r in spool.oldest(200)] == list(range(1150, 1250))
    finally:
        spool.close()


def test_corrupt_spool_is_set_aside_and_a_fresh_one_works(tmp_path: Path) -> None:
    (tmp_path / "bad.sqlite").write_bytes(b"this is not a database, " * 400)
    with structlog.testing.capture_logs() as logs:
        spool = Spool.open(tmp_path, "bad", 1 << 20)
    try:
        assert spool.ready and spool.depth == (0, 0)
        aside = sorted(tmp_path.glob("bad.sqlite.corrupt-*"))
        assert len(aside) == 1 and aside[0].read_bytes().startswith(b"this is not a database")
        assert [entry["event"] for entry in logs] == ["spool database unusable: set aside, a fresh one started"]
        spool.append([fixed(1), fixed(2)])
        assert [seq_of(r.json) for _, r in spool.oldest(5)] == [1, 2]
    finally:
        spool.close()


def test_damaged_pages_are_found_at_open(tmp_path: Path) -> None:
    spool = Spool.open(tmp_path, "dmg", 1 << 30)
    spool.append([Record(b'{"tracer":{"seq":%d},"pad":"%s"}' % (i, b"x" * 300), "e") for i in range(3000)])
    spool.close()
    path = tmp_path / "dmg.sqlite"
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")  # the page size, from the file's header
    assert len(data) > 20 * page
    for n in range(2, 20, 3):  # b-tree pages of the table: garbage in their headers
        data[n * page:n * page + 64] = b"\xa5" * 64
    path.write_bytes(bytes(data))
    spool = Spool.open(tmp_path, "dmg", 1 << 30)
    try:
        assert spool.depth == (0, 0)
        assert len(list(tmp_path.glob("dmg.sqlite.corrupt-*"))) == 1
    finally:
        spool.close()


# ---------------------------------------------------------------- the sink


def test_down_then_back_delivers_every_event_once_in_order(tmp_path: Path, sinks: list[QueuedSink]) -> None:
    switch = Switch(max_batch=16)
    losses = Losses()
    with structlog.testing.capture_logs() as logs:
        sink = QueuedSink(switch, spool=Spool.open(tmp_path, "sw", 1 << 30), on_loss=losses, **FAST)
        sinks.append(sink)
        for i in range(300):
            sink.submit(event(i))
        wait_for(lambda: len(switch.taken()) == 300)
        switch.up = False
        for start in range(300, 1300, 100):  # events keep coming while it is down
            for i in range(start, start + 100):
                sink.submit(event(i))
            time.sleep(0.02)
        wait_for(lambda: sink.stats().spooled_now_events == 1000)
        down = sink.stats()
        assert not down.up and down.last_error == "switched off" and down.retries > 0
        switch.up = True
        for i in range(1300, 1400):
            sink.submit(event(i))
        wait_for(lambda: len(switch.taken()) >= 1400)
        delivery = sink.close(5)
    assert switch.taken() == list(range(1400))
    assert delivery.accepted == delivery.written == 1400 and delivery.undelivered == 0
    end = sink.stats()
    assert (end.delivered, end.spooled_now_events, end.spooled_now_bytes, end.up) == (1400, 0, 0, True)
    assert losses.calls == []
    said = [entry for entry in logs if entry.get("output") == "sw"]
    assert [entry["event"] for entry in said] == ["output down", "output back"]
    assert said[0]["reason"] == "switched off"
    assert said[1]["spooled_delivered"] >= 1000


@pytest.mark.parametrize("spooled", [True, False], ids=["spool", "no-spool"])
def test_retried_and_rejected_records(tmp_path: Path, sinks: list[QueuedSink], spooled: bool) -> None:
    """A batch answered with retry=... and rejected=...: the retried records are sent again
    before anything newer, the rejected ones are counted once and dropped."""
    switch = Switch(max_batch=8)
    retry_left = {5: 1, 40: 2, 41: 1, 97: 3}
    rejected = {7, 41, 60}

    def plan(ids: list[int]) -> SendResult:
        retry = []
        for k, n in enumerate(ids):
            if retry_left.get(n, 0) > 0:
                retry_left[n] -= 1
                retry.append(k)
        return SendResult(retry=tuple(retry),  # 41: first retried, then rejected
                          rejected=tuple((k, "mapping error") for k, n in enumerate(ids)
                                         if n in rejected and k not in retry))

    switch.plan = plan
    losses = Losses()
    spool = Spool.open(tmp_path, "rr", 1 << 30) if spooled else None
    sink = QueuedSink(switch, spool=spool, on_loss=losses, **FAST)
    sinks.append(sink)
    for i in range(100):
        sink.submit(event(i))
        if i == 50:
            switch.up = False
        if i == 70:
            switch.up = True
    wait_for(lambda: sink.stats().delivered == 97)
    sink.close(5)
    got = switch.taken()
    assert sorted(got) == sorted(set(range(100)) - rejected)  # each once
    retried = {5, 40, 97}
    assert [n for n in got if n not in retried] == sorted(n for n in got if n not in retried)
    for n in retried:  # sent again before anything newer than the batch it came in
        batch = next(b for b in switch.batches if n in b)
        later = [m for m in got[:got.index(n)] if m > max(batch)]
        assert later == [], (n, batch, got)
    stats = sink.stats()
    assert stats.rejected == 3 and losses.total("rejected") == 3
    assert {kind for _, kind, _ in losses.calls} == {"rejected"}


def test_full_spool_drops_oldest_and_reports_the_exact_number(tmp_path: Path, sinks: list[QueuedSink]) -> None:
    size = record_size(fixed(0))
    losses = Losses()
    switch = Switch(up=False)
    sink = QueuedSink(switch, spool=Spool.open(tmp_path, "full", 200 * size), on_loss=losses, **FAST)
    sinks.append(sink)
    for i in range(1000):
        sink.submit(fixed(i))
    wait_for(lambda: sink.stats().spool_dropped == 800)
    stats = sink.stats()
    assert (stats.spooled_now_events, stats.spooled_now_bytes) == (200, 200 * size)
    wait_for(lambda: losses.total("spool_full") == 800)
    switch.up = True
    wait_for(lambda: len(switch.taken()) == 200)
    sink.close(5)
    assert switch.taken() == list(range(800, 1000))
    assert losses.total("spool_full") == 800 and {k for _, k, _ in losses.calls} == {"spool_full"}


def test_restart_with_a_spool_delivers_it_before_new_events(tmp_path: Path, sinks: list[QueuedSink]) -> None:
    first = QueuedSink(Switch(up=False), spool=Spool.open(tmp_path, "rs", 1 << 30), **FAST)
    for i in range(200):
        first.submit(event(i))
    delivery = first.close(1)
    assert (delivery.accepted, delivery.written, delivery.undelivered) == (200, 200, 0)

    switch = Switch(max_batch=32)
    switch.gate.clear()  # the first send (spooled events) waits while new ones arrive
    with structlog.testing.capture_logs() as logs:
        sink = QueuedSink(switch, spool=Spool.open(tmp_path, "rs", 1 << 30), **FAST)
        sinks.append(sink)
        switch.sending.wait(10)
        for i in range(200, 300):
            sink.submit(event(i))
        switch.gate.set()
        wait_for(lambda: len(switch.taken()) == 300)
        sink.close(5)
    assert switch.taken() == list(range(300))
    assert switch.batches[0] == list(range(32))
    assert sink.stats().carried_over == 200
    events = [entry["event"] for entry in logs if entry.get("output") == "rs"]
    assert events == ["delivering the spool of an earlier run first", "spool of an earlier run delivered"]


def test_close_with_the_output_down_leaves_everything_in_the_spool(tmp_path: Path) -> None:
    losses = Losses()
    sink = QueuedSink(Switch(up=False), spool=Spool.open(tmp_path, "cd", 1 << 30), on_loss=losses, **FAST)
    for i in range(2000):
        sink.submit(event(i))
    delivery = sink.close(0.5)  # whatever the worker did not spool yet, close() spools
    assert (delivery.accepted, delivery.written, delivery.dropped, delivery.undelivered) == (2000, 2000, 0, 0)
    assert delivery.error == "switched off"
    assert losses.calls == []
    spool = Spool.open(tmp_path, "cd", 1 << 30)
    try:
        assert spool.depth[0] == 2000
        assert [seq_of(r.json) for _, r in spool.oldest(5000)] == list(range(2000))
    finally:
        spool.close()


def test_close_of_an_output_that_is_up_delivers_the_queue(tmp_path: Path) -> None:
    switch = Switch(max_batch=64)
    sink = QueuedSink(switch, spool=Spool.open(tmp_path, "cu", 1 << 30), **FAST)
    for i in range(5000):
        sink.submit(event(i))
    delivery = sink.close(20)
    assert switch.taken() == list(range(5000))
    assert (delivery.accepted, delivery.written, delivery.undelivered) == (5000, 5000, 0)


def test_a_stuck_transport_never_blocks_submit(tmp_path: Path) -> None:
    switch = Switch(max_batch=16)
    switch.gate.clear()  # every send hangs until the test is done
    losses = Losses()
    sink = QueuedSink(switch, spool=Spool.open(tmp_path, "st", 1 << 30), queue_events=100, on_loss=losses)
    try:
        sink.submit(event(0))
        switch.sending.wait(10)
        for i in range(1, 5000):
            sink.submit(event(i))  # returns although the destination takes nothing
        stats = sink.stats()
        assert stats.accepted + stats.queue_dropped == 5000
        assert stats.queue_dropped >= 5000 - 100 - 16 and stats.delivered == 0
        delivery = sink.close(0.3)  # returns too: the worker is still stuck in send()
        assert switch.gate.is_set() is False
    finally:
        switch.gate.set()
    assert delivery.dropped == stats.queue_dropped
    assert delivery.accepted == stats.accepted
    assert losses.total("queue") == stats.queue_dropped
    spool = Spool.open(tmp_path, "st", 1 << 30)  # the batch in the stuck send and the queue are kept
    try:
        wait_for(lambda: spool.wait_ready(0.1))
        assert [seq_of(r.json) for _, r in spool.oldest(1000)] == list(range(stats.accepted))
    finally:
        spool.close()


def test_without_a_spool_a_down_output_counts_its_losses() -> None:
    switch = Switch(max_batch=10, up=False)
    losses = Losses()
    sink = QueuedSink(switch, spool=None, queue_events=50, on_loss=losses, name="nospool", **FAST)
    for i in range(100):
        sink.submit(event(i))
        if i == 0:
            wait_for(lambda: sink.stats().retries > 0)  # the first batch failed and waits in memory
    wait_for(lambda: losses.total("output_down") > 0)
    switch.up = True
    wait_for(lambda: sink.stats().queued_now == 0 and len(switch.taken()) == sink.stats().delivered > 0)
    delivery = sink.close(5)
    stats = sink.stats()
    got = switch.taken()
    assert got == sorted(got) and got[0] == 0
    assert stats.delivered + stats.down_dropped == 100
    assert losses.total("output_down") == stats.down_dropped == delivery.dropped
    assert all(name == "nospool" for name, _, _ in losses.calls)


def test_close_without_a_spool_gives_up_on_a_down_output_at_once() -> None:
    """No retries at close for an output that is down and has nowhere to keep its events:
    they are counted lost (the backoff here is far longer than any test)."""
    losses = Losses()
    sink = QueuedSink(Switch(up=False), spool=None, on_loss=losses, name="gone", retry_initial=600, retry_max=600)
    for i in range(100):
        sink.submit(event(i))
    wait_for(lambda: sink.stats().retries == 1 or not sink.stats().up)
    delivery = sink.close(600)
    assert (delivery.accepted, delivery.written, delivery.undelivered, delivery.error) == (100, 0, 100, "switched off")
    assert losses.calls == [("gone", "output_down", 100)]


def test_a_spool_in_use_is_taken_over_when_its_holder_closes(tmp_path: Path, sinks: list[QueuedSink]) -> None:
    """A reload opens the new sink of an output before the old one closes: the new one
    waits for the spool, then delivers what the old one left before its own events."""
    old = QueuedSink(Switch(up=False), spool=Spool.open(tmp_path, "ho", 1 << 30), **FAST)
    for i in range(50):
        old.submit(event(i))
    wait_for(lambda: old.stats().spooled_now_events == 50)
    switch = Switch()
    spool = Spool.open(tmp_path, "ho", 1 << 30)
    assert not spool.ready
    new = QueuedSink(switch, spool=spool, **FAST)
    sinks.append(new)
    for i in range(50, 60):
        new.submit(event(i))
    time.sleep(0.2)
    assert switch.taken() == []  # nothing overtakes the old sink's spool
    for i in range(60, 70):
        old.submit(event(i))
    old.close(1)
    wait_for(lambda: len(switch.taken()) == 70)
    assert switch.taken() == [*range(50), *range(60, 70), *range(50, 60)]


def test_reopen_closes_and_opens_the_transport(sinks: list[QueuedSink]) -> None:
    switch = Switch()
    sink = QueuedSink(switch, spool=None, **FAST)
    sinks.append(sink)
    wait_for(lambda: switch.opens == 1)
    sink.reopen()
    wait_for(lambda: switch.opens == 2)
    assert switch.closes == 1
    sink.submit(event(1))
    wait_for(lambda: switch.taken() == [1])


def test_stats_is_the_metrics_shape() -> None:
    fields = set(OutputStats.__dataclass_fields__)
    assert {"name", "accepted", "delivered", "queue_dropped", "spooled_now_events", "spooled_now_bytes",
            "spool_dropped", "rejected", "up", "last_error", "retries"} <= fields


# ---------------------------------------------------------------- SIGKILL

CHILD = r"""
import sys, time
from tracer import log
from tracer.outputs.file import FileTransport
from tracer.outputs.queued import QueuedSink
from tracer.outputs.spool import Spool
from tracer.outputs.transport import Record

spool_dir, dest, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
log.configure("info", json=True)  # to stderr: stdout says when the spool holds everything
sink = QueuedSink(FileTransport(dest), spool=Spool.open(spool_dir, "killed", 1 << 30),
                  retry_initial=0.05, retry_max=0.2)

def record(i):
    return Record(b'{"tracer":{"seq":%d}}' % i, "event %d" % i)

for i in range(n):
    sink.submit(record(i))
while sink.stats().spooled_now_events < n:
    time.sleep(0.005)
assert sink.stats().delivered == 0 and not sink.stats().up
print("spooled", flush=True)
i = n
while True:  # still spooling when the parent kills it
    sink.submit(record(i))
    i += 1
    time.sleep(0.0002)
"""


def test_sigkill_while_spooling_then_a_restart_delivers_everything_once(tmp_path: Path) -> None:
    blocker = tmp_path / "logs"
    blocker.write_text("a file where the output's directory should be\n")
    dest = blocker / "drops.ndjson"  # the file output is down: its directory cannot be made
    n = 3000
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(tmp_path / "spool"), str(dest), str(n)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "spooled\n"
        time.sleep(0.3)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)
        if child.stdout is not None:
            child.stdout.close()
    assert child.returncode == -signal.SIGKILL
    blocker.unlink()  # the destination is back

    sink = QueuedSink(FileTransport(str(dest)), spool=Spool.open(tmp_path / "spool", "killed", 1 << 30), **FAST)
    try:
        wait_for(lambda: sink.stats().carried_over > 0 and sink.stats().delivered == sink.stats().carried_over)
    finally:
        delivery = sink.close(5)
    seqs = [seq_of(line) for line in dest.read_bytes().splitlines()]
    assert seqs == list(range(len(seqs)))  # in order, nothing twice, no gap
    assert len(seqs) > n  # everything of before the kill, and what was spooled while it was killed
    assert delivery.written == delivery.accepted == len(seqs)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
