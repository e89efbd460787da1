"""Fix commands: the owner's syntax, quoting that survives hostile names, and the event's round trip.

Pure tests (no root): the commands are parsed back with shlex, as a shell would split a pasted
line, and compared word by word. The lab tests that run them are in tests/test_diagnosis.py.
"""

from __future__ import annotations

import shlex

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tracer.diagnosis import fixes
from tracer.diagnosis.facts import PacketFacts
from tracer.event.model import Diagnosis, Drop, DropEvent
from tracer.event.schema import validate
from tracer.netns import Netns

NS = Netns(inode=1, path="/var/run/netns/web", name="web")
SYN = PacketFacts(family=4, src="198.18.0.1", dst="198.18.0.2", l4proto=6, sport=40000, dport=8443,
                  tcp_flags=("SYN",))


def test_nft_insert_before_the_rule_in_its_namespace():
    place = fixes.Place("nftables", "inet", "fw", "input", NS, handle=7)
    [cmd] = fixes.accept_commands(place, fixes.nft_match(SYN), fixes.xt_matches(SYN))
    assert shlex.split(cmd) == ["ip", "netns", "exec", "web", "nft",
                                "insert rule inet fw input position 7 tcp dport 8443 accept"]


def test_iptables_takes_the_line_number_and_the_system_variant():
    place = fixes.Place("iptables-nft", "ip6", "filter", "INPUT", NS, number=2)
    [cmd] = fixes.accept_commands(place, None, fixes.xt_matches(SYN))
    words = shlex.split(cmd)
    assert words[4] in ("ip6tables", "ip6tables-nft")
    assert words[5:] == ["-I", "INPUT", "2", "-p", "tcp", "--dport", "8443", "-j", "ACCEPT"]
    nat = fixes.Place("iptables-legacy", "ip", "nat", "PREROUTING", None)
    [cmd] = fixes.accept_commands(nat, None, fixes.xt_matches(SYN))
    assert shlex.split(cmd)[1:5] == ["-t", "nat", "-A", "PREROUTING"]


def test_policy_appends_and_established_goes_first():
    policy = fixes.Place("nftables", "ip6", "edge", "in", None)
    match = fixes.nft_match(SYN.with_(dport=3000))
    assert fixes.accept_commands(policy, match, []) == ["nft 'add rule ip6 edge in tcp dport 3000 accept'"]
    first = fixes.Place("iptables-nft", "ip", "filter", "INPUT", None, first=True)
    [cmd] = fixes.accept_commands(first, fixes.ESTABLISHED_NFT, [fixes.ESTABLISHED_XT])
    assert shlex.split(cmd)[1:] == ["-I", "INPUT", "1", "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED",
                                    "-j", "ACCEPT"]


def test_icmp_and_neighbour_discovery_matches():
    frag = SYN.with_(l4proto=1, sport=None, dport=None, icmp_type=3, icmp_code=4, tcp_flags=())
    assert fixes.nft_match(frag).text == "icmp type destination-unreachable"
    ns6 = PacketFacts(family=6, src="2001:db8::1", dst="ff02::1:ff00:2", l4proto=58, icmp_type=135, icmp_code=0)
    assert fixes.nft_match(ns6).text == "icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }"
    assert [m[-1] for m in fixes.xt_matches(ns6)] == ["neighbour-advertisement", "neighbour-solicitation"]


def test_names_nft_text_cannot_hold_make_a_json_command():
    for table in ('a"b', "a\nb", "a\\b", "x y", "$(id)"):
        [cmd] = fixes.accept_commands(fixes.Place("nftables", "inet", table, "input", None, handle=4),
                                      fixes.nft_match(SYN), [])
        words = shlex.split(cmd)
        assert words[:2] == ["nft", "-j"] and len(words) == 3
        rule = orjson.loads(words[2])["nftables"][0]["insert"]["rule"]
        assert (rule["table"], rule["chain"], rule["handle"]) == (table, "input", 4)
        assert rule["expr"][-1] == {"accept": None}
    assert fixes.accept_commands(fixes.Place("iptables-nft", "ip", "filter", "-F", None), None,
                                 [["-p", "tcp"]]) == []
    assert fixes.sysctl_command(None, ["net", "ipv4", "conf", "a/b", "rp_filter"], 2) is None


@given(st.text(min_size=1, max_size=30))
def test_any_name_is_one_word_and_exactly_itself(name):
    """Whatever a namespace's owner names a chain, the pasted line splits back into exactly the words
    meant, and the name reaches nft as itself: plain in the text syntax, else inside JSON."""
    place = fixes.Place("nftables", "inet", "fw", name, NS, handle=3)
    [cmd] = fixes.accept_commands(place, fixes.nft_match(SYN), [])
    words = shlex.split(cmd)
    assert words[:5] == ["ip", "netns", "exec", "web", "nft"]
    if fixes.nft_name(name) == name:
        assert words[5:] == [f"insert rule inet fw {name} position 3 tcp dport 8443 accept"]
    else:
        assert words[5] == "-j" and len(words) == 7
        assert orjson.loads(words[6])["nftables"][0]["insert"]["rule"]["chain"] == name


def test_sysctl_uses_slashes_when_an_interface_has_a_dot():
    assert fixes.sysctl_command(NS, ["net", "ipv4", "conf", "eth0.100", "rp_filter"], 2) == \
        "ip netns exec web sysctl -w net/ipv4/conf/eth0.100/rp_filter=2"
    assert fixes.sysctl_command(None, ["net", "ipv4", "ip_forward"], 1) == "sysctl -w net.ipv4.ip_forward=1"


def test_diagnosis_section_round_trips_and_validates():
    event = DropEvent(timestamp_ns=1_700_000_000_000_000_000, drop=Drop("NO_SOCKET"),
                      diagnosis=Diagnosis("closed_port", "nothing listens on tcp port 9", (), ("no socket",)))
    doc = event.to_ecs()
    validate(doc)
    assert doc["diagnosis"] == {"cause": "closed_port", "summary": "nothing listens on tcp port 9", "fix": [],
                                "evidence": ["no socket"]}
    assert DropEvent.from_ecs(doc).to_ecs() == doc
    with pytest.raises(Exception, match="cause"):
        validate({**doc, "diagnosis": {**doc["diagnosis"], "cause": "bad_luck"}})


def test_text_line_escapes_what_could_act_on_a_terminal():
    d = Diagnosis("rule_blocks", "rule 3 of inet fw input drops it",
                  ("nft 'delete rule inet \"a\x1b[2Jb\" x handle 3'",))
    line = d.text()
    assert "\x1b" not in line and "\\x1b" in line
    assert Diagnosis("rule_blocks", 'rule 3 of "x"', ("nft 'x'",)).text() == \
        'cause rule_blocks: rule 3 of "x"  fix: nft \'x\''
