"""End to end: real BPF, real rulesets, real traffic between lab namespaces.

Each test builds a client/server lab, starts the engine in this process
(as `tracer watch` does), sends packets, and checks the events, every one
of them validated against the published JSON Schema.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import orjson
import pytest

from tracer.bpf_filter import host_networks
from tracer.engine import Engine, WatchOptions
from tracer.filters import WatchFilter
from tracer.schema import validate

pytestmark = [pytest.mark.root, pytest.mark.bpf]

SERVER_RULESET = """
table inet fw {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop comment "invalid"
        iif "lo" accept
        tcp dport 22 accept
        tcp dport 443 drop comment "legacy block"
        tcp dport 443 accept
        jump checks
    }
    chain checks {
        udp dport 53 drop comment "no dns"
    }
}
"""

CLIENT_RULESET = """
table inet host {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state invalid drop
        iif "lo" accept
        ip protocol icmp accept
        ip6 nexthdr ipv6-icmp accept
    }
}
"""

LAB_NETS = host_networks(["198.18.0.0/15", "2001:db8::/32"])


class Collector:
    """A sink that validates every event and lets a test wait for one."""

    def __init__(self) -> None:
        self.events: list[dict] = []
        self._cond = threading.Condition()

    def write(self, event: dict) -> None:
        validate(event)
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def flush(self) -> None:
        pass

    def wait_for(self, pred, timeout: float = 3.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching event in {timeout}s; got {self.events}")
                self._cond.wait(left)


class Watch:
    """The engine running in a thread for the duration of a test."""

    def __init__(self, **filter_kw) -> None:
        self.sink = Collector()
        filter_kw.setdefault("hosts", LAB_NETS)
        self.engine = Engine(WatchOptions(filter=WatchFilter(**filter_kw)), self.sink)
        self.engine.start()
        self.thread = threading.Thread(target=self.engine.run, daemon=True)
        self.thread.start()
        time.sleep(0.3)

    def stop(self) -> None:
        self.engine.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


@pytest.fixture
def net(lab):
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(server, SERVER_RULESET)
    lab.nft(client, CLIENT_RULESET)
    lab.spawn(server, [sys.executable, "-c", LISTEN, "22", "443"])
    time.sleep(0.3)
    return lab, client, server, link


@pytest.fixture
def watch(request):
    watches = []

    def start(**kw) -> Watch:
        w = Watch(**kw)
        watches.append(w)
        return w

    yield start
    for w in watches:
        w.stop()


LISTEN = (
    "import socket,sys,time\n"
    "socks=[]\n"
    "for p in map(int, sys.argv[1:]):\n"
    "    s=socket.socket(socket.AF_INET6); s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
    "    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('::', p)); s.listen(8); socks.append(s)\n"
    "time.sleep(600)\n"
)
CONNECT = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET); s.settimeout(float(sys.argv[3]))\n"
    "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); print('open')\n"
    "except OSError as e:\n    print(type(e).__name__)\n"
)
UDP = (
    "import socket,sys\n"
    "s=socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET, socket.SOCK_DGRAM)\n"
    "s.sendto(b'x', (sys.argv[1], int(sys.argv[2])))\n"
)


def connect(lab, ns, addr, port, timeout=0.5) -> str:
    return lab.run(ns, [sys.executable, "-c", CONNECT, str(addr), str(port), str(timeout)], check=False).stdout.strip()


def udp(lab, ns, addr, port) -> None:
    lab.run(ns, [sys.executable, "-c", UDP, str(addr), str(port)])


def to_port(port, dst=None):
    def pred(ev):
        return ev.get("destination", {}).get("port") == port and (dst is None or ev["destination"]["ip"] == dst)
    return pred


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_rule_drop_names_table_chain_rule_and_state(net, watch, family):
    lab, client, server, link = net
    handles = rule_handles(lab, server)
    dst = str(link.b_v4.ip if family == "ipv4" else link.b_v6.ip)
    w = watch()
    assert connect(lab, client, dst, 443) == "TimeoutError"
    ev = w.sink.wait_for(to_port(443, dst))
    nf = ev["netfilter"]
    assert nf["backend"] == "nftables" and nf["attribution"] == "nftrace"
    assert (nf["family"], nf["table"], nf["chain"], nf["base_chain"], nf["hook"]) == (
        "inet", "fw", "input", "input", "input")
    assert nf["rule"] == {"handle": handles["tcp dport 443 drop"], "text": "tcp dport 443 drop",
                          "comment": "legacy block"}
    assert nf["policy"] is False and nf["verdict"] == "drop"
    assert ev["drop"]["reason"] == "NETFILTER_DROP"
    assert ev["conntrack"]["state"] == "new" and ev["conntrack"]["direction"] == "original"
    assert ev["network"]["type"] == family and ev["network"]["direction"] == "ingress"
    assert ev["tcp"]["flags"] == ["SYN"]
    assert ev["netns"]["name"] == server.name
    assert ev["observer"]["ingress"]["interface"]["name"] == link.b_ifname


def test_user_chain_rule(net, watch):
    lab, client, server, link = net
    handles = rule_handles(lab, server)
    w = watch()
    udp(lab, client, link.b_v4.ip, 53)
    ev = w.sink.wait_for(to_port(53))
    nf = ev["netfilter"]
    assert (nf["chain"], nf["base_chain"], nf["hook"]) == ("checks", "input", "input")
    assert nf["rule"] == {"handle": handles["udp dport 53 drop"], "text": "udp dport 53 drop",
                          "comment": "no dns"}


def test_policy_drop(net, watch):
    lab, client, server, link = net
    w = watch()
    assert connect(lab, client, link.b_v4.ip, 8080) == "TimeoutError"
    ev = w.sink.wait_for(to_port(8080))
    nf = ev["netfilter"]
    assert nf["rule"] is None and nf["policy"] is True
    assert (nf["table"], nf["chain"], nf["base_chain"]) == ("fw", "input", "input")


def test_reply_dropped_without_established_rule(net, watch):
    """The server accepts port 22; its SYN-ACK dies in the client's input chain."""
    lab, client, server, link = net
    w = watch()
    assert connect(lab, client, link.b_v4.ip, 22) == "TimeoutError"
    ev = w.sink.wait_for(lambda e: e.get("source", {}).get("port") == 22)
    assert ev["tcp"]["flags"] == ["SYN", "ACK"]
    assert ev["conntrack"]["state"] == "established" and ev["conntrack"]["direction"] == "reply"
    nf = ev["netfilter"]
    assert (nf["table"], nf["chain"], nf["policy"]) == ("host", "input", True)
    assert ev["netns"]["name"] == client.name


def test_invalid_packet(net, watch):
    lab, client, server, link = net
    w = watch()
    send = ("from scapy.all import IP, TCP, send\n"
            f"send(IP(src='{link.a_v4.ip}', dst='{link.b_v4.ip}')/TCP(sport=4242, dport=9999, flags='SF'), verbose=0)\n")
    lab.run(client, [sys.executable, "-c", send])
    ev = w.sink.wait_for(to_port(9999))
    assert ev["conntrack"]["state"] == "invalid"
    assert ev["netfilter"]["rule"]["comment"] == "invalid"


def test_filters_leave_out_unwatched_traffic(net, watch):
    lab, client, server, link = net
    w = watch(ports=(443,))
    connect(lab, client, link.b_v4.ip, 8080)
    udp(lab, client, link.b_v4.ip, 53)
    connect(lab, client, link.b_v4.ip, 443)
    w.sink.wait_for(to_port(443))
    time.sleep(0.5)
    assert {e["destination"]["port"] for e in w.sink.events} == {443}


def test_reason_and_host_filters(net, watch):
    lab, client, server, link = net
    w = watch(hosts=host_networks([str(link.b_v6.ip)]), reasons=("NETFILTER_DROP",))
    connect(lab, client, link.b_v4.ip, 443)
    connect(lab, client, link.b_v6.ip, 443)
    w.sink.wait_for(to_port(443, str(link.b_v6.ip)))
    time.sleep(0.5)
    assert {e["destination"]["ip"] for e in w.sink.events} == {str(link.b_v6.ip)}


def test_drop_outside_netfilter_no_socket(lab, watch):
    a, b = lab.add_ns("a"), lab.add_ns("b")
    link = lab.link(a, b)
    w = watch()
    udp(lab, a, link.b_v4.ip, 7777)
    ev = w.sink.wait_for(to_port(7777))
    assert ev["drop"]["reason"] == "NO_SOCKET"
    assert "netfilter" not in ev
    assert ev["drop"]["location"].startswith("__udp4_lib_rcv")


def test_ruleset_replaced_mid_watch(net, watch):
    lab, client, server, link = net
    w = watch(ports=(443,))
    connect(lab, client, link.b_v4.ip, 443)
    first = w.sink.wait_for(to_port(443))
    assert first["netfilter"]["rule"]["comment"] == "legacy block"
    lab.nft(server, "flush ruleset\n" + SERVER_RULESET.replace(
        'tcp dport 443 drop comment "legacy block"',
        'tcp dport 443 counter drop comment "replaced"'))
    handle = rule_handles(lab, server)["tcp dport 443 counter drop"]
    connect(lab, client, link.b_v4.ip, 443)
    ev = w.sink.wait_for(lambda e: to_port(443)(e) and e is not first
                         and e["netfilter"]["rule"]["comment"] == "replaced")
    assert ev["netfilter"]["rule"] == {"handle": handle, "text": "tcp dport 443 counter drop",
                                       "comment": "replaced"}


def rule_handles(lab, ns) -> dict[str, int]:
    """Rule text (without comment) -> handle, as `nft -a` lists it."""
    out = lab.run(ns, ["nft", "-a", "-s", "list", "ruleset"]).stdout
    handles = {}
    for line in out.splitlines():
        line = line.strip()
        if "# handle" not in line or line.startswith(("table", "chain", "type")):
            continue
        text, handle = line.rsplit(" # handle ", 1)
        text = text.split(' comment "', 1)[0]
        handles[text] = int(handle)
    return handles


# ------------------------------------------------------------------ the CLI


def tracer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tracer", *args]


def test_cli_watch_port_443_prints_within_a_second(net):
    """`tracer watch --port 443` in the root namespace sees a SYN dropped in the lab."""
    lab, client, server, link = net
    before = {ns.name: lab.nft_list(ns) for ns in (client, server)}
    proc = subprocess.Popen(tracer_cmd("watch", "--port", "443", "--count", "1", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_ready(server, lab)
        sent = time.time()
        connect(lab, client, link.b_v4.ip, 443, timeout=0.2)
        line = proc.stdout.readline()
        got = time.time()
        ev = orjson.loads(line)
        validate(ev)
        assert ev["netfilter"]["rule"]["text"] == "tcp dport 443 drop"
        assert ev["netfilter"]["hook"] == "input"
        assert ev["conntrack"]["state"] == "new"
        assert got - sent < 1.0, f"event printed {got - sent:.3f}s after the SYN"
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert {ns.name: lab.nft_list(ns) for ns in (client, server)} == before


def wait_ready(ns, lab, timeout: float = 15.0) -> None:
    """Until the tracer's marking table is in the namespace (it is then tracing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "tracer_mark" in lab.nft_list(ns):
            time.sleep(0.3)
            return
        time.sleep(0.1)
    raise AssertionError("tracer never installed its marking table")


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_rulesets_identical_after_signal(net, sig):
    lab, client, server, link = net
    root_before = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    before = {ns.name: lab.nft_list(ns) for ns in (client, server)}
    proc = subprocess.Popen(tracer_cmd("watch", "--json"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_ready(server, lab)
        assert "tracer_mark" in lab.nft_list(server)
        os.kill(proc.pid, getattr(__import__("signal"), sig))
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if sig == "SIGKILL":
        # A new start after a crash must find and leave everything clean too.
        proc = subprocess.run(tracer_cmd("watch", "--json", "--duration", "1"),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    assert {ns.name: lab.nft_list(ns) for ns in (client, server)} == before
    assert subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout == root_before
