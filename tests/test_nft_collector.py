"""End to end: real namespaces, real rulesets, real packets, real nftrace."""

from __future__ import annotations

import errno
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import structlog
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTRACE, nftsocket
from scapy.layers.inet import TCP, UDP

from tests.support import datagram, fields, fingerprint_of, send_and_wait, wait_for
from tracer import netns
from tracer.collectors.nftrace import (
    NftCollector,
    TraceMessage,
    TraceVerdict,
    _NetnsWatch,
    nft_trace_msg,
    parse_trace_message,
)
from tracer.config import Scope
from tracer.lab import Lab, Link
from tracer.netfilter.marking import MARK_TABLE, remove_stale_marking_tables
from tracer.netfilter.nftables import NftContext, parse_ruleset
from tracer.netns import Netns
from tracer.nlmsg import netfilter_socket, split_messages

pytestmark = pytest.mark.root

RULESET = """\
table inet fw {
  chain input { type filter hook input priority 0; policy drop;
    ct state established,related accept
    iif lo accept
    tcp dport 443 drop comment "legacy block"
    tcp dport 443 accept
    jump checks
  }
  chain checks { udp dport 53 drop comment "no dns"; }
}
"""

WAIT = 3.0


# --- helpers ----------------------------------------------------------------------


def nft_handles(lab: Lab, ns: Netns) -> dict[str, int]:
    """Rule text -> handle, as `nft -a list ruleset` shows them (-s: no counter values in the key)."""
    out = lab.run(ns, ["nft", "-a", "-s", "list", "ruleset"]).stdout
    return {m.group(1): int(m.group(2)) for m in re.finditer(r"^\t\t(.+) # handle (\d+)$", out, re.M)}


NETFILTER_FIELDS = (
    "family",
    "table",
    "chain",
    "base_chain",
    "hook",
    "handle",
    "text",
    "comment",
    "policy",
    "verdict",
    "backend",
    "iptables",
)


@contextmanager
def rulesets_unchanged(lab: Lab) -> Iterator[None]:
    """Asserts that `nft list ruleset` of every lab namespace and of the host is byte-identical afterwards.

    Lab namespaces are compared without counter values (`-s`): the test's own
    packets move the counters of iptables-nft rules.
    """
    root = netns.root()
    before = {ns.name: lab.nft_list(ns, stateless=True) for ns in lab.namespaces.values()}
    root_before = netns.run_in(root, ["nft", "list", "ruleset"]).stdout
    yield
    after = {ns.name: lab.nft_list(ns, stateless=True) for ns in lab.namespaces.values()}
    assert after == before
    assert netns.run_in(root, ["nft", "list", "ruleset"]).stdout == root_before


@pytest.fixture
def fw(lab: Lab) -> tuple[Netns, Netns, Link]:
    """client <-> server, RULESET loaded in the server."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(server, RULESET)
    return client, server, link


# --- verdicts ---------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_rule_policy_and_user_chain_verdicts(lab: Lab, fw: tuple[Netns, Netns, Link], v6: bool) -> None:
    client, server, link = fw
    handles = nft_handles(lab, server)
    with rulesets_unchanged(lab), NftCollector(Scope()) as col:
        col.start([client, server])
        assert col.marking_table(server.inode) == MARK_TABLE
        assert col.marking_table(client.inode) is None  # no base chains, nothing can drop there

        syn = datagram(link, TCP(sport=40000, dport=443, flags="S", seq=1000), v6)
        v = send_and_wait(lab, col, client, server, syn)
        assert fields(v, *NETFILTER_FIELDS) == {
            "family": "inet",
            "table": "fw",
            "chain": "input",
            "base_chain": "input",
            "hook": "input",
            "handle": handles['tcp dport 443 drop comment "legacy block"'],
            "text": "tcp dport 443 drop",
            "comment": "legacy block",
            "policy": False,
            "verdict": "drop",
            "backend": "nftables",
            "iptables": None,
        }
        assert v is not None
        assert (v.netns_inode, v.nfproto) == (server.inode, "ipv6" if v6 else "ipv4")
        assert (v.ct_state, v.ct_direction, v.ct_status) == ("new", "original", ())
        assert v.fingerprint == fingerprint_of(syn)

        dns = datagram(link, UDP(sport=40001, dport=53) / b"q", v6, ident=4243)
        assert fields(send_and_wait(lab, col, client, server, dns), *NETFILTER_FIELDS) == {
            "family": "inet",
            "table": "fw",
            "chain": "checks",
            "base_chain": "input",
            "hook": "input",
            "handle": handles['udp dport 53 drop comment "no dns"'],
            "text": "udp dport 53 drop",
            "comment": "no dns",
            "policy": False,
            "verdict": "drop",
            "backend": "nftables",
            "iptables": None,
        }

        other = datagram(link, TCP(sport=40002, dport=8080, flags="S", seq=7), v6, ident=4244)
        assert fields(send_and_wait(lab, col, client, server, other), *NETFILTER_FIELDS) == {
            "family": "inet",
            "table": "fw",
            "chain": "input",
            "base_chain": "input",
            "hook": "input",
            "handle": None,
            "text": None,
            "comment": None,
            "policy": True,
            "verdict": "drop",
            "backend": "nftables",
            "iptables": None,
        }
    assert MARK_TABLE not in lab.nft_list(server)


def test_plain_socket_connect_is_attributed(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    """A real TCP connect (kernel-built SYN): the drop is reported for the server namespace."""
    client, server, link = fw
    seen: list[TraceVerdict] = []
    with NftCollector(Scope(ports=(443,)), on_verdict=seen.append) as col:
        col.start([client, server])
        with netns.entered(client):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        with s:
            s.settimeout(0.3)
            with pytest.raises(OSError):
                s.connect((str(link.b_v4.ip), 443))
        assert wait_for(lambda: bool(seen))
    assert seen[0].text == "tcp dport 443 drop" and seen[0].comment == "legacy block"


def test_reject_rule_reports_reject(lab: Lab) -> None:
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(
        server,
        "table ip filt {\n chain in { type filter hook input priority 0; policy accept;\n"
        "  tcp dport 444 reject with tcp reset\n  udp dport 9 reject\n }\n}\n",
    )
    with rulesets_unchanged(lab), NftCollector(Scope()) as col:
        col.start([client, server])
        v = send_and_wait(lab, col, client, server, datagram(link, TCP(sport=1, dport=444, flags="S")))
        assert fields(v, "family", "table", "chain", "hook", "text", "verdict", "policy") == {
            "family": "ip",
            "table": "filt",
            "chain": "in",
            "hook": "input",
            "text": "tcp dport 444 reject with tcp reset",
            "verdict": "reject",
            "policy": False,
        }
        v = send_and_wait(lab, col, client, server, datagram(link, UDP(sport=1, dport=9), ident=7))
        assert fields(v, "text", "verdict") == {"text": "udp dport 9 reject", "verdict": "reject"}


def test_output_hook_drop(lab: Lab) -> None:
    """Locally generated packets are marked at output and the hook is reported."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(
        client, "table ip out {\n chain o { type filter hook output priority 0; policy accept; udp dport 7 drop; }\n}\n"
    )
    with rulesets_unchanged(lab), NftCollector(Scope()) as col:
        col.start([client, server])
        data = datagram(link, UDP(sport=5, dport=7) / b"x")
        v = send_and_wait(lab, col, client, client, data)
        assert fields(v, "table", "chain", "base_chain", "hook", "text") == {
            "table": "out",
            "chain": "o",
            "base_chain": "o",
            "hook": "output",
            "text": "udp dport 7 drop",
        }


# --- scoping ------------------------------------------------------------------------


def test_filter_scopes_marking(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    client, server, link = fw
    with rulesets_unchanged(lab), NftCollector(Scope(ports=(443,), hosts=("198.18.0.0/24",))) as col:
        col.start([client, server])
        dns = datagram(link, UDP(sport=40001, dport=53) / b"q")
        assert send_and_wait(lab, col, client, server, dns, timeout=1.0) is None
        v6_syn = datagram(link, TCP(sport=40000, dport=443, flags="S"), v6=True)
        assert send_and_wait(lab, col, client, server, v6_syn, timeout=1.0) is None
        syn = datagram(link, TCP(sport=40000, dport=443, flags="S"))
        assert fields(send_and_wait(lab, col, client, server, syn), "text") == {"text": "tcp dport 443 drop"}


def test_filter_netns_selects_namespaces(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    client, server, _ = fw
    lab.nft(client, "table inet c { chain i { type filter hook input priority 0; policy accept; }; }\n")
    with NftCollector(Scope(netns=server.name)) as col:
        col.start([client, server])
        assert set(col.watched) == {server.inode}
        assert col.marking_table(client.inode) is None
    assert MARK_TABLE not in lab.nft_list(client)


# --- iptables-nft -------------------------------------------------------------------


@pytest.mark.parametrize("v6", [False, True], ids=["iptables", "ip6tables"])
def test_iptables_nft_rule(lab: Lab, v6: bool) -> None:
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    tool = "ip6tables-nft" if v6 else "iptables-nft"
    lab.run(server, [tool, "-A", "INPUT", "-p", "udp", "--dport", "5353", "-j", "ACCEPT"])
    lab.run(server, [tool, "-A", "INPUT", "-p", "tcp", "--dport", "443", "-j", "DROP"])
    with rulesets_unchanged(lab), NftCollector(Scope()) as col:
        col.start([client, server])
        rs = col.ruleset(server.inode)
        assert rs is not None and rs.backend("ip6" if v6 else "ip", "filter") == "iptables-nft"
        syn = datagram(link, TCP(sport=40000, dport=443, flags="S"), v6)
        v = send_and_wait(lab, col, client, server, syn)
        assert fields(v, *NETFILTER_FIELDS) == {
            "family": "ip6" if v6 else "ip",
            "table": "filter",
            "chain": "INPUT",
            "base_chain": "INPUT",
            "hook": "input",
            "handle": nft_handles(lab, server)["tcp dport 443 counter drop"],
            "text": "tcp dport 443 counter drop",
            "comment": None,
            "policy": False,
            "verdict": "drop",
            "backend": "iptables-nft",
            "iptables": "-A INPUT -p tcp -m tcp --dport 443 -j DROP",
        }


# --- ruleset changes ----------------------------------------------------------------


def test_ruleset_replaced_mid_watch_reports_new_text(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    client, server, link = fw
    with NftCollector(Scope()) as col:
        col.start([client, server])
        syn = datagram(link, TCP(sport=40000, dport=443, flags="S"), ident=1)
        first = send_and_wait(lab, col, client, server, syn)
        assert fields(first, "text", "comment") == {"text": "tcp dport 443 drop", "comment": "legacy block"}

        # Same table name, so the new rule gets the same handle: only a fresh
        # listing can tell the two apart.
        lab.nft(
            server,
            "flush ruleset\n"
            "table inet fw {\n chain input { type filter hook input priority 0; policy accept;\n"
            "  ct state established,related accept\n  iif lo accept\n"
            '  tcp dport 443 counter reject comment "new policy"\n }\n'
            " chain checks { }\n}\n",
        )
        assert first is not None
        assert nft_handles(lab, server)['tcp dport 443 counter reject comment "new policy"'] == first.handle
        # Our table is owned: the user's `flush ruleset` leaves it in place.
        assert MARK_TABLE in lab.nft_list(server)
        syn2 = datagram(link, TCP(sport=40000, dport=443, flags="S"), ident=2)
        second = send_and_wait(lab, col, client, server, syn2)
        assert fields(second, "handle", "text", "comment", "verdict") == {
            "handle": first.handle,
            "text": "tcp dport 443 counter reject",
            "comment": "new policy",
            "verdict": "reject",
        }
    assert MARK_TABLE not in lab.nft_list(server)


def test_base_chains_appearing_later_get_marked(lab: Lab) -> None:
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    with NftCollector(Scope()) as col:
        col.start([client, server])
        assert col.marking_table(server.inode) is None
        assert lab.nft_list(server) == ""
        lab.nft(server, RULESET)
        assert wait_for(lambda: col.marking_table(server.inode) == MARK_TABLE)
        v = send_and_wait(lab, col, client, server, datagram(link, UDP(sport=1, dport=53) / b"x"))
        assert fields(v, "chain", "base_chain") == {"chain": "checks", "base_chain": "input"}
    assert MARK_TABLE not in lab.nft_list(server)


# --- the marking table's lifetime -------------------------------------------------------

CHILD = """
import subprocess, sys, time
from tracer import netns
from tracer.config import Scope
from tracer.collectors.nftrace import NftCollector
ns = netns.by_name(sys.argv[1])
col = NftCollector(Scope())
col.start([ns])
# A helper that outlives us must not keep the owning socket (and the table) alive.
helper = subprocess.Popen(["sleep", "120"], close_fds=False)
print("READY", col.marking_table(ns.inode), helper.pid, flush=True)
time.sleep(120)
"""


def test_marking_table_dies_with_sigkilled_tracer(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    _, server, _ = fw
    before = lab.nft_list(server)
    child = lab.spawn(server, [sys.executable, "-c", CHILD, server.name or ""], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        lines = iter(child.stdout.readline, "")
        _, table, helper_pid = next(line for line in lines if line.startswith("READY")).split()
        assert table == MARK_TABLE
        listing = lab.nft_list(server)
        assert f"table inet {MARK_TABLE}" in listing and "flags owner" in listing
        # Owned by a live tracer: neither the stale-table sweep nor the user can remove it.
        assert remove_stale_marking_tables([server]) == 0
        assert lab.run(server, ["nft", "delete", "table", "inet", MARK_TABLE], check=False).returncode != 0
        assert MARK_TABLE in lab.nft_list(server)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(5)
    assert os.path.exists(f"/proc/{helper_pid}")  # still running, killed by the lab
    assert wait_for(lambda: lab.nft_list(server) == before)


def test_stale_unowned_tables_are_removed(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    client, server, link = fw
    before = lab.nft_list(server)
    # What a crashed tracer without the owner flag would have left behind.
    lab.nft(
        server,
        f"table inet {MARK_TABLE} {{\n"
        " chain prerouting { type filter hook prerouting priority -350; policy accept; }\n}\n",
    )
    lab.nft(server, f"table ip {MARK_TABLE}_old {{ }}\n")
    with NftCollector(Scope()) as col:
        col.start([client, server])
        listing = lab.nft_list(server)
        assert f"{MARK_TABLE}_old" not in listing
        assert listing.count(f"table inet {MARK_TABLE} ") == 1 and "flags owner" in listing
        v = send_and_wait(lab, col, client, server, datagram(link, TCP(sport=2, dport=443, flags="S")))
        assert fields(v, "text") == {"text": "tcp dport 443 drop"}
    assert lab.nft_list(server) == before


def test_remove_stale_marking_tables_function(lab: Lab) -> None:
    ns = lab.add_ns("solo")
    lab.nft(ns, f"table inet {MARK_TABLE} {{ }}\ntable inet keep {{ }}\n")
    assert remove_stale_marking_tables([ns]) == 1
    assert lab.nft_list(ns) == "table inet keep {\n}\n"


# --- namespaces coming and going ---------------------------------------------------------


def test_update_namespaces_and_vanishing(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    client, server, link = fw
    extra = lab.add_ns("extra")
    lab.nft(extra, RULESET)
    ghost = Netns(inode=1, path="/var/run/netns/trl-does-not-exist", name="trl-does-not-exist")
    with structlog.testing.capture_logs() as logs, NftCollector(Scope()) as col:
        col.start([client, ghost])
        assert set(col.watched) == {client.inode}
        col.update_namespaces([client, server, extra])
        assert set(col.watched) == {client.inode, server.inode, extra.inode}
        assert col.marking_table(extra.inode) == MARK_TABLE
        # The namespace disappears while watched; the engine then stops listing it.
        lab.delete_ns("extra")
        col.update_namespaces([client, server])
        assert set(col.watched) == {client.inode, server.inode}
        v = send_and_wait(lab, col, client, server, datagram(link, TCP(sport=3, dport=443, flags="S")))
        assert fields(v, "text") == {"text": "tcp dport 443 drop"}
    events = {e["event"] for e in logs}
    assert "nft.netns_watch_failed" in events
    assert "nft.netns_vanished" in events


def test_root_namespace_untouched(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    client, server, _ = fw
    root = netns.root()
    with NftContext() as ctx:
        root_has_base_chains = bool(ctx.ruleset().base_chains())
    with rulesets_unchanged(lab), NftCollector(Scope()) as col:
        # Only hand the collector the host namespace when it has nothing to
        # mark: the test must never change the host's firewall.
        col.start([root, client, server] if not root_has_base_chains else [client, server])
        assert col.marking_table(root.inode) is None
        assert col.marking_table(server.inode) == MARK_TABLE
    assert "tracer" not in netns.run_in(root, ["nft", "list", "tables"]).stdout


def test_stop_is_idempotent_and_joins_threads(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    import threading

    client, server, _ = fw
    col = NftCollector(Scope())
    col.start([client, server])
    assert any(t.name.startswith("nft-trace-") for t in threading.enumerate())
    col.stop()
    col.stop()
    assert not any(t.name.startswith("nft-trace-") for t in threading.enumerate())
    assert col.wait_verdict(server.inode, b"x", 0.1) is None
    assert MARK_TABLE not in lab.nft_list(server)


# --- robustness ----------------------------------------------------------------------------


def test_malformed_trace_message_is_logged_not_fatal(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    client, server, link = fw
    with NftCollector(Scope()) as col:
        col.start([server])
        watch: _NetnsWatch = col._watches[server.inode]
        msg = nft_trace_msg()
        msg["header"]["type"] = TRACE_TYPE
        msg["nfgen_family"] = 1
        msg["attrs"] = [("NFTA_TRACE_TYPE", 3)]
        msg.encode()
        with structlog.testing.capture_logs() as logs:
            watch._handle(TRACE_TYPE, bytes(msg.data))
        assert [e["event"] for e in logs] == ["nft.malformed_trace"]
        v = send_and_wait(lab, col, client, server, datagram(link, TCP(sport=4, dport=443, flags="S")))
        assert fields(v, "text") == {"text": "tcp dport 443 drop"}


def test_parse_ruleset_reads_structure(lab: Lab) -> None:
    ns = lab.add_ns("parse")
    lab.nft(
        ns,
        """table inet fw {
  set blocked { type ipv4_addr; flags interval; elements = { 198.18.5.0/24, 198.18.6.1 }; }
  chain input { type filter hook input priority 0; policy drop; comment "main input";
    ip saddr @blocked drop
    tcp dport vmap { 22 : jump checks, 23 : goto more }
    tcp dport 443 counter reject with tcp reset comment "x y"
  }
  chain checks { udp dport 53 drop comment "no dns"; }
  chain more { jump checks; }
}
table netdev nd { chain ing { type filter hook ingress device "lo" priority -500; policy accept; }; }
""",
    )
    with netns.entered(ns):
        ctx = NftContext()
    with ctx:
        rs = ctx.ruleset()
    inp = rs.chain("inet", "fw", "input")
    assert inp is not None and (inp.hook, inp.priority, inp.policy, inp.type) == ("input", 0, "drop", "filter")
    assert inp.jumps == ("checks", "more")
    ing = rs.chain("netdev", "nd", "ing")
    assert ing is not None and (ing.hook, ing.device, ing.priority) == ("ingress", "lo", -500)
    texts = {r.text: (r.comment, r.position, r.chain) for r in rs.rules.values()}
    assert texts["tcp dport 443 counter reject with tcp reset"] == ("x y", 2, "input")
    assert texts["udp dport 53 drop"] == ("no dns", 0, "checks")
    assert [c.name for c in rs.base_chains_reaching("inet", "fw", "checks")] == ["input"]
    assert rs.backend("inet", "fw") == "nftables"
    assert parse_ruleset(rs.json, rs.text).rules == rs.rules


def test_recovers_after_lost_messages(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    """ENOBUFS (the reader fell behind): traces are ignored until the queue is empty, then read again."""
    client, server, link = fw
    with NftCollector(Scope()) as col:
        col.start([server])
        watch: _NetnsWatch = col._watches[server.inode]
        with structlog.testing.capture_logs() as logs:
            watch._lost(OSError(errno.ENOBUFS, "No buffer space available"))
        assert [(e["event"], e["messages_lost"]) for e in logs] == [("nft.trace_socket_error", True)]
        assert watch._reader is not None
        watch._reader.wake()  # as after a real ENOBUFS, the reader reads on until the queue is empty
        assert wait_for(lambda: not watch._discarding)
        v = send_and_wait(lab, col, client, server, datagram(link, TCP(sport=5, dport=443, flags="S")))
        assert fields(v, "text") == {"text": "tcp dport 443 drop"}


# --- the hand-written trace decoder ----------------------------------------------------

TRACE_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | nftsocket.NFT_MSG_TRACE
_VERDICT_CODES = {name: code for code, name in nft_trace_msg.verdict.verdict_code.ops.items()}


def pyroute2_trace(msg: bytes) -> TraceMessage:
    """What pyroute2's generic decoder makes of a trace, in parse_trace_message's terms."""
    decoded = nft_trace_msg(msg)
    decoded.decode()
    attrs = {}
    for name, value in decoded["attrs"]:
        if name == "NFTA_TRACE_VERDICT":
            value = _VERDICT_CODES[value.get_attr("NFTA_VERDICT_CODE")]
        attrs[name] = value
    return TraceMessage(decoded["nfgen_family"], attrs)


def test_fast_trace_decoder_agrees_with_pyroute2(lab: Lab, fw: tuple[Netns, Netns, Link]) -> None:
    """Real traces, read beside the collector's own socket, decoded by hand and by pyroute2."""
    client, server, link = fw
    probes = [
        datagram(link, TCP(sport=40000, dport=443, flags="S"), ident=11),  # rule drop
        datagram(link, TCP(sport=40000, dport=443, flags="S"), v6=True, ident=12),
        datagram(link, UDP(sport=40001, dport=53) / b"q", ident=13),  # jump, then drop in a user chain
        datagram(link, TCP(sport=40002, dport=8080, flags="S"), v6=True, ident=14),  # policy drop
    ]
    sock = netfilter_socket(server, 1 << (NFNLGRP_NFTRACE - 1))
    with sock, NftCollector(Scope()) as col:
        col.start([client, server])
        for data in probes:
            assert send_and_wait(lab, col, client, server, data) is not None
        traces = []
        while True:
            try:
                chunk = sock.recv(1 << 16, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            traces += [msg for mtype, _, msg in split_messages(chunk) if mtype == TRACE_TYPE]
    assert len(traces) >= 3 * len(probes)
    for msg in traces:
        assert parse_trace_message(msg) == pyroute2_trace(msg)
    decoded = [parse_trace_message(msg) for msg in traces]
    names = set().union(*(m.attrs for m in decoded))
    assert {
        "NFTA_TRACE_TABLE", "NFTA_TRACE_CHAIN", "NFTA_TRACE_ID", "NFTA_TRACE_TYPE", "NFTA_TRACE_VERDICT",
        "NFTA_TRACE_POLICY", "NFTA_TRACE_RULE_HANDLE", "NFTA_TRACE_NETWORK_HEADER", "NFTA_TRACE_TRANSPORT_HEADER",
        "NFTA_TRACE_IIF", "NFTA_TRACE_NFPROTO", "NFTA_TRACE_CT_STATE", "NFTA_TRACE_CT_DIRECTION", "NFTA_TRACE_CT_ID",
    } <= names
    codes = {m.attrs["NFTA_TRACE_VERDICT"] for m in decoded if "NFTA_TRACE_VERDICT" in m.attrs}
    assert {0, -1, -3} <= codes  # drop; continue (the marking rule); jump
    assert {m.family for m in decoded} == {1}  # NFPROTO_INET: the marking table and fw are inet tables
