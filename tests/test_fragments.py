"""Fragments and long IPv6 header chains, end to end.

Real BPF, real nft rulesets and real fragments (scapy builds them, a raw
socket in a lab namespace sends them). Three defects are covered:

- a non-first fragment dropped by a rule keeps its rule: the drop and the
  nftrace verdict get the same fingerprint although only the trace carries
  the fragment's payload, and no ports are invented for it;
- the transport header after many IPv6 extension headers is found, so the
  event has its ports and its rule;
- fragments freed from a reassembly queue on timeout (FRAG_REASM_TIMEOUT)
  carry the namespace they were queued in, so a `--netns` watch (filtered in
  BPF) sees them, although skb->dev is then no device.

Every watch is limited to the lab's receiving namespace (`netns=`): other
labs running at the same time use the same addresses, and the in-kernel
netns filter is part of what is tested.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, fragment6
from scapy.packet import Raw

from tests.support import Watch, rule_handles, wait_for
from tracer.event.packet import IPV6_MAX_EXT_HEADERS, decode, fingerprint

REASM = "FRAG_REASM_TIMEOUT"


# ------------------------------------------------------------ packet helpers


def udp_datagram(link, v6: bool, dport: int, payload: int, ident: int):
    """A UDP datagram from the link's a side to its b side, with a fragment header for IPv6."""
    if v6:
        return (IPv6(src=str(link.a_v6.ip), dst=str(link.b_v6.ip)) / IPv6ExtHdrFragment(id=ident)
                / UDP(sport=40000, dport=dport) / Raw(b"v" * payload))
    return IP(src=str(link.a_v4.ip), dst=str(link.b_v4.ip), id=ident) / UDP(sport=40000, dport=dport) / Raw(
        b"v" * payload)


def fragments(link, v6: bool, dport: int = 7100, payload: int = 800, size: int = 96, ident: int | None = None):
    """The datagram's fragments as bytes, first first; `size` is each fragment's payload (IPv4) or length (IPv6)."""
    ident = ident if ident is not None else secrets.randbelow(0xFFFF) + 1
    pkt = udp_datagram(link, v6, dport, payload, ident)
    frags = fragment6(pkt, size) if v6 else fragment(pkt, fragsize=size)
    out = [bytes(f) for f in frags]
    assert len(out) >= 4, "the tests need a datagram of at least four fragments"
    return out


def with_dest_options(link, count: int, l4) -> bytes:
    """An IPv6 packet with `count` destination-options headers before `l4`."""
    chain = IPv6ExtHdrDestOpt()
    for _ in range(count - 1):
        chain = chain / IPv6ExtHdrDestOpt()
    return bytes(IPv6(src=str(link.a_v6.ip), dst=str(link.b_v6.ip)) / chain / l4)


def ports(ev: dict) -> tuple[int | None, int | None]:
    return ev.get("source", {}).get("port"), ev.get("destination", {}).get("port")


def rule_of(ev: dict) -> dict | None:
    return ev.get("netfilter", {}).get("rule")


def events_of(w: Watch, pred) -> list[dict]:
    return [e for e in list(w.sink.events) if pred(e)]


def wait_count(w: Watch, pred, n: int, timeout: float) -> list[dict]:
    """Waits until `n` events match; returns them (fails with what arrived)."""
    wait_for(lambda: len(events_of(w, pred)) >= n, timeout)
    got = events_of(w, pred)
    assert len(got) >= n, f"{len(got)} of {n} events arrived: {got}"
    return got


# ------------------------------------------------------------ the fingerprint, from what each side sees


def test_later_ipv4_fragment_fingerprint_ignores_the_payload():
    """The trace gives the payload as transport header, BPF gives none: one key."""
    frag = bytes(IP(src="198.18.0.1", dst="198.18.0.2", id=9, frag=8, proto=17) / Raw(b"payload-bytes-here"))
    trace = fingerprint(frag[:20], frag[20:40])
    bpf = fingerprint(frag[:40], b"")
    assert trace == bpf is not None
    other = bytes(IP(src="198.18.0.1", dst="198.18.0.2", id=9, frag=16, proto=17) / Raw(b"payload-bytes-here"))
    assert fingerprint(other[:40], b"") != bpf  # another fragment of the same datagram
    h = decode(frag[:40], frag[20:40])
    assert (h.protocol, h.sport, h.dport) == (17, None, None)


def test_later_ipv6_fragment_fingerprint_matches_the_trace_form():
    """nftables traces a non-first IPv6 fragment with no network header and the
    first 20 bytes of the IPv6 header as its transport header."""
    frag = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", fl=7) / IPv6ExtHdrFragment(id=5, offset=3, nh=17)
                 / Raw(b"x" * 24))
    bpf = fingerprint(frag[:40], b"")
    assert fingerprint(b"", frag[:20]) == bpf is not None
    # iptables-legacy (NFLOG) hands over the whole packet: the same key without transport bytes.
    assert fingerprint(frag[:40], b"") == bpf
    first = bytes(IPv6(src="2001:db8::1", dst="2001:db8::2", fl=7) / IPv6ExtHdrFragment(id=5, m=1)
                  / UDP(sport=1, dport=2))
    assert fingerprint(first[:40], first[48:68]) != bpf


def test_first_fragment_keeps_its_ports():
    pkt = IP(src="198.18.0.1", dst="198.18.0.2", id=3) / UDP(sport=40000, dport=7100) / Raw(b"v" * 200)
    first = bytes(fragment(pkt, fragsize=64)[0])
    h = decode(first[:40], first[20:40])
    assert (h.sport, h.dport) == (40000, 7100)
    assert fingerprint(first[:20], first[20:40]) == fingerprint(first[:40], first[20:40])


# ------------------------------------------------------------ fragments dropped by a rule

LATER_V4_RULES = {
    "frag-off": "ip frag-off & 0x1fff != 0 counter drop",
    "address": "ip saddr 198.18.0.1 ip daddr 198.18.0.2 counter drop",
}


@pytest.mark.parametrize("kind", sorted(LATER_V4_RULES))
@pytest.mark.root
@pytest.mark.bpf
def test_later_ipv4_fragments_keep_their_rule_and_have_no_ports(lab, watch, kind):
    """IPv4 reassembles before the input hook, so the rule is in prerouting (no conntrack, no defrag)."""
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    rule = LATER_V4_RULES[kind]
    lab.nft(b, f"""
table inet fw {{
    chain pre {{
        type filter hook prerouting priority filter;
        {rule} comment "later fragments"
    }}
}}
""")
    text = rule.replace("0x1fff", "8191")
    handle = rule_handles(lab, b)[text]
    frags = fragments(link, v6=False)
    w = watch(netns=b.name)
    for f in frags[1:3]:  # two later fragments of one datagram: two drops, two keys
        assert lab.send_ip(a, f)
    lengths = {len(f) for f in frags[1:3]}
    got = wait_count(w, lambda e: e["drop"]["reason"] == "NETFILTER_DROP"
                     and e.get("packet", {}).get("length") in lengths, 2, 5.0)
    for ev in got:
        assert rule_of(ev) == {"handle": handle, "text": text, "comment": "later fragments"}
        assert ev["netfilter"]["attribution"] == "nftrace"
        assert ev["network"]["transport"] == "udp"
        assert ports(ev) == (None, None)
        assert ev["netns"]["name"] == b.name


@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.root
@pytest.mark.bpf
def test_first_fragment_keeps_its_rule_and_ports(lab, watch, v6):
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    hook = "input" if v6 else "prerouting"
    lab.nft(b, f"""
table inet fw {{
    chain c {{
        type filter hook {hook} priority filter;
        udp dport 7100 counter drop comment "first fragment"
    }}
}}
""")
    handle = rule_handles(lab, b)["udp dport 7100 counter drop"]
    frags = fragments(link, v6=v6)
    w = watch(netns=b.name)
    assert lab.send_ip(a, frags[0])
    ev = w.sink.wait_for(lambda e: ports(e) == (40000, 7100), 5.0)
    assert rule_of(ev) == {"handle": handle, "text": "udp dport 7100 counter drop", "comment": "first fragment"}
    assert ev["network"]["transport"] == "udp"


V6_LATER_RULESET = """
table inet fw {
    chain input {
        type filter hook input priority filter;
        frag frag-off != 0 counter drop comment "later fragments"
    }
}
"""


def _send_later_v6(lab, watch):
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    lab.nft(b, V6_LATER_RULESET)  # no conntrack: IPv6 fragments reach the input hook unreassembled
    handle = rule_handles(lab, b)["frag frag-off != 0 counter drop"]
    frags = fragments(link, v6=True)
    w = watch(netns=b.name)
    assert lab.send_ip(a, frags[1])
    ev = w.sink.wait_for(lambda e: e["drop"]["reason"] == "NETFILTER_DROP"
                         and e.get("packet", {}).get("length") == len(frags[1]), 5.0)
    return b, handle, ev


@pytest.mark.root
@pytest.mark.bpf
def test_later_ipv6_fragment_has_no_ports(lab, watch):
    b, _, ev = _send_later_v6(lab, watch)
    assert ev["network"]["transport"] == "udp"  # the fragment header's next header
    assert ports(ev) == (None, None)
    assert ev["netns"]["name"] == b.name


@pytest.mark.root
@pytest.mark.bpf
def test_later_ipv6_fragment_keeps_its_rule(lab, watch):
    _, handle, ev = _send_later_v6(lab, watch)
    assert rule_of(ev) == {"handle": handle, "text": "frag frag-off != 0 counter drop",
                           "comment": "later fragments"}


# ------------------------------------------------------------ long IPv6 extension header chains

OPTIONS_RULESET = """
table inet fw {
    chain input {
        type filter hook input priority filter;
        udp dport 7001 counter drop comment "udp after options"
        tcp dport 7002 counter drop comment "tcp after options"
    }
}
"""


@pytest.mark.parametrize("count", [6, IPV6_MAX_EXT_HEADERS])
@pytest.mark.parametrize("proto", ["udp", "tcp"])
@pytest.mark.root
@pytest.mark.bpf
def test_transport_after_many_extension_headers(lab, watch, proto, count):
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    lab.nft(b, OPTIONS_RULESET)
    port = 7001 if proto == "udp" else 7002
    text = f"{proto} dport {port} counter drop"
    handle = rule_handles(lab, b)[text]
    l4 = UDP(sport=5000, dport=port) if proto == "udp" else TCP(sport=5000, dport=port, flags="S")
    w = watch(netns=b.name)
    assert lab.send_ip(a, with_dest_options(link, count, l4))
    ev = w.sink.wait_for(lambda e: ports(e) == (5000, port), 5.0)
    assert ev["network"]["transport"] == proto
    assert rule_of(ev) == {"handle": handle, "text": text, "comment": f"{proto} after options"}
    assert ev["netns"]["name"] == b.name


@pytest.mark.root
@pytest.mark.bpf
def test_chain_longer_than_the_walk_invents_no_ports(lab, watch):
    """Past IPV6_MAX_EXT_HEADERS the BPF walk gives up: the event says what it saw, no ports."""
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    lab.nft(b, OPTIONS_RULESET)
    data = with_dest_options(link, IPV6_MAX_EXT_HEADERS + 1, UDP(sport=5000, dport=7001))
    w = watch(netns=b.name)
    assert lab.send_ip(a, data)
    ev = w.sink.wait_for(lambda e: e.get("packet", {}).get("length") == len(data), 5.0)
    assert ev["network"]["transport"] == "60" and ports(ev) == (None, None)
    assert ev["drop"]["reason"] == "NETFILTER_DROP"


# ------------------------------------------------------------ reassembly timeouts

_FRAG_SYSCTLS = ("net/ipv4/ipfrag_time", "net/ipv6/ip6frag_time", "net/netfilter/nf_conntrack_frag6_timeout")

#: Conntrack in b: fragments are then queued by nf_defrag at prerouting
#: (IPv6: its own queue and timeout, expired by nf_ct_frag6_expire).
CONNTRACK_RULESET = """
table inet track {
    chain pre {
        type filter hook prerouting priority filter;
        ct state invalid counter drop
    }
}
"""


def _root_sysctls() -> dict[str, str]:
    """The values this process (in the root namespace) sees: they must not change."""
    return {k: Path("/proc/sys", k).read_text() for k in _FRAG_SYSCTLS}


def _short_reassembly_timeout(lab, ns) -> None:
    """1 s reassembly timeouts inside a lab namespace only (the sysctls are per namespace)."""
    names = [k.replace("/", ".") for k in _FRAG_SYSCTLS]
    lab.run(ns, ["sysctl", "-q", "-w", *(f"{n}=1" for n in names)])
    assert lab.run(ns, ["sysctl", "-n", *names]).stdout.split() == ["1"] * len(names)


@pytest.fixture
def reasm_lab(lab):
    """a -> b, with short reassembly timeouts in b; checks the root namespace's values are untouched."""
    before = _root_sysctls()
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    _short_reassembly_timeout(lab, b)
    assert _root_sysctls() == before
    yield a, b, link
    assert _root_sysctls() == before


@pytest.mark.parametrize("defrag", ["local", "conntrack"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.root
@pytest.mark.bpf
def test_reassembly_timeout_drops_carry_the_namespace(lab, watch, reasm_lab, v6, defrag):
    """Heads and the fragments purged after them pass an in-kernel --netns filter, named."""
    a, b, link = reasm_lab
    if defrag == "conntrack":
        lab.nft(b, CONNTRACK_RULESET)
    alone = fragments(link, v6, size=96)[:1]                       # a first fragment alone
    reversed_ = list(reversed(fragments(link, v6, size=112)[:-1]))  # last missing, out of order: rb-tree nodes
    gap = fragments(link, v6, size=128)
    in_order = gap[:2] + gap[3:]                                    # one in the middle missing: a run after the head
    sent = alone + reversed_ + in_order
    w = watch(netns=b.name, reasons=(REASM,))
    for f in sent:
        assert lab.send_ip(a, f)
    got = wait_count(w, lambda e: e["drop"]["reason"] == REASM, len(sent), 8.0)
    assert len(got) == len(sent)
    assert sorted(e["packet"]["length"] for e in got) == sorted(len(f) for f in sent)
    for ev in got:
        assert ev["netns"] == {"inode": b.inode, "name": b.name}
        assert ev["observer"]["ingress"]["interface"]["name"] == link.b_ifname
    heads = [e for e in got if ports(e) != (None, None)]
    assert len(heads) == 3 and all(ports(e) == (40000, 7100) for e in heads)
    expire = {("local", False): "ip_expire", ("conntrack", False): "ip_expire",
              ("local", True): "ip6_frag_expire", ("conntrack", True): "nf_ct_frag6_expire"}[defrag, v6]
    assert {e["drop"]["location"].split("+")[0] for e in heads} == {expire}


@pytest.mark.parametrize("order", ["in-order", "reversed"])
@pytest.mark.parametrize("v6", [False, True], ids=["ipv4", "ipv6"])
@pytest.mark.root
@pytest.mark.bpf
def test_reassembly_drops_without_a_head_never_name_another_namespace(lab, reasm_lab, v6, order):
    """Without its first fragment a queue has no head to learn the namespace from.

    Fragments that never were rb-tree nodes (in order: all but the first
    make one run) keep their real device and are named; the others (out of
    order every fragment is a node) have no namespace rather than one read
    from a garbage skb->dev. Watched without a netns filter, picked out by
    their lengths.
    """
    a, b, link = reasm_lab
    frags = fragments(link, v6, size=136)[1:]  # no first fragment
    if order == "reversed":
        frags.reverse()
    sizes = {len(f) for f in frags}
    w = Watch(netns_prefix=None, reasons=(REASM,), nftrace=False)
    try:
        for f in frags:
            assert lab.send_ip(a, f)
        dst = str(link.b_v6.ip if v6 else link.b_v4.ip)
        mine = lambda e: (e["drop"]["reason"] == REASM and e.get("destination", {}).get("ip") == dst  # noqa: E731
                          and e.get("packet", {}).get("length") in sizes)
        got = wait_count(w, mine, len(frags), 8.0)
    finally:
        w.stop()
    named = [e for e in got if "netns" in e]
    assert all(e["netns"] == {"inode": b.inode, "name": b.name} for e in named)
    if order == "in-order":
        assert len(named) == len(frags) - 1  # all but the run's first, the tree node
    assert all(ports(e) == (None, None) for e in got)
