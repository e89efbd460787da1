"""A stuck reader never stops the tracer: outputs through a bounded queue, signals obeyed.

The unit tests drive tracer.outputs.writer.FdWriter against real pipes that nobody
reads (or whose reader went away); the end-to-end tests run `tracer watch`
with a stdout pipe the test never reads, fill it with real drops in a lab,
and check that SIGTERM/SIGINT still end the watch within 2 s, with the host's
rulesets as they were and the undelivered events counted on stderr.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import re
import signal
import subprocess
import termios
import threading
import time

import orjson
import pytest

from tests.support import root_ruleset, tracer_cmd, wait_for, wait_ready
from tracer.outputs.base import Delivery, undelivered_line
from tracer.outputs.writer import PIPE_BUF, FdWriter


def pipe_bytes(fd: int) -> int:
    """How many bytes wait in a pipe (FIONREAD)."""
    held = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, held)
    return held[0]


def drain(fd: int) -> bytes:
    """Everything left in the pipe, once its write ends are closed."""
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def pipe():
    r, w = os.pipe()
    fds = {"r": r, "w": w}
    yield fds
    for fd in fds.values():
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _line(i: int, size: int = 1000) -> bytes:
    body = orjson.dumps({"n": i, "pad": "x" * max(0, size - 20)})
    return body + b"\n"


# ------------------------------------------------------------------ FdWriter


def test_put_never_blocks_on_a_pipe_nobody_reads(pipe):
    drops: list[tuple[int, int]] = []
    writer = FdWriter(pipe["w"], name="t", max_items=50, on_drop=lambda n, total: drops.append((n, total)))
    flags = fcntl.fcntl(pipe["w"], fcntl.F_GETFL)
    began = time.monotonic()
    for i in range(2000):
        writer.put(_line(i))
    assert time.monotonic() - began < 1.0, "put() waited for the reader"
    time.sleep(0.3)  # the writer fills the pipe and gets stuck
    began = time.monotonic()
    d = writer.close(0.3)
    assert time.monotonic() - began < 0.6
    assert fcntl.fcntl(pipe["w"], fcntl.F_GETFL) == flags, "the descriptor's flags were changed"
    assert d.accepted + d.dropped == 2000
    assert d.dropped >= 2000 - 50 - 70  # the queue (50) and what the pipe took (64 KiB of 1 KB lines)
    assert 0 < d.written * 1000 <= 65536
    assert d.undelivered == 2000 - d.written
    # One warning for the burst (at most one a second), with the count so far.
    assert len(drops) == 1 and drops[0][0] == 1 and drops[0][1] >= 1
    os.close(pipe["w"])
    pipe["w"] = None
    numbers = [orjson.loads(x)["n"] for x in drain(pipe["r"]).splitlines()]
    assert len(numbers) == d.written
    assert numbers == sorted(set(numbers))  # in order, none twice (a full queue skips some)


def test_drop_warnings_at_most_once_a_second(pipe):
    drops: list[tuple[int, int]] = []
    writer = FdWriter(pipe["w"], name="t", max_items=5, on_drop=lambda n, total: drops.append((n, total)))
    deadline = time.monotonic() + 2.5
    sent = 0
    while time.monotonic() < deadline:
        writer.put(_line(sent))
        sent += 1
        time.sleep(0.001)
    d = writer.close(0.1)
    assert 2 <= len(drops) <= 3, drops
    assert drops[-1][1] <= d.dropped  # running totals, never more than the final count
    assert sum(n for n, _ in drops) <= d.dropped


def test_everything_arrives_in_order_as_whole_lines(pipe):
    writer = FdWriter(pipe["w"], name="t")
    sizes = [10, 4000, PIPE_BUF + 500, 3 * PIPE_BUF, 100] * 40
    got: list[bytes] = []

    def read() -> None:
        with os.fdopen(pipe["r"], "rb", closefd=False) as f:
            got.extend(f.read().splitlines())

    reader = threading.Thread(target=read)
    reader.start()
    for i, size in enumerate(sizes):
        assert writer.put(_line(i, size))
    d = writer.close(10)
    os.close(pipe["w"])
    pipe["w"] = None
    reader.join(10)
    assert d == Delivery(accepted=len(sizes), written=len(sizes), dropped=0)
    assert undelivered_line(d, "stdout") is None
    assert [orjson.loads(x)["n"] for x in got] == list(range(len(sizes)))


def test_reader_gone_is_reported_once_and_stops_the_writer(pipe):
    errors: list[str] = []
    writer = FdWriter(pipe["w"], name="t", on_error=errors.append)
    os.close(pipe["r"])
    pipe["r"] = None
    writer.put(b"first\n")
    deadline = time.monotonic() + 2
    while not errors and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(errors) == 1
    assert not writer.put(b"second\n")
    d = writer.close(0.5)
    assert d.error == errors[0] and d.undelivered == 2 and d.written == 0
    line = undelivered_line(d, "stdout")
    assert line is not None and line.startswith("stdout failed (") and "2 events not delivered" in line


def test_a_closed_descriptor_fails_at_once():
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(OSError):
        FdWriter(w)


# ------------------------------------------------------------------ the CLI


def ready(lab, ns, proc: subprocess.Popen) -> None:
    """wait_ready, saying how the tracer ended if it did."""
    try:
        wait_ready(lab, ns)
    except AssertionError:
        if proc.poll() is not None:
            err = proc.stderr.read()
            raise AssertionError(f"the watch ended (status {proc.returncode}): {err!r}") from None
        raise


def host_rulesets(lab, *nss) -> dict[str, str]:
    """`nft list ruleset` in each lab namespace and in the root namespace."""
    return {**{ns.name: lab.nft_list(ns) for ns in nss}, "root": root_ruleset()}


def settled_rulesets(lab, *nss, timeout: float = 20.0) -> dict[str, str]:
    """The rulesets once no tracer's marking table is in them.

    Other tests (and people) may run tracers at the same time, and a tracer
    marks every namespace it watches: the snapshot to compare with must not
    hold one of theirs, and a table of theirs seen afterwards goes away
    when their tracer stops. Ours, if it stayed, never would.
    """
    deadline = time.monotonic() + timeout
    while True:
        now = host_rulesets(lab, *nss)
        if not any("tracer_mark" in text for text in now.values()) or time.monotonic() > deadline:
            return now
        time.sleep(0.2)


def assert_rulesets_restored(lab, before: dict[str, str], *nss) -> None:
    assert wait_for(lambda: host_rulesets(lab, *nss) == before, timeout=20), host_rulesets(lab, *nss)


def _wait_stuck(fd: int, proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """Until the pipe is nearly full and stops growing: the watch is then stuck writing."""
    deadline = time.monotonic() + timeout
    last, steady_since = -1, time.monotonic()
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the watch exited while its stdout was full"
        held = pipe_bytes(fd)
        if held != last:
            last, steady_since = held, time.monotonic()
        elif held >= 32 << 10 and time.monotonic() - steady_since > 0.5:
            return held
        time.sleep(0.05)
    raise AssertionError(f"the stdout pipe never filled (holds {last} bytes)")


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_signal_ends_a_watch_whose_reader_is_stuck(net, sig):
    lab, client, server, link = net
    before = settled_rulesets(lab, client, server)
    r, w = os.pipe()
    proc = subprocess.Popen(tracer_cmd("watch", "--json"), stdout=w, stderr=subprocess.PIPE, text=True)
    os.close(w)
    try:
        ready(lab, server, proc)
        for _ in range(3000):  # ~1 KB each: 3 MB of events for a 64 KiB pipe
            lab.udp_send(client, str(link.b_v4.ip), 53)
        held = _wait_stuck(r, proc)
        began = time.monotonic()
        os.kill(proc.pid, getattr(signal, sig))
        status = proc.wait(timeout=10)
        elapsed = time.monotonic() - began
        stderr = proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out = drain(r)
        os.close(r)
    assert elapsed < 2.0, f"exit took {elapsed:.2f}s after {sig}"
    assert status == 0, stderr
    assert "Traceback" not in stderr
    m = re.search(r"^tracer: (\d+) events? not delivered to stdout", stderr, re.M)
    assert m, stderr
    lines = out.splitlines()
    assert int(m[1]) > 0 and len(out) >= held
    for line in lines:  # the pipe got whole events only
        orjson.loads(line)
    assert_rulesets_restored(lab, before, client, server)


@pytest.mark.root
@pytest.mark.bpf
def test_a_reader_that_leaves_ends_the_watch(net):
    """`tracer watch | head -1`: the broken pipe stops the watch (exit 1, said once), tables removed."""
    lab, client, server, link = net
    before = settled_rulesets(lab, client, server)
    proc = subprocess.Popen(tracer_cmd("watch", "--json"), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready(lab, server, proc)
        lab.udp_send(client, str(link.b_v4.ip), 53)
        first = proc.stdout.readline()
        assert first, f"the watch ended early ({proc.wait(5)}): {proc.stderr.read().decode()}"
        orjson.loads(first)
        proc.stdout.close()  # the reader goes away
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:
            lab.udp_send(client, str(link.b_v4.ip), 53)
            time.sleep(0.02)
        status = proc.wait(timeout=5)
        stderr = proc.stderr.read().decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert status == 1, stderr
    assert "Traceback" not in stderr
    assert len(re.findall(r"^tracer: stdout failed \(", stderr, re.M)) == 1, stderr
    assert_rulesets_restored(lab, before, client, server)
