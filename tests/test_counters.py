"""Blind-spot counters (tracer.collectors.counters, tracer.event.counter): real namespaces, real drops.

The drops here never reach kfree_skb: a SYN-ACK with no route back is given
up before a packet exists, a SYN a full accept queue turns away is consumed.
Only the namespace's counters move, and the collector must report them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Iterator

import pytest

from tracer import netns as netns_mod
from tracer.collectors.counters import (
    CounterCollector,
    Reader,
    increases,
    parse_pairs,
    parse_snmp6,
    snapshot,
)
from tracer.event.counter import COUNTER_DATASET, COUNTERS, NETSTAT, SNMP, SNMP6, CounterEvent
from tracer.event.rendered import Rendered
from tracer.event.schema import COUNTER_EVENT, DropEventError, errors, schema_of, validate, validate_line
from tracer.event.sections import Namespace, Observer
from tracer.lab import Lab, Link
from tracer.netns import Netns, NetnsGone

T0 = 1_764_590_400_000_000_000  # 2025-12-01T12:00:00Z

#: The counters issue 10 asks for by name (IpInNoRoutes is IPv4's IpExtInNoRoutes: /proc/net/snmp has none).
REQUIRED = (
    "IpOutNoRoutes", "IpExtInNoRoutes", "IpInAddrErrors", "IpInDiscards", "IpOutDiscards", "TcpExtListenDrops",
    "TcpExtListenOverflows", "TcpExtTCPBacklogDrop", "TcpExtTCPReqQFullDrop", "TcpExtSyncookiesFailed",
    "TcpExtTCPMinTTLDrop", "TcpExtPFMemallocDrop", "TcpExtIPReversePathFilter", "TcpExtOutOfWindowIcmps",
    "TcpExtLockDroppedIcmps", "UdpInErrors", "UdpRcvbufErrors", "UdpSndbufErrors", "UdpNoPorts", "Udp6InErrors",
    "Udp6RcvbufErrors", "Udp6SndbufErrors", "Udp6NoPorts", "Ip6OutNoRoutes", "Ip6InNoRoutes", "Ip6InAddrErrors",
    "Ip6InDiscards", "Ip6OutDiscards", "Icmp6InErrors",
)


def _event(name: str = "TcpExtListenDrops", netns: Namespace | None = None, **kw) -> CounterEvent:
    return CounterEvent.of(COUNTERS[name], netns or Namespace(4026532999, "lab-srv"), timestamp_ns=T0 + 10**9,
                           delta=kw.pop("delta", 3), value=kw.pop("value", 10), start_ns=T0,
                           observer=Observer("build-1", "build-1", "0.10.0"), **kw)


# -- the event ---------------------------------------------------------------------------


def test_event_ecs_follows_the_counter_schema() -> None:
    doc = _event().to_ecs()
    assert schema_of(doc) == COUNTER_EVENT
    validate(doc)
    assert doc["event"] == {"kind": "event", "category": ["network"], "type": ["info"],
                            "action": "counter-increased", "dataset": COUNTER_DATASET,
                            "start": "2025-12-01T12:00:00.000000Z", "end": "2025-12-01T12:00:01.000000Z"}
    assert doc["counter"] == {"file": "netstat", "group": "TcpExt", "name": "TcpExtListenDrops", "delta": 3,
                              "value": 10, "meaning": COUNTERS["TcpExtListenDrops"].meaning}
    assert doc["netns"] == {"inode": 4026532999, "name": "lab-srv"}
    assert doc["observer"]["hostname"] == doc["host"]["hostname"] == "build-1"
    assert doc["message"].startswith("TcpExtListenDrops +3 (now 10) in netns lab-srv: ")


def test_event_json_line_validates_and_reads_back() -> None:
    event = _event("IpOutNoRoutes", delta=1, value=1)
    line = Rendered(event).json()
    doc = validate_line(line)  # the dataset picks the counter schema
    assert CounterEvent.from_ecs(doc) == event


@pytest.mark.parametrize("name", sorted(COUNTERS))
def test_every_counter_makes_a_valid_event(name: str) -> None:
    spec = COUNTERS[name]
    doc = _event(name).to_ecs()
    validate(doc)
    assert (doc["counter"]["file"], doc["counter"]["group"], doc["counter"]["name"]) == (spec.file, spec.group, name)
    assert name.startswith(spec.group)
    assert spec.meaning and spec.meaning == spec.meaning.strip() and not spec.meaning.endswith(".")


def test_text_line() -> None:
    line = Rendered(_event()).text()
    assert line.startswith("12:00:01.000000  COUNTER  netns lab-srv  TcpExtListenDrops +3 (now 10): ")
    assert line.endswith(COUNTERS["TcpExtListenDrops"].meaning)
    assert "\n" not in line


def test_text_line_escapes_a_hostile_namespace_name() -> None:
    hostile = 'x\n12:00:02.000000  DROPPED  tcp\x1b[2J\u202eevil"\\'
    event = _event(netns=Namespace(4026532999, hostile))
    line = event.text()
    assert "\n" not in line and "\x1b" not in line and "\u202e" not in line
    assert '\\n12:00:02.000000  DROPPED  tcp\\x1b[2J\\u202eevil\\"\\\\' in line
    doc = event.to_ecs()
    validate(doc)
    assert doc["netns"]["name"] == hostile  # the JSON carries the bytes


@pytest.mark.parametrize(("path", "value"), [
    (("counter", "delta"), 0),
    (("counter", "file"), "sockstat"),
    (("counter", "name"), "Ip OutNoRoutes"),
    (("event", "kind"), "alert"),
    (("event", "action"), "counter_increased"),
    (("counter", "extra"), 1),
])
def test_schema_rejects_mistakes(path: tuple[str, str], value: object) -> None:
    doc = _event().to_ecs()
    doc[path[0]][path[1]] = value
    assert errors(doc, COUNTER_EVENT)
    with pytest.raises(DropEventError, match=r"docs/counter-event\.md"):
        validate(doc)


def test_schema_wants_the_namespace_and_both_ends_of_the_period() -> None:
    doc = _event().to_ecs()
    del doc["netns"]
    assert errors(doc, COUNTER_EVENT)
    doc = _event().to_ecs()
    del doc["event"]["start"]
    assert errors(doc, COUNTER_EVENT)


def test_docs_schema_is_a_symlink_to_the_packaged_copy() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    docs_copy = os.path.join(root, "docs", "counter-event.schema.json")
    assert os.path.islink(docs_copy) and not os.path.isabs(os.readlink(docs_copy))
    assert os.path.realpath(docs_copy) == os.path.realpath(os.path.join(root, "tracer", "data",
                                                                         "counter-event.schema.json"))


def test_docs_list_every_counter() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, "docs", "counter-event.md"), encoding="utf-8") as f:
        text = f.read()
    assert [n for n in COUNTERS if f"`{n}`" not in text] == []
    examples = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", text, re.S)]
    assert examples
    for doc in examples:
        validate(doc)
        assert CounterEvent.from_ecs(doc).to_ecs() == doc


# -- parsing what this kernel writes ------------------------------------------------------


def _own_files() -> dict[str, str]:
    out = {}
    for file in (SNMP, NETSTAT, SNMP6):
        with open(f"/proc/thread-self/net/{file}", encoding="ascii") as f:
            out[file] = f.read()
    return out


def test_this_kernel_has_every_required_counter() -> None:
    reader = Reader()
    found: dict[str, int] = {}
    for file, text in _own_files().items():
        found.update(reader.parse(file, text))
    assert [n for n in REQUIRED if n not in found] == []
    if os.uname().release >= "6.7":  # TCPAODroppedIcmps, the newest, came in 6.7
        assert [n for n in COUNTERS if n not in found] == []


def test_parsing_never_pairs_a_name_with_another_value() -> None:
    reader = Reader()
    columns = reader._columns
    # A value line of another group, or a truncated one, gives nothing rather than a shifted column.
    assert parse_pairs(SNMP, "Udp: InDatagrams NoPorts\nTcp: 1 2\n", columns) == {}
    assert parse_pairs(SNMP, "Udp: InDatagrams NoPorts\nUdp: 5\n", columns) == {}
    assert parse_pairs(SNMP, "Udp: InDatagrams NoPorts\nUdp: 5 7\n", columns) == {"UdpNoPorts": 7}
    assert parse_snmp6("Udp6NoPorts 4\nUdp6InErrors\n", reader._snmp6) == {}
    assert parse_snmp6("Udp6NoPorts 4\nUdp6InErrors x\n", reader._snmp6) == {"Udp6NoPorts": 4}


def test_increases_leave_out_unknown_and_falling_counters() -> None:
    before = {"IpOutNoRoutes": 5, "UdpNoPorts": 9, "TcpExtListenDrops": 1}
    after = {"IpOutNoRoutes": 7, "UdpNoPorts": 3, "Ip6OutNoRoutes": 4, "TcpExtListenDrops": 1}
    found = increases(before, after)
    assert [(i.name, i.delta, i.value, i.cause) for i in found] == [("IpOutNoRoutes", 2, 7, "no_route")]
    assert found[0].meaning == COUNTERS["IpOutNoRoutes"].meaning


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="interval"):
        CounterCollector(lambda e: None, interval=0)
    with pytest.raises(ValueError, match="repeat"):
        CounterCollector(lambda e: None, repeat_s=-1)


# -- real namespaces ---------------------------------------------------------------------


class Events:
    """The collector's emit: keeps every event, validating its JSON as a consumer would."""

    def __init__(self) -> None:
        self.events: list[CounterEvent] = []

    def __call__(self, event: CounterEvent) -> None:
        validate_line(Rendered(event).json())
        self.events.append(event)

    def of(self, ns: Netns) -> dict[str, CounterEvent]:
        return {e.name: e for e in self.events if e.netns.inode == ns.inode}


@pytest.fixture
def collector() -> Iterator[tuple[CounterCollector, Events]]:
    events = Events()
    col = CounterCollector(events, interval=0.1, repeat_s=0)
    yield col, events
    col.stop()


def _no_route_back(lab: Lab, v6: bool) -> tuple[Netns, Netns, Netns, Link]:
    """client -> router -> server, forwarding on the router, no masquerade, no route back on the server."""
    client, router, server = lab.add_ns("client"), lab.add_ns("router"), lab.add_ns("server")
    near, far = lab.link(client, router), lab.link(router, server)
    key = "net.ipv6.conf.all.forwarding=1" if v6 else "net.ipv4.ip_forward=1"
    lab.run(router, ["sysctl", "-qw", key])  # inside the router's namespace only
    if v6:
        lab.ip(client, "-6", "route", "add", str(far.b_v6.network), "via", str(near.b_v6.ip))
    else:
        lab.ip(client, "route", "add", str(far.b_v4.network), "via", str(near.b_v4.ip))
    lab.listen(server, 8443)
    return client, router, server, far


@pytest.mark.root
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_no_route_back_shows_as_out_no_routes(lab: Lab, v6: bool) -> None:
    """The server answers the SYN, but has no route back to the client's network.

    The kernel gives up the SYN-ACK in inet_csk_route_req before it exists:
    IpOutNoRoutes (Ip6OutNoRoutes) and TcpExtListenDrops rise once per SYN,
    and the SYN itself is consumed, not freed by kfree_skb.
    """
    client, router, server, far = _no_route_back(lab, v6)
    events = Events()
    col = CounterCollector(events, interval=0.1, repeat_s=0)
    try:
        col.start([client, router, server])  # the baseline, then its own thread
        dst = str(far.b_v6.ip if v6 else far.b_v4.ip)
        assert lab.tcp_connect(client, dst, 8443, timeout=0.5) == "timeout"  # one SYN: its retry is at 1 s
        name = "Ip6OutNoRoutes" if v6 else "IpOutNoRoutes"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not {name, "TcpExtListenDrops"} <= events.of(server).keys():
            time.sleep(0.05)
    finally:
        col.stop()
    got = events.of(server)
    assert got[name].delta == 1 and got["TcpExtListenDrops"].delta == 1
    assert got[name].netns == Namespace(server.inode, server.name)
    assert got[name].file == ("snmp6" if v6 else "snmp") and got[name].group == ("Ip6" if v6 else "Ip")
    assert "no route back" in got[name].meaning
    assert f"netns {server.name}  {name} +1 (now 1): " in got[name].text()
    assert got[name].start_ns is not None and got[name].start_ns < got[name].timestamp_ns
    assert not events.of(client) and not events.of(router)
    assert {e.name for e in events.events} <= {name, "TcpExtListenDrops"}


@pytest.mark.root
def test_listener_that_never_accepts_overflows(lab: Lab, collector) -> None:
    col, events = collector
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    with netns_mod.entered(server):
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with listener:
        listener.bind((str(link.b_v4.ip), 9000))
        listener.listen(0)  # room for one connection, never accepted
        col.namespaces_changed([client, server])
        assert col.poll() == []  # the baseline
        results = [lab.tcp_connect(client, str(link.b_v4.ip), 9000, timeout=0.5) for _ in range(3)]
        assert results == ["open", "timeout", "timeout"]
        found = {e.name: e for e in col.poll()}
    assert found["TcpExtListenOverflows"].delta == 2 and found["TcpExtListenDrops"].delta == 2
    assert all(e.netns.inode == server.inode for e in found.values())
    assert set(found) == {"TcpExtListenOverflows", "TcpExtListenDrops"}
    assert events.of(server).keys() == found.keys()  # what poll returns is what it emitted


@pytest.mark.root
def test_first_poll_is_only_the_baseline(lab: Lab, collector) -> None:
    col, _ = collector
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    for _ in range(4):
        lab.udp_send(a, str(link.b_v4.ip), 9)  # nothing listens: UdpNoPorts in b, before the watch
    before = snapshot(b)
    assert before["UdpNoPorts"] == 4
    col.namespaces_changed([a, b])
    assert col.poll() == []
    assert col.poll() == []  # nothing moved
    lab.udp_send(a, str(link.b_v4.ip), 9)
    lab.udp_send(a, str(link.b_v6.ip), 9)
    found = {e.name: e for e in col.poll()}
    assert (found["UdpNoPorts"].delta, found["UdpNoPorts"].value) == (1, 5)
    assert (found["Udp6NoPorts"].delta, found["Udp6NoPorts"].value) == (1, 1)
    assert [(i.name, i.delta) for i in increases(before, snapshot(b))] == [("UdpNoPorts", 1), ("Udp6NoPorts", 1)]
    # A namespace added later starts with its own baseline.
    c = lab.add_ns("c")
    col.namespaces_changed([a, b, c])
    assert col.poll() == []


@pytest.mark.root
def test_repeats_are_held_back_and_then_reported_whole(lab: Lab) -> None:
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    events = Events()
    col = CounterCollector(events, interval=10, repeat_s=0.5)
    col.namespaces_changed([a, b])
    col.poll()
    lab.udp_send(a, str(link.b_v4.ip), 9)
    first = col.poll()
    assert [(e.name, e.delta) for e in first] == [("UdpNoPorts", 1)]
    lab.udp_send(a, str(link.b_v4.ip), 9)
    lab.udp_send(a, str(link.b_v4.ip), 9)
    assert col.poll() == []  # within repeat_s of the last event: held back
    time.sleep(0.6)
    held = col.poll()  # no new rise, but the held one is due
    assert [(e.name, e.delta, e.value) for e in held] == [("UdpNoPorts", 2, 3)]
    assert held[0].start_ns is not None and first[0].timestamp_ns <= held[0].start_ns < held[0].timestamp_ns
    assert col.recent(b.inode) == first + held
    col.stop()


def _veth_present(lab: Lab, ns: Netns, ifname: str) -> bool:
    return ifname in lab.ip(ns, "-br", "link", "show")


@pytest.mark.root
def test_vanished_namespace_is_skipped_and_not_held(lab: Lab, collector) -> None:
    col, _ = collector
    a, b = lab.add_ns("a"), lab.add_ns("gone")
    link = lab.link(a, b)
    col.namespaces_changed([a, b])
    assert col.poll() == []  # both read: their files are open now
    lab.delete_ns("gone")
    for _ in range(2):
        col.poll()  # must not raise, and keeps following `a`
    # The open files did not keep the deleted namespace alive: its end of the veth pair went,
    # and took `a`'s end with it.
    deadline = time.monotonic() + 10
    while _veth_present(lab, a, link.a_ifname) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _veth_present(lab, a, link.a_ifname)
    with pytest.raises(NetnsGone):
        snapshot(b)
    # `a` is still followed.
    lab.ip(a, "addr", "add", "198.19.200.1/32", "dev", "lo")
    lab.udp_send(a, "198.19.200.1", 9)  # to a's own closed port: a's UdpNoPorts
    assert "UdpNoPorts" in {e.name for e in col.poll() if e.netns.inode == a.inode}
    col.namespaces_changed([a])
    assert col.poll() == []


@pytest.mark.root
def test_one_round_over_a_hundred_namespaces(lab: Lab, collector) -> None:
    """Every namespace is read each round; the cost is printed (docs/counter-event.md), never asserted."""
    col, _ = collector
    nss = [lab.add_ns(f"n{i}") for i in range(99)]
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    col.namespaces_changed([*nss, a, b])
    col.poll()
    rounds, cpu = [], []
    for _ in range(5):
        start, start_cpu = time.perf_counter(), time.thread_time()
        assert col.poll() == []
        rounds.append(time.perf_counter() - start)
        cpu.append(time.thread_time() - start_cpu)
    lab.udp_send(a, str(link.b_v4.ip), 9)
    found = col.poll()
    assert [(e.netns.inode, e.name) for e in found] == [(b.inode, "UdpNoPorts")]
    print(f"one round over 101 namespaces: {sorted(rounds)[2] * 1000:.1f} ms, "
          f"{sorted(cpu)[2] * 1000:.1f} ms of CPU (medians of 5)")
