"""Prometheus metrics of `tracer run`: drops, events, losses, outputs, conntrack fill, BPF costs.

Off unless `[metrics] listen` is set. Two kinds of figures:

- counted as events pass: `Metrics.sink` is one more sink beside the
  outputs. It counts each event it is handed: drops by reason and hook and
  by rule, events by dataset, losses by kind. Its `submit` costs a few
  dictionary updates under one lock, in the pipeline's thread.
- read when Prometheus scrapes: the outputs' figures, the conntrack fill,
  BPF program statistics and the ring buffer's losses come from callables
  registered with `watch_*`, and the scrape itself calls them. No thread
  polls. A callable that fails leaves its metrics out of that scrape (it
  is logged once, until it works again) and never fails the scrape.

The rule metric's label values are names chosen by whoever owns a network
namespace (tables, chains), and an unprivileged user can own one.
prometheus-client escapes backslashes, quotes and newlines in the
exposition. `label_value` also writes the other control and format
characters as escapes, so a scrape shown on a terminal cannot act on it.
Each counter keeps at most `max_series` label sets, so a user who creates
chain after chain cannot grow the tracer's memory, or Prometheus' series,
without bound. Later label sets are counted in one series whose labels are
all "_other", and `tracer_metrics_series_overflow_total{metric}` says how
much went there.

The registry belongs to the `Metrics` object, never to prometheus-client's
global default. Importing this module registers nothing, and two instances
(tests, a reload) never collide. Only GET /metrics is served.
prometheus-client's `start_http_server` answers on every path, so its WSGI
app is wrapped and served by a small threading server of our own.
"""

from __future__ import annotations

import ipaddress
import socket
import socketserver
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import CollectorRegistry, generate_latest, make_wsgi_app
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from tracer import __version__
from tracer.config import ConfigError
from tracer.event.model import DropEvent
from tracer.event.notice import LOSS_DATASET, Notice

if TYPE_CHECKING:
    from tracer.event.rendered import Rendered
    from tracer.pipeline.engine import Engine

log = structlog.get_logger("tracer.metrics")

#: `[metrics] listen` as the example config gives it: loopback only.
DEFAULT_LISTEN = "127.0.0.1:9477"
#: Label sets kept per counter (and namespaces per conntrack gauge) at most.
MAX_SERIES = 2000
#: The label value of the series that counts what the bound left out.
OTHER = "_other"
#: Characters of a name kept in a label value (nft names have at most 256 bytes).
MAX_LABEL_CHARS = 256
#: Where the kernel says whether it counts BPF program runs.
BPF_STATS_ENABLED_PATH = "/proc/sys/kernel/bpf_stats_enabled"
#: A scrape connection idle this long is closed: a stalled client holds one thread, not forever.
REQUEST_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- listen address


def parse_listen(text: object, *, any_port: bool = False) -> tuple[str, int]:
    """`[metrics] listen`: "127.0.0.1:9477" or "[::1]:9477" -> (address, port).

    The address must be an IP literal. A name would need DNS at start-up and
    could bind somewhere other than the operator meant. Port 0 (any free
    port) is accepted only with `any_port` (tests): a scraper could not
    find it. Raises ConfigError, and the message starts with "listen:".
    """
    example = '(e.g. "127.0.0.1:9477" or "[::1]:9477")'
    if not isinstance(text, str):
        raise ConfigError(f"listen: {text!r} is not a string {example}")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"listen: {text!r} is not ADDRESS:PORT {example}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"listen: {text!r}: {host!r} in brackets is not an IPv6 address") from None
    else:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            if ":" in host:
                raise ConfigError(f"listen: {text!r}: an IPv6 address goes in brackets, "
                                  f'as in "[::1]:9477"') from None
            raise ConfigError(f"listen: {text!r}: {host!r} is not an IP address "
                              f"(a name is not accepted) {example}") from None
    lowest = 0 if any_port else 1
    if not (port_text.isascii() and port_text.isdigit()) or not lowest <= int(port_text) <= 65535:
        raise ConfigError(f"listen: {text!r}: the port is a number from 1 to 65535")
    return host, int(port_text)


# --------------------------------------------------------------------------- label values


def label_value(text: object) -> str:
    """A name as a label value: the name itself, except characters that could act on a terminal.

    Backslashes, quotes and newlines are kept: the exposition escapes them,
    and a parser gets them back exactly. Other control and format characters
    (ESC, CR, bidirectional overrides) become `\\xNN`/`\\uNNNN`. So does a
    byte that was not UTF-8 (kept by a surrogateescape decode), since the
    exposition must be UTF-8. Names are cut to MAX_LABEL_CHARS.
    """
    s = str(text)[:MAX_LABEL_CHARS]
    if s.isprintable():
        return s
    out = []
    for ch in s:
        code = ord(ch)
        if ch == "\n" or ch.isprintable():
            out.append(ch)
        elif 0xDC80 <= code <= 0xDCFF:  # surrogateescape: the byte code - 0xDC00
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x100:
            out.append(f"\\x{code:02x}")
        elif code < 0x10000:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    return "".join(out)


# --------------------------------------------------------------------------- counted from events


class _Counted:
    """The series of one counter, at most `cap` label sets plus the overflow one ("_other").

    The caller holds the sink's lock.
    """

    def __init__(self, name: str, documentation: str, labels: tuple[str, ...], cap: int) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = labels
        self.cap = cap
        self.other = (OTHER,) * len(labels)
        self.values: dict[tuple[str, ...], int] = {}
        self._distinct = 0  # label sets other than `other`

    def add(self, key: tuple[str, ...], n: int) -> bool:
        """Counts `n` under `key`; True when the bound sent it to the overflow series."""
        if key in self.values:
            self.values[key] += n
            return False
        folded = key != self.other and self._distinct >= self.cap
        if folded:
            key = self.other
            self.values[key] = self.values.get(key, 0) + n
            return True
        if key != self.other:
            self._distinct += 1
        self.values[key] = n
        return False

    def family(self) -> CounterMetricFamily:
        fam = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for key, value in self.values.items():
            fam.add_metric(key, value)
        return fam


class MetricsSink:
    """A `Sink` (tracer.outputs.base) that counts the events it is handed; never writes them.

    `submit` is called from the pipeline's thread and from the conntrack
    pressure thread; one lock keeps the counts whole for a scrape.
    """

    def __init__(self, max_series: int = MAX_SERIES) -> None:
        self._lock = threading.Lock()
        self.drops = _Counted("tracer_drops", "Dropped packets, by kernel drop reason and netfilter hook "
                              "(a summary event adds its event.count)", ("reason", "hook"), max_series)
        self.rule_drops = _Counted(
            "tracer_rule_drops", "Dropped packets with a netfilter section, by family, table, chain and rule "
            '(the rule handle, "policy" for a chain policy, "" when unknown)',
            ("family", "table", "chain", "rule"), max_series)
        self.events = _Counted("tracer_events", "Events emitted, by event.dataset", ("dataset",), max_series)
        self.lost = _Counted("tracer_lost", "Events lost or held back, by kind, from the loss reports. With an "
                             "empty output, the watch's own: still counted in summaries (ceiling and discarded "
                             "were only held back). With an output, what it lost for good",
                             ("kind", "output"), max_series)
        self.overflow: Counter[str] = Counter()

    def submit(self, rendered: Rendered) -> None:
        event = rendered.event
        try:
            with self._lock:
                if isinstance(event, DropEvent):
                    self._drop(event)
                elif isinstance(event, Notice):
                    self._notice(event)
                else:  # a counter event: counted by its dataset
                    self._add(self.events, (label_value(event.dataset),), 1)
        except Exception as exc:  # a sink never raises into the pipeline
            log.warning("metrics.count_failed", error=repr(exc))

    def _add(self, counted: _Counted, key: tuple[str, ...], n: int) -> None:
        if counted.add(key, n):
            self.overflow[counted.name] += n

    def _drop(self, event: DropEvent) -> None:
        summary = event.summary
        count = summary.count if summary is not None else 1
        self._add(self.events, ("tracer.drop.summary" if summary is not None else "tracer.drop",), 1)
        nf = event.netfilter
        hook = (nf.hook if nf is not None and nf.hook else event.drop.hook) or ""
        self._add(self.drops, (label_value(event.drop.reason), label_value(hook)), count)
        if nf is not None:
            rule = str(nf.rule.handle) if nf.rule is not None else ("policy" if nf.policy else "")
            self._add(self.rule_drops, (label_value(nf.family or ""), label_value(nf.table or ""),
                                        label_value(nf.chain or ""), rule), count)

    def _notice(self, notice: Notice) -> None:
        self._add(self.events, (label_value(notice.dataset),), 1)
        if notice.dataset != LOSS_DATASET:
            return
        loss = notice.details.get("loss")
        if not isinstance(loss, Mapping):
            return
        output = loss.get("output")  # an output's report (tracer.pipeline.losses.output_loss_notice)
        output_label = label_value(output) if isinstance(output, str) else ""
        for kind, n in loss.items():
            if kind != "total" and isinstance(n, int) and not isinstance(n, bool) and n > 0:
                self._add(self.lost, (label_value(kind), output_label), n)

    def families(self) -> list[Metric]:
        """The counters as they stand, copied under the lock."""
        with self._lock:
            out: list[Metric] = [c.family() for c in (self.drops, self.rule_drops, self.events, self.lost)]
            overflow = CounterMetricFamily(
                "tracer_metrics_series_overflow", "Counts that went to a series labelled _other because "
                "their metric had reached its bound of label sets", labels=("metric",))
            for name, n in self.overflow.items():
                overflow.add_metric((name + "_total",), n)
            out.append(overflow)
        return out


# --------------------------------------------------------------------------- read at scrape time


class OutputFigures(Protocol):
    """What metrics read of one output (tracer.outputs.queued's `OutputStats` has these)."""

    @property
    def name(self) -> str: ...
    @property
    def delivered(self) -> int: ...
    @property
    def queue_dropped(self) -> int: ...
    @property
    def down_dropped(self) -> int: ...
    @property
    def spool_dropped(self) -> int: ...
    @property
    def rejected(self) -> int: ...
    @property
    def up(self) -> bool: ...
    @property
    def spooled_now_events(self) -> int: ...
    @property
    def spooled_now_bytes(self) -> int: ...


OutputsFn = Callable[[], Iterable[OutputFigures]]
#: (netns inode, its `ip netns` name or None, entries, max) per watched namespace.
LevelsFn = Callable[[], Iterable[tuple[int, str | None, int, int]]]
#: Program name -> (run_cnt, run_time_ns).
ProgramStatsFn = Callable[[], Mapping[str, tuple[int, int]]]
#: (drop program, netfilter context), or None while nothing is loaded.
InfoFn = Callable[[], tuple[str, str | None] | None]

_OUTCOMES = ("delivered", "queue_dropped", "down_dropped", "spool_dropped", "rejected")
#: The families, by name without the _total a counter's samples add.
_COUNTERS = ("tracer_drops", "tracer_rule_drops", "tracer_events", "tracer_lost", "tracer_metrics_series_overflow",
             "tracer_output_events", "tracer_bpf_program_run", "tracer_bpf_program_run_seconds",
             "tracer_ring_buffer_lost")
_GAUGES = ("tracer_output_up", "tracer_spool_events", "tracer_spool_bytes", "tracer_conntrack_entries",
           "tracer_conntrack_fill_ratio", "tracer_conntrack_max", "tracer_bpf_stats_enabled")


def _nothing_loaded() -> None:
    """tracer_info's source until an engine is watched: the version alone."""


def bpf_stats_enabled(path: str = BPF_STATS_ENABLED_PATH) -> int | None:
    """kernel.bpf_stats_enabled (0 or 1); None when this kernel has no such sysctl."""
    try:
        with open(path) as f:
            return 1 if f.read().strip() not in ("", "0") else 0
    except OSError:
        return None


class _Scrape:
    """The registry's one collector: the sink's counters, then what the callables say now."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._failing: set[str] = set()
        self._lock = threading.Lock()  # `_failing`: two scrapes may run at once

    def describe(self) -> list[Metric]:
        """Every family this collector can give, without samples: lets the registry answer
        `?name[]=` and refuse a second collector of the same names."""
        names = [("counter", n) for n in _COUNTERS] + [("gauge", n) for n in _GAUGES]
        return [Metric(name, name, kind) for kind, name in names] + [Metric("tracer", "tracer", "info")]

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        yield from m.sink.families()
        yield from self._guarded("info", self._info, m._info or _nothing_loaded)
        yield from self._guarded("outputs", self._outputs, m._outputs)
        yield from self._guarded("conntrack", self._conntrack, m._levels)
        yield from self._guarded("bpf", self._bpf, m._program_stats)
        yield from self._guarded("ring_buffer", self._ring_lost, m._ring_lost)
        enabled = bpf_stats_enabled()
        if enabled is not None:
            yield GaugeMetricFamily("tracer_bpf_stats_enabled", "Whether the kernel counts BPF program runs "
                                    "(kernel.bpf_stats_enabled, which the operator sets)", value=enabled)

    def _guarded(self, what: str, build: Callable[[Any], list[Metric]], fn: Any) -> list[Metric]:
        """`build(fn)`, or nothing when `fn` is unset or fails (logged once until it works)."""
        if fn is None:
            return []
        try:
            out = build(fn)
        except Exception as exc:
            with self._lock:
                first = what not in self._failing
                self._failing.add(what)
            if first:
                log.warning("metrics.source_failed", source=what, error=repr(exc))
            return []
        with self._lock:
            self._failing.discard(what)
        return out

    def _info(self, fn: InfoFn) -> list[Metric]:
        loaded = fn()
        drop_program, nf_context = loaded if loaded is not None else ("", None)
        return [InfoMetricFamily("tracer", "The tracer's version and the kernel programs it runs", value={
            "version": __version__, "drop_program": drop_program, "netfilter_context": nf_context or "none"})]

    def _outputs(self, fn: OutputsFn) -> list[Metric]:
        events = CounterMetricFamily("tracer_output_events", "Events each output delivered or lost, by outcome",
                                     labels=("output", "outcome"))
        up = GaugeMetricFamily("tracer_output_up", "1 while the output's destination takes events",
                               labels=("output",))
        spooled = GaugeMetricFamily("tracer_spool_events", "Events in the output's on-disk spool now",
                                    labels=("output",))
        spooled_bytes = GaugeMetricFamily("tracer_spool_bytes", "Bytes of the output's on-disk spool now",
                                          labels=("output",))
        seen: set[str] = set()
        for o in fn():
            name = label_value(o.name)
            if name in seen:
                continue  # two outputs of one name would make one series twice
            seen.add(name)
            for outcome in _OUTCOMES:
                events.add_metric((name, outcome), getattr(o, outcome))
            up.add_metric((name,), 1 if o.up else 0)
            spooled.add_metric((name,), o.spooled_now_events)
            spooled_bytes.add_metric((name,), o.spooled_now_bytes)
        return [events, up, spooled, spooled_bytes]

    def _conntrack(self, fn: LevelsFn) -> list[Metric]:
        """The fill of at most MAX_SERIES namespaces, the fullest first: those are the ones to see."""
        levels = list(fn())
        levels.sort(key=lambda lv: lv[2] / lv[3] if lv[3] > 0 else 0.0, reverse=True)
        entries = GaugeMetricFamily("tracer_conntrack_entries", "Conntrack entries of each watched namespace",
                                    labels=("netns",))
        ratio = GaugeMetricFamily("tracer_conntrack_fill_ratio", "Conntrack entries over nf_conntrack_max, "
                                  "per watched namespace", labels=("netns",))
        limit = 0
        seen: set[str] = set()
        for inode, name, count, most in levels:
            label = label_value(name) if name else str(inode)
            if label in seen or len(seen) >= self.metrics.max_series:
                continue
            seen.add(label)
            entries.add_metric((label,), count)
            if most > 0:
                ratio.add_metric((label,), count / most)
            limit = max(limit, most)
        out: list[Metric] = [entries, ratio]
        if levels:
            out.append(GaugeMetricFamily("tracer_conntrack_max", "nf_conntrack_max (global; 0: no limit)",
                                         value=limit))
        return out

    def _bpf(self, fn: ProgramStatsFn) -> list[Metric]:
        runs = CounterMetricFamily("tracer_bpf_program_run", "Runs of each tracer BPF program, as the kernel "
                                   "counts them (only while kernel.bpf_stats_enabled is 1)", labels=("program",))
        seconds = CounterMetricFamily("tracer_bpf_program_run_seconds", "Time spent in each tracer BPF program "
                                      "(only while kernel.bpf_stats_enabled is 1)", labels=("program",))
        for program, (run_cnt, run_time_ns) in sorted(fn().items()):
            runs.add_metric((label_value(program),), run_cnt)
            seconds.add_metric((label_value(program),), run_time_ns / 1e9)
        return [runs, seconds]

    def _ring_lost(self, fn: Callable[[], int]) -> list[Metric]:
        return [CounterMetricFamily("tracer_ring_buffer_lost", "First drops whose record the kernel could "
                                    "not queue because the ring buffer was full", value=fn())]


# --------------------------------------------------------------------------- the endpoint


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    """One thread per scrape, none left behind at exit."""

    daemon_threads = True

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the address to a name (DNS, at start-up): not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.socket.getsockname()[:2]
        self.server_name, self.server_port = str(host), int(port)
        self.setup_environ()


class _Handler(WSGIRequestHandler):
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not logged: one every 15 s would fill the journal."""


def _only_metrics(app: Callable[..., Iterable[bytes]]) -> Callable[..., Iterable[bytes]]:
    def serve(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: metrics are at /metrics\n"]
        return app(environ, start_response)
    return serve


class Metrics:
    """The daemon's metrics: the counting sink, the scrape-time sources, the HTTP endpoint.

    Wire it up so:

        metrics = Metrics()
        metrics.watch_engine(engine)          # conntrack, BPF programs, ring buffer, info
        metrics.watch_outputs(lambda: [o.stats() for o in outputs])
        sinks = [*outputs, metrics.sink]      # the sink beside the outputs
        metrics.serve(config_listen)          # OSError if it cannot listen
        ...
        metrics.close()

    Each `watch_*` replaces what was registered before (a reload).
    """

    def __init__(self, *, max_series: int = MAX_SERIES) -> None:
        if max_series < 1:
            raise ValueError(f"max_series {max_series!r} is not positive")
        self.max_series = max_series
        self.registry = CollectorRegistry()
        self.sink = MetricsSink(max_series)
        self._outputs: OutputsFn | None = None
        self._levels: LevelsFn | None = None
        self._program_stats: ProgramStatsFn | None = None
        self._ring_lost: Callable[[], int] | None = None
        self._info: InfoFn | None = None
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self.collector = _Scrape(self)  # the registry's only collector
        self.registry.register(self.collector)

    # ------------------------------------------------------------ sources

    def watch_outputs(self, figures: OutputsFn | None) -> None:
        """Each output's figures (`QueuedSink.stats()`), read at each scrape."""
        self._outputs = figures

    def watch_conntrack(self, levels: LevelsFn | None) -> None:
        """(inode, name, entries, max) per namespace (`ConntrackPressure.levels`)."""
        self._levels = levels

    def watch_bpf(self, program_stats: ProgramStatsFn | None) -> None:
        """(run_cnt, run_time_ns) per program (`LoadedTracer.program_stats`)."""
        self._program_stats = program_stats

    def watch_ring_buffer_lost(self, lost: Callable[[], int] | None) -> None:
        """The total of records the kernel could not queue."""
        self._ring_lost = lost

    def watch_info(self, info: InfoFn | None) -> None:
        """(drop program, netfilter context) for tracer_info."""
        self._info = info

    def watch_engine(self, engine: Engine) -> None:
        """Every scrape-time source of one engine, read through it at each scrape, so a tracer
        loaded again or a conntrack watcher restarted is followed, and a closed one reads empty."""

        def levels() -> list[tuple[int, str | None, int, int]]:
            pressure = engine.pressure
            return pressure.levels() if pressure is not None else []

        def program_stats() -> dict[str, tuple[int, int]]:
            tracer = engine.tracer
            return tracer.program_stats() if tracer is not None else {}

        def info() -> tuple[str, str | None] | None:
            tracer = engine.tracer
            return (tracer.drop_mode, tracer.nf_mode) if tracer is not None else None

        self.watch_conntrack(levels)
        self.watch_bpf(program_stats)
        # The engine's own total, updated once a second from the kernel's counter by its join
        # thread: a scrape never touches the BPF maps of a tracer that may be closing.
        self.watch_ring_buffer_lost(lambda: engine.losses.total.get("ring_buffer", 0))
        self.watch_info(info)

    # ------------------------------------------------------------ endpoint

    def exposition(self) -> bytes:
        """What a scrape gets (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry)

    def serve(self, listen: str) -> tuple[str, int]:
        """Serves GET /metrics on `listen` ("127.0.0.1:9477", "[::1]:9477"; port 0: any free port),
        in threads of its own; returns the address bound.

        ConfigError for a malformed address, OSError naming it when it cannot listen.
        """
        return self.serve_at(parse_listen(listen, any_port=True))

    def serve_at(self, address: tuple[str, int]) -> tuple[str, int]:
        """`serve` for an address `parse_listen` already checked (the config keeps it so)."""
        if self._httpd is not None:
            raise RuntimeError("metrics endpoint already serving")
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("MetricsServer", (_Server,), {"address_family": family})
        where = f"[{host}]:{port}" if family == socket.AF_INET6 else f"{host}:{port}"
        try:
            httpd: _Server = make_server(host, port, _only_metrics(make_wsgi_app(self.registry)),
                                         server_class=server_class, handler_class=_Handler)
        except OSError as exc:
            raise OSError(exc.errno, f"metrics: cannot listen on {where}: {exc.strerror}") from exc
        self._httpd = httpd
        self._thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="metrics-http", daemon=True)
        self._thread.start()
        log.info("metrics.serving", url=self.url)
        return self.address

    @property
    def address(self) -> tuple[str, int]:
        """(address, port) the endpoint listens on."""
        if self._httpd is None:
            raise RuntimeError("metrics endpoint not serving")
        return self._httpd.server_name, self._httpd.server_port

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"

    def close(self, timeout: float = 2.0) -> None:
        """Stops serving (scrapes under way finish in their own threads); idempotent."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=timeout)
            self._thread = None
