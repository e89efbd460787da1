"""Related packets pass the watch filter (issue 10, item 2).

A `--port`/`--host` watch also selects, in the kernel: the ICMP error that
quotes a watched packet, neighbour discovery naming a watched host, and a
DNATed flow by its pre-NAT port or address (the conntrack tuples). The lab
tests use real namespaces, rulesets, traffic and BPF; the first tests check
the decoding and the JSON form on their own.
"""

from __future__ import annotations

import time

import pytest

from tracer.collectors.conntrack import reversed_tuple, with_nat_tuples
from tracer.event.packet import (
    IPPROTO_ICMP,
    IPPROTO_TCP,
    PacketHeaders,
    decode_arp,
    is_icmp_error,
    protocol_of_transport,
)
from tracer.event.sections import ConntrackInfo, CtTuple, Packet, _headers_from_ecs
from tracer.lab import Lab, routed_path

# ------------------------------------------------------------ decoding, no kernel


def test_quoted_packet_round_trips_through_ecs() -> None:
    quoted = PacketHeaders(4, "198.18.0.1", "198.18.1.2", IPPROTO_TCP, sport=40080, dport=80)
    icmp = PacketHeaders(4, "198.18.0.2", "198.18.0.1", IPPROTO_ICMP, icmp_type=3, icmp_code=4, quoted=quoted)
    doc: dict = {"drop": {}}
    Packet(icmp).add_flow_ecs(doc, None)
    assert doc["drop"]["icmp"] == {
        "type": 3, "code": 4,
        "quoted": {"source": {"ip": "198.18.0.1", "port": 40080}, "destination": {"ip": "198.18.1.2", "port": 80},
                   "transport": "tcp"},
    }
    back = _headers_from_ecs(doc)
    assert back is not None and back.quoted == quoted


def test_transport_names_invert() -> None:
    assert protocol_of_transport("ipv6-icmp") == 58
    assert protocol_of_transport("47") == 47
    with pytest.raises(ValueError, match="neither"):
        protocol_of_transport("nonsense")
    assert is_icmp_error(1, 3) and is_icmp_error(58, 2)
    assert not is_icmp_error(1, 8) and not is_icmp_error(58, 135) and not is_icmp_error(6, 3)


def test_nat_tuples_only_when_nat_changed_the_flow() -> None:
    info = ConntrackInfo("new", "original", ("confirmed",))
    plain = CtTuple("198.18.0.1", "198.18.0.2", 40000, 80)
    assert with_nat_tuples(info, plain, reversed_tuple(plain)) is info
    dnat_reply = CtTuple("198.18.1.2", "198.18.0.1", 80, 40000)
    original = CtTuple("198.18.0.1", "198.18.0.2", 40000, 8080)
    got = with_nat_tuples(info, original, dnat_reply)
    assert got.original == original and got.reply == dnat_reply and got.nat
    assert with_nat_tuples(ConntrackInfo("invalid"), original, dnat_reply) == ConntrackInfo("invalid")
    assert ConntrackInfo.from_ecs(got.to_ecs()) == got


def test_arp_header_decodes() -> None:
    header = bytes.fromhex("0001080006040001020000000001c6120001000000000000c6120002")
    n = decode_arp(header)
    assert n is not None and (n.protocol, n.op, n.sender, n.target) == ("arp", 1, "198.18.0.1", "198.18.0.2")
    assert decode_arp(header[:20]) is None
    assert decode_arp(b"\x00\x06" + header[2:]) is None  # not Ethernet


# ------------------------------------------------------------ in the kernel


def _icmp_type(ev: dict) -> int | None:
    return ev.get("drop", {}).get("icmp", {}).get("type")


def _input_ruleset(rule: str) -> str:
    return f"""
table inet fw {{
    chain input {{
        type filter hook input priority filter; policy accept;
        {rule}
    }}
}}
"""


def _quiet(col, pred, seconds: float = 0.7) -> None:
    """Fails if an event matching `pred` arrives within `seconds`."""
    time.sleep(seconds)
    assert not [ev for ev in col.events if pred(ev)], col.events


@pytest.mark.root
@pytest.mark.bpf
def test_frag_needed_quoting_port_80_is_seen_with_port_80(lab: Lab, watch) -> None:
    """A DF segment too big for the far link: the router's "fragmentation needed" dies in the
    client's input on a rule. `--port 80` selects it by the TCP segment it quotes, and only that."""
    from scapy.layers.inet import IP, TCP

    path = routed_path(lab, far_mtu=1280)
    lab.nft(path.client, _input_ruleset('icmp type destination-unreachable drop comment "no icmp"'))
    w = watch(ports=(80,), hosts=())
    client, server = str(path.near.a_v4.ip), str(path.far.b_v4.ip)
    for dport in (81, 80):  # the unrelated one first: its error must not show
        segment = IP(src=client, dst=server, flags="DF", id=7000 + dport) / TCP(sport=40000 + dport, dport=dport,
                                                                               flags="PA") / (b"x" * 1400)
        assert lab.send_ip(path.client, bytes(segment))
    ev = w.sink.wait_for(lambda e: _icmp_type(e) == 3, timeout=5)
    assert ev["drop"]["reason"] == "NETFILTER_DROP"
    assert ev["netns"]["name"] == path.client.name
    assert ev["drop"]["icmp"] == {
        "type": 3, "code": 4,
        "quoted": {"source": {"ip": client, "port": 40080}, "destination": {"ip": server, "port": 80},
                   "transport": "tcp"},
    }
    assert (ev["source"]["ip"], ev["destination"]["ip"]) == (str(path.near.b_v4.ip), client)
    _quiet(w.sink, lambda e: e.get("drop", {}).get("icmp", {}).get("quoted", {}).get("destination", {})
           .get("port") == 81)


@pytest.mark.root
@pytest.mark.bpf
def test_neighbor_solicitation_for_a_watched_host_is_seen(lab: Lab, watch) -> None:
    """The server's rule drops neighbour solicitations; `--host <server>` shows the one that asks
    for the server, though it is sent from the client to a multicast group: its target matches."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    peer = str(link.b_v6.ip)
    lab.ip(client, "-6", "neigh", "del", peer, "dev", link.a_ifname)
    lab.nft(server, _input_ruleset('icmpv6 type nd-neighbor-solicit drop comment "no nd"'))
    w = watch(hosts=(f"{peer}/128",))
    lab.tcp_connect(client, peer, 80, timeout=0.3)
    ev = w.sink.wait_for(lambda e: _icmp_type(e) == 135, timeout=5)
    assert ev["netns"]["name"] == server.name
    assert ev["drop"]["reason"] == "NETFILTER_DROP"
    # Neither address is the watched host: the solicitation's target is.
    assert ev["destination"]["ip"].startswith("ff02::1:ff")
    assert peer not in (ev["source"]["ip"], ev["destination"]["ip"])


@pytest.mark.root
@pytest.mark.bpf
def test_neighbor_solicitation_is_not_selected_by_port_alone(lab: Lab, watch) -> None:
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    peer = str(link.b_v6.ip)
    lab.ip(client, "-6", "neigh", "del", peer, "dev", link.a_ifname)
    lab.nft(server, _input_ruleset("icmpv6 type nd-neighbor-solicit drop"))
    w = watch(ports=(80,), hosts=())
    lab.tcp_connect(client, peer, 80, timeout=0.3)
    _quiet(w.sink, lambda e: _icmp_type(e) == 135)


def _dnat_lab(lab: Lab):
    """client -- router -- server; the router forwards its port 8080 to the server's 80, and its
    forward chain accepts nothing."""
    path = routed_path(lab)
    router, server = str(path.near.b_v4.ip), str(path.far.b_v4.ip)
    lab.nft(path.router, f"""
table ip nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        tcp dport 8080 dnat to {server}:80
    }}
}}
table inet fw {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
    }}
}}
""")
    lab.listen(path.server, 80)
    return path, router, server


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("by", ["pre-nat port", "router address"])
def test_dnat_forward_drop_is_found_by_the_pre_nat_tuple(lab: Lab, watch, by: str) -> None:
    path, router, server = _dnat_lab(lab)
    client = str(path.near.a_v4.ip)
    w = watch(ports=(8080,), hosts=()) if by == "pre-nat port" else watch(hosts=(f"{router}/32",))
    assert lab.tcp_connect(path.client, router, 8080, timeout=0.3) == "timeout"
    ev = w.sink.wait_for(lambda e: e.get("destination", {}).get("port") == 80, timeout=5)
    assert ev["netns"]["name"] == path.router.name
    assert (ev["source"]["ip"], ev["destination"]["ip"]) == (client, server)  # post-DNAT headers
    ct = ev["conntrack"]
    assert "dst_nat" in ct["status"]
    sport = ev["source"]["port"]
    assert ct["original"] == {"source": {"ip": client, "port": sport}, "destination": {"ip": router, "port": 8080}}
    assert ct["reply"] == {"source": {"ip": server, "port": 80}, "destination": {"ip": client, "port": sport}}
    if by == "pre-nat port":
        # Unrelated: a datagram to another port of the router (conntrack tracks it too).
        lab.udp_send(path.client, router, 9999)
        _quiet(w.sink, lambda e: 9999 in (e.get("destination", {}).get("port"), e.get("source", {}).get("port")))
    else:
        # Unrelated: straight to the server, no DNAT, the router's address nowhere.
        assert lab.tcp_connect(path.client, server, 81, timeout=0.3) == "timeout"
        _quiet(w.sink, lambda e: e.get("destination", {}).get("port") == 81)
