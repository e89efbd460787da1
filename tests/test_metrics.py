"""The Prometheus endpoint (tracer.service.metrics): real events in, a real HTTP scrape out.

Every exposition a test scrapes is checked with `promtool check metrics`
(Debian's prometheus package) and parsed back with prometheus-client's parser.
The events are built with the event model, and the loss reports and alerts
with the classes that make them in a watch. The end-to-end test runs a real
engine in a lab.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import LAB_NETS, Collector, doc_examples, rule_handles, to_port
from tracer.bpf.libbpf import enable_stats
from tracer.bpf.loader import DROP_PROGRAMS
from tracer.collectors.ctpressure import ConntrackPressure, NamespaceAlerts, Reading
from tracer.config import Config, ConfigError, Scope
from tracer.event.model import Drop, DropEvent, Namespace, Netfilter, Rule, Summary
from tracer.event.rendered import Rendered
from tracer.netns import Netns
from tracer.pipeline.engine import Engine
from tracer.pipeline.losses import LossMeter, output_loss_notice
from tracer.service.metrics import MAX_SERIES, OTHER, Metrics, bpf_stats_enabled, label_value, parse_listen

Labels = frozenset[tuple[str, str]]


# ------------------------------------------------------------------ helpers


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    m.serve("127.0.0.1:0")
    yield m
    m.close()


def get(request: str | urllib.request.Request, timeout: float = 10):
    """One HTTP request to the endpoint under test (an http:// URL on loopback, built here)."""
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (only our http:// URLs)


def fetch(url: str) -> str:
    with get(url) as resp:
        assert resp.status == 200
        return resp.read().decode("utf-8")


def promtool(text: str) -> None:
    """`promtool check metrics` finds no problem (it prints each one and exits non-zero)."""
    tool = shutil.which("promtool")
    assert tool, "promtool not found: install Debian's prometheus package (scripts/install-deps.sh)"
    res = subprocess.run([tool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60,
                         check=False)
    assert res.returncode == 0 and not res.stdout and not res.stderr, (res.returncode, res.stdout, res.stderr)


def scrape(m: Metrics) -> dict[str, dict[Labels, float]]:
    """One scrape over HTTP, checked by promtool: sample name -> labels -> value."""
    text = fetch(m.url)
    promtool(text)
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def value(samples: dict[str, dict[Labels, float]], name: str, **labels: str) -> float:
    return samples[name][frozenset(labels.items())]


def event(reason: str = "NETFILTER_DROP", *, hook: str | None = "input", table: str = "fw", chain: str = "input",
          handle: int | None = 4, count: int | None = None) -> DropEvent:
    """A netfilter drop as the join builds it (a rule, or the policy when `handle` is None)."""
    now = time.time_ns()
    return DropEvent(
        timestamp_ns=now, drop=Drop(reason, "nf_hook_slow+0xa1", subsystem="nftables", hook=hook),
        netfilter=Netfilter("nftables", "nftrace", family="inet", hook=hook, table=table, chain=chain,
                            base_chain=chain, rule=Rule(handle, "tcp dport 443 drop") if handle is not None else None,
                            policy=handle is None, verdict="drop"),
        netns=Namespace(4026532211, "lab-server"),
        summary=Summary(count, now - 10**9, now) if count is not None else None)


def loss_report() -> Rendered:
    meter = LossMeter()
    meter.add("ceiling", 1329)
    meter.add("ring_buffer", 7)
    notice = meter.report(force=True)
    assert notice is not None
    return Rendered(notice)


def conntrack_alert() -> Rendered:
    alerts = NamespaceAlerts(Netns(4026532211, "/run/netns/lab-server", "lab-server"), 0.5, 0)
    now = time.monotonic_ns()
    (notice,) = alerts.update(Reading(now, now + 1000, 900, 1000, 0, 0, 0, 0))
    return Rendered(notice)


@dataclasses.dataclass(frozen=True)
class Figures:
    """What `QueuedSink.stats()` gives (tracer.outputs.queued.OutputStats has these attributes)."""

    name: str
    delivered: int
    queue_dropped: int
    spool_dropped: int
    rejected: int
    up: bool
    spooled_now_events: int
    spooled_now_bytes: int
    down_dropped: int = 0


# ------------------------------------------------------------------ the listen address


@pytest.mark.parametrize(("text", "expected"), [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)),
    ("198.18.0.1:1", ("198.18.0.1", 1)),
    ("[::1]:9477", ("::1", 9477)),
    ("[2001:db8::5]:65535", ("2001:db8::5", 65535)),
])
def test_listen_addresses(text: str, expected: tuple[str, int]) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("9477", "is not ADDRESS:PORT"),
    (":9477", "is not ADDRESS:PORT"),
    ("localhost:9477", "is not an IP address"),
    ("::1:9477", "goes in brackets"),
    ("[127.0.0.1]:9477", "not an IPv6 address"),
    ("127.0.0.1:0", "from 1 to 65535"),
    ("127.0.0.1:65536", "from 1 to 65535"),
    ("127.0.0.1:-1", "from 1 to 65535"),
    ("127.0.0.1:９４７７", "from 1 to 65535"),  # fullwidth digits: str.isdigit() says yes
    ("127.0.0.01:9477", "is not an IP address"),
    (9477, "is not a string"),
])
def test_bad_listen_addresses_name_the_key(text: object, says: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_listen(text)
    assert str(exc.value).startswith("listen: ") and says in str(exc.value)


def test_port_zero_is_for_serve_only() -> None:
    assert parse_listen("127.0.0.1:0", any_port=True) == ("127.0.0.1", 0)


def test_a_busy_port_is_a_clear_error(metrics: Metrics) -> None:
    host, port = metrics.address
    other = Metrics()
    with pytest.raises(OSError, match=rf"metrics: cannot listen on {host}:{port}: Address already in use"):
        other.serve(f"{host}:{port}")


# ------------------------------------------------------------------ counted from events


def test_real_events_counted_and_exposition_valid(metrics: Metrics) -> None:
    """The documented events (complete, summary, policy, NO_SOCKET, iptables), a loss report
    and a conntrack alert, through the sink; then one scrape."""
    docs = doc_examples()
    for doc in docs:
        metrics.sink.submit(Rendered(DropEvent.from_ecs(doc)))
    metrics.sink.submit(loss_report())
    metrics.sink.submit(conntrack_alert())
    s = scrape(metrics)

    # Packets: a summary adds its count (1873 SOCKET_RCVBUFF drops), others one each.
    assert value(s, "tracer_drops_total", reason="SOCKET_RCVBUFF", hook="") == 1873
    assert value(s, "tracer_drops_total", reason="NETFILTER_DROP", hook="input") == 4  # the diagnosed example included
    assert value(s, "tracer_drops_total", reason="NETFILTER_DROP", hook="output") == 1
    assert value(s, "tracer_drops_total", reason="NO_SOCKET", hook="") == 1
    assert sum(s["tracer_drops_total"].values()) == sum(d["event"]["count"] for d in docs)
    # Rules: the handle, or "policy".
    assert value(s, "tracer_rule_drops_total", family="inet", table="fw", chain="web", rule="4") == 1
    assert value(s, "tracer_rule_drops_total", family="inet", table="filter", chain="input", rule="policy") == 1
    assert value(s, "tracer_rule_drops_total", family="ip", table="filter", chain="INPUT", rule="3") == 1
    assert sum(s["tracer_rule_drops_total"].values()) == sum(1 for d in docs if "netfilter" in d)
    # Events by dataset, and the loss report's kinds.
    assert value(s, "tracer_events_total", dataset="tracer.drop") == len(docs) - 1
    assert value(s, "tracer_events_total", dataset="tracer.drop.summary") == 1
    assert value(s, "tracer_events_total", dataset="tracer.loss") == 1
    assert value(s, "tracer_events_total", dataset="tracer.conntrack") == 1
    assert s["tracer_lost_total"] == {frozenset({("kind", "ceiling"), ("output", "")}): 1329,
                                      frozenset({("kind", "ring_buffer"), ("output", "")}): 7}
    # Nothing overflowed; the version is there though no engine is watched.
    assert "tracer_metrics_series_overflow_total" not in s
    (info,) = s["tracer_info"]
    assert dict(info)["version"] and dict(info)["drop_program"] == ""


def test_output_losses_are_told_apart_from_the_watch(metrics: Metrics) -> None:
    """An output's loss report (its queue) and the join's (its queue) are two series."""
    metrics.sink.submit(Rendered(output_loss_notice("syslog tcp://127.0.0.1:6514", {"queue": 3, "spool_full": 2})))
    meter = LossMeter()
    meter.add("queue", 5)
    notice = meter.report(force=True)
    assert notice is not None
    metrics.sink.submit(Rendered(notice))
    s = scrape(metrics)
    assert value(s, "tracer_lost_total", kind="queue", output="syslog tcp://127.0.0.1:6514") == 3
    assert value(s, "tracer_lost_total", kind="spool_full", output="syslog tcp://127.0.0.1:6514") == 2
    assert value(s, "tracer_lost_total", kind="queue", output="") == 5
    assert len(s["tracer_lost_total"]) == 3


def test_counts_add_up_across_scrapes(metrics: Metrics) -> None:
    metrics.sink.submit(Rendered(event(count=None)))
    first = scrape(metrics)
    metrics.sink.submit(Rendered(event(count=41)))
    second = scrape(metrics)
    assert value(first, "tracer_drops_total", reason="NETFILTER_DROP", hook="input") == 1
    assert value(second, "tracer_drops_total", reason="NETFILTER_DROP", hook="input") == 42
    assert value(second, "tracer_rule_drops_total", family="inet", table="fw", chain="input", rule="4") == 42


HOSTILE = ['quote " in it', "back\\slash", "new\nline", '\\"', "-Z", "--modprobe=/tmp/x", "}{=,", "ünï ☃"]


def test_hostile_names_are_escaped_and_parse_back_exactly(metrics: Metrics) -> None:
    for i, name in enumerate(HOSTILE):
        metrics.sink.submit(Rendered(event(table=name, chain=f"c{i}")))
    text = fetch(metrics.url)
    promtool(text)
    assert all(line.startswith(("# HELP ", "# TYPE ", "tracer_")) for line in text.splitlines())
    parsed = {dict(s.labels)["table"] for f in text_string_to_metric_families(text)
              if f.name == "tracer_rule_drops" for s in f.samples}
    assert parsed == set(HOSTILE)
    assert 'table="quote \\" in it"' in text and 'table="new\\nline"' in text and 'table="back\\\\slash"' in text


def test_terminal_controls_never_reach_the_exposition(metrics: Metrics) -> None:
    """ESC, CR, bidi overrides and undecodable bytes are written as escapes; the rest is kept."""
    names = {"\x1b[31mred": "\\x1b[31mred", "cr\rhere": "cr\\x0dhere", "\u202eevil": "\\u202eevil",
             "byte\udcff": "byte\\xff", "tab\tx": "tab\\x09x"}
    for name in names:
        metrics.sink.submit(Rendered(event(chain=name)))
    text = fetch(metrics.url)
    promtool(text)
    assert not any(ch in text for ch in "\x1b\r\t\u202e")
    parsed = {dict(s.labels)["chain"] for f in text_string_to_metric_families(text)
              if f.name == "tracer_rule_drops" for s in f.samples}
    assert parsed == set(names.values())
    assert label_value("x" * 1000) == "x" * 256


def test_cardinality_is_bounded(metrics: Metrics) -> None:
    """A user creating chain after chain: 2000 series, then one "_other" series and the overflow count."""
    extra = 7
    for i in range(MAX_SERIES + extra):
        metrics.sink.submit(Rendered(event(chain=f"chain{i}", count=2)))
    metrics.sink.submit(Rendered(event(chain="chain0", count=2)))  # a known series still counts itself
    s = scrape(metrics)
    rules = s["tracer_rule_drops_total"]
    assert len(rules) == MAX_SERIES + 1
    assert value(s, "tracer_rule_drops_total", family=OTHER, table=OTHER, chain=OTHER, rule=OTHER) == 2 * extra
    assert value(s, "tracer_rule_drops_total", family="inet", table="fw", chain="chain0", rule="4") == 4
    assert sum(rules.values()) == 2 * (MAX_SERIES + extra + 1)
    assert s["tracer_metrics_series_overflow_total"] == {frozenset({("metric", "tracer_rule_drops_total")}): 2 * extra}
    assert value(s, "tracer_drops_total", reason="NETFILTER_DROP", hook="input") == 2 * (MAX_SERIES + extra + 1)


def test_small_bound() -> None:
    m = Metrics(max_series=2)
    for reason in ("A", "B", "C", "D"):
        m.sink.submit(Rendered(event(reason, handle=None)))
    s = {f.name: f for f in text_string_to_metric_families(m.exposition().decode())}
    assert sorted(dict(x.labels)["reason"] for x in s["tracer_drops"].samples) == ["A", "B", OTHER]
    with pytest.raises(ValueError):
        Metrics(max_series=0)


# ------------------------------------------------------------------ read at scrape time


def test_output_figures_are_read_at_each_scrape(metrics: Metrics) -> None:
    outputs = [Figures("file /var/log/tracer/drops.ndjson", 10, 0, 0, 0, True, 0, 0),
               Figures("elasticsearch http://127.0.0.1:9200", 3, 1, 2, 4, False, 120, 65536)]
    metrics.watch_outputs(lambda: outputs)
    s = scrape(metrics)
    es = "elasticsearch http://127.0.0.1:9200"
    assert {k: value(s, "tracer_output_events_total", output=es, outcome=k)
            for k in ("delivered", "queue_dropped", "spool_dropped", "rejected")} == {
        "delivered": 3, "queue_dropped": 1, "spool_dropped": 2, "rejected": 4}
    assert value(s, "tracer_output_up", output=es) == 0
    assert value(s, "tracer_output_up", output="file /var/log/tracer/drops.ndjson") == 1
    assert value(s, "tracer_spool_events", output=es) == 120
    assert value(s, "tracer_spool_bytes", output=es) == 65536
    # The next scrape reads them again: nothing polls in between.
    outputs[1] = dataclasses.replace(outputs[1], delivered=123, up=True, spooled_now_events=0, spooled_now_bytes=0)
    s = scrape(metrics)
    assert value(s, "tracer_output_events_total", output=es, outcome="delivered") == 123
    assert value(s, "tracer_output_up", output=es) == 1 and value(s, "tracer_spool_events", output=es) == 0


def test_a_failing_source_leaves_only_its_metrics_out(metrics: Metrics) -> None:
    metrics.sink.submit(Rendered(event()))
    metrics.watch_outputs(lambda: [1 / 0])
    metrics.watch_bpf(lambda: {"kfree_skb_btf": (5, 2_000_000_000)})
    s = scrape(metrics)
    assert not any(name.startswith(("tracer_output_", "tracer_spool_")) for name in s)
    assert value(s, "tracer_drops_total", reason="NETFILTER_DROP", hook="input") == 1
    assert value(s, "tracer_bpf_program_run_seconds_total", program="kfree_skb_btf") == 2.0
    metrics.watch_outputs(lambda: [Figures("stdout", 1, 0, 0, 0, True, 0, 0)])
    assert value(scrape(metrics), "tracer_output_events_total", output="stdout", outcome="delivered") == 1


def test_conntrack_gauges_keep_the_fullest_namespaces() -> None:
    m = Metrics(max_series=2)
    m.watch_conntrack(lambda: [(1, "quiet", 10, 1000), (2, None, 900, 1000), (3, "busy", 500, 1000)])
    m.serve("[::1]:0")
    try:
        assert m.url.startswith("http://[::1]:")
        s = scrape(m)
    finally:
        m.close()
    assert s["tracer_conntrack_entries"] == {frozenset({("netns", "2")}): 900, frozenset({("netns", "busy")}): 500}
    assert value(s, "tracer_conntrack_fill_ratio", netns="2") == 0.9
    assert value(s, "tracer_conntrack_max") == 1000


def test_described_families_are_those_collected() -> None:
    """The registry's list of names (for `?name[]=`) matches what a scrape with every source gives."""
    m = Metrics()
    m.watch_outputs(lambda: [Figures("stdout", 1, 0, 0, 0, True, 0, 0)])
    m.watch_conntrack(lambda: [(1, None, 1, 10)])
    m.watch_bpf(lambda: {"kfree_skb_btf": (1, 1)})
    m.watch_ring_buffer_lost(lambda: 0)
    described = {f.name for f in m.collector.describe()}
    assert described == {f.name for f in m.registry.collect()}


def test_only_metrics_is_served(metrics: Metrics) -> None:
    base = metrics.url.removesuffix("/metrics")
    for path in ("/", "/favicon.ico", "/metrics/", "/metricsx", "/../metrics"):
        with pytest.raises(urllib.error.HTTPError) as exc:
            get(base + path)
        assert exc.value.code == 404, path
    only = fetch(metrics.url + "?name[]=tracer_info")
    assert "tracer_info{" in only and "tracer_drops_total" not in only
    with pytest.raises(urllib.error.HTTPError) as exc:
        get(urllib.request.Request(metrics.url, data=b"x", method="POST"))  # noqa: S310 (our URL)
    assert exc.value.code == 405


def test_close_stops_listening() -> None:
    m = Metrics()
    m.serve("127.0.0.1:0")
    url = m.url
    fetch(url)
    m.close()
    m.close()
    with pytest.raises(urllib.error.URLError):
        get(url, timeout=5)
    assert not [t for t in threading.enumerate() if t.name == "metrics-http"]


# ------------------------------------------------------------------ real kernel sources


@pytest.mark.root
def test_conntrack_levels_from_a_real_table(net) -> None:
    """ConntrackPressure.levels: what its poller read of a namespace with an entry, through a scrape."""
    lab, client, server, link = net
    assert lab.tcp_connect(client, str(link.b_v4.ip), 22) == "timeout"  # the server accepted the SYN
    pressure = ConntrackPressure(threshold=0.9, emit=lambda notice: None, interval=0.2)
    m = Metrics()
    m.watch_conntrack(pressure.levels)
    m.serve("127.0.0.1:0")
    pressure.start([server])
    try:
        deadline = time.monotonic() + 5
        while not pressure.levels() and time.monotonic() < deadline:
            time.sleep(0.05)
        ((inode, name, count, most),) = pressure.levels()
        s = scrape(m)
    finally:
        pressure.stop()
        m.close()
    with open("/proc/sys/net/netfilter/nf_conntrack_max") as f:
        global_max = int(f.read())
    assert (inode, name, most) == (server.inode, server.name, global_max) and count >= 1
    assert value(s, "tracer_conntrack_entries", netns=server.name) == count
    assert value(s, "tracer_conntrack_fill_ratio", netns=server.name) == count / global_max
    assert value(s, "tracer_conntrack_max") == global_max
    assert pressure.levels() == []


class Fanout:
    def __init__(self, *sinks) -> None:
        self.sinks = sinks

    def submit(self, rendered: Rendered) -> None:
        for sink in self.sinks:
            sink.submit(rendered)


@pytest.mark.root
@pytest.mark.bpf
def test_engine_in_a_lab(net) -> None:
    """A real engine: a rule drop in the lab counted by rule, BPF program statistics (counted
    while this test holds a BPF_ENABLE_STATS descriptor: the sysctl is left alone), conntrack
    fill, the tracer's info; and after the engine closes, a scrape that still works."""
    lab, client, server, link = net
    handle = rule_handles(lab, server)["tcp dport 443 drop"]
    m = Metrics()
    m.serve("127.0.0.1:0")
    collector = Collector(lab.prefix)
    engine = Engine(Config(scope=Scope(hosts=LAB_NETS)), Fanout(collector, m.sink))
    m.watch_engine(engine)
    before = scrape(m)  # nothing loaded yet: the sources read empty
    assert dict(next(iter(before["tracer_info"])))["drop_program"] == ""
    assert "tracer_bpf_program_run_total" not in before
    thread = None
    stats_fd = enable_stats()
    try:
        engine.start()
        thread = threading.Thread(target=engine.run, daemon=True)
        thread.start()
        assert lab.tcp_connect(client, str(link.b_v4.ip), 443) == "timeout"
        collector.wait_for(to_port(443), timeout=5)
        os.close(stats_fd)
        stats_fd = -1
        deadline = time.monotonic() + 5
        while True:  # the pressure poller reads every namespace once a second
            s = scrape(m)
            if any(("netns", server.name) in k for k in s.get("tracer_conntrack_entries", {})) \
                    or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        tracer = engine.tracer
        assert tracer is not None
        program = DROP_PROGRAMS[tracer.drop_mode]
    finally:
        if stats_fd >= 0:
            os.close(stats_fd)
        engine.stop()
        if thread is not None:
            thread.join(timeout=10)
        else:
            engine.close()
    try:
        assert value(s, "tracer_drops_total", reason="NETFILTER_DROP", hook="input") >= 1
        assert value(s, "tracer_rule_drops_total", family="inet", table="fw", chain="input", rule=str(handle)) >= 1
        assert value(s, "tracer_events_total", dataset="tracer.drop") >= 1
        # The drop program ran at least for this drop while stats were on.
        assert value(s, "tracer_bpf_program_run_total", program=program) >= 1
        assert value(s, "tracer_bpf_program_run_seconds_total", program=program) > 0
        assert value(s, "tracer_bpf_stats_enabled") == bpf_stats_enabled()
        assert value(s, "tracer_ring_buffer_lost_total") >= 0
        ratio = value(s, "tracer_conntrack_fill_ratio", netns=server.name)
        assert 0 <= ratio <= 1 and value(s, "tracer_conntrack_max") > 0
        (info,) = s["tracer_info"]
        assert dict(info)["drop_program"] == tracer.drop_mode
        assert dict(info)["netfilter_context"] == (tracer.nf_mode or "none")
        after = scrape(m)  # the engine is closed: its sources read empty, the counts stay
        assert "tracer_bpf_program_run_total" not in after and "tracer_conntrack_entries" not in after
        assert value(after, "tracer_rule_drops_total", family="inet", table="fw", chain="input",
                     rule=str(handle)) >= 1
        assert tracer.program_stats() == {}
    finally:
        m.close()
