"""Conntrack pressure alerts and conntrack-full attribution, on real tables in lab namespaces.

Two set-ups (build-machines.md has the facts):
- a UDP flood from a client fills the server namespace's table to the
  global maximum (the count is per namespace, the max global and read-only
  there), after which the kernel evicts unreplied entries early;
- ASSURED entries created through ctnetlink fill it so that nothing can be
  evicted: the next SYN is dropped by conntrack itself.
The tables vanish with their namespaces.
"""

from __future__ import annotations

import dataclasses
import math
import os
import queue
import signal
import subprocess
import threading
import time

import orjson
import pytest

from tests import ctlab
from tests.support import stop_process, tracer_cmd, wait_for, wait_ready
from tracer.collectors.conntrack import ConntrackInfo
from tracer.collectors.ctpressure import REPEAT_S, ConntrackPressure
from tracer.config import CONNTRACK_THRESHOLD_DEFAULT
from tracer.event.notice import CONNTRACK_DATASET, Notice
from tracer.event.schema import validate
from tracer.lab import Lab
from tracer.pipeline import attribution
from tracer.sources.drop import KernelDrop, NfContext

pytestmark = [pytest.mark.root]

#: Polls in the tests are faster than the tracer's 1 s, so that the tests are short.
INTERVAL = 0.2
PORT = 5555
SERVER_RULESET = ctlab.SERVER_RULESET


class Alerts:
    """The emit callback: keeps every notice, lets a test wait for one."""

    def __init__(self) -> None:
        self.notices: list[Notice] = []
        self._lock = threading.Lock()

    def __call__(self, notice: Notice) -> None:
        with self._lock:
            self.notices.append(notice)

    def of(self, action: str, netns_inode: int | None = None) -> list[Notice]:
        with self._lock:
            return [n for n in self.notices if n.action == action
                    and (netns_inode is None or (n.netns is not None and n.netns.inode == netns_inode))]

    def wait(self, action: str, netns_inode: int, timeout: float = 10.0) -> Notice:
        assert wait_for(lambda: self.of(action, netns_inode), timeout), f"no {action}; got {self.notices}"
        return self.of(action, netns_inode)[0]


def _root_or_skip() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("needs root; CI=true must run as root", pytrace=False)
        pytest.skip("needs root")


def _check_table_alert(n: Notice, ns, count_at_least: int = 0) -> dict:
    doc = n.to_ecs()
    validate(doc)  # the notice schema, by its dataset
    assert doc["event"]["kind"] == "alert" and doc["event"]["dataset"] == CONNTRACK_DATASET
    assert doc["netns"] == {"inode": ns.inode, "name": ns.name}
    table = doc["conntrack"]["table"]
    assert table["max"] > 0 and table["count"] >= count_at_least
    assert table["ratio"] == pytest.approx(table["count"] / table["max"], abs=1e-4)
    assert set(doc["conntrack"]["stats"]) == {"drop", "early_drop", "insert_failed", "invalid"}
    assert doc["message"] and isinstance(doc["event"]["severity"], int)
    return doc


# ------------------------------------------------------------ (a) UDP flood: filling, early drop


def _flood_lab(lab: Lab):
    """client -> server, the server with five addresses (the client knows their MAC) and SERVER_RULESET."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    mac = lab.mac(server, link.b_ifname)
    addresses = [f"198.18.0.{i}" for i in range(2, 7)]
    for addr in addresses[1:]:
        lab.ip(server, "addr", "add", f"{addr}/24", "dev", link.b_ifname)
        lab.ip(client, "neigh", "replace", addr, "lladdr", mac, "dev", link.a_ifname, "nud", "permanent")
    lab.nft(server, SERVER_RULESET)
    return client, server, addresses


def test_flood_fills_table_alerts_once_then_recovers(lab, tmp_path):
    client, server, addresses = _flood_lab(lab)
    flooder = ctlab.build_flooder(tmp_path)
    alerts = Alerts()
    pressure = ConntrackPressure(threshold=CONNTRACK_THRESHOLD_DEFAULT, emit=alerts, interval=INTERVAL)
    pressure.start([client, server])
    try:
        began = time.monotonic()
        t0 = time.monotonic()
        sent = ctlab.udp_flood(lab, client, flooder, addresses)
        fill_s = time.monotonic() - t0
        full = ctlab.read(server)
        print(f"\nflood: {sent} datagrams in {fill_s:.2f} s; table {full.count}/{full.max}, "
              f"early_drop {full.early_drop}")
        assert full.count >= 0.99 * full.max and full.early_drop > 0

        filling = alerts.wait("conntrack_table_filling", server.inode)
        doc = _check_table_alert(filling, server, count_at_least=int(0.9 * full.max))
        assert doc["conntrack"]["table"]["ratio"] >= 0.9 and doc["conntrack"]["threshold"] == 0.9
        early = alerts.wait("conntrack_early_drop", server.inode)
        doc = _check_table_alert(early, server)
        assert doc["conntrack"]["delta"]["early_drop"] > 0
        assert doc["event"]["start"] <= doc["event"]["end"]
        assert "evicted early" in doc["message"]

        # Hover: drain to ~0.875 (between the clear mark and the threshold), refill, twice.
        for mark in (0, 1):
            ctlab.flush(server, mark=mark)
            low = ctlab.read(server)
            assert 0.85 < low.count / low.max < 0.9, low
            time.sleep(3 * INTERVAL)
            ctlab.udp_flood(lab, client, flooder, addresses)
            ctlab.wait_reading(server, lambda r: r.count >= 0.99 * r.max)
            time.sleep(3 * INTERVAL)
        elapsed = time.monotonic() - began
        polls = elapsed / INTERVAL
        early_alerts = alerts.of("conntrack_early_drop", server.inode)
        print(f"hover: {elapsed:.1f} s, ~{polls:.0f} polls, {len(alerts.notices)} alerts: "
              f"{[n.action for n in alerts.notices]}")
        assert len(alerts.of("conntrack_table_filling")) == 1
        assert alerts.of("conntrack_table_recovered") == []
        assert 1 <= len(early_alerts) <= 1 + math.ceil(elapsed / REPEAT_S)
        total = ctlab.read(server).early_drop
        assert sum(n.details["delta"]["early_drop"] for n in early_alerts) <= total

        ctlab.flush(server)
        recovered = alerts.wait("conntrack_table_recovered", server.inode)
        doc = _check_table_alert(recovered, server)
        assert doc["conntrack"]["table"]["ratio"] < 0.85 and doc["conntrack"]["peak_ratio"] >= 0.99
        time.sleep(3 * INTERVAL)
        assert len(alerts.of("conntrack_table_recovered")) == 1
        assert alerts.of("conntrack_table_full_drop") == []  # eviction made room: nothing dropped
        assert [n for n in alerts.notices if n.netns and n.netns.inode == client.inode] == []
    finally:
        pressure.stop()
    assert not any(t.name == "conntrack-pressure" for t in threading.enumerate())


def test_inactive_conntrack_and_vanished_namespace(lab):
    """A namespace without `ct` rules has nothing to say; one that goes away is let go of."""
    quiet = lab.add_ns("quiet")
    alerts = Alerts()
    pressure = ConntrackPressure(threshold=0.5, emit=alerts, interval=INTERVAL)
    pressure.start([quiet])
    try:
        time.sleep(3 * INTERVAL)
        assert not pressure.dropping(quiet.inode)
        pressure.namespaces_changed([])
        lab.delete_ns("quiet")
        assert not pressure.dropping(quiet.inode)
        time.sleep(2 * INTERVAL)
    finally:
        pressure.stop()
    assert alerts.notices == []


# ------------------------------------------------------------ (b) ASSURED entries: the SYN is dropped


@pytest.fixture(scope="module")
def full_table(tmp_path_factory):
    """client -> server:5555, the server's table filled to the max with ASSURED entries."""
    _root_or_skip()
    lab = Lab()
    try:
        client, server = lab.add_ns("client"), lab.add_ns("server")
        link = lab.link(client, server)
        lab.nft(server, SERVER_RULESET)
        with ctlab.listener(server, str(link.b_v4.ip), PORT):
            assert lab.tcp_connect(client, str(link.b_v4.ip), PORT) == "open"
            t0 = time.monotonic()
            reading = ctlab.fill_assured(server, str(link.b_v4.ip))
            print(f"\nASSURED fill: {reading.count}/{reading.max} entries in {time.monotonic() - t0:.2f} s")
            assert reading.full
            yield lab, client, server, link
    finally:
        lab.close()


def test_full_table_drop_alert(full_table):
    lab, client, server, link = full_table
    alerts = Alerts()
    pressure = ConntrackPressure(threshold=CONNTRACK_THRESHOLD_DEFAULT, emit=alerts, interval=INTERVAL)
    pressure.start([client, server])
    try:
        alerts.wait("conntrack_table_filling", server.inode)  # the first reading: full already
        before = ctlab.read(server).drop
        assert lab.tcp_connect(client, str(link.b_v4.ip), PORT, timeout=0.5) == "timeout"
        assert ctlab.read(server).drop > before  # conntrack itself refused the SYN
        n = alerts.wait("conntrack_table_full_drop", server.inode)
        doc = _check_table_alert(n, server)
        assert doc["conntrack"]["delta"]["drop"] >= 1
        assert doc["conntrack"]["table"]["count"] == doc["conntrack"]["table"]["max"]
        assert doc["conntrack"]["table"]["ratio"] == 1.0
        assert "new connections refused" in doc["message"]
        assert alerts.of("conntrack_early_drop") == []  # ASSURED entries cannot be evicted
        assert alerts.of("conntrack_table_full_drop", client.inode) == []
    finally:
        pressure.stop()


def test_readings_agree_with_pyroute2(full_table):
    """The hand-read statistics (tracer.collectors.ctpressure) against pyroute2's Conntrack."""
    from pyroute2 import Conntrack

    _lab, _client, server, _link = full_table
    ct = Conntrack(netns=server.name)  # its socket is made lazily, in a thread of its own: not by entered()
    try:
        r = ctlab.read(server)
        per_cpu = ct.stat()
        assert (r.count, r.max) == (ct.count(), ct.conntrack_max_size())
    finally:
        ct.close()
    for name in ("drop", "early_drop", "insert_failed", "invalid"):
        assert getattr(r, name) == sum(cpu.get(name, 0) for cpu in per_cpu), name


def _syn_drop(netns: int, at_ns: int, **changes) -> KernelDrop:
    """A SYN refused by a full table, as the decoder makes it (build-machines.md): freed by
    nf_hook_slow at prerouting with NETFILTER_DROP, no chain verdict, no conntrack entry."""
    drop = KernelDrop(
        mono_ns=at_ns, wall_ns=time.time_ns(), reason="NETFILTER_DROP", location="nf_hook_slow+0xa1",
        stack=["nf_hook_slow+0xa1", "ip_sublist_rcv+0x1a2", "ip_list_rcv+0x10c"], netns=netns,
        hook="prerouting", subsystem="netfilter", packet=None, fingerprint=None, l3proto=0x0800,
        length=60, mark=0, ifindex=2, iif=2, dev_name="veth0b", process=None, conntrack=None, nf=None)
    return dataclasses.replace(drop, **changes)


def test_shape_of_a_conntrack_drop():
    assert attribution.conntrack_shaped(_syn_drop(1, 0), None, None)
    assert attribution.conntrack_shaped(_syn_drop(1, 0, hook="output"), None, None)
    accept = NfContext("fexit", "nftables", 2, "prerouting", "inet", "tracer_mark", "prerouting", 1)
    assert attribution.conntrack_shaped(_syn_drop(1, 0, nf=accept), None, None)
    not_conntrack = {
        "a rule freed it in nft_do_chain": {"subsystem": "nftables", "location": "nft_do_chain+0x3e8"},
        "after conntrack's hook": {"hook": "input"},
        "it had an entry": {"conntrack": ConntrackInfo("new", "original", (), 0, 0)},
        "not a netfilter verdict": {"reason": "NO_SOCKET", "subsystem": "socket"},
        "a table said drop": {"nf": dataclasses.replace(accept, table="fw", verdict=0)},
    }
    for why, changes in not_conntrack.items():
        assert not attribution.conntrack_shaped(_syn_drop(1, 0, **changes), None, None), why


def test_conntrack_full_from_real_pressure(full_table):
    """The attribution function with a real ConntrackPressure on the real full table."""
    lab, client, server, link = full_table
    pressure = ConntrackPressure(threshold=CONNTRACK_THRESHOLD_DEFAULT, emit=Alerts(), interval=INTERVAL)
    pressure.start([client, server])
    try:
        time.sleep(3 * INTERVAL)
        quiet_drop = _syn_drop(server.inode, time.monotonic_ns())
        time.sleep(3 * INTERVAL)
        # Full, but conntrack's drop counter did not move around that time: not conntrack's.
        assert attribution.conntrack_full(quiet_drop, None, None, pressure) is None
        at = time.monotonic_ns()
        assert lab.tcp_connect(client, str(link.b_v4.ip), PORT, timeout=0.3) == "timeout"
        drop = _syn_drop(server.inode, at)
        nf = attribution.conntrack_full(drop, None, None, pressure)
        assert nf is not None
        assert (nf.backend, nf.hook, nf.rule, nf.policy, nf.verdict) == ("conntrack", "prerouting", None, None, "drop")
        assert attribution.subsystem(drop, nf) == "conntrack"
        assert set(nf.to_ecs()) == {"backend", "hook", "verdict", "attribution"}  # no rule, no policy
        # The same drop in the client namespace, whose conntrack is idle: not conntrack's.
        assert attribution.conntrack_full(_syn_drop(client.inode, at), None, None, pressure) is None
        assert attribution.conntrack_full(drop, None, None, None) is None
    finally:
        pressure.stop()


def _lines(proc: subprocess.Popen) -> queue.Queue:
    out: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            out.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return out


@pytest.mark.bpf
def test_cli_watch_attributes_full_table_drop_to_conntrack(full_table):
    """`tracer watch --json`: the SYN's drop names conntrack (no rule, no policy), and the alert is there.

    Needs ConntrackPressure wired into the engine (Engine.start and _attribute)."""
    lab, client, server, link = full_table
    proc = subprocess.Popen(tracer_cmd("watch", "--json", "--netns", server.name, "--port", str(PORT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        lines = _lines(proc)
        wait_ready(lab, server)
        assert lab.tcp_connect(client, str(link.b_v4.ip), PORT, timeout=0.5) == "timeout"
        drop_ev, alert = None, None
        deadline = time.monotonic() + 20
        while (drop_ev is None or alert is None) and time.monotonic() < deadline:
            try:
                ev = orjson.loads(lines.get(timeout=0.5))
            except queue.Empty:
                continue
            if ev["event"]["dataset"] == "tracer.drop" and ev.get("destination", {}).get("port") == PORT:
                drop_ev = ev
            elif ev["event"].get("action") == "conntrack_table_full_drop":
                alert = ev
        assert drop_ev is not None, "no drop event for the SYN"
        validate(drop_ev)
        assert drop_ev["drop"]["subsystem"] == "conntrack", drop_ev
        assert drop_ev["drop"]["reason"] == "NETFILTER_DROP"
        nf = drop_ev["netfilter"]
        assert nf["backend"] == "conntrack" and nf["hook"] == "prerouting"
        assert "rule" not in nf and "policy" not in nf and "table" not in nf
        assert drop_ev["tcp"]["flags"] == ["SYN"] and drop_ev["netns"]["name"] == server.name
        assert alert is not None, "no conntrack_table_full_drop alert"
        validate(alert)
        assert alert["event"]["kind"] == "alert" and alert["netns"]["name"] == server.name
        assert alert["conntrack"]["table"]["count"] == alert["conntrack"]["table"]["max"]
    finally:
        stop_process(proc, signal.SIGTERM, 10)
