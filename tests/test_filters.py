"""Scope validation and the nft match expressions it turns into."""

from __future__ import annotations

import ipaddress

import pytest

from tracer.config import Scope
from tracer.lab import Lab
from tracer.netfilter.marking import mark_commands, nft_match_rules


def test_empty_filter_marks_everything() -> None:
    f = Scope()
    assert f.empty
    assert nft_match_rules(f) == [""]
    assert nft_match_rules(f, "output") == [""]


def test_ports_match_source_or_destination() -> None:
    assert nft_match_rules(Scope(ports=(443,), proto="tcp")) == ["tcp sport 443", "tcp dport 443"]
    assert nft_match_rules(Scope(ports=(53, 443))) == [
        "meta l4proto { tcp, udp, sctp, udplite, dccp } th sport { 53, 443 }",
        "meta l4proto { tcp, udp, sctp, udplite, dccp } th dport { 53, 443 }",
    ]


def test_hosts_and_ports_give_the_cross_product() -> None:
    f = Scope(ports=(443,), hosts=("198.18.0.0/24", "2001:db8::1"), proto="tcp")
    assert nft_match_rules(f) == [
        "ip saddr 198.18.0.0/24 tcp sport 443",
        "ip saddr 198.18.0.0/24 tcp dport 443",
        "ip daddr 198.18.0.0/24 tcp sport 443",
        "ip daddr 198.18.0.0/24 tcp dport 443",
        "ip6 saddr 2001:db8::1/128 tcp sport 443",
        "ip6 saddr 2001:db8::1/128 tcp dport 443",
        "ip6 daddr 2001:db8::1/128 tcp sport 443",
        "ip6 daddr 2001:db8::1/128 tcp dport 443",
    ]


def test_protocols_and_interface() -> None:
    assert nft_match_rules(Scope(proto="icmp")) == ["meta l4proto icmp"]
    assert nft_match_rules(Scope(proto="icmpv6")) == ["meta l4proto ipv6-icmp"]
    assert nft_match_rules(Scope(proto="47", iface="veth0")) == ['iifname "veth0" meta l4proto 47']
    assert nft_match_rules(Scope(proto=47, iface="veth0"), "output") == ['oifname "veth0" meta l4proto 47']
    # icmp is IPv4 only: IPv6 hosts drop out rather than yielding a rule that never matches.
    assert nft_match_rules(Scope(proto="icmp", hosts=("198.18.0.1", "2001:db8::1"))) == [
        "ip saddr 198.18.0.1/32 meta l4proto icmp",
        "ip daddr 198.18.0.1/32 meta l4proto icmp",
    ]


def test_normalisation() -> None:
    f = Scope(
        ports=("443", 80, 443),  # type: ignore[arg-type]
        hosts=("198.18.0.7/24",),  # type: ignore[arg-type]
        proto="TCP",
        reasons=("skb_drop_reason_netfilter_drop",),
    )
    assert f.ports == (80, 443)
    assert f.hosts == (ipaddress.ip_network("198.18.0.0/24"),)
    assert f.proto == "tcp"
    assert f.reasons == ("NETFILTER_DROP",)
    assert Scope(proto="6").proto == "tcp"
    assert Scope(proto="ipv6-icmp").proto == "icmpv6"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ports": (0,)}, "out of range 1-65535"),
        ({"ports": (65536,)}, "out of range 1-65535"),
        ({"ports": ("http",)}, "is not a number"),
        ({"hosts": ("198.18.0.0/33",)}, "not an IPv4/IPv6 address or CIDR prefix"),
        ({"hosts": ("example.com",)}, "not an IPv4/IPv6 address or CIDR prefix"),
        ({"proto": "tcpp"}, "is not one of"),
        ({"proto": "256"}, "out of range 0-255"),
        ({"proto": "icmp", "ports": (1,)}, "has no ports"),
        ({"proto": "icmpv6", "hosts": ("198.18.0.1",)}, "never matches"),
        ({"iface": "an-interface-name-too-long"}, "not a valid Linux interface name"),
        ({"iface": 'eth0" accept'}, "not a valid Linux interface name"),
        ({"netns": "a b"}, "not a valid name"),
        ({"reasons": ("not a reason",)}, "drop-reason name"),
    ],
)
def test_invalid_input_is_refused_clearly(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Scope(**kwargs)  # type: ignore[arg-type]


def test_netns_scope() -> None:
    assert Scope().matches_netns(1, None)
    assert Scope(netns="web").matches_netns(1, "web")
    assert Scope(netns="4026532211").matches_netns(4026532211, None)
    assert not Scope(netns="web").matches_netns(1, "db")


FILTERS = [
    Scope(),
    Scope(ports=(53, 443)),
    Scope(ports=(443,), proto="tcp", hosts=("198.18.0.0/24", "2001:db8::/64")),
    Scope(proto="icmpv6", hosts=("2001:db8::1",)),
    Scope(proto="sctp", ports=(9,), iface="veth0a"),
    Scope(proto="132"),
]


@pytest.mark.root
@pytest.mark.parametrize("f", FILTERS, ids=range(len(FILTERS)))
def test_generated_marking_table_is_valid_nft(lab: Lab, f: Scope) -> None:
    """nft itself accepts what we generate (checked with `nft -c`, nothing is loaded)."""
    ns = lab.add_ns("check")
    lab.run(ns, ["nft", "-c", "-f", "-"], input=mark_commands("tracer_mark", f, rate=1000, burst=100))
    assert lab.nft_list(ns) == ""
