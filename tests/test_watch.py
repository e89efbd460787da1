"""End to end: real BPF, real rulesets, real traffic between lab namespaces.

Each test builds a client/server lab, starts the engine in this process
(as `tracer watch` does), sends packets, and checks the events, every one
of them validated against the published JSON Schema.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import orjson
import pytest
from scapy.layers.inet import IP, TCP

from tests.support import SERVER_RULESET, root_ruleset, rule_handles, to_port, tracer_cmd, wait_ready
from tracer.config import host_networks
from tracer.event.schema import validate

pytestmark = [pytest.mark.root, pytest.mark.bpf]


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_rule_drop_names_table_chain_rule_and_state(net, watch, family):
    lab, client, server, link = net
    handles = rule_handles(lab, server)
    dst = str(link.b_v4.ip if family == "ipv4" else link.b_v6.ip)
    w = watch()
    assert lab.tcp_connect(client, dst, 443) == "timeout"
    ev = w.sink.wait_for(to_port(443, dst))
    nf = ev["netfilter"]
    assert nf["backend"] == "nftables" and nf["attribution"] == "nftrace"
    assert (nf["family"], nf["table"], nf["chain"], nf["base_chain"], nf["hook"]) == (
        "inet", "fw", "input", "input", "input")
    assert nf["rule"] == {"handle": handles["tcp dport 443 drop"], "text": "tcp dport 443 drop",
                          "comment": "legacy block"}
    assert nf["policy"] is False and nf["verdict"] == "drop"
    assert ev["drop"]["reason"] == "NETFILTER_DROP"
    assert ev["conntrack"]["state"] == "new" and ev["conntrack"]["direction"] == "original"
    assert ev["network"]["type"] == family and ev["network"]["direction"] == "ingress"
    assert ev["tcp"]["flags"] == ["SYN"]
    assert ev["netns"]["name"] == server.name
    assert ev["observer"]["ingress"]["interface"]["name"] == link.b_ifname


def test_user_chain_rule(net, watch):
    lab, client, server, link = net
    handles = rule_handles(lab, server)
    w = watch()
    lab.udp_send(client, str(link.b_v4.ip), 53)
    ev = w.sink.wait_for(to_port(53))
    nf = ev["netfilter"]
    assert (nf["chain"], nf["base_chain"], nf["hook"]) == ("checks", "input", "input")
    assert nf["rule"] == {"handle": handles["udp dport 53 drop"], "text": "udp dport 53 drop",
                          "comment": "no dns"}


def test_policy_drop(net, watch):
    lab, client, _server, link = net
    w = watch()
    assert lab.tcp_connect(client, str(link.b_v4.ip), 8080) == "timeout"
    ev = w.sink.wait_for(to_port(8080))
    nf = ev["netfilter"]
    assert nf["rule"] is None and nf["policy"] is True
    assert (nf["table"], nf["chain"], nf["base_chain"]) == ("fw", "input", "input")


def test_reply_dropped_without_established_rule(net, watch):
    """The server accepts port 22; its SYN-ACK dies in the client's input chain."""
    lab, client, _server, link = net
    w = watch()
    assert lab.tcp_connect(client, str(link.b_v4.ip), 22) == "timeout"
    ev = w.sink.wait_for(lambda e: e.get("source", {}).get("port") == 22)
    assert ev["tcp"]["flags"] == ["SYN", "ACK"]
    assert ev["conntrack"]["state"] == "established" and ev["conntrack"]["direction"] == "reply"
    nf = ev["netfilter"]
    assert (nf["table"], nf["chain"], nf["policy"]) == ("host", "input", True)
    assert ev["netns"]["name"] == client.name


def test_invalid_packet(net, watch):
    lab, client, _server, link = net
    w = watch()
    lab.send_ip(client, bytes(IP(src=str(link.a_v4.ip), dst=str(link.b_v4.ip)) /
                             TCP(sport=4242, dport=9999, flags="SF")))
    ev = w.sink.wait_for(to_port(9999))
    assert ev["conntrack"]["state"] == "invalid"
    assert ev["netfilter"]["rule"]["comment"] == "invalid"


def test_filters_leave_out_unwatched_traffic(net, watch):
    lab, client, _server, link = net
    w = watch(ports=(443,))
    lab.tcp_connect(client, str(link.b_v4.ip), 8080)
    lab.udp_send(client, str(link.b_v4.ip), 53)
    lab.tcp_connect(client, str(link.b_v4.ip), 443)
    w.sink.wait_for(to_port(443))
    time.sleep(0.5)
    assert {e["destination"]["port"] for e in w.sink.events} == {443}


def test_reason_and_host_filters(net, watch):
    lab, client, _server, link = net
    w = watch(hosts=host_networks([str(link.b_v6.ip)]), reasons=("NETFILTER_DROP",))
    lab.tcp_connect(client, str(link.b_v4.ip), 443)
    lab.tcp_connect(client, str(link.b_v6.ip), 443)
    w.sink.wait_for(to_port(443, str(link.b_v6.ip)))
    time.sleep(0.5)
    assert {e["destination"]["ip"] for e in w.sink.events} == {str(link.b_v6.ip)}


def test_drop_outside_netfilter_no_socket(lab, watch):
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    w = watch()
    lab.udp_send(a, str(link.b_v4.ip), 7777)
    ev = w.sink.wait_for(to_port(7777))
    assert ev["drop"]["reason"] == "NO_SOCKET"
    assert "netfilter" not in ev
    assert ev["drop"]["location"].startswith("__udp4_lib_rcv")


def test_ruleset_replaced_mid_watch(net, watch):
    lab, client, server, link = net
    w = watch(ports=(443,))
    lab.tcp_connect(client, str(link.b_v4.ip), 443)
    first = w.sink.wait_for(to_port(443))
    assert first["netfilter"]["rule"]["comment"] == "legacy block"
    lab.nft(server, "flush ruleset\n" + SERVER_RULESET.replace(
        'tcp dport 443 drop comment "legacy block"',
        'tcp dport 443 counter drop comment "replaced"'))
    handle = rule_handles(lab, server)["tcp dport 443 counter drop"]
    lab.tcp_connect(client, str(link.b_v4.ip), 443)
    ev = w.sink.wait_for(lambda e: to_port(443)(e) and e is not first
                         and e["netfilter"]["rule"]["comment"] == "replaced")
    assert ev["netfilter"]["rule"] == {"handle": handle, "text": "tcp dport 443 counter drop",
                                       "comment": "replaced"}


# ------------------------------------------------------------------ the CLI


def test_cli_watch_port_443_prints_within_a_second(net):
    """`tracer watch --port 443` in the root namespace sees a SYN dropped in the lab."""
    lab, client, server, link = net
    before = {ns.name: lab.nft_list(ns) for ns in (client, server)}
    proc = subprocess.Popen(tracer_cmd("watch", "--port", "443", "--count", "1", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_ready(lab, server)
        sent = time.time()
        lab.tcp_connect(client, str(link.b_v4.ip), 443, timeout=0.2)
        line = proc.stdout.readline()
        got = time.time()
        ev = orjson.loads(line)
        validate(ev)
        assert ev["netfilter"]["rule"]["text"] == "tcp dport 443 drop"
        assert ev["netfilter"]["hook"] == "input"
        assert ev["conntrack"]["state"] == "new"
        assert got - sent < 1.0, f"event printed {got - sent:.3f}s after the SYN"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert {ns.name: lab.nft_list(ns) for ns in (client, server)} == before


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_rulesets_identical_after_signal(net, sig):
    lab, client, server, _link = net
    root_before = root_ruleset()
    before = {ns.name: lab.nft_list(ns) for ns in (client, server)}
    proc = subprocess.Popen(tracer_cmd("watch", "--json"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(lab, server)
        assert "tracer_mark" in lab.nft_list(server)
        os.kill(proc.pid, getattr(signal, sig))
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == "SIGKILL":
        # A new start after a crash must find and leave everything clean too.
        proc = subprocess.run(tracer_cmd("watch", "--json", "--duration", "1"),
                              capture_output=True, text=True, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
    assert {ns.name: lab.nft_list(ns) for ns in (client, server)} == before
    assert root_ruleset() == root_before


def test_output_drop_names_the_sending_process(lab, watch):
    """A locally sent packet dropped in the output hook: egress, sender's pid and name."""
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    lab.nft(a, 'table ip out {\n chain output {\n type filter hook output priority 0;\n'
               ' tcp dport 9000 drop comment "no 9000"\n }\n}\n')
    w = watch()
    assert lab.tcp_connect(a, str(link.b_v4.ip), 9000, timeout=0.3) in ("timeout", "PermissionError")
    ev = w.sink.wait_for(to_port(9000))
    nf = ev["netfilter"]
    assert (nf["family"], nf["table"], nf["chain"], nf["hook"]) == ("ip", "out", "output", "output")
    assert nf["rule"]["comment"] == "no 9000"
    assert ev["network"]["direction"] == "egress"
    assert ev["process"]["pid"] == os.getpid()
    with open(f"/proc/{os.getpid()}/comm") as f:
        assert ev["process"]["name"] == f.read().strip()
    assert ev["observer"]["egress"]["interface"]["name"] == link.a_ifname
    assert "ingress" not in ev["observer"]


def test_untracked_packet(lab, watch):
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    lab.nft(b, """
table inet fw {
    chain raw { type filter hook prerouting priority raw; udp dport 5000 notrack; }
    chain input { type filter hook input priority filter; ct state untracked udp dport 5000 drop comment "untracked"; }
}
""")
    w = watch()
    lab.udp_send(a, str(link.b_v4.ip), 5000)
    ev = w.sink.wait_for(to_port(5000))
    assert ev["conntrack"] == {"state": "untracked"}
    assert ev["netfilter"]["rule"]["comment"] == "untracked"
    assert ev["drop"]["subsystem"] == "nftables"


def test_iptables_nft_rule(lab, watch):
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    lab.run(b, ["iptables-nft", "-A", "INPUT", "-p", "tcp", "--dport", "8443", "-j", "DROP",
                "-m", "comment", "--comment", "old app"])
    w = watch()
    lab.tcp_connect(a, str(link.b_v4.ip), 8443, timeout=0.3)
    ev = w.sink.wait_for(to_port(8443))
    nf = ev["netfilter"]
    assert (nf["backend"], nf["family"], nf["table"], nf["chain"], nf["hook"]) == (
        "iptables-nft", "ip", "filter", "INPUT", "input")
    assert nf["rule"]["iptables"] == '-A INPUT -p tcp -m tcp --dport 8443 -m comment --comment "old app" -j DROP'
    assert "tcp dport 8443" in nf["rule"]["text"] and nf["rule"]["comment"] == "old app"


def test_netns_proto_and_iface_filters(net, watch):
    lab, client, server, link = net
    w = watch(netns=server.name, proto="udp", iface=link.b_ifname)
    lab.tcp_connect(client, str(link.b_v4.ip), 443, timeout=0.2)   # tcp: filtered out
    lab.udp_send(client, str(link.b_v4.ip), 53)                    # udp into server: kept
    lab.udp_send(server, str(link.a_v4.ip), 4444)                  # udp into client: other netns
    w.sink.wait_for(to_port(53))
    time.sleep(0.5)
    assert [e["destination"]["port"] for e in w.sink.events] == [53]
    assert w.sink.events[0]["netns"]["name"] == server.name
