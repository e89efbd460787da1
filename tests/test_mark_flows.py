"""Marking only what may be dropped: real nft, real traffic, in lab namespaces.

What is traced is read beside the tracer, on a trace socket of the test's
own in the namespace. A packet counts as marked by us when the trace shows
it leaving one of our table's marking rules (the `ports<v>`/`hosts<v>`
chains): another tracer running on the same machine may mark packets too,
and those are not ours to count.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, NFNLGRP_NFTABLES, NFNLGRP_NFTRACE, nftsocket

from tests.support import to_port, wait_for
from tracer import netns
from tracer.collectors.netfilter import NftraceCollector
from tracer.collectors.nftrace import NFT_TRACETYPE_RULE, NftCollector, TraceVerdict, flow_of, parse_trace_message
from tracer.config import Config, Scope
from tracer.lab import Lab, Link
from tracer.netfilter.marking import (
    FLOW_BURST,
    FLOW_RATE,
    MARK_TABLE,
    FlowKey,
    MarkingCoordinator,
    conntrack_in_use,
    flow_element,
    ruleset_uses_conntrack,
)
from tracer.netfilter.nftables import NftContext
from tracer.netns import Netns
from tracer.nlmsg import NFGEN_ATTRS, attributes, netfilter_socket, split_messages

TRACE_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | nftsocket.NFT_MSG_TRACE
NEWSETELEM = (NFNL_SUBSYS_NFTABLES << 8) | nftsocket.NFT_MSG_NEWSETELEM

#: Stateful: established connections are accepted first, as most rulesets do.
STATEFUL = """
table inet fw {
    chain raw {
        type filter hook prerouting priority raw;
        tcp dport 7300 drop comment "raw block"
    }
    chain input {
        type filter hook input priority filter; policy drop;
        tcp dport 7310 meta length > 200 drop comment "big"
        ct state established,related accept
        tcp dport { 7310, 7320 } accept
        tcp dport 7330 drop comment "closed"
        udp dport 7340 drop comment "flood"
    }
    chain count {
        type filter hook prerouting priority filter;
        tcp dport 7320 counter comment "seen"
    }
}
"""

#: Stateless: no conntrack in the namespace; the tracer must not turn it on.
STATELESS = """
table inet fw {
    chain input {
        type filter hook input priority filter; policy drop;
        tcp dport 7320 counter accept comment "seen"
        tcp dport 7330 drop comment "closed"
        udp dport 7340 drop comment "flood"
    }
}
"""

CT_RULE = "ct state established ct status assured return"


# --- helpers ------------------------------------------------------------------------


@dataclass(frozen=True)
class Traced:
    """One packet our marking table marked, as its traces showed it."""

    trace_id: int
    version: int
    l4proto: int
    sport: int
    dport: int
    tcp_flags: int


class Traces:
    """The nftrace messages of one namespace, read on a socket of the test's own."""

    def __init__(self, ns: Netns) -> None:
        self.sock = netfilter_socket(ns, 1 << (NFNLGRP_NFTRACE - 1))
        self.headers: dict[int, tuple[bytes, bytes]] = {}
        self.ours: set[int] = set()

    def close(self) -> None:
        self.sock.close()

    def read(self, table: str) -> list[Traced]:
        """Every packet marked by `table` so far (reads what is queued, then decodes)."""
        while True:
            try:
                chunk = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            for mtype, _, msg in split_messages(chunk):
                if mtype != TRACE_TYPE:
                    continue
                m = parse_trace_message(msg)
                tid = m.attrs.get("NFTA_TRACE_ID")
                if tid is None:
                    continue
                nh, th = m.attrs.get("NFTA_TRACE_NETWORK_HEADER"), m.attrs.get("NFTA_TRACE_TRANSPORT_HEADER")
                if nh and tid not in self.headers:
                    self.headers[tid] = (bytes(nh), bytes(th or b""))
                chain = m.attrs.get("NFTA_TRACE_CHAIN", "")
                if (m.attrs.get("NFTA_TRACE_TABLE") == table and m.attrs.get("NFTA_TRACE_TYPE") == NFT_TRACETYPE_RULE
                        and chain.startswith(("ports", "hosts"))):  # fmt: skip
                    self.ours.add(tid)
        return [_traced(tid, *self.headers[tid]) for tid in sorted(self.ours) if tid in self.headers]


def _traced(tid: int, nh: bytes, th: bytes) -> Traced:
    version = nh[0] >> 4
    l4proto = nh[9] if version == 4 else nh[6]
    sport = int.from_bytes(th[0:2], "big") if len(th) >= 4 else 0
    dport = int.from_bytes(th[2:4], "big") if len(th) >= 4 else 0
    flags = th[13] if l4proto == 6 and len(th) >= 14 else 0
    return Traced(tid, version, l4proto, sport, dport, flags)


@contextmanager
def traces(ns: Netns) -> Iterator[Traces]:
    t = Traces(ns)
    try:
        yield t
    finally:
        t.close()


def nft_counter(lab: Lab, ns: Netns, comment: str) -> int:
    for line in lab.nft_list(ns).splitlines():
        if f'comment "{comment}"' in line and "counter packets" in line:
            return int(line.split("counter packets ")[1].split()[0])
    raise AssertionError(f"no counter {comment!r}")


def conntrack_count(ns: Netns) -> int:
    with netns.entered(ns), open("/proc/sys/net/netfilter/nf_conntrack_count") as fh:  # follows the thread
        return int(fh.read())


def marking_listing(lab: Lab, ns: Netns, table: str | None) -> str:
    assert table is not None and table.startswith(MARK_TABLE)
    return lab.run(ns, ["nft", "list", "table", "inet", table]).stdout


def known_flows(lab: Lab, ns: Netns, table: str | None, version: int) -> str:
    """The elements of the set trace_flow fills (the per-flow budgets are in other sets)."""
    assert table is not None and table.startswith(MARK_TABLE)
    return lab.run(ns, ["nft", "list", "set", "inet", table, f"flows{version}"]).stdout


_MARKING_TABLE = re.compile(r"^table inet (tracer_mark\S*) \{.*?^\}\n", re.M | re.S)


def rulesets(lab: Lab) -> dict[str, str]:
    """`nft -s list ruleset` of every lab namespace, marking tables left out: another tracer
    running on this machine may mark the lab's namespaces at any time (ours is checked to
    be gone on its own)."""
    return {ns.name or "": _MARKING_TABLE.sub("", lab.nft_list(ns, stateless=True)) for ns in lab.namespaces.values()}


def marking_tables(lab: Lab) -> set[tuple[str, str]]:
    return {(ns.name or "", m.group(1)) for ns in lab.namespaces.values()
            for m in _MARKING_TABLE.finditer(lab.nft_list(ns))}  # fmt: skip


def transfer(lab: Lab, client: Netns, server: Netns, addr: str, port: int, size: int) -> int:
    """Sends `size` bytes over one TCP connection, read to the end by the server; returns
    how many the server got."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with netns.entered(server):
        listener = socket.socket(family, socket.SOCK_STREAM)
    got = [0]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            while data := conn.recv(1 << 16):
                got[0] += len(data)

    with listener:
        listener.bind((addr, port))
        listener.listen(1)
        reader = threading.Thread(target=serve, daemon=True)
        reader.start()
        with netns.entered(client):
            sender = socket.socket(family, socket.SOCK_STREAM)
        with sender:
            sender.settimeout(10)
            sender.connect((addr, port))
            sender.sendall(b"x" * size)
        reader.join(timeout=15)
    return got[0]


@pytest.fixture
def pair(lab: Lab) -> tuple[Netns, Netns, Link]:
    client, server = lab.add_ns("client"), lab.add_ns("server")
    return client, server, lab.link(client, server)


@contextmanager
def collector(lab: Lab, *namespaces: Netns, **kw) -> Iterator[NftCollector]:
    """An nftrace collector on `namespaces`; afterwards every lab namespace's ruleset and
    the host's are byte-identical to what they were before it started."""
    before = rulesets(lab)
    root_before = netns.run_in(netns.root(), ["nft", "list", "ruleset"]).stdout
    with NftCollector(Scope(), **kw) as col:
        col.start(list(namespaces))
        ours = {(ns.name or "", col.marking_table(ns.inode)) for ns in namespaces}
        yield col
    assert not ours & marking_tables(lab)
    assert rulesets(lab) == before
    assert netns.run_in(netns.root(), ["nft", "list", "ruleset"]).stdout == root_before


@contextmanager
def element_notices(ns: Netns) -> Iterator[Callable[[str | None], list[tuple[str, int]]]]:
    """Reads the namespace's ruleset notifications: the call gives (set, elements) of every
    NEWSETELEM notice for `table` so far. Another tracer's commits in the namespace (its own
    table) are not counted."""
    sock = netfilter_socket(ns, 1 << (NFNLGRP_NFTABLES - 1))

    def read(table: str | None) -> list[tuple[str, int]]:
        found = []
        while True:
            try:
                chunk = sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return found
            for mtype, _, msg in split_messages(chunk):
                if mtype != NEWSETELEM:
                    continue
                attrs = {a: msg[s:e] for a, s, e in attributes(msg, NFGEN_ATTRS)}
                if attrs.get(1, b"").rstrip(b"\0").decode() == table:  # NFTA_SET_ELEM_LIST_TABLE, _SET, _ELEMENTS
                    found.append((attrs[2].rstrip(b"\0").decode(), len(list(attributes(attrs[3], 0)))))

    with sock:
        yield read


# --- accepted traffic is not traced -----------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("ruleset", ["stateful", "stateless"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_accepted_transfer_traces_only_the_handshake(lab: Lab, pair: tuple[Netns, Netns, Link], ruleset: str,
                                                      v6: bool) -> None:  # fmt: skip
    """Thousands of accepted packets through a watched ruleset: only the SYN and the SYN-ACK
    are marked, never an established data segment; without conntrack in the ruleset, the
    tracer does not turn it on."""
    client, server, link = pair
    lab.nft(server, STATEFUL if ruleset == "stateful" else STATELESS)
    addr = str(link.b_v6.ip if v6 else link.b_v4.ip)
    with collector(lab, client, server) as col, traces(server) as seen:
        table = col.marking_table(server.inode)
        assert table is not None
        assert (CT_RULE in marking_listing(lab, server, table)) == (ruleset == "stateful")
        assert transfer(lab, client, server, addr, 7320, 32 << 20) == 32 << 20
        time.sleep(0.2)
        marked = [t for t in seen.read(table) if 7320 in (t.sport, t.dport)]
        packets = nft_counter(lab, server, "seen")
    assert packets > 300  # segments of one connection that the ruleset accepted
    assert marked, "the handshake was not traced"
    assert all(t.tcp_flags & 0x02 for t in marked), marked  # SYN or SYN-ACK, never a data segment
    assert len(marked) <= 4
    if ruleset == "stateless":
        assert conntrack_count(server) == 0


# --- the first drop of a new connection keeps its rule -------------------------------------------


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("ruleset", ["stateful", "stateless"])
def test_first_drop_of_a_new_connection_has_its_rule(lab: Lab, pair: tuple[Netns, Netns, Link], watch,
                                                     ruleset: str) -> None:  # fmt: skip
    """A SYN to a closed port, as `tracer watch` reports it: with the rule that dropped it."""
    client, server, link = pair
    lab.nft(server, STATEFUL if ruleset == "stateful" else STATELESS)
    w = watch()
    assert lab.tcp_connect(client, str(link.b_v4.ip), 7330, timeout=0.3) == "timeout"
    ev = w.sink.wait_for(to_port(7330))
    assert ev["netfilter"]["rule"]["comment"] == "closed"
    assert ev["netfilter"]["attribution"] == "nftrace"
    assert ev["tcp"]["flags"] == ["SYN"]
    lab.udp_send(client, str(link.b_v4.ip), 7340)
    assert w.sink.wait_for(to_port(7340))["netfilter"]["rule"]["comment"] == "flood"


@pytest.mark.root
@pytest.mark.bpf
def test_syn_dropped_in_a_raw_chain_has_its_rule(lab: Lab, pair: tuple[Netns, Netns, Link], watch) -> None:
    """Before conntrack nothing says a packet is new, except a SYN: it is marked early, so a
    raw chain's drop (DDoS rules live there) is traced too."""
    client, server, link = pair
    lab.nft(server, STATEFUL)
    w = watch()
    assert lab.tcp_connect(client, str(link.b_v4.ip), 7300, timeout=0.3) == "timeout"
    ev = w.sink.wait_for(to_port(7300))
    assert ev["netfilter"]["rule"]["comment"] == "raw block"
    assert ev["netfilter"]["hook"] == "prerouting"


# --- one flooding flow cannot spend the namespace's budget -------------------------------------


@pytest.mark.root
def test_a_flooding_flow_leaves_the_budget_to_new_flows(lab: Lab, pair: tuple[Netns, Netns, Link]) -> None:
    """With a namespace budget of 10 traces, 500 datagrams of one flow are marked at the
    per-flow rate only, and a new flow right after still gets its first packet traced."""
    client, server, link = pair
    lab.nft(server, STATEFUL)
    addr = str(link.b_v4.ip)
    with collector(lab, server, rate=10, burst=10) as col, traces(server) as seen:
        table = col.marking_table(server.inode)
        assert table is not None
        with netns.entered(client):
            flood = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with flood:
            flood.bind((str(link.a_v4.ip), 40100))
            started = time.monotonic()
            for _ in range(500):
                flood.sendto(b"f", (addr, 7340))
            elapsed = time.monotonic() - started
        lab.udp_send(client, addr, 7340)  # another source port: a new flow
        assert wait_for(lambda: any(t.sport != 40100 and t.dport == 7340 for t in seen.read(table)))
        marked = seen.read(table)
    flooding = [t for t in marked if t.sport == 40100]
    assert 1 <= len(flooding) <= FLOW_BURST + FLOW_RATE * elapsed + 1
    assert len([t for t in marked if t.sport != 40100 and t.dport == 7340]) == 1


# --- flows the tracer saw dropped ---------------------------------------------------------------


@pytest.mark.root
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
def test_trace_flow_makes_an_established_flows_drop_known(lab: Lab, pair: tuple[Netns, Netns, Link],
                                                          v6: bool) -> None:  # fmt: skip
    """An established connection whose large segments a rule drops: not traced (its packets
    are an accepted flow's), until trace_flow() names it; then its retransmissions come with
    the rule. The set element expires after the flow timeout."""
    client, server, link = pair
    lab.nft(server, STATEFUL)
    lab.listen(server, 7310)  # the kernel completes the handshake; nobody needs to accept
    src, dst = (str(link.a_v6.ip), str(link.b_v6.ip)) if v6 else (str(link.a_v4.ip), str(link.b_v4.ip))
    verdicts: list[TraceVerdict] = []
    marking = MarkingCoordinator()
    nftrace = NftraceCollector(Config(scope=Scope()), marking, flow_timeout=2)
    nftrace.nft.on_verdict = verdicts.append
    before = rulesets(lab)
    marking.start([client, server])
    table = nftrace.nft.marking_table(server.inode)
    try:
        with netns.entered(client):
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, socket.SOCK_STREAM)
        with sock:
            sock.connect((dst, 7310))
            sport = sock.getsockname()[1]
            sock.send(b"y" * 1000)  # dropped by "big", and retransmitted, for seconds
            time.sleep(1.0)
            assert not [v for v in verdicts if v.comment == "big"]  # an established flow: not traced
            flow = FlowKey(6 if v6 else 4, src, dst, socket.IPPROTO_TCP, sport, 7310)
            nftrace.trace_flow(server.inode, flow)
            assert wait_for(lambda: f"{sport} . 7310" in known_flows(lab, server, table, flow.version), 2.0)
            assert wait_for(lambda: any(v.comment == "big" for v in verdicts), 8.0)
            v = next(v for v in verdicts if v.comment == "big")
            assert (v.text, v.ct_state, v.chain) == ("tcp dport 7310 meta length > 200 drop", "established", "input")
            assert v.flow == flow  # what a summary's key is matched by
            expired = lambda: f"{sport} . 7310" not in known_flows(lab, server, table, flow.version)  # noqa: E731
            assert wait_for(expired, 5.0)
    finally:
        marking.stop()
    assert (server.name, table) not in marking_tables(lab)
    assert rulesets(lab) == before


@pytest.mark.root
def test_invalid_and_hostile_flows_never_reach_nft(lab: Lab, pair: tuple[Netns, Netns, Link]) -> None:
    """trace_flow() with values that are not addresses and numbers, or not of one version:
    refused before any command is made (no set element is added: the kernel announces each
    one), never raising; a valid flow right after is added, once however often it is asked
    for."""
    client, server, link = pair
    lab.nft(server, STATEFUL)
    src, dst = str(link.a_v4.ip), str(link.b_v4.ip)
    with collector(lab, server) as col, element_notices(server) as notices:
        table = col.marking_table(server.inode)
        for bad in HOSTILE:
            col.trace_flow(server.inode, bad)  # type: ignore[arg-type]
        col.trace_flow(True, FlowKey(4, src, dst, 6, 1, 2))  # type: ignore[arg-type]
        col.trace_flow(client.inode, FlowKey(4, src, dst, 6, 1, 2))  # not watched
        good = FlowKey(4, src, dst, 17, 5353, 7340)
        for _ in range(1000):
            col.trace_flow(server.inode, good)
        assert wait_for(lambda: "5353 . 7340" in known_flows(lab, server, table, 4))
        col.loop.run_sync(lambda: None)  # whatever was queued has run
        assert notices(table) == [("flows4", 1)]  # the good flow, once
        listing = marking_listing(lab, server, table)
    assert "flush" not in listing and "8.8.8.8" not in listing


HOSTILE: list[object] = [
    FlowKey(4, "198.18.0.1; flush ruleset", "198.18.0.2", 6, 1, 2),
    FlowKey(4, "198.18.0.1", "198.18.0.2 } ; add table ip x {", 6, 1, 2),
    FlowKey(6, "2001:db8::1%eth0", "2001:db8::2", 6, 1, 2),  # a zone would be nft text
    FlowKey(4, "localhost", "198.18.0.2", 6, 1, 2),  # nft would resolve a name
    FlowKey(4, "dns.google", "8.8.8.8", 17, 1, 53),
    FlowKey(4, "2001:db8::1", "2001:db8::2", 6, 1, 2),  # version and addresses disagree
    FlowKey(6, "198.18.0.1", "198.18.0.2", 6, 1, 2),
    FlowKey(5, "198.18.0.1", "198.18.0.2", 6, 1, 2),
    FlowKey(4, 3323068417, "198.18.0.2", 6, 1, 2),  # type: ignore[arg-type]
    FlowKey(4, "198.18.0.1", "198.18.0.2", 256, 1, 2),
    FlowKey(4, "198.18.0.1", "198.18.0.2", -1, 1, 2),
    FlowKey(4, "198.18.0.1", "198.18.0.2", 6, 65536, 2),
    FlowKey(4, "198.18.0.1", "198.18.0.2", 6, 1, -2),
    FlowKey(4, "198.18.0.1", "198.18.0.2", 6, True, 2),
    FlowKey(4, "198.18.0.1", "198.18.0.2", "6", 1, 2),  # type: ignore[arg-type]
    FlowKey(4, "198.18.0.1", "198.18.0.2", 6, 1.5, 2),  # type: ignore[arg-type]
    FlowKey(4, "198.18.0.1" * 20, "198.18.0.2", 6, 1, 2),
    ("198.18.0.1", "198.18.0.2", 6, 1, 2),
    None,
]


@pytest.mark.parametrize("bad", HOSTILE, ids=range(len(HOSTILE)))
def test_flow_element_refuses_what_is_not_an_address_or_a_number(bad: object) -> None:
    with pytest.raises(ValueError):
        flow_element(bad)  # type: ignore[arg-type]


def test_flow_element_normalises_and_picks_the_set() -> None:
    assert flow_element(FlowKey(4, "198.18.0.1", "198.18.0.2", 6, 40000, 443)) == (
        "flows4", ("198.18.0.1", "198.18.0.2", 6, 40000, 443))
    assert flow_element(FlowKey(6, "2001:DB8:0::1", "2001:db8::2", 17, 5, 53)) == (
        "flows6", ("2001:db8::1", "2001:db8::2", 17, 5, 53))
    # No ports: keyed by addresses and protocol (ports given anyway are not part of the key).
    assert flow_element(FlowKey(4, "198.18.0.1", "198.18.0.2", 1, 0, 0)) == ("peers4", ("198.18.0.1", "198.18.0.2", 1))
    assert flow_element(FlowKey(6, "2001:db8::1", "2001:db8::2", 58, 8, 0))[0] == "peers6"


# --- the rules follow the ruleset's use of conntrack --------------------------------------------


@pytest.mark.root
def test_marking_follows_the_rulesets_use_of_conntrack(lab: Lab, pair: tuple[Netns, Netns, Link]) -> None:
    """A namespace without conntrack gets no `ct` rule from us; once its ruleset tracks
    connections the table switches to the stateful rules, and back when it stops, keeping
    the flows it was given."""
    _client, server, link = pair
    lab.nft(server, STATELESS)
    with collector(lab, server) as col:
        table = col.marking_table(server.inode)
        assert CT_RULE not in marking_listing(lab, server, table)
        col.trace_flow(server.inode, FlowKey(4, str(link.a_v4.ip), str(link.b_v4.ip), 6, 1234, 7320))
        assert wait_for(lambda: "1234 . 7320" in known_flows(lab, server, table, 4))
        lab.nft(server, "table inet st { chain c { type filter hook input priority 10; ct state invalid drop; }; }")
        assert wait_for(lambda: CT_RULE in marking_listing(lab, server, table), 5.0)
        lab.nft(server, "delete table inet st")
        assert wait_for(lambda: CT_RULE not in marking_listing(lab, server, table), 5.0)
        assert "1234 . 7320" in known_flows(lab, server, table, 4)


CONNTRACK_USERS = {
    "ct state": "table inet t { chain c { type filter hook input priority 0; ct state invalid drop; }; }",
    "ct mark": "table ip t { chain c { type filter hook prerouting priority 0; ct mark set 1; }; }",
    "nat chain": "table ip t { chain c { type nat hook postrouting priority srcnat; }; }",
    "masquerade": "table ip t { chain c { type nat hook postrouting priority srcnat; oifname \"x\" masquerade; }; }",
    "ct count": "table ip t { chain c { type filter hook input priority 0; tcp dport 22 ct count over 5 drop; }; }",
    "iptables-nft state": None,  # iptables-nft -m conntrack
}
NOT_CONNTRACK = {
    "ports": "table inet t { chain c { type filter hook input priority 0; tcp dport 22 drop; }; }",
    "ct in a comment": 'table inet t { chain c { type filter hook input priority 0; drop comment "ct"; }; }',
    "notrack": "table inet t { chain c { type filter hook prerouting priority raw; udp dport 53 notrack; }; }",
}


@pytest.mark.root
@pytest.mark.parametrize("case", sorted(CONNTRACK_USERS) + sorted(NOT_CONNTRACK))
def test_which_rulesets_use_conntrack(lab: Lab, case: str) -> None:
    """Read from the real JSON listing of each kind of ruleset (ours would not count: owned
    tables' contents are never listed)."""
    ns = lab.add_ns("ct")
    if case == "iptables-nft state":
        lab.run(ns, ["iptables-nft", "-A", "INPUT", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"])
    else:
        lab.nft(ns, {**CONNTRACK_USERS, **NOT_CONNTRACK}[case] or "")
    with netns.entered(ns):
        ctx = NftContext()
    with ctx:
        rs = ctx.ruleset()
    assert ruleset_uses_conntrack(rs) == (case in CONNTRACK_USERS)
    assert conntrack_in_use(ns, rs) == (case in CONNTRACK_USERS)


def test_flow_of_traced_headers() -> None:
    """The flow key a verdict carries, from headers as a trace gives them (the network header
    runs up to the transport header, extension headers included)."""
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment

    def split(pkt, l4) -> tuple[bytes, bytes]:
        data = bytes(pkt)
        at = len(data) - len(bytes(l4))
        return data[:at], data[at:]

    tcp = TCP(sport=40000, dport=443, flags="S")
    assert flow_of(*split(IP(src="198.18.0.1", dst="198.18.0.2") / tcp, tcp)) == FlowKey(
        4, "198.18.0.1", "198.18.0.2", 6, 40000, 443)
    udp = UDP(sport=5, dport=53)
    v6 = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrDestOpt() / IPv6ExtHdrDestOpt() / udp
    assert flow_of(*split(v6, udp)) == FlowKey(6, "2001:db8::1", "2001:db8::2", 17, 5, 53)
    later = IPv6(src="2001:db8::1", dst="2001:db8::2") / IPv6ExtHdrFragment(offset=10, nh=17) / udp
    assert flow_of(*split(later, udp)) == FlowKey(6, "2001:db8::1", "2001:db8::2", 17, 0, 0)
    frag = IP(src="198.18.0.1", dst="198.18.0.2", frag=10, proto=17) / udp
    assert flow_of(*split(frag, udp)) == FlowKey(4, "198.18.0.1", "198.18.0.2", 17, 0, 0)
    icmp = ICMP()
    assert flow_of(*split(IP(src="198.18.0.1", dst="198.18.0.2") / icmp, icmp)) == FlowKey(
        4, "198.18.0.1", "198.18.0.2", 1, 0, 0)
    assert flow_of(b"", bytes(udp)) is None and flow_of(b"\x60" + b"\0" * 10, b"") is None
    for key in (flow_of(*split(v6, udp)), flow_of(*split(frag, udp))):
        assert key is not None
        flow_element(key)  # what a trace gives, trace_flow takes
