"""iptables-legacy attribution end to end: real namespaces, legacy rules, TRACE lines.

Every test runs only in namespaces its lab creates, and the `host_untouched`
fixture checks afterwards that the host's nf_log bindings, nftables ruleset
and legacy tables are exactly as before.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from tests.support import datagram, fields, fingerprint_of, send_and_wait, to_port, wait_for
from tracer import netns
from tracer.collectors.nftrace import NftCollector
from tracer.collectors.xtrace import (
    LegacyCollector,
    config_message,
    nfulnl_packet_msg,
    parse_packet_message,
    parse_trace_prefix,
    payload_fingerprint,
)
from tracer.config import Scope
from tracer.lab import Lab, Link
from tracer.netfilter.marking import (
    MARK_TABLE,
    NF_LOGGER,
    STATE_DIR,
    MarkingCoordinator,
    read_nf_log,
    write_nf_log,
)
from tracer.netfilter.xtables import parse_save
from tracer.netns import Netns

WAIT = 3.0
IPV4, IPV6 = 2, 10


# --- guards and helpers ------------------------------------------------------------------


def host_state() -> dict[str, str]:
    """What a test must never change in the initial namespace (all read-only queries)."""
    root = netns.root()
    state = {f"nf_log/{pf}": read_nf_log(root, pf) for pf in (IPV4, IPV6)}
    state["nft"] = netns.run_in(root, ["nft", "list", "ruleset"]).stdout
    for tool, names in (("iptables-legacy-save", "ip_tables_names"), ("ip6tables-legacy-save", "ip6_tables_names")):
        # -save lists only tables already loaded; strip its timestamps and counters.
        out = netns.run_in(root, [tool]).stdout
        state[tool] = "\n".join(ln.split(" [")[0] for ln in out.splitlines() if not ln.startswith("#"))
        state[names] = Path(f"/proc/net/{names}").read_text()
    return state


@pytest.fixture(autouse=True)
def host_untouched() -> Iterator[None]:
    if os.geteuid() != 0:
        yield
        return
    before = host_state()
    yield
    assert host_state() == before


def legacy(lab: Lab, ns: Netns, *args: str, v6: bool = False) -> None:
    lab.run(ns, ["ip6tables-legacy" if v6 else "iptables-legacy", *args])


def journals() -> set[Path]:
    return set(STATE_DIR.glob("nf_log.*.json")) if STATE_DIR.exists() else set()


VERDICT_FIELDS = (
    "family", "table", "chain", "base_chain", "hook", "rule_number",
    "text", "iptables", "comment", "policy", "verdict",
)  # fmt: skip


@pytest.fixture
def fw(lab: Lab) -> tuple[Netns, Netns, Link]:
    """client <-> server; the server's INPUT drops 443, a user chain drops DNS, the policy drops the rest."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    for v6 in (False, True):
        legacy(lab, server, "-N", "checks", v6=v6)
        legacy(lab, server, "-A", "INPUT", "-i", "lo", "-j", "ACCEPT", v6=v6)
        legacy(lab, server, "-A", "INPUT", "-p", "udp", "-j", "checks", v6=v6)
        legacy(lab, server, "-A", "INPUT", "-p", "tcp", "--dport", "443", "-j", "DROP", v6=v6)
        legacy(lab, server, "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT", v6=v6)
        legacy(lab, server, "-A", "checks", "-p", "udp", "--dport", "53", "-m", "comment", "--comment", "no dns",
               "-j", "DROP", v6=v6)  # fmt: skip
        legacy(lab, server, "-P", "INPUT", "DROP", v6=v6)
    return client, server, link


@pytest.fixture
def collectors() -> Iterator[Any]:
    """Starts LegacyCollector + NftCollector as the engine does; stops both in the engine's order."""
    started: list[MarkingCoordinator] = []

    def start(namespaces: list[Netns], f: Scope | None = None, **kw: Any) -> tuple[NftCollector, LegacyCollector]:
        f = f or Scope()
        marking = MarkingCoordinator()
        leg = LegacyCollector(f, marking=marking, **kw)
        nft = NftCollector(f, marking=marking)
        started.append(marking)
        marking.start(namespaces)
        return nft, leg

    yield start
    for marking in started:
        marking.stop()


# --- pure parsing -------------------------------------------------------------------------


def test_trace_prefix_parsing() -> None:
    assert parse_trace_prefix("TRACE: filter:INPUT:rule:3 ") == parse_trace_prefix("TRACE: filter:INPUT:rule:3")
    p = parse_trace_prefix("TRACE: filter:my:chain:policy:12 ")
    assert p is not None and (p.table, p.chain, p.kind, p.number) == ("filter", "my:chain", "policy", 12)
    assert parse_trace_prefix("TRACE: raw:PREROUTING:return:1 ") is not None
    for other in ("", "NFLOG user prefix", "TRACE: filter:INPUT:rule:x ", "TRACE: filter:INPUT:jump:1 "):
        assert parse_trace_prefix(other) is None


def test_parse_save_and_what_can_drop() -> None:
    text = (
        "*filter\n:INPUT ACCEPT [3:120]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:web - [0:0]\n"
        "-A INPUT -j web\n-A web -p tcp -m tcp --dport 80 -m comment --comment \"no \\\"web\\\"\" -j REJECT\n"
        "COMMIT\n*mangle\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n"
        "-A INPUT -j MARK --set-xmark 0x1/0xffffffff\nCOMMIT\n"
    )
    tables = parse_save(text, "ip")
    filt, mangle = tables["filter"], tables["mangle"]
    assert filt.chains["web"].policy is None and filt.chains["FORWARD"].policy == "DROP"
    assert filt.rule("web", 1) == '-A web -p tcp -m tcp --dport 80 -m comment --comment "no \\"web\\"" -j REJECT'
    assert filt.rule("web", 2) is None
    assert filt.verdict_of(filt.chains["INPUT"].rules[0]) is None  # a jump
    assert filt.verdict_of(filt.chains["web"].rules[0]) == "reject"
    assert filt.can_drop_from("INPUT") and filt.can_drop_from("FORWARD") and not filt.can_drop_from("OUTPUT")
    assert not mangle.can_drop and filt.can_drop


def test_fast_packet_parser_agrees_with_the_message_class() -> None:
    payload = bytes(IP(src="198.18.0.1", dst="198.18.0.2", id=9) / UDP(sport=1, dport=53))
    msg = nfulnl_packet_msg()
    msg["header"]["type"] = (4 << 8) | 0
    msg["nfgen_family"] = IPV4
    msg["attrs"] = [
        ("NFULA_PACKET_HDR", {"hw_protocol": 0x0800, "hook": 1, "_pad": 0}),
        ("NFULA_PREFIX", "TRACE: filter:INPUT:rule:2 "),
        ("NFULA_IFINDEX_INDEV", 2),
        ("NFULA_MARK", 7),
        ("NFULA_PAYLOAD", payload),
    ]
    msg.encode()
    data = bytes(msg.data)
    decoded = nfulnl_packet_msg(data)
    decoded.decode()
    attrs = dict(decoded["attrs"])
    fast = parse_packet_message(data)
    assert (fast.pf, fast.hook, fast.prefix, fast.payload) == (
        decoded["nfgen_family"], attrs["NFULA_PACKET_HDR"]["hook"], attrs["NFULA_PREFIX"], attrs["NFULA_PAYLOAD"])
    assert (fast.pf, fast.hook, fast.payload) == (IPV4, 1, payload)


def test_payload_fingerprint_matches_the_bpf_side() -> None:
    """Headers split as the BPF program reads them: network header, then transport bytes."""
    from tracer.event import packet

    v4 = bytes(IP(src="198.18.0.1", dst="198.18.0.2", id=7) / TCP(sport=1, dport=443, flags="S"))
    assert payload_fingerprint(v4) == packet.fingerprint(v4[:40], v4[20:40])
    dest_opts = b"\x11\x00" + bytes(6)  # next header UDP, 8 bytes long
    v6 = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", nh=60)) + dest_opts + bytes(UDP(sport=5, dport=53))
    assert payload_fingerprint(v6) == packet.fingerprint(v6[:40], v6[48:56])
    frag = bytes(IP(src="198.18.0.1", dst="198.18.0.2", id=8, frag=3) / b"payload-bytes")
    assert payload_fingerprint(frag) == packet.fingerprint(frag[:40], b"")


# --- verdicts ------------------------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("v6", [False, True], ids=["iptables", "ip6tables"])
def test_rule_user_chain_and_policy(lab: Lab, fw: tuple[Netns, Netns, Link], collectors: Any, v6: bool) -> None:
    client, server, link = fw
    pf = IPV6 if v6 else IPV4
    before = {ns.name: (read_nf_log(ns, IPV4), read_nf_log(ns, IPV6)) for ns in (client, server)}
    nft, col = collectors([client, server])
    assert col.tracing(server.inode) and not col.tracing(client.inode)  # no legacy tables in the client
    assert nft.marking_table(server.inode) == MARK_TABLE and nft.marking_table(client.inode) is None
    assert read_nf_log(server, pf) == NF_LOGGER
    assert (read_nf_log(client, IPV4), read_nf_log(client, IPV6)) == before[client.name]

    syn = datagram(link, TCP(sport=40000, dport=443, flags="S", seq=1000), v6)
    assert fields(send_and_wait(lab, col, client, server, syn), *VERDICT_FIELDS) == {
        "family": "ip6" if v6 else "ip",
        "table": "filter",
        "chain": "INPUT",
        "base_chain": "INPUT",
        "hook": "input",
        "rule_number": 3,
        "text": "-p tcp -m tcp --dport 443 -j DROP",
        "iptables": "-A INPUT -p tcp -m tcp --dport 443 -j DROP",
        "comment": None,
        "policy": False,
        "verdict": "drop",
    }
    dns = datagram(link, UDP(sport=40001, dport=53) / b"q", v6, ident=4243)
    assert fields(send_and_wait(lab, col, client, server, dns), *VERDICT_FIELDS) == {
        "family": "ip6" if v6 else "ip",
        "table": "filter",
        "chain": "checks",
        "base_chain": "INPUT",
        "hook": "input",
        "rule_number": 1,
        "text": '-p udp -m udp --dport 53 -m comment --comment "no dns" -j DROP',
        "iptables": '-A checks -p udp -m udp --dport 53 -m comment --comment "no dns" -j DROP',
        "comment": "no dns",
        "policy": False,
        "verdict": "drop",
    }
    other = datagram(link, TCP(sport=40002, dport=8080, flags="S"), v6, ident=4244)
    v = send_and_wait(lab, col, client, server, other)
    assert fields(v, *VERDICT_FIELDS) == {
        "family": "ip6" if v6 else "ip",
        "table": "filter",
        "chain": "INPUT",
        "base_chain": "INPUT",
        "hook": "input",
        "rule_number": None,
        "text": None,
        "iptables": None,
        "comment": None,
        "policy": True,
        "verdict": "drop",
    }
    assert v is not None and v.netns_inode == server.inode and v.fingerprint == fingerprint_of(other)
    # Accepted packets have no verdict; nor does the client, which is not traced.
    ssh = datagram(link, TCP(sport=40003, dport=22, flags="S"), v6, ident=4245)
    assert send_and_wait(lab, col, client, server, ssh) is None

    nft.stop()
    col.stop()
    if not foreign_users(server):
        assert {ns.name: (read_nf_log(ns, IPV4), read_nf_log(ns, IPV6)) for ns in (client, server)} == before
        assert MARK_TABLE not in lab.nft_list(server)
    assert col.journal.path not in journals()


@pytest.mark.root
def test_reject_in_output_hook(lab: Lab, collectors: Any) -> None:
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    legacy(lab, client, "-A", "OUTPUT", "-p", "udp", "--dport", "9", "-j", "REJECT")
    _, col = collectors([client, server])
    data = datagram(link, UDP(sport=5, dport=9) / b"x")
    assert not lab.send_ip(client, data)  # the sender's own output hook refused it
    v = col.wait_verdict(client.inode, fingerprint_of(data), WAIT)
    assert fields(v, "table", "chain", "base_chain", "hook", "rule_number", "verdict", "iptables") == {
        "table": "filter",
        "chain": "OUTPUT",
        "base_chain": "OUTPUT",
        "hook": "output",
        "rule_number": 1,
        "verdict": "reject",
        "iptables": "-A OUTPUT -p udp -m udp --dport 9 -j REJECT --reject-with icmp-port-unreachable",
    }


@pytest.mark.root
def test_rules_changed_mid_watch_are_listed_again(lab: Lab, fw: tuple[Netns, Netns, Link], collectors: Any) -> None:
    client, server, link = fw
    _, col = collectors([client, server])
    syn = datagram(link, TCP(sport=1, dport=443, flags="S"), ident=1)
    assert fields(send_and_wait(lab, col, client, server, syn), "rule_number") == {"rule_number": 3}
    legacy(lab, server, "-I", "INPUT", "1", "-p", "tcp", "--dport", "443", "-s", str(link.a_v4.ip), "-j", "DROP")
    syn2 = datagram(link, TCP(sport=1, dport=443, flags="S"), ident=2)
    assert fields(send_and_wait(lab, col, client, server, syn2), "rule_number", "iptables") == {
        "rule_number": 1,
        "iptables": f"-A INPUT -s {link.a_v4.ip}/32 -p tcp -m tcp --dport 443 -j DROP",
    }


# --- which namespaces are touched -----------------------------------------------------------------


@pytest.mark.root
def test_tables_that_cannot_drop_are_left_alone_until_they_can(lab: Lab, collectors: Any) -> None:
    """Empty legacy tables: no binding, no marking. A DROP rule added later is found by the poll."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    legacy(lab, server, "-S")  # loads the filter table, empty with ACCEPT policies
    assert lab.run(server, ["cat", "/proc/net/ip_tables_names"]).stdout.split() == ["filter"]
    nft, col = collectors([client, server], poll_interval=0.2)
    assert not col.tracing(server.inode) and nft.marking_table(server.inode) is None
    assert read_nf_log(server, IPV4) == "nf_log_ipv4"

    legacy(lab, server, "-A", "INPUT", "-p", "tcp", "--dport", "443", "-j", "DROP")
    assert wait_for(lambda: nft.marking_table(server.inode) == MARK_TABLE)
    assert col.tracing(server.inode) and read_nf_log(server, IPV4) == NF_LOGGER
    v = send_and_wait(lab, col, client, server, datagram(link, TCP(sport=2, dport=443, flags="S")))
    assert fields(v, "table", "rule_number") == {"table": "filter", "rule_number": 1}


@pytest.mark.root
def test_nftables_marked_namespace_gets_legacy_tables_bound_first(lab: Lab, collectors: Any) -> None:
    """A namespace marked for its nftables chains, whose legacy tables cannot drop anything:
    TRACE lines of marked packets must still not reach the syslog logger."""
    ns = lab.add_ns("mixed")
    lab.nft(ns, "table inet fw { chain input { type filter hook input priority 0; policy accept; }; }\n")
    legacy(lab, ns, "-S")
    legacy(lab, ns, "-S", v6=True)
    nft, _ = collectors([ns])
    assert nft.marking_table(ns.inode) == MARK_TABLE
    assert (read_nf_log(ns, IPV4), read_nf_log(ns, IPV6)) == (NF_LOGGER, NF_LOGGER)


@pytest.mark.root
def test_filter_netns_limits_binding(lab: Lab, fw: tuple[Netns, Netns, Link], collectors: Any) -> None:
    client, server, _ = fw
    other = lab.add_ns("other")
    legacy(lab, other, "-A", "INPUT", "-j", "DROP")
    _, col = collectors([client, server, other], Scope(netns=server.name))
    assert set(col.watched) == {server.inode}
    assert col.tracing(server.inode) and read_nf_log(other, IPV4) == "nf_log_ipv4"


# --- fallback ---------------------------------------------------------------------------------


def hold_group_zero(ns: Netns) -> socket.socket:
    """Another nfnetlink_log listener on group 0 (as ulogd could be): we cannot bind it then."""
    with netns.entered(ns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    sock.bind((0, 0))
    sock.send(config_message(1, [("NFULA_CFG_CMD", 1)]))
    sock.settimeout(2)
    ack = sock.recv(4096)
    assert struct.unpack_from("=i", ack, 16)[0] == 0, "group 0 is bound already"
    return sock


@pytest.mark.root
def test_fallback_names_the_table_when_only_one_can_drop(
    lab: Lab, fw: tuple[Netns, Netns, Link], collectors: Any,
) -> None:
    client, server, link = fw
    legacy(lab, server, "-t", "mangle", "-A", "PREROUTING", "-j", "MARK", "--set-mark", "1")
    legacy(lab, server, "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "7", "-j", "DROP")
    busy = hold_group_zero(server)
    try:
        with structlog.testing.capture_logs() as logs:
            _, col = collectors([client, server])
        assert "legacy.trace_unavailable" in {e["event"] for e in logs}
        assert not col.tracing(server.inode)
        assert read_nf_log(server, IPV4) == "nf_log_ipv4"  # untouched: nothing journalled either
        assert send_and_wait(lab, col, client, server, datagram(link, TCP(sport=3, dport=443, flags="S"))) is None
        assert col.table_candidates(server.inode, "input", "ip") == ["filter"]
        assert col.table_candidates(server.inode, "prerouting", "ip") == ["raw"]
        assert col.table_candidates(server.inode, "output", "ip") == []
        assert col.table_candidates(server.inode, "input", "ip6") == ["filter"]
        legacy(lab, server, "-t", "mangle", "-A", "INPUT", "-p", "tcp", "--dport", "25", "-j", "DROP")
        assert col.table_candidates(server.inode, "input", "ip") == ["mangle", "filter"]  # ambiguous
    finally:
        busy.close()


# --- leaving the host as it was ------------------------------------------------------------------

CHILD = """
import sys, time
from tracer import netns
from tracer.config import Scope
from tracer.collectors.nftrace import NftCollector
from tracer.collectors.xtrace import LegacyCollector
from tracer.netfilter.marking import MarkingCoordinator
namespaces = [netns.by_name(name) for name in sys.argv[1:]]
marking = MarkingCoordinator()
legacy = LegacyCollector(Scope(), marking=marking)
nft = NftCollector(Scope(), marking=marking)
marking.start(namespaces)
print("READY", legacy.journal.path, flush=True)
time.sleep(120)
"""


@pytest.mark.root
def test_bindings_restored_after_sigkill_and_restart(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    client, server, _ = fw
    doomed = lab.add_ns("doomed")  # vanishes while the tracer is dead
    legacy(lab, doomed, "-A", "INPUT", "-j", "DROP")
    write_nf_log(server, IPV6, "NONE")  # a non-default binding must come back as it was
    before = (read_nf_log(server, IPV4), read_nf_log(server, IPV6))
    assert before == ("nf_log_ipv4", "NONE")

    child = lab.spawn(client, [sys.executable, "-c", CHILD, server.name or "", doomed.name or ""],
                      stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert child.stdout is not None
        _, journal = next(ln for ln in iter(child.stdout.readline, "") if ln.startswith("READY")).split()
        recorded = json.loads(Path(journal).read_text())
        assert recorded["pid"] == child.pid
        assert {(b["name"], b["pf"], b["previous"]) for b in recorded["bindings"]} == {
            (server.name, IPV4, "nf_log_ipv4"),
            (server.name, IPV6, "NONE"),
            (doomed.name, IPV4, "nf_log_ipv4"),
        }
        assert (read_nf_log(server, IPV4), read_nf_log(server, IPV6)) == (NF_LOGGER, NF_LOGGER)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(5)
    # Dead tracer: the owned marking table went with it, the nf_log bindings did not.
    assert (read_nf_log(server, IPV4), read_nf_log(server, IPV6)) == (NF_LOGGER, NF_LOGGER)
    assert Path(journal).exists()
    lab.delete_ns("doomed")

    with structlog.testing.capture_logs() as logs, LegacyCollector(Scope()) as col:
        col.start([])  # the next start cleans up, whatever it then watches
    if not foreign_users(server):  # a tracer still using the binding keeps it
        assert (read_nf_log(server, IPV4), read_nf_log(server, IPV6)) == before
    assert not Path(journal).exists()
    assert "legacy.journalled_netns_gone" in {e["event"] for e in logs}


@pytest.mark.root
def test_binding_changed_by_someone_else_is_left_alone(
    lab: Lab, fw: tuple[Netns, Netns, Link], collectors: Any,
) -> None:
    client, server, _ = fw
    nft, col = collectors([client, server])
    assert read_nf_log(server, IPV4) == NF_LOGGER
    write_nf_log(server, IPV4, "NONE")  # an admin changes it while we run
    nft.stop()
    col.stop()
    assert read_nf_log(server, IPV4) == "NONE"
    assert col.journal.path not in journals()


@pytest.mark.root
def test_unwatched_namespace_is_restored_and_vanished_one_tolerated(
    lab: Lab, fw: tuple[Netns, Netns, Link], collectors: Any
) -> None:
    client, server, _ = fw
    extra = lab.add_ns("extra")
    legacy(lab, extra, "-A", "INPUT", "-j", "DROP")
    nft, col = collectors([client, server, extra])
    assert col.tracing(extra.inode) and col.tracing(server.inode)
    nft.update_namespaces([client, extra])
    col.update_namespaces([client, extra])
    assert not col.tracing(server.inode) and read_nf_log(server, IPV4) == "nf_log_ipv4"
    lab.delete_ns("extra")
    nft.update_namespaces([client])
    col.update_namespaces([client])
    assert col.watched == {client.inode: client}


@pytest.mark.root
def test_stop_is_idempotent_and_joins_threads(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    client, server, _ = fw
    col = LegacyCollector(Scope(), poll_interval=0.1)
    col.start([client, server])
    assert any(t.name.startswith("legacy-trace-") for t in threading.enumerate())
    col.stop()
    col.stop()
    assert not any(t.name.startswith(("legacy-trace-", "legacy-poll")) for t in threading.enumerate())
    assert col.wait_verdict(server.inode, b"x", 0.1) is None
    assert read_nf_log(server, IPV4) == "nf_log_ipv4"


# --- through the engine ---------------------------------------------------------------------------

@pytest.mark.root
@pytest.mark.bpf
def test_engine_reports_legacy_rule_and_policy(lab: Lab, fw: tuple[Netns, Netns, Link], watch) -> None:
    client, server, link = fw
    lab.listen(server, 22)
    w = watch(netns=server.name)
    engine, sink = w.engine, w.sink
    try:
        assert engine.legacy is not None and engine.legacy.tracing(server.inode)
        dst4, dst6 = str(link.b_v4.ip), str(link.b_v6.ip)
        assert lab.tcp_connect(client, dst4, 443) == "timeout"
        assert lab.tcp_connect(client, dst6, 8080) == "timeout"
        assert lab.tcp_connect(client, dst4, 22) == "open"

        ev = sink.wait_for(to_port(443, dst4))
        assert ev["netfilter"] == {
            "backend": "iptables-legacy",
            "family": "ip",
            "hook": "input",
            "table": "filter",
            "chain": "INPUT",
            "base_chain": "INPUT",
            "rule": {
                "handle": 3,
                "text": "-A INPUT -p tcp -m tcp --dport 443 -j DROP",
                "iptables": "-A INPUT -p tcp -m tcp --dport 443 -j DROP",
                "number": 3,
            },
            "policy": False,
            "verdict": "drop",
            "attribution": "nftrace",
        }
        assert ev["drop"]["reason"] == "NETFILTER_DROP" and ev["event"]["action"] == "dropped"
        assert ev["network"]["direction"] == "ingress" and ev["netns"]["name"] == server.name

        ev6 = sink.wait_for(to_port(8080, dst6))
        assert ev6["netfilter"]["rule"] is None and ev6["netfilter"]["policy"] is True
        assert (ev6["netfilter"]["family"], ev6["netfilter"]["table"], ev6["netfilter"]["chain"]) == (
            "ip6", "filter", "INPUT")
        assert not [e for e in sink.events if e["destination"]["port"] == 22]
    finally:
        w.stop()
    if not foreign_users(server):
        assert (read_nf_log(server, IPV4), read_nf_log(server, IPV6)) == ("nf_log_ipv4", "nf_log_ipv6")
        assert MARK_TABLE not in lab.nft_list(server)


@pytest.mark.root
@pytest.mark.bpf
def test_engine_fallback_names_only_the_table(lab: Lab, fw: tuple[Netns, Netns, Link], watch) -> None:
    """No trace possible (group 0 taken): the event still names the one table that can drop at input."""
    client, server, link = fw
    busy = hold_group_zero(server)
    w = watch(netns=server.name)
    try:
        assert w.engine.legacy is not None and not w.engine.legacy.tracing(server.inode)
        dst = str(link.b_v4.ip)
        assert lab.tcp_connect(client, dst, 443) == "timeout"
        nf = w.sink.wait_for(to_port(443, dst))["netfilter"]
        assert nf == {
            "backend": "iptables-legacy",
            "hook": "input",
            "table": "filter",
            "base_chain": "INPUT",
            "verdict": "drop",
            "attribution": "stack",
        }
    finally:
        w.stop()
        busy.close()
    assert read_nf_log(server, IPV4) == "nf_log_ipv4"


# --- hostile names and comments -------------------------------------------------------------------

NASTY_COMMENT = 'a\n-A INPUT -j ACCEPT\nCOMMIT\r\x1b[31m"q\\\' \x1c\u2028end'


def test_save_words_are_read_as_xtables_quotes_them() -> None:
    from tracer.netfilter.xtables import (
        rule_comment,
        rule_target,
        spaced_names,
        split_words,
    )

    line = '-A a\'b -m comment --comment "x \\"y\\" \\\\ \\\' z" -j a\'b'
    assert split_words(line) == ["-A", "a'b", "-m", "comment", "--comment", "x \"y\" \\ ' z", "-j", "a'b"]
    assert rule_target(line) == ("a'b", False)
    assert rule_comment(line) == "x \"y\" \\ ' z"
    assert rule_target("-A INPUT -g -Z") == ("-Z", True)
    assert rule_target('-A "q -p tcp -j "q') == ('"q', False)  # names after -A and -j are bare
    assert split_words("-A two words -j x", spaced_names(["two words", "x"]))[:2] == ["-A", "two words"]
    assert rule_comment('-A INPUT -m comment --comment "unterminated') == "unterminated"


def hostile_save() -> str:
    quoted = NASTY_COMMENT.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return (
        "# Generated by iptables-save\n*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ':"q - [0:0]\n:--modprobe=/tmp/x - [0:0]\n:-Z - [0:0]\n:a"b - [0:0]\n:two words - [0:0]\n'
        "-A INPUT -p tcp -m tcp --dport 1001 -j -Z\n"
        f"-A INPUT -p tcp -m tcp --dport 1003 -m comment --comment \"{quoted}\" -j DROP\n"
        '-A INPUT -p tcp -m tcp --dport 1006 -j "q\n'
        "-A INPUT -p tcp -m tcp --dport 1005 -j DROP\n"
        "-A INPUT -j DROP\n"
        '-A "q -j DROP\n'
        "-A --modprobe=/tmp/x -p tcp -j REJECT --reject-with icmp-port-unreachable\n"
        "-A -Z -j DROP\n"
        '-A a"b -j ACCEPT\n'
        "-A two words -j RETURN\n"
        "COMMIT\n# Completed\n"
    )


def test_parse_save_survives_hostile_names_and_comments() -> None:
    """Chains called `-Z`, `--modprobe=...`, `"q`, with spaces; a comment with line breaks that look
    like rules and COMMIT, CR, ESC, quotes: every rule keeps its number and text."""
    from tracer.netfilter.xtables import TableLayout

    text = hostile_save()
    layout = TableLayout(b"d", {"INPUT": 6, "FORWARD": 1, "OUTPUT": 1, '"q': 2, "--modprobe=/tmp/x": 2, "-Z": 2,
                                'a"b': 2, "two words": 2})  # fmt: skip
    for layouts in ({"filter": layout}, {"filter": layout, "raw": TableLayout(b"r", {"OUTPUT": 1})}):
        filt = parse_save(text, "ip", layouts)["filter"]
        assert all(c.trusted for c in filt.chains.values())
        assert set(filt.chains) == {"INPUT", "FORWARD", "OUTPUT", '"q', "--modprobe=/tmp/x", "-Z", 'a"b', "two words"}
        assert len(filt.chains["INPUT"].rules) == 5
        nasty = filt.rule("INPUT", 2)
        assert nasty is not None and "\n" in nasty and rule_comment_of(nasty) == NASTY_COMMENT
        assert filt.verdict_of(nasty) == "drop"
        assert filt.rule("INPUT", 3) == '-A INPUT -p tcp -m tcp --dport 1006 -j "q'
        assert filt.rule("INPUT", 4) == "-A INPUT -p tcp -m tcp --dport 1005 -j DROP"
        assert filt.rule("INPUT", 5) == "-A INPUT -j DROP"
        assert filt.verdict_of(filt.rule("INPUT", 1) or "") is None  # a jump to the chain -Z
        assert filt.rule("-Z", 1) == "-A -Z -j DROP"
        assert filt.rule("two words", 1) == "-A two words -j RETURN"
        assert filt.rule('"q', 1) == '-A "q -j DROP'
        assert filt.can_drop_from("INPUT")
    # The kernel has more rules in INPUT than either reading shows: that chain lends no text.
    short = TableLayout(b"d", {**layout.chains, "INPUT": 9})
    filt = parse_save(text, "ip", {"filter": short})["filter"]
    assert not filt.chains["INPUT"].trusted and filt.rule("INPUT", 4) is None
    assert filt.rule("-Z", 1) == "-A -Z -j DROP" and filt.can_drop_from("INPUT")
    # Tables the kernel does not have are not believed.
    assert "nat" not in parse_save(text + "*nat\n:PREROUTING ACCEPT [0:0]\nCOMMIT\n", "ip", {"filter": layout})
    # Read line by line (no layout to check against), the comment's line breaks make rules up.
    assert len(parse_save(text, "ip")["filter"].chains["INPUT"].rules) == 6


def test_parse_save_bare_word_with_a_quote_does_not_swallow_rules() -> None:
    """An interface name is printed bare: `"x` there is no quote, and the rules after it stay."""
    from tracer.netfilter.xtables import TableLayout

    text = ('*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -i "x -j DROP\n-A INPUT -m comment --comment "c" -j ACCEPT\n'
            "-A INPUT -p tcp -j DROP\nCOMMIT\n")  # fmt: skip
    filt = parse_save(text, "ip", {"filter": TableLayout(b"d", {"INPUT": 4})})["filter"]
    assert filt.chains["INPUT"].trusted
    assert filt.rule("INPUT", 1) == '-A INPUT -i "x -j DROP' and filt.rule("INPUT", 3) == "-A INPUT -p tcp -j DROP"


def rule_comment_of(line: str) -> str | None:
    from tracer.netfilter.xtables import rule_comment

    return rule_comment(line)


@pytest.fixture
def hostile(lab: Lab) -> Iterator[tuple[Netns, Netns, Link, Path]]:
    """A server whose legacy chains have hostile names, and a rule with a comment full of line breaks."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    marker = Path(f"/tmp/trx-{os.getpid()}")
    script = Path(f"/tmp/trs-{os.getpid()}")  # what `--modprobe=` would run: it must never run
    script.write_text(f"#!/bin/sh\ntouch {marker}\n")
    script.chmod(0o700)
    evil = f"--modprobe={script}"
    assert len(evil) <= 28
    lab.run(server, ["iptables-legacy-restore"], input=(
        f'*filter\n:INPUT ACCEPT [0:0]\n:-Z - [0:0]\n:{evil} - [0:0]\n:"q - [0:0]\n'
        f"-A -Z -j DROP\n-A {evil} -p tcp -j REJECT\nCOMMIT\n"))  # fmt: skip
    legacy(lab, server, "-A", '"q', "-j", "DROP")  # restore would read the quote
    legacy(lab, server, "-A", "INPUT", "-p", "tcp", "--dport", "1001", "-j", "-Z")
    legacy(lab, server, "-A", "INPUT", "-p", "tcp", "--dport", "1002", "-j", evil)
    legacy(lab, server, "-A", "INPUT", "-p", "tcp", "--dport", "1003", "-m", "comment", "--comment", NASTY_COMMENT,
           "-j", "DROP")  # fmt: skip
    legacy(lab, server, "-A", "INPUT", "-p", "tcp", "--dport", "1006", "-j", '"q')
    legacy(lab, server, "-A", "INPUT", "-p", "tcp", "--dport", "1005", "-j", "DROP")
    legacy(lab, server, "-A", "INPUT", "-j", "DROP")
    try:
        yield client, server, link, marker
    finally:
        script.unlink()
        marker.unlink(missing_ok=True)


@pytest.mark.root
def test_hostile_chain_names_and_comments_end_to_end(lab: Lab, hostile: Any, collectors: Any) -> None:
    client, server, link, marker = hostile
    evil = f"--modprobe=/tmp/trs-{os.getpid()}"
    _, col = collectors([client, server])

    def drop(port: int) -> dict[str, Any]:
        syn = datagram(link, TCP(sport=port, dport=port, flags="S"), ident=port)
        return fields(send_and_wait(lab, col, client, server, syn), "chain", "rule_number", "iptables", "comment",
                      "policy", "verdict")  # fmt: skip

    # Unconditional plain verdicts are traced as `return:1` / `policy:6` by the kernel: still rules.
    assert drop(1001) == {"chain": "-Z", "rule_number": 1, "iptables": "-A -Z -j DROP", "comment": None,
                          "policy": False, "verdict": "drop"}  # fmt: skip
    assert drop(1002) == {"chain": evil, "rule_number": 1, "comment": None, "policy": False, "verdict": "reject",
                          "iptables": f"-A {evil} -p tcp -j REJECT --reject-with icmp-port-unreachable"}  # fmt: skip
    nasty = drop(1003)
    assert (nasty["chain"], nasty["rule_number"], nasty["comment"]) == ("INPUT", 3, NASTY_COMMENT)
    assert nasty["iptables"].startswith("-A INPUT -p tcp -m tcp --dport 1003 -m comment --comment \"a\n-A INPUT")
    assert drop(1006) == {"chain": '"q', "rule_number": 1, "iptables": '-A "q -j DROP', "comment": None,
                          "policy": False, "verdict": "drop"}  # fmt: skip
    assert drop(1005) == {"chain": "INPUT", "rule_number": 5, "iptables": "-A INPUT -p tcp -m tcp --dport 1005 -j DROP",
                          "comment": None, "policy": False, "verdict": "drop"}  # fmt: skip
    assert drop(9) == {"chain": "INPUT", "rule_number": 6, "iptables": "-A INPUT -j DROP", "comment": None,
                       "policy": False, "verdict": "drop"}  # fmt: skip
    # Nothing ran a name as an option: counters of the chain `-Z` were not zeroed, no script ran.
    counts = lab.run(server, ["iptables-legacy", "-L", "INPUT", "-v", "-x", "-n"]).stdout.splitlines()[2]
    assert int(counts.split()[0]) >= 1
    assert not marker.exists()


# --- several tracers at once -------------------------------------------------------------------

RULE_443 = {"table": "filter", "chain": "INPUT", "rule_number": 3, "policy": False,
            "iptables": "-A INPUT -p tcp -m tcp --dport 443 -j DROP"}  # fmt: skip
POLICY = {"table": "filter", "chain": "INPUT", "rule_number": None, "policy": True, "iptables": None}


def role(col: LegacyCollector, ns: Netns) -> str | None:
    n = col._get(ns.inode)
    return n.trace.role if n is not None and n.trace is not None else None


def took_over(col: LegacyCollector, ns: Netns) -> bool:
    """After the holder stopped: `col` holds group 0 now, or reads it from whoever does (it may be
    another test run's tracer), and no longer from the holder that left."""
    holder = group_holder_pid(ns)
    return col.tracing(ns.inode) and (role(col, ns) == "holder" or holder not in (None, os.getpid()))


def verdicts(lab: Lab, link: Link, client: Netns, server: Netns, cols: list[LegacyCollector], dport: int,
             ident: int) -> list[dict[str, Any]]:  # fmt: skip
    """One SYN from the client, and what every tracer says dropped it."""
    syn = datagram(link, TCP(sport=ident, dport=dport, flags="S"), ident=ident)
    lab.send_ip(client, syn)
    found = [c.wait_verdict(server.inode, fingerprint_of(syn), WAIT) for c in cols]
    return [fields(v, "table", "chain", "rule_number", "policy", "iptables") for v in found]


def group_holder_pid(ns: Netns) -> int | None:
    from tracer.collectors.xtrace_relay import group_holder

    holder = group_holder(ns, 0)
    return holder.pid if holder is not None else None


def foreign_users(ns: Netns, ours: set[int] = frozenset()) -> set[int]:
    """Running tracers other than this test's that use the namespace's nf_log binding.

    Other test runs on the same machine watch every namespace, ours too: they may hold group 0
    here, or keep nfnetlink_log bound after we stop (rightly: they still use it).
    """
    from tracer.netfilter.marking import _live_users

    return {pid for pf in (IPV4, IPV6) for pid in _live_users(STATE_DIR, (ns.inode, pf))} - {os.getpid(), *ours}


def assert_host_as_before(server: Netns, client: Netns, before: tuple[str, str], lab: Lab | None = None) -> None:
    """nf_log bindings as before, no marking table, no relay socket or journal left, unless a
    foreign tracer still uses them."""
    if foreign_users(server):
        return
    assert (read_nf_log(server, IPV4), read_nf_log(server, IPV6)) == before
    assert shared_state_left(client, server) == []
    if lab is not None:
        assert MARK_TABLE not in lab.nft_list(server)


def shared_state_left(*nss: Netns) -> list[Path]:
    """Relay sockets and journals (a handover included) that still name these namespaces."""
    from tracer.collectors.xtrace_relay import relay_path

    left = [relay_path(STATE_DIR, ns.inode) for ns in nss if relay_path(STATE_DIR, ns.inode).exists()]
    inodes = {ns.inode for ns in nss}
    for path in journals():
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if any(b.get("netns_inode") in inodes for b in doc.get("bindings", [])):
            left.append(path)
    return left


@pytest.mark.root
@pytest.mark.parametrize("first_to_stop", ["holder", "subscriber"])
def test_tracers_share_group_zero_and_take_over(
    lab: Lab, fw: tuple[Netns, Netns, Link], collectors: Any, first_to_stop: str
) -> None:
    """Two tracers on one legacy namespace: both get the exact rule and the policy, whoever
    stops first; the one left (and a third that joins) keep full attribution; afterwards the
    nf_log bindings are as before and nothing is left in /run/tracer."""
    client, server, link = fw
    before = (read_nf_log(server, IPV4), read_nf_log(server, IPV6))
    nft_a, a = collectors([client, server])
    nft_b, b = collectors([client, server])
    ours = group_holder_pid(server) == os.getpid()  # else another test run's tracer has it
    assert (role(a, server), role(b, server)) == (("holder" if ours else "subscriber"), "subscriber")
    assert a.tracing(server.inode) and b.tracing(server.inode)
    assert verdicts(lab, link, client, server, [a, b], 443, 5001) == [RULE_443, RULE_443]
    assert verdicts(lab, link, client, server, [a, b], 8080, 5002) == [POLICY, POLICY]

    gone, stays = ((nft_a, a), (nft_b, b)) if first_to_stop == "holder" else ((nft_b, b), (nft_a, a))
    gone[0].stop()
    gone[1].stop()
    # The binding stays while the other tracer still needs it.
    assert (read_nf_log(server, IPV4), read_nf_log(server, IPV6)) == (NF_LOGGER, NF_LOGGER)
    left = stays[1]
    assert wait_for(lambda: took_over(left, server), 5)
    assert verdicts(lab, link, client, server, [left], 443, 5003) == [RULE_443]

    nft_c, c = collectors([client, server])  # a third one joins the one left
    assert role(c, server) == "subscriber"
    assert verdicts(lab, link, client, server, [left, c], 443, 5004) == [RULE_443, RULE_443]
    stays[0].stop()
    left.stop()
    assert wait_for(lambda: took_over(c, server), 5)
    assert verdicts(lab, link, client, server, [c], 8080, 5005) == [POLICY]
    assert read_nf_log(server, IPV4) == NF_LOGGER
    nft_c.stop()
    c.stop()
    assert_host_as_before(server, client, before, lab)


@pytest.mark.root
def test_group_held_by_another_program_is_named_and_recovered(
    lab: Lab, fw: tuple[Netns, Netns, Link], collectors: Any
) -> None:
    """A process that is no tracer binds group 0 itself: the warning names it; once it lets go,
    the tracer binds the group and attributes legacy drops."""
    client, server, link = fw
    assert wait_for(lambda: group_holder_pid(server) is None, 10)  # another test run's tracer may be quicker
    busy = hold_group_zero(server)
    comm = Path("/proc/self/comm").read_text().strip()
    try:
        with structlog.testing.capture_logs() as logs:
            nft, col = collectors([client, server], poll_interval=0.5)
            warned = [e for e in logs if e["event"] == "legacy.trace_unavailable"]
            assert len(warned) == 1, logs
            assert f"in netns {server.name} is held by pid {os.getpid()} ({comm})" in warned[0]["error"]
            assert not col.tracing(server.inode) and read_nf_log(server, IPV4) == "nf_log_ipv4"
            busy.close()
            assert wait_for(lambda: col.tracing(server.inode), 5)
            # Now that legacy tables are traced, nftables marks the namespace (the coordinator's legacy_ready).
            assert wait_for(lambda: nft.marking_table(server.inode) is not None, 5)
        assert "legacy.trace_recovered" in {e["event"] for e in logs}, logs
    finally:
        busy.close()
    assert role(col, server) in ("holder", "subscriber") and read_nf_log(server, IPV4) == NF_LOGGER
    assert verdicts(lab, link, client, server, [col], 443, 5011) == [RULE_443]


# --- the relay's own defences ----------------------------------------------------------------------


def test_relay_frames_are_bounded_and_typed() -> None:
    from tracer.collectors.xtrace_relay import (
        F_DRAIN,
        F_MESSAGE,
        FrameReader,
        RelayError,
        check_packet_message,
        frame,
    )

    reader = FrameReader({F_DRAIN: 0, F_MESSAGE: 100})
    data = frame(F_DRAIN) + frame(F_MESSAGE, b"x" * 10)
    assert reader.feed(data[:3]) == [] and reader.feed(data[3:]) == [(F_DRAIN, b""), (F_MESSAGE, b"x" * 10)]
    for bad in (frame(F_DRAIN, b"x"), frame(9), struct.pack("!IB", 1 << 31, F_MESSAGE)):
        with pytest.raises(RelayError):
            FrameReader({F_DRAIN: 0, F_MESSAGE: 100}).feed(bad)
    with pytest.raises(RelayError):
        check_packet_message(struct.pack("=IHHII", 99, 1024, 0, 0, 0) + bytes(8))  # says 99 bytes, has 24
    assert check_packet_message(struct.pack("=IHHII", 24, 1024, 0, 0, 0) + bytes(8)) == 1024


def fake_holder(path: Path, payload: bytes) -> threading.Thread:
    """A 'holder' that accepts one subscriber, sends it `payload` and holds the line a moment."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    os.chmod(path, 0o600)
    srv.listen(1)

    def serve() -> None:
        with srv:
            conn, _ = srv.accept()
            with conn:
                conn.sendall(payload)
                conn.settimeout(2)
                with contextlib.suppress(OSError):
                    conn.recv(100)  # until the subscriber hangs up
        path.unlink()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.mark.root
def test_subscriber_survives_a_broken_or_malicious_holder(tmp_path: Path) -> None:
    """Whatever a holder sends, the subscriber ends the connection and says why; it never raises
    into the reader, and a good stream is handed over exactly."""
    from tracer.collectors.xtrace_relay import (
        _HELLO,
        F_DRAINED,
        F_HELLO,
        F_LOST,
        F_MESSAGE,
        RELAY_VERSION,
        RelayClient,
        RelayError,
        frame,
        relay_path,
    )

    tmp_path.chmod(0o700)
    inode = 4242
    hello = frame(F_HELLO, _HELLO.pack(RELAY_VERSION, inode, 0))
    msg = struct.pack("=IHHII", 24, 1024, 0, 0, 0) + bytes(8)
    now = time.monotonic()
    cases = {
        "good": hello + frame(F_MESSAGE, msg) + frame(F_LOST, b"x") + frame(F_DRAINED, struct.pack("!d", now)),
        "huge": hello + struct.pack("!IB", 1 << 30, F_MESSAGE),
        "type": hello + frame(77, b"?"),
        "message": hello + frame(F_MESSAGE, msg[:-1]),
        "future": hello + frame(F_DRAINED, struct.pack("!d", now + 3600)),
        "nan": hello + frame(F_DRAINED, struct.pack("!d", float("nan"))),
        "backwards": hello + frame(F_DRAINED, struct.pack("!d", now)) + frame(F_DRAINED, struct.pack("!d", now - 1)),
        "hello twice": hello + hello,
    }
    for case, payload in cases.items():
        got: list[Any] = []
        closed = threading.Event()
        path = relay_path(tmp_path, inode)
        server = fake_holder(path, payload)
        # The callbacks run during this iteration only (the client is closed at its end).
        client = RelayClient(path, netns_inode=inode, cookie=0,
                             on_message=lambda t, m: got.append(("msg", t, m)),  # noqa: B023
                             on_drained=lambda t: got.append(("drained", t)),  # noqa: B023
                             on_lost=lambda r: got.append(("lost", r)),  # noqa: B023
                             on_closed=lambda r: (got.append(("closed", r)), closed.set()),  # noqa: B023
                             log=structlog.get_logger())  # fmt: skip
        try:
            assert client.connect() == os.getpid()
            assert closed.wait(5), case
        finally:
            client.close()
            server.join(5)
        reason = got[-1][1]
        if case == "good":
            assert got[:3] == [("msg", 1024, msg), ("lost", "x"), ("drained", now)]
            assert reason == "holder closed the connection"
        else:
            assert reason.startswith("protocol error"), (case, got)
    # A holder serving another namespace is refused at connect time.
    path = relay_path(tmp_path, inode)
    server = fake_holder(path, frame(F_HELLO, _HELLO.pack(RELAY_VERSION, inode + 1, 0)))
    client = RelayClient(path, netns_inode=inode, cookie=0, on_message=lambda t, m: None, on_drained=lambda t: None,
                         on_lost=lambda r: None, on_closed=lambda r: None, log=structlog.get_logger())  # fmt: skip
    with pytest.raises(RelayError, match="another namespace"):
        client.connect()
    client.close()
    server.join(5)


@pytest.mark.root
def test_holder_never_blocks_on_a_slow_subscriber(tmp_path: Path) -> None:
    """A subscriber that stops reading costs the holder a bounded queue; when it reads again it is
    told what it lost (LOST), and then gets the new messages."""
    from tracer.collectors.xtrace_relay import (
        F_DRAINED,
        F_HELLO,
        F_LOST,
        F_MESSAGE,
        SUBSCRIBER_BUFFER,
        FrameReader,
        RelayServer,
        relay_path,
    )

    tmp_path.chmod(0o700)
    server = RelayServer(state_dir=tmp_path, netns_inode=7, cookie=0, wake_source=lambda: None,
                         log=structlog.get_logger())  # fmt: skip
    server.start()
    try:
        assert stat.S_IMODE(os.stat(relay_path(tmp_path, 7)).st_mode) == 0o600
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(str(relay_path(tmp_path, 7)))
        assert wait_for(lambda: server.subscribers == 1)
        msg = struct.pack("=IHHII", 1024, 1024, 0, 0, 0) + bytes(1008)
        started = time.monotonic()
        for _ in range(5000):  # 5 MB: several times the queue
            server.message(msg)
        server.drained(time.monotonic())
        assert time.monotonic() - started < 2.0
        sub = server._subs[0]
        assert sub.queued <= SUBSCRIBER_BUFFER and sub.overflowed
        frames = read_frames(slow, FrameReader({F_HELLO: 17, F_MESSAGE: 2000, F_DRAINED: 8, F_LOST: 256}))
        assert frames[0][0] == F_HELLO and F_LOST not in {k for k, _ in frames}
        early = sum(k == F_MESSAGE for k, _ in frames)
        assert 0 < early < 5000
        server.message(msg)
        server.drained(time.monotonic())
        frames = read_frames(slow, FrameReader({F_HELLO: 17, F_MESSAGE: 2000, F_DRAINED: 8, F_LOST: 256}))
        kinds = [k for k, _ in frames]
        assert kinds == [F_LOST, F_MESSAGE, F_DRAINED], kinds
        assert b"messages dropped" in frames[0][1]
        slow.close()
    finally:
        server.close()
    assert not relay_path(tmp_path, 7).exists()


def read_frames(sock: socket.socket, reader: Any) -> list[tuple[int, bytes]]:
    """Every frame that arrives until the line is quiet for half a second."""
    frames: list[tuple[int, bytes]] = []
    sock.settimeout(0.5)
    while True:
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            return frames
        if not data:
            return frames
        frames += reader.feed(data)


@pytest.mark.root
def test_stale_relay_sockets_are_removed(tmp_path: Path) -> None:
    from tracer.collectors.xtrace_relay import cleanup_stale_sockets, relay_path

    tmp_path.chmod(0o700)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(relay_path(tmp_path, 1)))
    dead.close()  # a holder that was killed leaves its file
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(relay_path(tmp_path, 2)))
    live.listen(1)
    try:
        assert cleanup_stale_sockets(tmp_path, structlog.get_logger()) == 1
        assert not relay_path(tmp_path, 1).exists() and relay_path(tmp_path, 2).exists()
    finally:
        live.close()


# --- several tracers through the engine and the CLI ---------------------------------------------------

MIXED_NFT = """
table inet fw {
    chain input {
        type filter hook input priority -10; policy accept;
        tcp dport 8443 drop comment "nft says no"
    }
}
"""


def syn_from(lab: Lab, link: Link, client: Netns, sport: int, dport: int) -> None:
    lab.send_ip(client, datagram(link, TCP(sport=sport, dport=dport, flags="S"), ident=sport))


def from_port(sport: int, dport: int):
    return lambda ev: ev.get("source", {}).get("port") == sport and ev.get("destination", {}).get("port") == dport


LEGACY_443 = {"handle": 3, "text": "-A INPUT -p tcp -m tcp --dport 443 -j DROP",
              "iptables": "-A INPUT -p tcp -m tcp --dport 443 -j DROP", "number": 3}  # fmt: skip


@pytest.mark.root
@pytest.mark.bpf
def test_two_engines_on_a_mixed_namespace(lab: Lab, fw: tuple[Netns, Netns, Link], watch) -> None:
    """nftables and iptables-legacy in one namespace, two engines: both name the legacy rule and
    the nftables rule; the second keeps doing so when the first (the holder) stops."""
    client, server, link = fw
    lab.nft(server, MIXED_NFT)
    first = watch(netns=server.name)
    second = watch(netns=server.name)
    assert first.engine.legacy is not None and second.engine.legacy is not None
    ours = group_holder_pid(server) == os.getpid()  # else another test run's tracer has it
    assert (role(first.engine.legacy, server), role(second.engine.legacy, server)) == (
        "holder" if ours else "subscriber", "subscriber")
    syn_from(lab, link, client, 6001, 443)
    syn_from(lab, link, client, 6002, 8443)
    for w in (first, second):
        nf = w.sink.wait_for(from_port(6001, 443))["netfilter"]
        assert (nf["backend"], nf["table"], nf["chain"], nf["rule"]) == (
            "iptables-legacy", "filter", "INPUT", LEGACY_443)
        nf = w.sink.wait_for(from_port(6002, 8443))["netfilter"]
        assert (nf["backend"], nf["table"], nf["rule"]["text"]) == ("nftables", "fw", 'tcp dport 8443 drop')
    first.stop()
    legacy_b = second.engine.legacy
    assert wait_for(lambda: took_over(legacy_b, server), 5)
    syn_from(lab, link, client, 6003, 443)
    nf = second.sink.wait_for(from_port(6003, 443))["netfilter"]
    assert (nf["table"], nf["rule"], nf["attribution"]) == ("filter", LEGACY_443, "nftrace")
    second.stop()
    assert_host_as_before(server, client, ("nf_log_ipv4", "nf_log_ipv6"), lab)


class CliWatch:
    """`tracer watch --json` as a process: its events (stdout) and its logs (stderr), read by threads."""

    def __init__(self, *args: str) -> None:
        from tests.support import tracer_cmd

        env = {**os.environ, "TRACER_LOG_LEVEL": "info", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
        self.proc = subprocess.Popen(tracer_cmd("watch", "--json", *args), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env)  # fmt: skip
        self.events: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        for stream, into in ((self.proc.stdout, self.events), (self.proc.stderr, self.logs)):
            threading.Thread(target=self._read, args=(stream, into), daemon=True).start()

    def _read(self, stream: Any, into: list[dict[str, Any]]) -> None:
        for line in iter(stream.readline, b""):
            try:
                item = json.loads(line)
            except ValueError:
                item = {"event": line.decode(errors="replace")}
            with self._cond:
                into.append(item)
                self._cond.notify_all()

    def wait(self, into: list[dict[str, Any]], pred: Any, timeout: float = 20.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for item in into:
                    if pred(item):
                        return item
                left = deadline - time.monotonic()
                if left <= 0 or (self.proc.poll() is not None and not left):
                    raise AssertionError(f"nothing matched in {timeout}s; events {self.events}, logs {self.logs}")
                self._cond.wait(min(left, 0.5))

    def tracing(self, ns: Netns, role: str | None = None, after: int = 0) -> dict[str, Any]:
        """The log line that says this tracer reads the namespace's TRACE messages (as `role`)."""
        return self.wait(self.logs, lambda e: e.get("event") == "legacy.tracing" and e.get("netns") == ns.name
                         and role in (None, e.get("role")) and self.logs.index(e) >= after)  # fmt: skip

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            assert self.proc.wait(15) == (0 if sig == signal.SIGTERM else -sig), self.logs
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_two_cli_watches_then_a_third(lab: Lab, fw: tuple[Netns, Netns, Link], sig: signal.Signals) -> None:
    """Real `tracer watch` processes: the second shares the first's group 0, takes it over when
    the first stops (or is killed: its socket file and journal stay behind), and serves a third;
    all stopped, the host is as before."""
    client, server, link = fw
    before = (read_nf_log(server, IPV4), read_nf_log(server, IPV6))
    args = ("--netns", server.name or "", "--port", "443")
    started: list[CliWatch] = []
    try:
        one = CliWatch(*args)
        started.append(one)
        ours = one.tracing(server)["role"] == "holder"  # else another test run's tracer has it
        one.wait(one.logs, lambda e: e.get("event") == "nft.marking_table_added")
        two = CliWatch(*args)
        started.append(two)
        two.tracing(server, "subscriber")
        two.wait(two.logs, lambda e: e.get("event") == "nft.marking_table_added")
        syn_from(lab, link, client, 7001, 443)
        for w in (one, two):
            nf = w.wait(w.events, from_port(7001, 443))["netfilter"]
            assert (nf["backend"], nf["table"], nf["rule"]) == ("iptables-legacy", "filter", LEGACY_443)

        mark = len(two.logs)
        one.stop(sig)
        if ours:
            two.tracing(server, after=mark)  # bound group 0 itself, or subscribed to whoever did
        syn_from(lab, link, client, 7002, 443)
        assert two.wait(two.events, from_port(7002, 443))["netfilter"]["rule"] == LEGACY_443

        three = CliWatch(*args)
        started.append(three)
        three.tracing(server, "subscriber")
        three.wait(three.logs, lambda e: e.get("event") == "nft.marking_table_added")
        syn_from(lab, link, client, 7003, 443)
        for w in (two, three):
            assert w.wait(w.events, from_port(7003, 443))["netfilter"]["rule"] == LEGACY_443
        two.stop()
        three.stop()
    finally:
        for w in started:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait()
    assert_host_as_before(server, client, before, lab)
