"""iptables-legacy attribution end to end: real namespaces, legacy rules, TRACE lines.

Every test runs only in namespaces its lab creates, and the `host_untouched`
fixture checks afterwards that the host's nf_log bindings, nftables ruleset
and legacy tables are exactly as before.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6

from tests.support import datagram, fields, fingerprint_of, send_and_wait, to_port, wait_for
from tracer import netns
from tracer.collectors.iptables import (
    NF_LOGGER,
    STATE_DIR,
    LegacyCollector,
    config_message,
    nfulnl_packet_msg,
    parse_packet_message,
    parse_save,
    parse_trace_prefix,
    payload_fingerprint,
    read_nf_log,
    write_nf_log,
)
from tracer.collectors.nft import MARK_TABLE, NftCollector
from tracer.filters import WatchFilter
from tracer.lab import Lab, Link
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
    started: list[tuple[NftCollector, LegacyCollector]] = []

    def start(namespaces: list[Netns], f: WatchFilter | None = None, **kw: Any) -> tuple[NftCollector, LegacyCollector]:
        f = f or WatchFilter()
        leg = LegacyCollector(f, **kw)
        nft = NftCollector(f, mark_legacy=leg)
        leg.on_ready = lambda: nft.update_namespaces(namespaces)
        started.append((nft, leg))
        leg.start(namespaces)
        nft.start(namespaces)
        return nft, leg

    yield start
    for nft, leg in started:
        nft.stop()
        leg.stop()


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
    from tracer import packet

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
    assert {ns.name: (read_nf_log(ns, IPV4), read_nf_log(ns, IPV6)) for ns in (client, server)} == before
    assert col.journal.path not in journals()
    assert MARK_TABLE not in lab.nft_list(server)


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
    _, col = collectors([client, server, other], WatchFilter(netns=server.name))
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
    assert sock.recv(4096)  # the acknowledgement
    return sock


@pytest.mark.root
def test_fallback_names_the_table_when_only_one_can_drop(lab: Lab, fw: tuple[Netns, Netns, Link], collectors: Any) -> None:
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
from tracer.filters import WatchFilter
from tracer.collectors.nft import NftCollector
from tracer.collectors.iptables import LegacyCollector
namespaces = [netns.by_name(name) for name in sys.argv[1:]]
legacy = LegacyCollector(WatchFilter())
legacy.start(namespaces)
nft = NftCollector(WatchFilter(), mark_legacy=legacy)
nft.start(namespaces)
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

    with structlog.testing.capture_logs() as logs, LegacyCollector(WatchFilter()) as col:
        col.start([])  # the next start cleans up, whatever it then watches
    assert (read_nf_log(server, IPV4), read_nf_log(server, IPV6)) == before
    assert not Path(journal).exists()
    assert "legacy.journalled_netns_gone" in {e["event"] for e in logs}


@pytest.mark.root
def test_binding_changed_by_someone_else_is_left_alone(lab: Lab, fw: tuple[Netns, Netns, Link], collectors: Any) -> None:
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
    col = LegacyCollector(WatchFilter(), poll_interval=0.1)
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
