"""The people's view (issue 10): what the text line shows, iptables rules by their line number,
the next hop of a neighbour failure, and what each drop reason means.

The model tests need nothing; the lab tests build real iptables-nft and iptables-legacy
rulesets, and a namespace that drops neighbour solicitations, and watch real drops.
"""

from __future__ import annotations

import io
import re
from typing import Any

import pytest

from tests.support import to_port
from tests.test_event_model import full_event
from tracer.collectors.neighbors import NeighborsCollector, nud_state
from tracer.event.model import (
    ConntrackInfo,
    CtTuple,
    Diagnosis,
    Drop,
    DropEvent,
    Interface,
    Interfaces,
    Netfilter,
    Packet,
    Rule,
)
from tracer.event.packet import PacketHeaders
from tracer.event.reasons import REASONS, explain, is_neighbor_failure
from tracer.event.rendered import Rendered
from tracer.event.schema import validate
from tracer.event.sections import Neighbor
from tracer.event.text import icmp_name, one_line, printable, text_lines
from tracer.lab import Lab
from tracer.outputs.stdout import TerminalSink


def _icmp(version: int, icmp_type: int, code: int, src: str, dst: str) -> Packet:
    proto = 1 if version == 4 else 58
    return Packet(PacketHeaders(version, src, dst, proto, icmp_type=icmp_type, icmp_code=code), 576)


# ------------------------------------------------------------ the line


@pytest.mark.parametrize(("packet", "shown"), [
    (_icmp(4, 3, 4, "198.18.1.1", "198.18.0.1"), "icmp 198.18.1.1 > 198.18.0.1 3/4 frag-needed len 576"),
    (_icmp(6, 2, 0, "2001:db8:1::1", "2001:db8::1"), "icmpv6 2001:db8:1::1 > 2001:db8::1 2/0 packet-too-big len 576"),
    (_icmp(6, 135, 0, "fe80::1", "ff02::1:ff00:2"), "icmpv6 fe80::1 > ff02::1:ff00:2 135/0 neighbor-solicit len 576"),
    (_icmp(4, 8, 0, "198.18.0.1", "198.18.0.2"), "icmp 198.18.0.1 > 198.18.0.2 8/0 echo-request len 576"),
    (_icmp(4, 42, 7, "198.18.0.1", "198.18.0.2"), "icmp 198.18.0.1 > 198.18.0.2 42/7 len 576"),
    (Packet(None, 28), "? > ? len 28"),
])  # fmt: skip
def test_the_packet_part_shows_icmp_type_code_name_and_length(packet: Packet, shown: str) -> None:
    assert packet.text() == shown
    assert f"  {shown}  " in one_line(DropEvent(timestamp_ns=0, drop=Drop("NETFILTER_DROP"), packet=packet))


def test_icmp_names_by_code_where_the_code_says_why() -> None:
    assert icmp_name(4, 3, 3) == "port-unreachable" and icmp_name(4, 3, 13) == "admin-prohibited"
    assert icmp_name(4, 11, 0) == "ttl-exceeded" and icmp_name(6, 1, 4) == "port-unreachable"
    assert icmp_name(6, 136, 0) == "neighbor-advert" and icmp_name(6, 200, 0) is None


def test_the_line_shows_interfaces_nat_original_and_next_hop() -> None:
    event = full_event(
        interfaces=Interfaces(Interface(5, "eth0"), Interface(7, "eth1")),
        conntrack=ConntrackInfo("new", "original", ("dst_nat",), original=CtTuple("198.18.0.1", "198.18.9.9",
                                                                                  40000, 8080)),
    )
    line = one_line(event)
    assert "  netns lab-server  in eth0 out eth1  nftables/input " in line
    assert "  ct new/original nat from 198.18.0.1:40000 > 198.18.9.9:8080" in line
    assert "in if7" in one_line(full_event(interfaces=Interfaces(Interface(7))))
    assert "  in " not in one_line(full_event(interfaces=None))
    neigh = full_event(netfilter=None, drop=Drop("NEIGH_FAILED", "neigh_invalidate+0x7e"),
                       neighbor=Neighbor("198.18.0.254", "FAILED", "eth1"))
    assert "  at neigh_invalidate+0x7e  next hop 198.18.0.254 dev eth1 FAILED  ct new/original" in one_line(neigh)


def test_the_diagnosis_is_a_second_indented_line_at_a_terminal_only() -> None:
    diag = Diagnosis("rule_order", "tcp dport 443 drop comes before the accept",
                     ("nft delete rule inet fw input handle 4", "nft list ruleset"), ("handle 4",))
    event = full_event(diagnosis=diag)
    lines = text_lines(event)
    assert lines == [one_line(event), ("    cause rule_order: tcp dport 443 drop comes before the accept  "
                                       "fix: nft delete rule inet fw input handle 4")]
    assert "\n" not in Rendered(event).text()  # syslog and the journal keep one line a record
    out = io.StringIO()
    sink = TerminalSink(out, stack=True)
    sink.submit(Rendered(event))
    sink.close()
    assert out.getvalue() == "\n".join([*lines, "        nf_hook_slow+0xa1", "        ip_local_deliver+0xd6"]) + "\n"
    assert text_lines(full_event()) == [one_line(full_event())]


def test_hostile_interface_and_neighbour_names_are_escaped() -> None:
    nasty = "ev\nil\x1b[2J\u202e"
    event = full_event(interfaces=Interfaces(Interface(5, nasty), Interface(6, nasty)),
                       neighbor=Neighbor("198.18.0.254", "FAILED", nasty),
                       diagnosis=Diagnosis("rule_blocks", nasty, (nasty,)))
    for line in text_lines(event):
        assert not any(ord(c) < 0x20 or c == "\u202e" for c in line), repr(line)
    assert one_line(event).count(printable(nasty)) == 3


# ------------------------------------------------------------ iptables rules


def test_iptables_rules_are_shown_by_line_number_and_their_a_line() -> None:
    line = '-A INPUT -p tcp -m tcp --dport 443 -m comment --comment "old \\"block\\"" -j DROP'
    nft = Netfilter("iptables-nft", "nftrace", "ip", "input", "filter", "INPUT", "INPUT",
                    Rule(7, "tcp dport 443 counter drop", 'old "block"', line, 3), False, "drop")
    assert nft.describe() == f'ip filter chain INPUT line 3 "{printable(line)}"'
    assert "rule 7" not in one_line(full_event(netfilter=nft))
    legacy = Netfilter("iptables-legacy", "nftrace", "ip", "input", "filter", "INPUT", "INPUT",
                       Rule(2, line, None, line, 2), False, "drop")
    assert legacy.describe().startswith("ip filter chain INPUT line 2 \"-A INPUT -p tcp")
    # Without its -S line, an iptables-nft rule is named by what it is, its nft handle.
    unknown = Netfilter("iptables-nft", "nftrace", "ip", "input", "filter", "INPUT", "INPUT",
                        Rule(7, "tcp dport 443 counter drop"), False, "drop")
    assert unknown.describe() == 'ip filter chain INPUT handle 7 "tcp dport 443 counter drop"'
    doc = full_event(netfilter=nft).to_ecs()
    assert doc["netfilter"]["rule"]["number"] == 3
    validate(doc)


def _listed_line(lab: Lab, ns: Any, tool: str, port: int) -> int:
    """The number `iptables -L INPUT --line-numbers` prints for the DROP of `port`."""
    out = lab.run(ns, [tool, "-L", "INPUT", "-n", "--line-numbers"]).stdout
    numbers = [int(ln.split()[0]) for ln in out.splitlines()
               if re.match(r"^\d+\s+DROP\b", ln) and f"dpt:{port}" in ln]
    assert len(numbers) == 1, out
    return numbers[0]


@pytest.mark.root
@pytest.mark.bpf
def test_iptables_nft_rule_number_is_the_listed_line_not_the_handle(lab: Lab, watch) -> None:
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    for args in (("-A", "INPUT", "-i", "lo", "-j", "ACCEPT"),
                 ("-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"),
                 ("-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"),
                 ("-A", "INPUT", "-p", "tcp", "--dport", "443", "-j", "DROP"), ("-D", "INPUT", "2")):
        lab.run(server, ["iptables-nft", *args])
    listed = _listed_line(lab, server, "iptables-nft", 443)
    w = watch()
    assert lab.tcp_connect(client, str(link.b_v4.ip), 443) == "timeout"
    ev = w.sink.wait_for(to_port(443, str(link.b_v4.ip)))
    nf = ev["netfilter"]
    assert (nf["backend"], nf["table"], nf["chain"]) == ("iptables-nft", "filter", "INPUT")
    rule = nf["rule"]
    assert rule["number"] == listed == 3
    assert rule["handle"] != rule["number"]  # the deleted rule left a gap in the handles
    assert rule["iptables"] == "-A INPUT -p tcp -m tcp --dport 443 -j DROP"
    assert f'chain INPUT line 3 "{rule["iptables"]}"' in one_line(w.sink.model(ev))


@pytest.mark.root
@pytest.mark.bpf
def test_iptables_legacy_rule_number_is_the_listed_line(lab: Lab, watch) -> None:
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    for args in (("-A", "INPUT", "-i", "lo", "-j", "ACCEPT"),
                 ("-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"),
                 ("-A", "INPUT", "-p", "tcp", "--dport", "9", "-j", "ACCEPT"),
                 ("-A", "INPUT", "-p", "tcp", "--dport", "8443", "-j", "DROP"), ("-D", "INPUT", "1")):
        lab.run(server, ["ip6tables-legacy", *args])
    listed = _listed_line(lab, server, "ip6tables-legacy", 8443)
    w = watch()
    assert lab.tcp_connect(client, str(link.b_v6.ip), 8443) == "timeout"
    ev = w.sink.wait_for(to_port(8443, str(link.b_v6.ip)), timeout=5)
    nf = ev["netfilter"]
    assert (nf["backend"], nf["table"], nf["chain"]) == ("iptables-legacy", "filter", "INPUT")
    assert nf["rule"]["number"] == listed == 3
    assert 'chain INPUT line 3 "-A INPUT -p tcp -m tcp --dport 8443 -j DROP"' in one_line(w.sink.model(ev))


# ------------------------------------------------------------ next hop


def test_neighbour_section_round_trip_and_schema() -> None:
    event = full_event(netfilter=None, drop=Drop("NOT_SPECIFIED", "neigh_invalidate+0x7e"),
                       neighbor=Neighbor("2001:db8::2", "FAILED", "veth0a"))
    doc = event.to_ecs()
    assert doc["neighbor"] == {"ip": "2001:db8::2", "state": "FAILED", "interface": "veth0a"}
    validate(doc)
    assert DropEvent.from_ecs(doc).neighbor == event.neighbor
    assert Neighbor("198.18.0.1").to_ecs() == {"ip": "198.18.0.1"}


def test_which_drops_are_neighbour_failures() -> None:
    for reason in ("NEIGH_FAILED", "NEIGH_QUEUEFULL", "NEIGH_DEAD", "NEIGH_CREATEFAIL"):
        assert is_neighbor_failure(reason, None)
    assert is_neighbor_failure("NOT_SPECIFIED", "neigh_invalidate+0x7e")
    assert is_neighbor_failure("NOT_SPECIFIED", "__neigh_event_send+0x1a [kernel]")
    assert not is_neighbor_failure("NOT_SPECIFIED", "ip_rcv_core+0x10")
    assert not is_neighbor_failure("NETFILTER_DROP", "neigh_invalidate+0x7e")
    assert (nud_state(0x20), nud_state(0x01), nud_state(0)) == ("FAILED", "INCOMPLETE", "NONE")


def _with_neighbors(w: Any) -> None:
    """Adds the collector to a running engine unless the engine already has it."""
    if not any(isinstance(c, NeighborsCollector) for c in w.engine.collectors):
        w.engine._section_collectors.append(NeighborsCollector())


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("family", ["ipv6-on-link", "ipv4-via-gateway"])
def test_neighbour_failure_names_the_next_hop(lab: Lab, watch, family: str) -> None:
    """The peer drops neighbour solicitations (or ARP): the client's SYN dies waiting for the
    next hop, and the event names that hop, its device and its FAILED entry."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    if family == "ipv6-on-link":
        hop, dst, sysctl = str(link.b_v6.ip), str(link.b_v6.ip), "ipv6"
        lab.nft(server, "table ip6 nd { chain input { type filter hook input priority 0; "
                        "icmpv6 type nd-neighbor-solicit drop; }; }")
    else:
        hop, dst, sysctl = str(link.b_v4.ip), "198.19.7.1", "ipv4"
        lab.ip(client, "route", "add", "198.19.7.0/24", "via", hop)
        lab.nft(server, "table arp noarp { chain input { type filter hook input priority 0; policy drop; }; }")
    lab.ip(client, "neigh", "del", hop, "dev", link.a_ifname)  # the lab's static entry
    # The lab namespace's own neighbour timer (not a global sysctl): fail in 0.6 s, not 3.
    lab.run(client, ["sysctl", "-qw", f"net.{sysctl}.neigh.{link.a_ifname}.retrans_time_ms=200"])
    w = watch()
    _with_neighbors(w)
    assert lab.tcp_connect(client, dst, 443) == "timeout"
    ev = w.sink.wait_for(lambda e: to_port(443, dst)(e) and is_neighbor_failure(
        e["drop"]["reason"], e["drop"].get("location")), timeout=8)
    assert ev["netns"]["name"] == client.name
    assert ev["neighbor"] == {"ip": hop, "state": "FAILED", "interface": link.a_ifname}
    assert f"next hop {hop} dev {link.a_ifname} FAILED" in one_line(w.sink.model(ev))


# ------------------------------------------------------------ drop reasons


#: The reasons people meet most: each has its sentence.
_COMMON_WORDS = (
    "NOT_SPECIFIED NO_SOCKET NETFILTER_DROP IP_INADDRERRORS IP_RPFILTER IP_NOPROTO IP_OUTNOROUTES "
    "IP_INNOROUTES NEIGH_FAILED NEIGH_QUEUEFULL NEIGH_DEAD NEIGH_CREATEFAIL TCP_CSUM TCP_FLAGS TCP_ZEROWINDOW "
    "TCP_OLD_DATA TCP_OVERWINDOW TCP_RESET TCP_INVALID_SYN TCP_LISTEN_OVERFLOW TCP_INVALID_SEQUENCE "
    "TCP_OLD_ACK TCP_ACK_UNSENT_DATA TCP_MD5FAILURE TCP_CLOSE TCP_RFC7323_PAWS UDP_CSUM SKB_CSUM PKT_TOO_BIG "
    "PKT_TOO_SMALL OTHERHOST QDISC_DROP NOMEM SOCKET_RCVBUFF SOCKET_FILTER SOCKET_BACKLOG PROTO_MEM IP_CSUM "
    "IP_INHDR XFRM_POLICY CPU_BACKLOG DEV_READY FRAG_REASM_TIMEOUT IPV6DISABLED IP_LOCAL_SOURCE "
    "IP_INVALID_SOURCE ICMP_CSUM XDP TC_INGRESS TC_EGRESS BPF_CGROUP_EGRESS SECURITY_HOOK"
)
COMMON = _COMMON_WORDS.split()


def test_common_reasons_each_have_a_sentence() -> None:
    assert len(COMMON) >= 40
    for name in COMMON:
        sentence = explain(name)
        assert sentence and sentence.endswith(".") and sentence[0].isupper(), name
    assert explain("skb_drop_reason_ip_rpfilter") == REASONS["IP_RPFILTER"]
    assert "rp_filter" in REASONS["IP_RPFILTER"] and "ip_forward" in REASONS["IP_INADDRERRORS"]
    assert explain("NO_SUCH_REASON") is None


def test_every_reason_of_this_kernel_has_a_sentence() -> None:
    """This kernel's BTF, as doctor reads it: no reason is left without a sentence."""
    from tracer.cli.doctor import reason_lines

    lines = reason_lines()
    assert {line.name for line in lines} >= set(COMMON)
    assert [line.name for line in lines if line.explanation is None] == []
