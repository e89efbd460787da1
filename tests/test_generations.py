"""Rule text that cannot go stale: reload races, identical packets, namespaces that come back.

Handles restart at 1 in a re-created table, so two rulesets loaded in turn
name different rules with the same handle. A verdict must be joined to the
packet instance that made it, and its text taken from the generation the
packet was evaluated in.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
from scapy.layers.inet import UDP

from tests.support import datagram, wait_ready
from tracer import netns

pytestmark = [pytest.mark.root, pytest.mark.bpf]


def _ruleset(port: int, comment: str) -> str:
    # `flush ruleset` leaves the tracer's owner-flagged marking table alone.
    return (
        "flush ruleset\n"
        "table inet fw {\n chain input { type filter hook input priority 0; policy accept;\n"
        f'  udp dport {port} drop comment "{comment}"\n }}\n}}\n'
    )


RULESET_A, RULESET_B = _ruleset(5001, "A drops 5001"), _ruleset(5002, "B drops 5002")
COMMENT_OF_PORT = {5001: "A drops 5001", 5002: "B drops 5002"}


def test_fast_reloads_never_give_another_generations_rule(lab, watch) -> None:
    """300 back-to-back reloads of two rulesets whose only rule has handle 2 in both, with traffic.

    Every event that names a rule must name the rule that matches its own
    packet's port: a wrong one would be the other generation's.
    """
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(server, RULESET_A)
    w = watch(ports=(5001, 5002), trace_rate=5000, validate=False, every_drop=True)  # one flow, each drop
    wait_ready(lab, server)
    with netns.entered(client):
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stop = threading.Event()
    sent = [0]

    def traffic() -> None:
        while not stop.is_set():
            for port in (5001, 5002):
                sender.sendto(b"x", (str(link.b_v4.ip), port))
                sent[0] += 1
            time.sleep(0.0005)

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    try:
        for i in range(300):  # `nft -f`, as people and tools reload
            lab.nft(server, RULESET_B if i % 2 == 0 else RULESET_A)
    finally:
        stop.set()
        t.join(5)
        sender.close()
    time.sleep(1.0)
    w.stop()
    events = [e for e in w.sink.events if e.get("netns", {}).get("inode") == server.inode]
    named = [e for e in events if e.get("netfilter", {}).get("rule", {}) and "text" in e["netfilter"]["rule"]]
    wrong = [
        e for e in named
        if e["netfilter"]["rule"]["text"] != f"udp dport {e['destination']['port']} drop"
        or e["netfilter"]["rule"].get("comment") != COMMENT_OF_PORT[e["destination"]["port"]]
    ]
    print(f"sent {sent[0]}, events {len(events)}, with rule text {len(named)}, wrong {len(wrong)}")
    assert len(named) >= 100, f"too few attributed events to judge: {len(named)} of {len(events)}"
    assert not wrong, wrong[:3]


def test_identical_packets_across_a_swap_never_get_the_old_rule(lab, watch) -> None:
    """The same datagram (same IP ID, ports, payload) before and after a ruleset swap, trace rate 1/s."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(server, _ruleset(5003, "old"))
    w = watch(ports=(5003,), trace_rate=1, every_drop=True)  # one flow: every drop, not a summary
    wait_ready(lab, server)
    data = datagram(link, UDP(sport=40000, dport=5003) / b"same", ident=777)
    lab.send_ip(client, data)
    first = w.sink.wait_for(lambda e: e.get("netns", {}).get("inode") == server.inode, timeout=5)
    assert first["netfilter"]["rule"]["comment"] == "old"
    lab.nft(server, _ruleset(5003, "new"))
    for _ in range(8):  # more than the marking rule's burst: some are not traced at all
        lab.send_ip(client, data)
        time.sleep(0.02)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        after = [e for e in w.sink.events if e.get("netns", {}).get("inode") == server.inode][1:]
        if len(after) >= 8:
            break
        time.sleep(0.1)
    w.stop()
    assert len(after) == 8
    comments = [e.get("netfilter", {}).get("rule", {}).get("comment") for e in after]
    assert "old" not in comments, comments
    assert comments[0] == "new", comments  # the first after the swap is within the burst: traced


def test_netns_name_is_followed_when_recreated(lab, watch) -> None:
    """`--netns NAME`: the namespace is deleted and made again under the same name."""
    client = lab.add_ns("client")
    server = lab.add_ns("server")
    lab.link(client, server)
    lab.nft(server, _ruleset(5004, "first"))
    w = watch(ports=(5004,), netns=server.name)
    wait_ready(lab, server)
    link = lab.links[0]
    lab.send_ip(client, datagram(link, UDP(sport=40001, dport=5004) / b"1"))
    first = w.sink.wait_for(lambda e: e["netns"]["inode"] == server.inode, timeout=5)
    assert first["netfilter"]["rule"]["comment"] == "first"

    lab.delete_ns("server")
    lab.delete_ns("client")
    lab.links.clear()
    client2, server2 = lab.add_ns("client"), lab.add_ns("server")
    assert server2.name == server.name
    link2 = lab.link(client2, server2)
    lab.nft(server2, _ruleset(5004, "second"))
    wait_ready(lab, server2)
    lab.send_ip(client2, datagram(link2, UDP(sport=40002, dport=5004) / b"2"))
    second = w.sink.wait_for(lambda e: e["netns"]["inode"] == server2.inode, timeout=8)
    w.stop()
    assert second["netns"]["name"] == server.name
    assert second["netfilter"]["rule"]["comment"] == "second"
