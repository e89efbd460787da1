"""Events a second each daemon output sustains, end to end through its queued sink (issue 9).

Run from the repository root, as root (the syslog cases start an rsyslogd,
the journald case a systemd-journald in user, mount and network namespaces
of its own; rsyslog and rsyslog-openssl come with scripts/install-deps.sh):

    sudo .venv/bin/python -m tests.bench.outputs [--events 20000] [--rounds 3] [--cases render,file,...]

Like the other benchmarks it asserts nothing about time: it prints figures
to compare between runs and machines, min / median / max over the rounds
(rounds are interleaved: round 1 of every case, then round 2, ...).

Every case is the daemon's path: the sink `tracer.outputs.registry.make_sink`
builds from an `[[output]]` table's `Options` (queue 10 000, spool in a
scratch directory), fed with real drop events (the full event of
docs/drop-event.md, built with the model), each a fresh `Rendered`, so the
worker pays for the JSON and the text line as the first output does in the
daemon. `drive` submits them as fast as the sink takes them without losing
any (it holds back while half a queue waits: a full queue drops events,
which is no throughput) and counts from the first submit until every event
is delivered (or spooled) and `close()` returned. The receivers are real or
local and count what they got:

- file: lines in the file;
- syslog udp/tcp/tls/unix: a fresh rsyslogd per run (tests.test_out_syslog's
  `Rsyslog`), counting the lines it wrote; the clock stops when its file has
  every event (or stopped growing: UDP may lose, `received` says);
- journald: a fresh systemd-journald per run (tests.test_out_journald's
  `Journald`); its socket takes a datagram only once journald has room, so
  the clock stops when `close()` returned, and `journalctl` counts after;
- elasticsearch, splunk_hec, gzip off and on: the fake servers of
  tests/httpfakes.py with `check=False` (they count documents), in this
  process, so they share its GIL with the worker;
- spool-write: a destination that is down, events into the SQLite spool;
  spool-drain: a spool of the same size left by an earlier run, delivered
  to the file output.

`render` is the reference: `Rendered.json()` and `text()` alone in a loop,
what every output pays before its own work. `worker µs/ev` is the CPU time
of the sink's worker thread per event (rendering included), `receiver
µs/ev` that of rsyslogd or journald. Traffic stays on 127.0.0.1 and unix
sockets in the scratch directory; every receiver is stopped in a `finally`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tracer.event.rendered import Rendered
from tracer.outputs import elasticsearch, file, journald, registry, splunk, syslog
from tracer.outputs.queued import QUEUE_EVENTS, QueuedSink
from tracer.outputs.spool import Spool
from tracer.outputs.transport import OutputDown, Record, SendResult

#: The sink holds back submits while this many events wait in it (half the default queue).
IN_FLIGHT = QUEUE_EVENTS // 2
#: The spool's size limit in the cases (the daemon's default, 1 GiB).
SPOOL_BYTES = 1 << 30
#: Cases whose events were rendered before the clock started (their "minus render" means nothing).
PRERENDERED = frozenset({"render", "spool-drain"})
#: Longest a run may take to deliver everything, seconds.
WAIT = 600.0


def drop_events(n: int) -> Iterator[Rendered]:
    """n fresh Rendered of the full drop event, made as they are taken: as in the daemon, an
    event's rendered forms are garbage once every output has it (holding all of them alive
    would make the collector's passes, and so every figure, grow with n)."""
    from tests.test_event_model import full_event

    event = full_event()
    for _ in range(n):
        yield Rendered(event)


@dataclass(frozen=True)
class Run:
    """One run of one case: `events` in `seconds`; CPU seconds spent, where known."""

    events: int
    seconds: float
    worker_cpu: float | None = None  # the sink's worker thread (or the render loop)
    receiver_cpu: float | None = None  # rsyslogd or systemd-journald
    received: int | None = None  # what the receiver counted

    @property
    def rate(self) -> float:
        return self.events / self.seconds


@dataclass(frozen=True)
class Driven:
    """What `drive` saw: perf_counter at the first submit and once close() returned."""

    start: float
    end: float
    worker_cpu: float


def drive(sink: QueuedSink, n: int) -> Driven:
    """Submits n fresh events as fast as the sink takes them without losing any, waits until
    each is delivered or spooled, closes the sink. RuntimeError if it lost any: a rate with
    losses is no throughput."""
    events = drop_events(n)
    clock = worker_clock(sink)
    cpu0 = time.clock_gettime(clock)
    start = time.perf_counter()
    for i, rendered in enumerate(events):
        if i % 256 == 0:
            hold_back(sink)
        sink.submit(rendered)
    settle(sink, lambda s: s.delivered - s.carried_over + s.spooled_now_events >= n)
    cpu = time.clock_gettime(clock) - cpu0
    delivery = sink.close(WAIT)
    end = time.perf_counter()
    if delivery.written != n or delivery.undelivered:
        raise RuntimeError(f"{sink.name}: the sink lost events: {delivery}")
    return Driven(start, end, cpu)


def hold_back(sink: QueuedSink) -> None:
    """Waits while IN_FLIGHT events sit in the sink's memory."""
    while True:
        s = sink.stats()
        if s.accepted + s.carried_over - s.delivered - s.spooled_now_events < IN_FLIGHT:
            return
        time.sleep(0.0005)


def settle(sink: QueuedSink, done: Callable[[Any], bool]) -> None:
    """Polls the sink's figures until `done(stats)`; RuntimeError on a loss or after WAIT."""
    deadline = time.monotonic() + WAIT
    while not done(s := sink.stats()):
        if s.queue_dropped or s.rejected or s.down_dropped or s.spool_dropped:
            raise RuntimeError(f"{sink.name}: events lost: {s}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sink.name}: not delivered within {WAIT:.0f} s: {s}")
        time.sleep(0.001)


def worker_clock(sink: QueuedSink) -> int:
    """The CPU-time clock of the sink's worker thread (named `output-NAME`)."""
    for thread in threading.enumerate():
        if thread.name == f"output-{sink.name}" and thread.ident is not None:
            return time.pthread_getcpuclockid(thread.ident)
    raise RuntimeError(f"no worker thread for {sink.name}")


def process_cpu(pid: int) -> float:
    """utime + stime of a process, all its threads, in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wait_count(count: Callable[[], int], n: int, *, poll: float, quiet: float) -> tuple[int, float]:
    """Polls `count()` until it reaches n or stays the same for `quiet` seconds: the count,
    and the perf_counter at which it last grew."""
    last, grew = count(), time.perf_counter()
    deadline = grew + WAIT
    while last < n and time.perf_counter() < deadline:
        time.sleep(poll)
        now = count()
        if now != last:
            last, grew = now, time.perf_counter()
        elif time.perf_counter() - grew > quiet:
            break
    return last, grew


class Lines:
    """Lines written to a file so far, read on from where the last call stopped; lines
    containing `skip` (rsyslog's readiness probes) are not counted."""

    def __init__(self, path: Path, skip: bytes | None = None) -> None:
        self.path, self.skip = path, skip
        self._offset, self._rest, self.count = 0, b"", 0

    def __call__(self) -> int:
        try:
            with self.path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return self.count
        self._offset += len(data)
        lines = (self._rest + data).split(b"\n")
        self._rest = lines.pop()
        skip = self.skip
        self.count += len(lines) if skip is None else sum(1 for line in lines if skip not in line)
        return self.count


def daemon_sink(kind: str, options: Any, spool_dir: Path) -> QueuedSink:
    """The sink the daemon makes of one `[[output]]` table (spool on, default queue)."""
    options.check()
    sink = registry.make_sink(kind, options, spool_dir=spool_dir, spool_max_bytes=SPOOL_BYTES, name=kind,
                              queue=QUEUE_EVENTS, on_loss=None)
    assert isinstance(sink, QueuedSink)
    return sink


class Null:
    """A destination that takes everything at once: the sink's own cost."""

    name = "null"
    max_batch = 1000

    def open(self) -> None:
        pass

    def send(self, records: object) -> SendResult:
        return SendResult()

    def close(self) -> None:
        pass


class Down:
    """A destination that is always down: what spooling costs."""

    name = "down"
    max_batch = 1000

    def open(self) -> None:
        raise OutputDown("down for the benchmark")

    def send(self, records: object) -> SendResult:
        raise OutputDown("down for the benchmark")

    def close(self) -> None:
        pass


@contextlib.contextmanager
def scratch() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tracer-bench-") as d:
        yield Path(d)


# ------------------------------------------------------------ the cases


@dataclass(frozen=True)
class Bench:
    """What the cases share: rsyslog's TLS certificates (made once per bench)."""

    certs: Any  # tests.test_out_syslog.Certs


#: A case: a fresh scratch directory, the bench, the number of events -> the run's figures.
Case = Callable[[Path, Bench, int], Run]


def case_render(d: Path, bench: Bench, n: int) -> Run:
    """Rendering alone: what every output pays before its own work."""
    cpu0, start = time.thread_time(), time.perf_counter()
    for rendered in drop_events(n):
        rendered.json()
        rendered.text()
    return Run(n, time.perf_counter() - start, time.thread_time() - cpu0)


def case_null(d: Path, bench: Bench, n: int) -> Run:
    got = drive(QueuedSink(Null(), name="null"), n)
    return Run(n, got.end - got.start, got.worker_cpu)


def case_file(d: Path, bench: Bench, n: int) -> Run:
    out = d / "out"
    got = drive(daemon_sink("file", file.Options(path=str(out / "drops.ndjson")), d / "spool"), n)
    lines = sum(p.read_bytes().count(b"\n") for p in out.glob("drops.ndjson*"))
    return Run(n, got.end - got.start, got.worker_cpu, received=lines)


def case_syslog(scheme: str) -> Case:
    """syslog over `scheme` (udp, tcp, tls, unix) into a fresh rsyslogd, counting what it wrote."""

    def run(d: Path, bench: Bench, n: int) -> Run:
        from tests.test_out_syslog import Rsyslog, address_of

        source = "uxlocal" if scheme == "unix" else scheme  # rsyslog's input (and file) of that scheme
        rs = Rsyslog(d, bench.certs)
        try:
            rs.start()
            assert rs.proc is not None
            options = syslog.Options(address=address_of(rs, source),
                                     ca_file=str(bench.certs.ca) if scheme == "tls" else None)
            sink = daemon_sink("syslog", options, d / "spool")
            cpu0 = process_cpu(rs.proc.pid)
            got = drive(sink, n)
            written, last = wait_count(Lines(d / f"{source}.log", b"|probe|"), n, poll=0.01, quiet=1.0)
            cpu = process_cpu(rs.proc.pid) - cpu0
        finally:
            rs.stop()
        return Run(n, max(got.end, last) - got.start, got.worker_cpu, cpu, written)

    return run


def case_journald(d: Path, bench: Bench, n: int) -> Run:
    """journald's native protocol into a fresh systemd-journald in namespaces of its own."""
    from tests.test_out_journald import Journald, unique_identifier

    (d / "journald").mkdir()  # its own directory: the spool stays out of its bind mounts
    j = Journald(d / "journald")
    ident = unique_identifier()
    try:
        j.start()
        assert j.proc is not None
        sink = daemon_sink("journald", journald.Options(socket=j.socket, identifier=ident), d / "spool")
        cpu0 = process_cpu(j.proc.pid)
        got = drive(sink, n)
        stored, _ = wait_count(lambda: journal_entries(j, ident), n, poll=0.5, quiet=3.0)
        cpu = process_cpu(j.proc.pid) - cpu0
    finally:
        j.stop()
    return Run(n, got.end - got.start, got.worker_cpu, cpu, stored)


def journal_entries(j: Any, identifier: str) -> int:
    """Entries of `identifier` in the journal of a tests.test_out_journald.Journald."""
    (directory,) = {p.parent for p in j.journal_files()}
    out = subprocess.run(["journalctl", "-D", str(directory), "--no-pager", "-o", "cat",
                          "--output-fields=SYSLOG_IDENTIFIER", f"SYSLOG_IDENTIFIER={identifier}"],
                         capture_output=True, check=True, timeout=120).stdout
    return out.count(b"\n")


def case_http(kind: str, gzip: bool) -> Case:
    """elasticsearch or splunk_hec (gzip on or off) to a fake server of tests/httpfakes.py."""

    def run(d: Path, bench: Bench, n: int) -> Run:
        from tests.httpfakes import FakeElasticsearch, FakeServer, FakeSplunk

        server: FakeServer
        options: Any
        if kind == "elasticsearch":
            es = FakeElasticsearch(check=False)
            server, options = es, elasticsearch.Options(url="http://127.0.0.1", gzip=gzip)
        else:
            hec = FakeSplunk(check=False)
            server, options = hec, splunk.Options(url="http://127.0.0.1", token=hec.token, gzip=gzip)
        with server:
            got = drive(daemon_sink(kind, replace(options, url=server.url), d / "spool"), n)
            seen: int = getattr(server, "seen", 0)
        return Run(n, got.end - got.start, got.worker_cpu, received=seen)

    return run


def case_spool_write(d: Path, bench: Bench, n: int) -> Run:
    """The destination is down: every event into the SQLite spool."""
    sink = QueuedSink(Down(), spool=Spool.open(d / "spool", "down", SPOOL_BYTES))
    got = drive(sink, n)
    return Run(n, got.end - got.start, got.worker_cpu)


def case_spool_drain(d: Path, bench: Bench, n: int) -> Run:
    """A spool of n events left by an earlier run, delivered to the file output (the
    events were rendered when they were spooled: draining reads records back)."""
    spool = Spool.open(d / "spool", "file", SPOOL_BYTES)
    try:
        chunk = [Record(r.json().rstrip(b"\n"), r.text()) for r in drop_events(min(n, 1000))]
        for first in range(0, n, len(chunk)):
            spool.append(chunk[:n - first])
    finally:
        spool.close()
    out = d / "out"
    start = time.perf_counter()
    sink = daemon_sink("file", file.Options(path=str(out / "drops.ndjson")), d / "spool")
    try:
        cpu0 = time.clock_gettime(clock := worker_clock(sink))
        settle(sink, lambda s: s.carried_over == n and s.delivered >= n)
        cpu = time.clock_gettime(clock) - cpu0
    finally:
        delivery = sink.close(WAIT)
    elapsed = time.perf_counter() - start
    if delivery.written != n or delivery.undelivered:
        raise RuntimeError(f"spool drain lost events: {delivery}")
    lines = sum(p.read_bytes().count(b"\n") for p in out.glob("drops.ndjson*"))
    return Run(n, elapsed, cpu, received=lines)


#: name -> (what it measures, how).
CASES: dict[str, tuple[str, Case]] = {
    "render": ("Rendered.json() + text() alone (the reference)", case_render),
    "null": ("queued sink, destination takes all at once", case_null),
    "file": ("file output (NDJSON lines in a file)", case_file),
    "syslog-udp": ("syslog udp:// to rsyslogd (RFC 5424)", case_syslog("udp")),
    "syslog-tcp": ("syslog tcp:// to rsyslogd (octet counting)", case_syslog("tcp")),
    "syslog-tls": ("syslog tls:// to rsyslogd (OpenSSL)", case_syslog("tls")),
    "syslog-unix": ("syslog unix:// to rsyslogd's imuxsock", case_syslog("unix")),
    "journald": ("journald native socket to systemd-journald", case_journald),
    "es": ("elasticsearch _bulk, gzip off", case_http("elasticsearch", False)),
    "es-gzip": ("elasticsearch _bulk, gzip on", case_http("elasticsearch", True)),
    "splunk": ("splunk_hec, gzip off", case_http("splunk_hec", False)),
    "splunk-gzip": ("splunk_hec, gzip on", case_http("splunk_hec", True)),
    "spool-write": ("destination down: into the SQLite spool", case_spool_write),
    "spool-drain": ("earlier run's spool delivered to the file output", case_spool_drain),
}


def make_certs(d: Path) -> Any:
    from tests.test_out_syslog import make_certs as certs_in

    return certs_in(d)


def run_case(name: str, bench: Bench, n: int) -> Run:
    """One run of one case with n events, in a fresh scratch directory."""
    with scratch() as d:
        return CASES[name][1](d, bench, n)


# ------------------------------------------------------------ the table


def spread(values: Sequence[float], fmt: str) -> str:
    return " / ".join(format(v, fmt) for v in (min(values), statistics.median(values), max(values)))


def per_event(runs: Sequence[Run], cpu: Callable[[Run], float | None]) -> float | None:
    values = [c / r.events * 1e6 for r in runs if (c := cpu(r)) is not None]
    return statistics.median(values) if values else None


def table(results: dict[str, list[Run]], size: int) -> str:
    """The table printed (and pasted into docs/performance.md): Markdown."""
    render = per_event(results.get("render", []), lambda r: r.worker_cpu)
    head = ("| output | events/s min / median / max | worker µs/ev | minus render | receiver µs/ev "
            "| received | what |\n| --- | --- | --- | --- | --- | --- | --- |")
    rows = [head]
    for name, runs in results.items():
        what = CASES[name][0]
        worker = per_event(runs, lambda r: r.worker_cpu)
        receiver = per_event(runs, lambda r: r.receiver_cpu)
        own = f"{worker - render:.0f}" if worker is not None and render is not None and name not in PRERENDERED else "–"
        got = [r.received for r in runs if r.received is not None]
        received = "–" if not got else ("all" if all(g >= r.events for g, r in zip(got, runs, strict=False))
                                        else ", ".join(f"{g / r.events:.1%}" for g, r in zip(got, runs, strict=False)))
        rows.append(f"| {name} | {spread([r.rate for r in runs], ',.0f')} | "
                    f"{'–' if worker is None else f'{worker:.0f}'} | {own} | "
                    f"{'–' if receiver is None else f'{receiver:.0f}'} | {received} | {what} |")
    return "\n".join(rows) + f"\n\n(events of {size} bytes of JSON; µs/ev: medians of CPU time per event)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per run")
    parser.add_argument("--rounds", type=int, default=3, help="runs per case, interleaved")
    parser.add_argument("--cases", default=",".join(CASES), help=f"any of {','.join(CASES)}")
    args = parser.parse_args()
    names = args.cases.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown or args.events < 1 or args.rounds < 1:
        parser.error(f"unknown case(s) {', '.join(unknown)}" if unknown else "--events and --rounds: at least 1")
    from tracer import log

    log.configure("error", json=False)  # the outage of the spool cases is on purpose
    size = len(next(drop_events(1)).json())
    print(f"outputs benchmark: {args.events} events per run, {args.rounds} rounds, {os.cpu_count()} CPUs, "
          f"load {os.getloadavg()[0]:.2f}, {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results: dict[str, list[Run]] = {name: [] for name in names}
    with scratch() as certs_dir:
        bench = Bench(make_certs(certs_dir) if any(n.startswith("syslog") for n in names) else None)
        for round_no in range(1, args.rounds + 1):
            for name in names:
                run = run_case(name, bench, args.events)
                results[name].append(run)
                print(f"  round {round_no} {name:12} {run.rate:>10,.0f} events/s", flush=True)
    print()
    print(table(results, size))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
