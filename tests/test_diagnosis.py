"""Every cause of issue 10, diagnosed in a broken lab, and its printed fix applied.

For each scenario of tests/scenarios.py: the connection fails, a watch sees
the drop with `diagnosis.cause`, the fix names the right table, chain and
port, and running the printed fix commands (as a person would paste them)
makes the connection succeed. That last step is the real test of a fix.
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import time

import pytest

from tests.scenarios import SCENARIOS, Scenario, run_fix
from tests.support import Watch, tracer_cmd
from tests.test_firewalld import connect, firewalld_ok, fw_net  # noqa: F401 (fixtures used by name)
from tracer import netns
from tracer.event.schema import validate

pytestmark = [pytest.mark.root, pytest.mark.bpf]

#: Scenarios whose drop event carries the cause (the others are counters or need the host).
BY_EVENT = [n for n in SCENARIOS if n not in ("no_route", "conntrack_full")]


def _wait_cause(w: Watch, sc: Scenario, timeout: float = 6.0) -> dict:
    """Attempts the connection until a drop with the scenario's cause shows up."""
    def pred(ev: dict) -> bool:
        return ev.get("diagnosis", {}).get("cause") == sc.cause

    for _ in range(3):
        assert not sc.attempt(), f"{sc.name}: the connection should fail before the fix"
        try:
            return w.sink.wait_for(pred, timeout=timeout / 3)
        except AssertionError:
            continue
    causes = sorted({ev.get("diagnosis", {}).get("cause", "-") for ev in w.sink.events})
    raise AssertionError(f"{sc.name}: no drop diagnosed {sc.cause}; causes seen: {causes}; "
                         f"events: {w.sink.events[-5:]}")


def _check_fix_names(sc: Scenario, fix: list[str]) -> None:
    words = [w for cmd in fix for w in shlex.split(cmd)]
    text = " ".join(words)
    firewall = any(tool in words for tool in ("nft", "iptables", "ip6tables", "firewall-cmd"))
    if firewall and sc.fix_table is not None and not (sc.backend == "iptables-nft" and sc.fix_table == "filter"):
        assert sc.fix_table in text, (sc.name, fix)  # iptables' own default table goes without -t
    if firewall and sc.fix_chain is not None:
        assert sc.fix_chain in text, (sc.name, fix)
    if firewall and sc.fix_port is not None:
        assert str(sc.fix_port) in text, (sc.name, fix)
    for term in sc.fix_terms:
        assert term in text, (sc.name, term, fix)
    if sc.fix_ns.name is not None:
        assert all(shlex.split(c)[:4] == ["ip", "netns", "exec", sc.fix_ns.name] for c in fix), fix


@pytest.mark.parametrize("name", BY_EVENT)
def test_cause_and_fix(lab, name):
    sc = SCENARIOS[name](lab)
    w = Watch(netns_prefix=lab.prefix)
    try:
        ev = _wait_cause(w, sc)
    finally:
        w.stop()
    validate(ev)
    d = ev["diagnosis"]
    assert d["summary"] and d["evidence"], d
    if sc.cause == "closed_port":
        # Nothing to change in a firewall: the service must be started (the scenario's hand fix).
        assert d["fix"] == [], d
        run_fix(lab, sc.fix_ns, sc.hand_fix)
    else:
        assert d["fix"], d
        _check_fix_names(sc, d["fix"])
        run_fix(lab, sc.fix_ns, d["fix"])
    assert sc.attempt(), f"{sc.name}: still failing after the printed fix {d['fix']}"


@pytest.mark.parametrize(("family", "port"), [(4, 8080), (6, 5201)])
def test_firewalld_zone_cause_and_fix(fw_net, family, port):  # noqa: F811 (the fixture)
    """The real firewalld's zone public refuses the port: cause firewalld_zone, zone named, and the
    printed firewall-cmd fix (runtime and --permanent) opens it."""
    _lab, client, _server, link, fw = fw_net
    addr = str(link.b_v4.ip if family == 4 else link.b_v6.ip)
    w = Watch(netns_prefix=_lab.prefix)
    try:
        assert connect(client, addr, port, timeout=0.5) != "open"
        ev = w.sink.wait_for(lambda e: e.get("diagnosis", {}).get("cause") == "firewalld_zone", timeout=5)
    finally:
        w.stop()
    d = ev["diagnosis"]
    assert "zone public" in d["evidence"], d
    assert d["fix"][0].endswith(f"firewall-cmd --zone=public --add-port={port}/tcp"), d
    assert any("--permanent" in c for c in d["fix"]), d
    for line in d["fix"]:
        fw.run_fix(line)
    assert connect(client, addr, port) == "open"


# --- tracer diagnose ------------------------------------------------------------------------

def _diagnose(sc: Scenario, *extra: str, duration: float = 4.0) -> tuple[int, dict]:
    argv = tracer_cmd("diagnose", sc.target, "--port", str(sc.port), "--proto", sc.proto,
                      "--netns", sc.client.name or "", "--duration", str(duration), "--json", *extra)
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode in (0, 1), (res.returncode, res.stderr)
    report = json.loads(res.stdout)
    validate(report, "diagnose-report")
    return res.returncode, report


def _ours(report: dict, lab) -> list[dict]:
    """The causes found in this lab's namespaces (another test's lab may run at the same time)."""
    return [c for c in report["causes"] if (c["netns"] or "").startswith(lab.prefix)]


@pytest.mark.parametrize("name", ["default_policy_nft_v6", "nat_forward_missing", "no_route", "rule_order_ipt_v6"])
def test_diagnose_command_finds_the_cause_and_its_fix_works(lab, name):
    sc = SCENARIOS[name](lab)
    code, report = _diagnose(sc)
    found = [c for c in _ours(report, lab) if c["cause"] == sc.cause]
    assert code == 1 and found, report
    assert report["probe"]["verdict"] != "connected", report
    fix = next(c["fix"] for c in found if c["fix"])
    _check_fix_names(sc, fix) if sc.cause != "no_route" else None
    run_fix(lab, sc.fix_ns, fix)
    assert sc.attempt(), (name, fix)
    code, report = _diagnose(sc, duration=2.0)
    assert not _ours(report, lab), report
    assert report["probe"]["verdict"] == "connected", report


def test_diagnose_text_report_and_usage_errors(lab):
    sc = SCENARIOS["default_policy_nft_v6"](lab)
    argv = tracer_cmd("diagnose", sc.target, "--port", str(sc.port), "--netns", sc.client.name or "",
                      "--duration", "3")
    res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 1, res.stderr
    assert "default_policy" in res.stdout and "fix: ip netns exec" in res.stdout, res.stdout
    assert "ruled out:" in res.stdout
    for bad in (["diagnose", "--port", "0"], ["diagnose", "198.18.0.1"], ["diagnose", "not an address!",
                "--port", "80"], ["diagnose", "198.18.0.1", "--port", "80", "--netns", "no-such-ns-here"]):
        res = subprocess.run(tracer_cmd(*bad), capture_output=True, text=True, timeout=60, check=False)
        assert res.returncode == 2, (bad, res.stdout, res.stderr)
        assert "Traceback" not in res.stderr and "error" in res.stderr, res.stderr


def test_conntrack_full_is_diagnosed(lab):
    """A lab namespace's table filled to the global limit: cause conntrack_full, and the fix raises the
    global nf_conntrack_max on the host. Applying it is the VM's test (tests/test_vm_conntrack.py): the
    host's global sysctls are never changed here."""
    sc = SCENARIOS["conntrack_full"](lab)
    w = Watch(netns_prefix=lab.prefix)
    try:
        ev = _wait_cause(w, sc, timeout=15.0)
    finally:
        w.stop()
    d = ev["diagnosis"]
    assert len(d["fix"]) == 1 and d["fix"][0].startswith("sysctl -w net.netfilter.nf_conntrack_max="), d
    assert any("nf_conntrack_max" in e for e in d["evidence"]), d


def test_no_route_back_shows_as_counter_events_in_a_watch(lab):
    """The SYN-ACK with no route back never passes kfree_skb: the watch reports the server's counters."""
    sc = SCENARIOS["no_route"](lab)
    w = Watch(netns_prefix=lab.prefix)
    try:
        assert not sc.attempt()
        deadline = time.monotonic() + 6
        rose: list[dict] = []
        while time.monotonic() < deadline and not rose:
            time.sleep(0.3)
            rose = [c for c in w.sink.counters if c["counter"]["name"] == "IpOutNoRoutes"
                    and c["netns"].get("name") == sc.server.name]
    finally:
        w.stop()
    assert rose, w.sink.counters
    ev = rose[0]
    validate(ev)
    assert ev["event"]["dataset"] == "tracer.counter" and ev["counter"]["delta"] >= 1
    assert "route" in ev["counter"]["meaning"]


def test_hostile_names_are_quoted_in_a_fix_that_still_works(lab, tmp_path):
    """A namespace's owner names the table and chain to break a pasted command: the fix still runs
    exactly the nft command meant (no shell expansion), and the connection then succeeds."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    canary = tmp_path / "pwned"
    table, chain = f"t $(touch {canary})", "in'put; id"
    # nft's text syntax cannot name such a table; netlink (here through libnftables JSON) can.
    lab.run(server, ["nft", "-j", json.dumps({"nftables": [
        {"add": {"table": {"family": "inet", "name": table}}},
        {"add": {"chain": {"family": "inet", "table": table, "name": chain, "type": "filter", "hook": "input",
                           "prio": 0, "policy": "drop"}}}]})])
    lab.listen(server, 6060)
    target = str(link.b_v4.ip)
    w = Watch(netns_prefix=lab.prefix)
    try:
        assert lab.tcp_connect(client, target, 6060, timeout=0.5) != "open"
        ev = w.sink.wait_for(lambda e: e.get("diagnosis", {}).get("cause") == "default_policy", timeout=5)
    finally:
        w.stop()
    [cmd] = ev["diagnosis"]["fix"]
    words = shlex.split(cmd)
    assert words[:6] == ["ip", "netns", "exec", server.name, "nft", "-j"], words
    rule = json.loads(words[6])["nftables"][0]["add"]["rule"]
    assert (rule["table"], rule["chain"]) == (table, chain)
    run_fix(lab, server, [cmd])
    assert not canary.exists()
    assert lab.tcp_connect(client, target, 6060) == "open"


def test_diagnose_command_reads_firewalld_zones(fw_net):  # noqa: F811 (the fixture)
    """With firewalld in use, the check reads the zone's verdict before any packet, the watch sees
    the reject, and the printed firewall-cmd fix makes `tracer diagnose` find nothing wrong."""
    lab, client, _server, link, fw = fw_net
    addr = str(link.b_v4.ip)

    def run(duration: str) -> tuple[int, dict]:
        argv = tracer_cmd("diagnose", addr, "--port", "8080", "--netns", client.name or "", "--duration",
                          duration, "--json")
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
        report = json.loads(res.stdout)
        validate(report, "diagnose-report")
        return res.returncode, report

    code, report = run("4")
    # The check (before any packet) and the drops of the attempts are one finding: the drops'.
    [found] = [c for c in _ours(report, lab) if c["cause"] == "firewalld_zone"]
    assert code == 1 and found["source"] == "drops" and found["count"] >= 1, report
    assert "firewalld's verdict for a new connection: reject" in found["evidence"], found
    fix = found["fix"]
    assert fix[0].endswith("firewall-cmd --zone=public --add-port=8080/tcp"), fix
    for line in fix:
        fw.run_fix(line)
    _code, report = run("2")
    assert not _ours(report, lab) and report["probe"]["verdict"] == "connected", report
    assert any(c["check"] == "firewalld" and c["result"] == "ok" for c in report["checks"]), report["checks"]


def test_a_service_bound_to_loopback_only_is_named(lab):
    """NO_SOCKET although a socket listens: on 127.0.0.1 only. The diagnosis says where it listens."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    with netns.entered(server):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.bind(("127.0.0.1", 7171))
        sock.listen(8)
        w = Watch(netns_prefix=lab.prefix)
        try:
            assert lab.tcp_connect(client, str(link.b_v4.ip), 7171) == "refused"
            ev = w.sink.wait_for(lambda e: e.get("diagnosis", {}).get("cause") == "closed_port", timeout=5)
        finally:
            w.stop()
    d = ev["diagnosis"]
    assert "listens only on 127.0.0.1" in d["summary"] and d["fix"] == [], d


def test_rule_order_over_iptables_legacy(lab):
    """iptables-legacy: the evaluator reads the table's -S lines, so a DROP before an ACCEPT that
    matches is rule_order, and the fix moves the ACCEPT's own match above it by line number."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    for rule in ("-A INPUT -i lo -j ACCEPT", "-A INPUT -p tcp --dport 9090 -j DROP",
                 "-A INPUT -s 198.18.0.0/15 -p tcp -m multiport --dports 9090,9091 -j ACCEPT"):
        lab.run(server, ["iptables-legacy", *shlex.split(rule)])
    lab.listen(server, 9090)
    target = str(link.b_v4.ip)
    w = Watch(netns_prefix=lab.prefix)
    try:
        assert lab.tcp_connect(client, target, 9090) != "open"
        ev = w.sink.wait_for(lambda e: e.get("diagnosis", {}).get("cause") == "rule_order", timeout=8)
    finally:
        w.stop()
    d = ev["diagnosis"]
    assert ev["netfilter"]["backend"] == "iptables-legacy" and ev["netfilter"]["rule"]["handle"] == 2, ev
    [cmd] = d["fix"]
    assert shlex.split(cmd)[4:] == ["iptables-legacy", "-I", "INPUT", "2", "-s", "198.18.0.0/15", "-p", "tcp",
                                    "-m", "multiport", "--dports", "9090,9091", "-j", "ACCEPT"], cmd
    run_fix(lab, server, [cmd])
    assert lab.tcp_connect(client, target, 9090) == "open"
