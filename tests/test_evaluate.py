"""The rule evaluator against real rulesets: nft, iptables-nft and iptables-legacy.

Each ruleset is loaded into a lab namespace by the real tools and read back
the way the tracer reads it (NftContext inside the namespace; -S and
-legacy-save listings for iptables); the evaluator is pure, so packets are
hand-built PacketFacts and no traffic is sent.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer import netns
from tracer.diagnosis.evaluate import (
    Tri,
    accepting_rules,
    later_accept,
    rule_matches,
    rule_verdict,
    walk_chain,
    xt_accepting_rules,
    xt_later_accept,
    xt_rule_matches,
    xt_walk_chain,
)
from tracer.diagnosis.facts import PacketFacts
from tracer.event.model import ConntrackInfo, Drop, DropEvent, Interface, Interfaces, Netfilter, Packet
from tracer.event.packet import PacketHeaders
from tracer.lab import Lab
from tracer.netfilter.nftables import NftContext, Rule, Ruleset, parse_ruleset
from tracer.netfilter.xtables import XtTable, parse_save, split_iptables_rules
from tracer.netns import Netns

YES, NO, UNKNOWN = Tri.YES, Tri.NO, Tri.UNKNOWN

NFT_RULESET = """\
table inet fw {
  set trusted4 { type ipv4_addr; flags interval;
    elements = { 198.18.0.0/24, 198.19.1.1-198.19.1.9, 198.18.5.5 } }
  set webports { type inet_service; flags interval; elements = { 80, 443, 8000-8099 } }
  set pairs { type ipv4_addr . inet_service; elements = { 198.18.0.1 . 22 } }
  map portv { type inet_service : verdict; elements = { 2222 : accept, 2323 : drop } }
  chain input { type filter hook input priority 0; policy drop;
    ct state established,related accept comment "est"
    ct state invalid drop comment "inv"
    iif lo accept comment "lo"
    iifname "wan*" tcp dport 22 drop comment "wan ssh"
    ip saddr 198.18.0.0/15 tcp dport ssh accept comment "ssh"
    ip saddr @trusted4 tcp dport @webports accept comment "web"
    ip saddr . tcp dport @pairs accept comment "pairs"
    tcp dport vmap @portv comment "vmap"
    udp dport vmap { 53 : accept, 5353 : jump mdns } comment "anon vmap"
    tcp dport 1000-1999 drop comment "range drop"
    tcp dport 3000 drop comment "3000 drop"
    tcp dport 3000 accept comment "3000 accept"
    ip6 saddr 2001:db8::/32 icmpv6 type { echo-request, nd-neighbor-solicit, packet-too-big } accept comment "icmp6"
    icmp type destination-unreachable icmp code frag-needed accept comment "fragneeded"
    icmp type echo-request limit rate 5/second accept comment "ping limit"
    tcp flags & (syn|ack) == syn tcp dport 4000 drop comment "syn 4000"
    meta mark & 0xff == 0x1 accept comment "mark"
    fib daddr type local tcp dport 5000 accept comment "fib"
    tcp dport 6000 jump checks comment "to checks"
    tcp dport 6001 goto checks comment "goto checks"
    tcp dport 7000 drop comment "7000 drop"
  }
  chain checks {
    tcp dport 6000 ct state new return comment "new returns"
    tcp dport 6001 accept comment "6001 accept"
    tcp dport 6002 drop comment "checks drop"
  }
  chain mdns {
    ip saddr 198.18.0.0/24 accept comment "mdns lan"
  }
  chain output { type filter hook output priority 0; policy accept;
    oifname != "lo" tcp dport 25 reject comment "no smtp"
  }
}
table ip nat {
  chain pre { type nat hook prerouting priority -100; policy accept;
    ip daddr 198.18.0.1 tcp dport 8080 dnat to 198.18.1.1:80 comment "dnat"
  }
}
table inet tail {
  chain input { type filter hook input priority 10; policy accept;
    tcp dport 7000 accept comment "other table"
  }
}
"""


def facts(
    dport: int | None = 22, *, src: str = "198.18.0.2", dst: str = "198.18.0.1", proto: int = 6, **kw
) -> PacketFacts:
    """A packet from the lab's 198.18.0.2 to 198.18.0.1: a new TCP SYN to `dport` on veth0b, unless told."""
    base: dict = {"sport": 40000, "dport": dport, "tcp_flags": ("SYN",), "iif": "veth0b", "hook": "input",
                  "ct_state": "new", "ct_status": (), "ct_direction": "original", "mark": 0}
    if proto not in (6, 17):
        base.update(sport=None, dport=None, tcp_flags=())
    base.update(kw)
    family = 6 if ":" in src else 4
    return PacketFacts(family, src, dst, proto, **base)


def ruleset_of(ns: Netns) -> Ruleset:
    with netns.entered(ns):
        ctx = NftContext()
    with ctx:
        return ctx.ruleset()


def by_comment(rs: Ruleset, comment: str) -> Rule:
    found = [r for r in rs.rules.values() if r.comment == comment]
    assert len(found) == 1, comment
    return found[0]


@pytest.fixture
def nft_rs(lab: Lab) -> Ruleset:
    ns = lab.add_ns("fw")
    lab.nft(ns, NFT_RULESET)
    return ruleset_of(ns)


def matches(rs: Ruleset, comment: str, f: PacketFacts) -> Tri:
    return rule_matches(rs, by_comment(rs, comment), f)


# --- nftables -----------------------------------------------------------------------------


@pytest.mark.root
def test_prefixes_services_and_named_interval_sets(nft_rs: Ruleset) -> None:
    rs = nft_rs
    assert matches(rs, "ssh", facts(22)) is YES  # 198.18.0.0/15, `ssh` by name
    assert matches(rs, "ssh", facts(22, src="198.20.0.1")) is NO
    assert matches(rs, "ssh", facts(22, proto=17)) is NO  # tcp's dependency fails on UDP
    assert matches(rs, "ssh", facts(src="2001:db8::2", dst="2001:db8::1")) is NO  # ip saddr on IPv6
    assert matches(rs, "web", facts(8042)) is YES  # prefix element, port range element
    assert matches(rs, "web", facts(443, src="198.19.1.5")) is YES  # address range element
    assert matches(rs, "web", facts(443, src="198.19.1.10")) is NO
    assert matches(rs, "web", facts(443, src="198.18.5.5")) is YES  # single element
    assert matches(rs, "web", facts(8100)) is NO
    assert matches(rs, "pairs", facts(22, src="198.18.0.1")) is YES  # concatenation
    assert matches(rs, "pairs", facts(23, src="198.18.0.1")) is NO
    assert matches(rs, "range drop", facts(1500)) is YES
    assert matches(rs, "range drop", facts(2000)) is NO


@pytest.mark.root
def test_ct_state_interfaces_icmp_and_flags(nft_rs: Ruleset) -> None:
    rs = nft_rs
    assert matches(rs, "est", facts(ct_state="established")) is YES
    assert matches(rs, "est", facts(ct_state="related")) is YES
    assert matches(rs, "est", facts(ct_state="new")) is NO
    assert matches(rs, "est", facts(ct_state=None)) is UNKNOWN
    assert matches(rs, "inv", facts(ct_state="invalid")) is YES
    assert matches(rs, "lo", facts(iif="lo")) is YES
    assert matches(rs, "lo", facts(iif=None)) is UNKNOWN
    assert matches(rs, "wan ssh", facts(22, iif="wan0")) is YES  # iifname "wan*"
    assert matches(rs, "wan ssh", facts(22, iif="wa")) is NO
    assert matches(rs, "wan ssh", facts(22, iif=None)) is UNKNOWN
    v6 = {"src": "2001:db8::2", "dst": "2001:db8::1", "proto": 58}
    assert matches(rs, "icmp6", facts(**v6, icmp_type=135, icmp_code=0)) is YES  # nd-neighbor-solicit
    assert matches(rs, "icmp6", facts(**v6, icmp_type=2, icmp_code=0)) is YES  # packet-too-big
    assert matches(rs, "icmp6", facts(**v6, icmp_type=136, icmp_code=0)) is NO
    assert matches(rs, "icmp6", facts(**v6, icmp_type=None)) is UNKNOWN
    assert matches(rs, "fragneeded", facts(proto=1, icmp_type=3, icmp_code=4)) is YES
    assert matches(rs, "fragneeded", facts(proto=1, icmp_type=3, icmp_code=3)) is NO
    assert matches(rs, "syn 4000", facts(4000, tcp_flags=("SYN",))) is YES
    assert matches(rs, "syn 4000", facts(4000, tcp_flags=("SYN", "ACK"))) is NO
    assert matches(rs, "syn 4000", facts(4000, tcp_flags=())) is UNKNOWN
    assert matches(rs, "mark", facts(mark=0x301)) is YES
    assert matches(rs, "mark", facts(mark=0x2)) is NO
    assert matches(rs, "mark", facts(mark=None)) is UNKNOWN
    # oifname != "lo": decided in output with a name, unknown without one
    assert matches(rs, "no smtp", facts(25, hook="output", oif="veth0a")) is YES
    assert matches(rs, "no smtp", facts(25, hook="output", oif="lo")) is NO
    assert matches(rs, "no smtp", facts(25, hook="output", oif=None)) is UNKNOWN


@pytest.mark.root
def test_what_cannot_be_decided_is_unknown(nft_rs: Ruleset) -> None:
    rs = nft_rs
    assert matches(rs, "ping limit", facts(proto=1, icmp_type=8, icmp_code=0)) is UNKNOWN  # limit
    assert matches(rs, "ping limit", facts(proto=1, icmp_type=0, icmp_code=0)) is NO  # decided before it
    assert matches(rs, "fib", facts(5000)) is UNKNOWN
    assert matches(rs, "fib", facts(5001)) is NO


@pytest.mark.root
def test_verdict_maps(nft_rs: Ruleset) -> None:
    rs = nft_rs
    vmap, anon = by_comment(rs, "vmap"), by_comment(rs, "anon vmap")
    assert rule_verdict(rs, vmap, facts(2222)) == "accept"
    assert rule_verdict(rs, vmap, facts(2323)) == "drop"
    assert rule_matches(rs, vmap, facts(2424)) is NO  # a key in no element: the lookup fails
    assert rule_verdict(rs, vmap, facts(2424)) is None
    assert rule_verdict(rs, vmap, facts(None)) == "unknown"
    assert rule_matches(rs, vmap, facts(None)) is UNKNOWN
    assert rule_verdict(rs, anon, facts(5353, proto=17)) == "jump:mdns"
    assert rule_verdict(rs, anon, facts(53, proto=17)) == "accept"
    assert rule_matches(rs, anon, facts(53)) is NO  # udp dport on TCP
    assert rule_verdict(rs, by_comment(rs, "no smtp"), facts()) == "reject"
    assert rule_verdict(rs, by_comment(rs, "to checks"), facts()) == "jump:checks"
    assert rule_verdict(rs, by_comment(rs, "goto checks"), facts()) == "goto:checks"
    w = walk_chain(rs, "ip", "nat", "pre", facts(8080, hook="prerouting"))
    assert (w.verdict, w.rule and w.rule.comment, w.certain) == ("nat", "dnat", True)
    w = walk_chain(rs, "ip", "nat", "pre", facts(8081, hook="prerouting"))
    assert (w.verdict, w.policy) == ("accept", True)


@pytest.mark.root
def test_walks_follow_jumps_returns_and_policy(nft_rs: Ruleset) -> None:
    rs = nft_rs
    w = walk_chain(rs, "inet", "fw", "input", facts(22))
    assert (w.verdict, w.rule and w.rule.comment, w.policy, w.certain) == ("accept", "ssh", False, True)
    w = walk_chain(rs, "inet", "fw", "input", facts(9999, src="198.20.0.1"))
    assert (w.verdict, w.rule, w.policy) == ("drop", None, True)
    # jump checks, where `ct state new` returns: back in input, nothing else matches, the policy
    w = walk_chain(rs, "inet", "fw", "input", facts(6000, src="198.20.0.1"))
    assert (w.verdict, w.policy, w.certain) == ("drop", True, True)
    w = walk_chain(rs, "inet", "fw", "input", facts(6001, src="198.20.0.1"))
    assert (w.verdict, w.rule and w.rule.comment) == ("accept", "6001 accept")
    w = walk_chain(rs, "inet", "fw", "input", facts(5353, proto=17, src="198.18.0.9"))
    assert (w.verdict, w.rule and w.rule.comment) == ("accept", "mdns lan")
    # an undecided rule on the way: fib, then the policy
    w = walk_chain(rs, "inet", "fw", "input", facts(5000, src="198.20.0.1"))
    assert (w.verdict, w.policy, w.certain) == ("drop", True, False)
    assert [r.comment for r in w.undecided] == ["fib"]
    # from a given rule on, and from inside a user chain
    after = by_comment(rs, "3000 drop").handle
    w = walk_chain(rs, "inet", "fw", "input", facts(3000, src="198.20.0.1"), after_handle=after)
    assert (w.verdict, w.rule and w.rule.comment) == ("accept", "3000 accept")
    w = walk_chain(rs, "inet", "fw", "checks", facts(6009))
    assert (w.verdict, w.rule, w.policy, w.certain) == ("continue", None, False, True)


@pytest.mark.root
def test_later_accept_tells_rule_order_from_a_blocking_rule(nft_rs: Ruleset) -> None:
    rs = nft_rs
    outside = "198.20.0.1"
    drop3000 = by_comment(rs, "3000 drop").handle
    found = later_accept(rs, "inet", "fw", "input", drop3000, facts(3000, src=outside))
    assert found is not None and found[0].comment == "3000 accept" and found[1] is YES
    # 7000: the accept is in another table, which is not the same evaluation
    drop7000 = by_comment(rs, "7000 drop").handle
    assert later_accept(rs, "inet", "fw", "input", drop7000, facts(7000, src=outside)) is None
    # inside a user chain that no rule sends this packet to: nothing to continue with
    checks_drop = by_comment(rs, "checks drop").handle
    assert later_accept(rs, "inet", "fw", "checks", checks_drop, facts(6002, src=outside)) is None
    wan = by_comment(rs, "wan ssh").handle
    found = later_accept(rs, "inet", "fw", "input", wan, facts(22, iif="wan0"))
    assert found is not None and found[0].comment == "ssh" and found[1] is YES
    # the only candidate is undecided (fib): UNKNOWN, never a guess either way
    range_drop = by_comment(rs, "range drop").handle
    found = later_accept(rs, "inet", "fw", "input", range_drop, facts(5000, src=outside))
    assert found is not None and found[0].comment == "fib" and found[1] is UNKNOWN
    # an accept reached through a jump
    est = by_comment(rs, "est").handle
    found = later_accept(rs, "inet", "fw", "input", est, facts(6001, src=outside))
    assert found is not None and found[0].comment == "6001 accept"


@pytest.mark.root
def test_accepting_rules_for_a_default_policy(nft_rs: Ruleset) -> None:
    rs = nft_rs
    assert accepting_rules(rs, "inet", "fw", "input", facts(9999, src="198.20.0.1")) == []
    found = {r.comment: t for r, t in accepting_rules(rs, "inet", "fw", "input", facts(5000, src="198.20.0.1"))}
    assert found == {"fib": UNKNOWN}
    found = {r.comment: t for r, t in accepting_rules(rs, "inet", "fw", "input", facts(443))}
    assert found["web"] is YES
    assert "est" not in found and "ssh" not in found
    found = {r.comment: t for r, t in accepting_rules(rs, "inet", "fw", "input", facts(5353, proto=17))}
    assert found == {"mdns lan": YES}  # through the verdict map's jump; its `53 : accept` is not selected
    # `tracer diagnose` before any packet: the source is unknown, rules on it are undecided
    anyone = PacketFacts(4, None, "198.18.0.1", 6, None, 443, ct_state="new", ct_status=(), hook="input")
    found = {r.comment: t for r, t in accepting_rules(rs, "inet", "fw", "input", anyone)}
    assert found == {"lo": UNKNOWN, "web": UNKNOWN, "mark": UNKNOWN}  # no iif, source or mark known


@pytest.mark.root
def test_from_event(nft_rs: Ruleset) -> None:
    headers = PacketHeaders(version=4, src="198.18.0.2", dst="198.18.0.1", protocol=6, sport=40000, dport=443,
                            tcp_flags=("SYN",))
    event = DropEvent(
        timestamp_ns=1,
        drop=Drop("NETFILTER_DROP"),
        packet=Packet(headers, length=60, mark=7),
        interfaces=Interfaces(ingress=Interface(3, "veth0b")),
        netfilter=Netfilter("nftables", "nftrace", family="inet", hook="input", table="fw", chain="input"),
        conntrack=ConntrackInfo("new", "original", ("confirmed",)),
    )
    f = PacketFacts.from_event(event)
    assert f is not None
    assert (f.family, f.dport, f.iif, f.oif, f.hook, f.ct_state, f.ct_status, f.mark, f.length) == (
        4, 443, "veth0b", None, "input", "new", ("confirmed",), 7, 60)
    assert matches(nft_rs, "web", f) is YES
    assert f.with_(dport=444).dport == 444
    assert PacketFacts.from_event(DropEvent(timestamp_ns=1, drop=Drop("NO_SOCKET"))) is None
    # no conntrack section: the state is unknown, not "none"
    bare = DropEvent(timestamp_ns=1, drop=Drop("NO_SOCKET", hook="input"), packet=Packet(headers))
    f = PacketFacts.from_event(bare)
    assert f is not None and f.ct_state is None and f.ct_status is None and f.hook == "input"
    assert matches(nft_rs, "est", f) is UNKNOWN


# --- iptables-nft -------------------------------------------------------------------------

IPTABLES_RULES = """\
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:checks - [0:0]
-A INPUT -m state --state RELATED,ESTABLISHED -j ACCEPT
-A INPUT -m conntrack --ctstate INVALID -j DROP
-A INPUT -i lo -j ACCEPT
-A INPUT -p tcp -m tcp --dport 3000 -j DROP
-A INPUT -s 198.18.0.0/15 ! -d 198.18.0.9/32 -p udp -m udp --sport 1000:2000 -j ACCEPT
-A INPUT -i veth+ -p tcp -m multiport --dports 80,443,8000:8080 -j ACCEPT
-A INPUT -p icmp -m icmp --icmp-type 8 -j ACCEPT
-A INPUT -p tcp -m tcp ! --tcp-flags FIN,SYN,RST,ACK SYN -m comment --comment "not a syn" -j DROP
-A INPUT -p tcp -m tcp --dport 25 -j REJECT --reject-with tcp-reset
-A INPUT -p tcp -j checks
-A INPUT -m mark --mark 0x10/0xff -j ACCEPT
-A INPUT -p tcp -m tcp --dport 3000 -j ACCEPT
-A INPUT -m limit --limit 5/sec -j ACCEPT
-A checks -p tcp -m tcp --dport 7777 -j RETURN
-A checks -p tcp -m conntrack --ctstate DNAT -j ACCEPT
-A checks -p tcp -m tcp --dport 7000:7999 -j DROP
COMMIT
"""

IP6TABLES_RULES = """\
*filter
:INPUT DROP [0:0]
:FORWARD ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -p ipv6-icmp -m icmp6 --icmpv6-type 135 -j ACCEPT
-A INPUT -s 2001:db8::/32 -p tcp -m tcp --dport 22 -j ACCEPT
COMMIT
"""


@pytest.fixture
def iptnft(lab: Lab) -> tuple[Ruleset, dict[str, list[str]], dict[str, list[str]]]:
    ns = lab.add_ns("ipt")
    lab.run(ns, ["iptables-nft-restore"], input=IPTABLES_RULES)
    lab.run(ns, ["ip6tables-nft-restore"], input=IP6TABLES_RULES)
    v4 = split_iptables_rules(lab.run(ns, ["iptables-nft", "-t", "filter", "-S"]).stdout)
    v6 = split_iptables_rules(lab.run(ns, ["ip6tables-nft", "-t", "filter", "-S"]).stdout)
    return ruleset_of(ns), v4, v6


def nth(rs: Ruleset, family: str, chain: str, number: int) -> Rule:
    c = rs.chain(family, "filter", chain)
    assert c is not None
    r = rs.rule(family, "filter", c.rules[number - 1])
    assert r is not None
    return r


@pytest.mark.root
def test_iptables_nft_translations_and_xt_lines(iptnft) -> None:
    rs, v4, v6 = iptnft
    assert rs.is_iptables_nft("ip", "filter")
    est = nth(rs, "ip", "INPUT", 1)  # -m state: an xt match in nft's listing
    assert rule_matches(rs, est, facts(ct_state="established")) is UNKNOWN
    line = v4["INPUT"][0]
    assert rule_matches(rs, est, facts(ct_state="established"), iptables_line=line) is YES
    assert rule_matches(rs, est, facts(ct_state="new"), iptables_line=line) is NO
    udp = nth(rs, "ip", "INPUT", 5)  # translated natively: prefix, != address, port range
    assert rule_matches(rs, udp, facts(53, proto=17, sport=1500)) is YES
    assert rule_matches(rs, udp, facts(53, proto=17, sport=1500, dst="198.18.0.9")) is NO
    assert rule_matches(rs, udp, facts(53, proto=17, sport=2001)) is NO
    multi = nth(rs, "ip", "INPUT", 6)
    assert rule_matches(rs, multi, facts(8080), iptables_line=v4["INPUT"][5]) is YES
    assert rule_matches(rs, multi, facts(8081), iptables_line=v4["INPUT"][5]) is NO
    assert rule_matches(rs, multi, facts(8080, proto=17)) is NO  # the native l4proto match decides
    assert rule_verdict(rs, nth(rs, "ip", "INPUT", 9), facts(25)) == "reject"
    assert rule_verdict(rs, nth(rs, "ip", "INPUT", 10), facts()) == "jump:checks"
    nd = nth(rs, "ip6", "INPUT", 1)
    v6f = facts(src="2001:db8::2", dst="2001:db8::1", proto=58, icmp_type=135, icmp_code=0)
    assert rule_matches(rs, nd, v6f, iptables_line=v6["INPUT"][0]) is YES
    assert rule_matches(rs, nd, v6f.with_(icmp_type=136), iptables_line=v6["INPUT"][0]) is NO


@pytest.mark.root
def test_iptables_nft_walk_and_later_accept(iptnft) -> None:
    rs, v4, _ = iptnft
    outside = "198.20.0.1"
    w = walk_chain(rs, "ip", "filter", "INPUT", facts(8080, src=outside), xt_lines=v4)
    assert (w.verdict, w.rule and w.rule.position) == ("accept", 5)
    drop3000 = nth(rs, "ip", "INPUT", 4)
    found = later_accept(rs, "ip", "filter", "INPUT", drop3000.handle, facts(3000, src=outside), xt_lines=v4)
    assert found is not None and found[0].position == 11 and found[1] is YES
    # without the lines, the -m state rule stays undecided and the walk says so
    w = walk_chain(rs, "ip", "filter", "INPUT", facts(9, src=outside, ct_state="established"))
    assert not w.certain
    w = walk_chain(rs, "ip", "filter", "INPUT", facts(9, src=outside, ct_state="established"), xt_lines=v4)
    assert (w.verdict, w.rule and w.rule.position, w.certain) == ("accept", 0, True)


# --- iptables-legacy ----------------------------------------------------------------------


@pytest.fixture
def legacy(lab: Lab) -> XtTable:
    ns = lab.add_ns("legacy")
    lab.run(ns, ["iptables-legacy-restore"], input=IPTABLES_RULES)
    tables = parse_save(lab.run(ns, ["iptables-legacy-save"]).stdout, "ip")
    return tables["filter"]


@pytest.mark.root
def test_legacy_matches(legacy: XtTable) -> None:
    t = legacy
    line = t.rule("INPUT", 5)
    assert line is not None and "--sport 1000:2000" in line
    assert xt_rule_matches(line, facts(53, proto=17, sport=1000)) is YES
    assert xt_rule_matches(line, facts(53, proto=17, sport=1000, dst="198.18.0.9")) is NO  # ! -d
    assert xt_rule_matches(line, facts(53, proto=17, sport=999)) is NO
    assert xt_rule_matches(line, facts(53, proto=6, sport=1000)) is NO
    multi = t.rule("INPUT", 6)
    assert multi is not None
    assert xt_rule_matches(multi, facts(443, iif="veth3")) is YES  # -i veth+
    assert xt_rule_matches(multi, facts(443, iif="eth0")) is NO
    assert xt_rule_matches(multi, facts(443, iif=None)) is UNKNOWN
    assert xt_rule_matches(multi, facts(8000)) is YES
    assert xt_rule_matches(multi, facts(8081)) is NO
    ping = t.rule("INPUT", 7)
    assert ping is not None
    assert xt_rule_matches(ping, facts(proto=1, icmp_type=8, icmp_code=0)) is YES
    assert xt_rule_matches(ping, facts(proto=1, icmp_type=0, icmp_code=0)) is NO
    flags = t.rule("INPUT", 8)  # ! --tcp-flags FIN,SYN,RST,ACK SYN, with a comment
    assert flags is not None
    assert xt_rule_matches(flags, facts(tcp_flags=("SYN",))) is NO
    assert xt_rule_matches(flags, facts(tcp_flags=("ACK",))) is YES
    assert xt_rule_matches(flags, facts(tcp_flags=())) is UNKNOWN
    mark = t.rule("INPUT", 11)
    assert mark is not None
    assert xt_rule_matches(mark, facts(mark=0x210)) is YES
    assert xt_rule_matches(mark, facts(mark=0x11)) is NO
    limit = t.rule("INPUT", 13)
    assert limit is not None and xt_rule_matches(limit, facts()) is UNKNOWN
    # a chain name that looks like matches is the chain's, not the rule's
    assert xt_rule_matches("-A x -p udp -p tcp --dport 22 -j ACCEPT", facts(22), chain="x -p udp") is YES
    assert xt_rule_matches("-A x -p udp -p tcp --dport 22 -j ACCEPT", facts(22)) is NO
    dnat = t.rule("checks", 2)
    assert dnat is not None
    assert xt_rule_matches(dnat, facts(ct_status=("confirmed", "dst_nat"))) is YES
    assert xt_rule_matches(dnat, facts(ct_status=("confirmed",))) is NO
    assert xt_rule_matches(dnat, facts(ct_status=None)) is UNKNOWN


@pytest.mark.root
def test_legacy_walks(legacy: XtTable) -> None:
    t = legacy
    outside = "198.20.0.1"
    w = xt_walk_chain(t, "INPUT", facts(7500, src=outside))
    assert (w.verdict, w.rule and (w.rule.chain, w.rule.number)) == ("drop", ("checks", 3))
    w = xt_walk_chain(t, "INPUT", facts(7777, src=outside, mark=0x10))  # RETURN, then -m mark accepts
    assert (w.verdict, w.rule and (w.rule.chain, w.rule.number), w.certain) == ("accept", ("INPUT", 11), True)
    w = xt_walk_chain(t, "INPUT", facts(7777, src=outside))  # RETURN; only -m limit could accept
    assert (w.verdict, w.policy, w.certain) == ("drop", True, False)
    assert [(r.chain, r.number) for r in w.undecided] == [("INPUT", 13)]
    found = xt_later_accept(t, "INPUT", 4, facts(3000, src=outside))
    assert found is not None and (found[0].number, found[1]) == (12, YES)
    # a drop inside the user chain: the accept after its caller's jump counts
    found = xt_later_accept(t, "checks", 3, facts(7500, src=outside, mark=0x10))
    assert found is not None and (found[0].chain, found[0].number, found[1]) == ("INPUT", 11, YES)
    found = xt_later_accept(t, "checks", 3, facts(7500, src=outside))
    assert found is not None and found[0].number == 13 and found[1] is UNKNOWN
    accepts = {(r.chain, r.number): v for r, v in xt_accepting_rules(t, "INPUT", facts(7500, src=outside))}
    assert accepts == {("INPUT", 13): UNKNOWN}
    accepts = {(r.chain, r.number): v for r, v in xt_accepting_rules(
        t, "INPUT", facts(7500, src=outside, ct_status=("dst_nat",)))}
    assert accepts == {("checks", 2): YES, ("INPUT", 13): UNKNOWN}


# --- properties -----------------------------------------------------------------------------


def _synthetic(right: dict, field: str = "saddr", proto: str = "ip") -> tuple[Ruleset, Rule]:
    """A one-rule ruleset in nft's JSON shape (what `nft -j` lists), for properties without root."""
    items = [
        {"table": {"family": "inet", "name": "t", "handle": 1}},
        {"chain": {"family": "inet", "table": "t", "name": "c", "handle": 1}},
        {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 2, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": proto, "field": field}}, "right": right}},
            {"accept": None}]}},
    ]
    rs = parse_ruleset(items)
    rule = rs.rule("inet", "t", 2)
    assert rule is not None
    return rs, rule


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, 2**32 - 1), st.integers(0, 32), st.integers(0, 2**32 - 1))
def test_prefix_membership_agrees_with_ipaddress(net: int, length: int, addr: int) -> None:
    network = ipaddress.IPv4Network((net, length), strict=False)
    rs, rule = _synthetic({"prefix": {"addr": str(network.network_address), "len": length}})
    ip = ipaddress.IPv4Address(addr)
    got = rule_matches(rs, rule, PacketFacts(4, str(ip), "198.18.0.1", 6, 1, 2))
    assert got is Tri.of(ip in network)
    line = f"-A INPUT -s {network} -j ACCEPT"
    assert xt_rule_matches(line, PacketFacts(4, str(ip), "198.18.0.1", 6, 1, 2)) is Tri.of(ip in network)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, 2**128 - 1), st.integers(0, 128), st.integers(0, 2**128 - 1))
def test_ipv6_prefix_membership_agrees_with_ipaddress(net: int, length: int, addr: int) -> None:
    network = ipaddress.IPv6Network((net, length), strict=False)
    rs, rule = _synthetic({"prefix": {"addr": str(network.network_address), "len": length}}, proto="ip6")
    ip = ipaddress.IPv6Address(addr)
    got = rule_matches(rs, rule, PacketFacts(6, str(ip), "2001:db8::1", 6, 1, 2))
    assert got is Tri.of(ip in network)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.integers(0, 65535), st.integers(0, 65535), st.integers(0, 65535))
def test_port_range_membership(a: int, b: int, port: int) -> None:
    lo, hi = min(a, b), max(a, b)
    rs, rule = _synthetic({"range": [lo, hi]}, field="dport", proto="tcp")
    f = PacketFacts(4, "198.18.0.2", "198.18.0.1", 6, 40000, port, tcp_flags=("SYN",))
    assert rule_matches(rs, rule, f) is Tri.of(lo <= port <= hi)
    assert xt_rule_matches(f"-A INPUT -p tcp -m tcp --dport {lo}:{hi} -j ACCEPT", f) is Tri.of(lo <= port <= hi)
    assert rule_matches(rs, rule, f.with_(dport=None)) is UNKNOWN
    assert rule_matches(rs, rule, f.with_(l4proto=17)) is NO


_loaded: dict[str, Ruleset] = {}

SET_RULESET = """\
table ip p {
  set nets { type ipv4_addr; flags interval; elements = { 198.18.0.0/16, 198.19.128.0/17, 198.19.3.7-198.19.3.70 } }
  chain c { ip saddr @nets accept comment "set"; ip saddr != 198.18.64.0/18 accept comment "not prefix"; }
}
"""


@pytest.mark.root
@settings(max_examples=200, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(addr=st.integers(int(ipaddress.IPv4Address("198.17.255.0")), int(ipaddress.IPv4Address("198.20.0.255"))))
def test_real_interval_set_agrees_with_ipaddress(lab: Lab, addr: int) -> None:
    if lab.suffix not in _loaded:  # once per lab: hypothesis runs every example in one test call
        ns = lab.add_ns("set")
        lab.nft(ns, SET_RULESET)
        _loaded[lab.suffix] = ruleset_of(ns)
    rs = _loaded[lab.suffix]
    ip = ipaddress.IPv4Address(addr)
    inside = (ip in ipaddress.ip_network("198.18.0.0/16") or ip in ipaddress.ip_network("198.19.128.0/17")
              or ipaddress.IPv4Address("198.19.3.7") <= ip <= ipaddress.IPv4Address("198.19.3.70"))
    f = PacketFacts(4, str(ip), "198.18.0.1", 17, 1, 2)
    assert matches(rs, "set", f) is Tri.of(inside)
    assert matches(rs, "not prefix", f) is Tri.of(ip not in ipaddress.ip_network("198.18.64.0/18"))


_WORDS = st.sampled_from(["match", "op", "left", "right", "payload", "protocol", "field", "meta", "key", "ct",
                          "set", "prefix", "addr", "len", "range", "concat", "&", "|", "vmap", "data", "elem",
                          "val", "jump", "target", "accept", "ip", "tcp", "saddr", "dport", "state", "@s", "==",
                          "!=", "in", "!", "<", "iifname", "flags", "xt", "type", "name", "limit"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 2**33) | _WORDS | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_WORDS, inner, max_size=3),
    max_leaves=12,
)


_LEFTS = st.sampled_from([
    {"payload": {"protocol": "ip", "field": "saddr"}}, {"payload": {"protocol": "tcp", "field": "dport"}},
    {"payload": {"protocol": "th", "field": "sport"}}, {"payload": {"protocol": "icmp", "field": "type"}},
    {"payload": {"protocol": "tcp", "field": "flags"}}, {"meta": {"key": "iifname"}}, {"meta": {"key": "mark"}},
    {"ct": {"key": "state"}}, {"ct": {"key": "status"}}, {"meta": {"key": "l4proto"}},
    {"concat": [{"payload": {"protocol": "ip", "field": "saddr"}}, {"payload": {"protocol": "tcp", "field": "dport"}}]},
    {"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, ["syn", "ack"]]},
])
_MATCHES = st.builds(lambda op, left, right: {"match": {"op": op, "left": left, "right": right}},
                     st.sampled_from(["==", "!=", "in", "!", "<", ">=", "??"]), _LEFTS, _JSON)
_VMAPS = st.builds(lambda key, data: {"vmap": {"key": key, "data": data}}, _LEFTS, _JSON)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.lists(_JSON | _MATCHES | _VMAPS, max_size=3), st.sampled_from([facts(22), facts(None, proto=1, icmp_type=3)]))
def test_any_expression_shape_gives_an_answer(exprs: list, f: PacketFacts) -> None:
    """Hostile or unforeseen JSON never raises: it evaluates to YES, NO or UNKNOWN."""
    items = [
        {"table": {"family": "inet", "name": "t", "handle": 1}},
        {"set": {"family": "inet", "table": "t", "name": "s", "type": "ipv4_addr", "elem": exprs}},
        {"chain": {"family": "inet", "table": "t", "name": "c", "handle": 1, "hook": "input", "policy": "drop"}},
        {"rule": {"family": "inet", "table": "t", "chain": "c", "handle": 2, "expr": exprs}},
    ]
    rs = parse_ruleset(items)
    rule = rs.rule("inet", "t", 2)
    assert rule is not None
    assert rule_matches(rs, rule, f) in (YES, NO, UNKNOWN)
    verdict = rule_verdict(rs, rule, f)
    assert verdict is None or isinstance(verdict, str)
    assert walk_chain(rs, "inet", "t", "c", f).verdict
    later_accept(rs, "inet", "t", "c", 2, f)
    accepting_rules(rs, "inet", "t", "c", f)
