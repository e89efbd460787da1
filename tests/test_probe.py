"""`tracer probe` and `tracer pmtu` end to end, in a client - router - server lab.

The router's link to the server has MTU 1400; every test runs the real CLI
inside the client namespace and validates its JSON against the published
schemas (docs/probe.md).
"""

from __future__ import annotations

import sys

import orjson
import pytest

from tests.support import to_port
from tracer.cli.demo import PROBE_CLIENT_RULESET, ROUTER_BLOCKS_ICMP, build_probe_lab
from tracer.event.packet import decode
from tracer.event.schema import validate
from tracer.probe import marker as probe_marker

pytestmark = [pytest.mark.root]

@pytest.fixture
def path(lab):
    """client -- router -- server (tracer.lab.routed_path), server firewall and services."""
    p = build_probe_lab(lab)
    return lab, p.client, p.router, p.server, p.near, p.far


def tracer(lab, ns, *args: str, schema: str):
    res = lab.run(ns, [sys.executable, "-m", "tracer", *args, "--json"], check=False)
    docs = [orjson.loads(line) for line in res.stdout.splitlines() if line.strip()]
    for doc in docs:
        validate(doc, schema)
    return res.returncode, docs, res.stderr


def probe(lab, ns, *args: str):
    return tracer(lab, ns, "probe", *args, "--timeout", "0.5", "--retries", "1", schema="probe-result")


@pytest.mark.bpf  # each answer's fate on the client is checked with the drop engine
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_verdicts(path, family):
    lab, client, _router, _server, _near, far = path
    dst = str(far.b_v4.ip if family == "ipv4" else far.b_v6.ip)
    rc, results, err = probe(lab, client, dst, "--port", "443,80,444,445")
    assert rc == 1, err
    got = {r["target"]["port"]: r for r in results}
    assert got[443]["verdict"] == "open" and got[443]["rtt_ms"] > 0
    assert got[443]["answer"] == {"verdict": "open", "fate": "delivered"}
    assert "answer" not in got[444]  # nothing came back
    assert got[80]["verdict"] == "closed"
    assert got[444]["verdict"] == "filtered" and got[444]["probe"]["attempts"] == 2
    assert got[445]["verdict"] == "prohibited"
    assert got[445]["icmp"] == ({"type": 3, "code": 13} if family == "ipv4" else {"type": 1, "code": 1})
    assert got[445]["responder"] == dst
    rc, results, err = probe(lab, client, dst, "--proto", "udp", "--port", "7,53,446")
    got = {r["target"]["port"]: r["verdict"] for r in results}
    assert got == {7: "open", 53: "closed", 446: "prohibited"}
    rc, results, err = probe(lab, client, dst, "--proto", "icmp")
    assert rc == 0 and results[0]["verdict"] == "open"


@pytest.mark.bpf
def test_all_open_exits_0_and_usage_errors_exit_2(path):
    lab, client, _router, _server, _near, far = path
    rc, results, _err = probe(lab, client, str(far.b_v4.ip), "--port", "443")
    assert rc == 0 and results[0]["verdict"] == "open"
    res = lab.run(client, [sys.executable, "-m", "tracer", "probe", str(far.b_v4.ip), "--proto", "icmp",
                           "--port", "80"], check=False)
    assert res.returncode == 2 and "does not apply" in res.stderr
    res = lab.run(client, [sys.executable, "-m", "tracer", "probe", "no.such.host.invalid"], check=False)
    assert res.returncode == 2 and "cannot resolve" in res.stderr


@pytest.mark.bpf
def test_unreachable(path):
    lab, client, _router, _server, near, _far = path
    # The router has no route to 198.18.9.0/24 and says so with ICMP.
    _rc, results, _err = probe(lab, client, "198.18.9.9", "--port", "443")
    assert results[0]["verdict"] == "unreachable"
    assert results[0]["responder"] == str(near.b_v4.ip)
    assert results[0]["icmp"]["type"] == 3
    _rc, results, _err = probe(lab, client, "2001:db8:9::9", "--port", "443")
    assert results[0]["verdict"] == "unreachable"
    assert results[0]["responder"] == str(near.b_v6.ip) and results[0]["icmp"]["type"] == 1
    # The client itself has no route to 198.18.20.0/24.
    _rc, results, _err = probe(lab, client, "198.18.20.1", "--port", "443")
    assert results[0]["verdict"] == "unreachable" and results[0]["responder"] == "local"


@pytest.mark.bpf
def test_probe_dropped_by_own_output_rule_is_explained(path):
    lab, client, _router, _server, _near, far = path
    lab.nft(client, PROBE_CLIENT_RULESET)
    _rc, results, err = probe(lab, client, str(far.b_v4.ip), "--port", "8443", "--explain")
    r = results[0]
    assert r["verdict"] == "filtered", err
    assert "output rule" in r["detail"] and "tcp dport 8443 drop" in r["detail"], r["detail"]
    assert "egress policy" in r["detail"]
    drop = r["local_drops"][0]
    validate(drop)
    assert drop["probe"]["id"] == r["probe"]["id"]
    assert drop["netfilter"]["hook"] == "output" and drop["netfilter"]["table"] == "host"
    # A local reject rule answers like a closed port; the drop event tells them apart.
    _rc, results, err = probe(lab, client, str(far.b_v4.ip), "--port", "8444", "--explain")
    r = results[0]
    assert r["verdict"] == "prohibited", r
    assert "rejected here by output rule" in r["detail"] and "no legacy app" in r["detail"]


@pytest.mark.bpf
def test_probe_lost_upstream_says_so(path):
    lab, client, _router, _server, _near, far = path
    _rc, results, _err = probe(lab, client, str(far.b_v4.ip), "--port", "444", "--explain")
    r = results[0]
    assert r["verdict"] == "filtered" and "local_drops" not in r
    assert "lost upstream" in r["detail"]
    assert any("tracer watch --port 444" in s for s in r["next_steps"])


@pytest.mark.bpf
def test_server_side_event_carries_the_probe_id(path, watch):
    lab, client, _router, server, _near, far = path
    w = watch(netns=server.name)
    _rc, results, _err = probe(lab, client, str(far.b_v4.ip), "--port", "444")
    ev = w.sink.wait_for(to_port(444))
    assert ev["probe"]["id"] == results[0]["probe"]["id"]
    assert ev["netfilter"]["rule"]["comment"] == "silently dropped"


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pmtu_found_exactly(path, family):
    lab, client, _router, _server, near, far = path
    dst = str(far.b_v4.ip if family == "ipv4" else far.b_v6.ip)
    rc, (result,), err = tracer(lab, client, "pmtu", dst, schema="pmtu-result")
    assert rc == 0, err
    assert result["path_mtu"] == 1400 and result["verdict"] == "reduced"
    assert result["interface_mtu"] == 1500
    assert result["hop"] == str(near.b_v4.ip if family == "ipv4" else near.b_v6.ip)
    assert result["next_hop_mtu"] == 1400 and result["black_hole"] is False


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pmtu_black_hole(path, family):
    lab, client, router, _server, _near, far = path
    lab.nft(router, ROUTER_BLOCKS_ICMP)
    dst = str(far.b_v4.ip if family == "ipv4" else far.b_v6.ip)
    rc, (result,), err = tracer(lab, client, "pmtu", dst, "--timeout", "0.3", schema="pmtu-result")
    assert rc == 1, err
    assert result["verdict"] == "black_hole" and result["black_hole"] is True
    assert result["path_mtu"] == 1400
    assert "hop" not in result
    assert any("packet-too-big" in f or "destination-unreachable" in f for f in result["fix"])


def test_pmtu_over_tcp_where_echo_is_blocked(path):
    lab, client, _router, server, _near, far = path
    lab.nft(server, "table inet echo {\n chain input {\n type filter hook input priority filter;\n"
                    " icmp type echo-request drop\n }\n}\n")
    rc, (result,), err = tracer(lab, client, "pmtu", str(far.b_v4.ip), "--port", "443", schema="pmtu-result")
    assert rc == 0, err
    assert result["method"] == "tcp" and result["path_mtu"] == 1400


def test_marker_round_trip():
    from tracer.probe.reach import Target, build

    for proto, port in (("tcp", 443), ("udp", 53), ("icmp", None)):
        for dst in ("198.18.1.2", "2001:db8::2"):
            raw = bytes(build(Target(dst, dst, proto, port), 0x1a2b, source="198.18.0.1" if ":" not in dst
                              else "2001:db8::1"))
            hlen = 20 if ":" not in dst else 40
            assert probe_marker.recognise(decode(raw[:hlen], raw[hlen:hlen + 20])) == "tr-1a2b"
    assert probe_marker.recognise(None) is None


def test_result_schemas_reject_inconsistent_documents():
    from tracer.event.schema import errors

    good = {"target": {"host": "h", "ip": "198.18.1.2", "protocol": "tcp", "port": 443},
            "verdict": "open", "detail": "SYN-ACK", "probe": {"id": "tr-00ff", "attempts": 1}}
    assert errors(good, "probe-result") == []
    no_port = {**good, "target": {"host": "h", "ip": "198.18.1.2", "protocol": "tcp"}}
    assert errors(no_port, "probe-result")
    assert errors({**good, "verdict": "timeout"}, "probe-result")
    pmtu = {"target": {"host": "h", "ip": "198.18.1.2", "protocol": "icmp"}, "method": "icmp",
            "verdict": "black_hole", "black_hole": False, "detail": "x", "probes": [], "probe_ids": [],
            "path_mtu": 1400}
    assert errors(pmtu, "pmtu-result")
    assert errors({**pmtu, "black_hole": True}, "pmtu-result") == []
