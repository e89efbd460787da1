"""`tracer demo`: three firewalls broken the way real ones are, and what tracer shows.

The lab is two namespaces, `client` (198.18.0.1, 2001:db8::1) and `server`
(198.18.0.2, 2001:db8::2), on one veth pair. Nothing leaves the lab: no
default route, benchmarking and documentation addresses only. The lab and
the tracer's marking tables are removed when the demo ends, also on Ctrl-C.
"""

from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass

from tracer.config import Config, Scope, host_networks
from tracer.lab import Lab, routed_path
from tracer.outputs.stdout import NdjsonSink, TerminalSink
from tracer.pipeline.engine import Engine

SERVER_RULESET = """
table inet fw {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "lo" accept
        tcp dport 22 accept comment "ssh"
        tcp dport 443 drop comment "legacy block"
        tcp dport 443 accept comment "https"
    }
}
"""

# The client only lets in what it thinks it needs, and forgot that replies
# to its own connections are inbound packets too.
CLIENT_RULESET = """
table inet host {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state invalid drop
        iif "lo" accept
        tcp dport 22 accept comment "ssh to this host"
    }
}
"""

@dataclass(frozen=True)
class Case:
    title: str
    port: int
    what_breaks: str
    fix: str


CASES = (
    Case("a DROP rule before the ACCEPT for 443", 443,
         "server input rule `tcp dport 443 drop` comes before `tcp dport 443 accept`",
         "delete the stale drop rule, or move the accept above it"),
    Case("a default DROP policy with no allow rule", 8080,
         "server listens on 8080, but no rule accepts it and the input policy is drop",
         "add `tcp dport 8080 accept` to the server's input chain"),
    Case("return traffic dropped for lack of an ESTABLISHED rule", 22,
         "the server answers, but the client's input chain has no "
         "`ct state established,related accept`, so the SYN-ACK dies",
         "add `ct state established,related accept` first in the client's input chain"),
)


def _build(lab: Lab):
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(server, SERVER_RULESET)
    lab.nft(client, CLIENT_RULESET)
    lab.listen(server, 22, 443, 8080)
    return client, server, link


def run(json_out: bool = False) -> int:
    out = sys.stdout
    sink = NdjsonSink() if json_out else TerminalSink(out)

    def say(text: str = "") -> None:
        if not json_out:
            out.write(text + "\n")
            out.flush()

    with Lab() as lab:
        client, _server, link = _build(lab)
        say(f"lab: client {link.a_v4.ip} / {link.a_v6.ip}  <->  server {link.b_v4.ip} / {link.b_v6.ip}")
        say("tracer watches drops to and from 198.18.0.0/15 and 2001:db8::/32\n")
        opts = Config(scope=Scope(hosts=host_networks(["198.18.0.0/15", "2001:db8::/32"])))
        engine = Engine(opts, sink)
        engine.start()
        runner = threading.Thread(target=engine.run, name="demo-engine", daemon=True)
        runner.start()
        try:
            time.sleep(0.5)  # trace sockets subscribe before the first packet
            for n, case in enumerate(CASES, 1):
                say(f"--- case {n}: {case.title}")
                say(f"    {case.what_breaks}")
                for addr in (str(link.b_v4.ip), str(link.b_v6.ip)):
                    result = lab.tcp_connect(client, addr, case.port, timeout=1.0)
                    say(f"    client connects to {addr} port {case.port}: {result}")
                time.sleep(0.6)
                say(f"    fix: {case.fix}\n")
        finally:
            engine.stop()
            runner.join(timeout=5)
        say(f"{engine.emitted} drops reported; removing the lab")
    return 0


# ------------------------------------------------------------------ probes

PROBE_SERVER_RULESET = """
table inet fw {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp dport 444 drop comment "silently dropped"
        tcp dport 445 reject with icmpx type admin-prohibited
        udp dport 446 reject with icmpx type admin-prohibited
    }
}
"""

PROBE_CLIENT_RULESET = """
table inet host {
    chain output {
        type filter hook output priority filter;
        tcp dport 8443 drop comment "egress policy"
        tcp dport 8444 reject with tcp reset comment "no legacy app"
    }
}
"""

ROUTER_BLOCKS_ICMP = """
table inet fw {
    chain out {
        type filter hook output priority filter;
        icmp type destination-unreachable drop
        icmpv6 type packet-too-big drop
    }
}
"""

UDP_ECHO = (
    "import socket\n"
    "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
    "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
    "s.bind(('::', 7))\n"
    "while True:\n"
    "    data, peer = s.recvfrom(2048)\n"
    "    s.sendto(data, peer)\n"
)


def build_probe_lab(lab: Lab):
    """The lab of `tracer demo --probes` and of tests/test_probe.py."""
    path = routed_path(lab)
    lab.nft(path.server, PROBE_SERVER_RULESET)
    lab.listen(path.server, 443)
    lab.spawn(path.server, [sys.executable, "-c", UDP_ECHO])
    return path


def run_probes() -> int:
    """Runs `tracer probe` and `tracer pmtu` in the client of a routed lab, as a person would."""
    out = sys.stdout
    with Lab() as lab:
        path = build_probe_lab(lab)
        v4, v6 = str(path.far.b_v4.ip), str(path.far.b_v6.ip)
        out.write(f"lab: client {path.near.a_v4.ip} -- router -- server {v4} / {v6}; "
                  "router->server MTU 1400\n\n")
        cases = [
            ("open, closed, filtered, prohibited (TCP)", ["probe", v4, "--port", "443,80,444,445"]),
            ("the same over IPv6", ["probe", v6, "--port", "443,80,444,445"]),
            ("UDP: an echo service, a closed port, a reject rule", ["probe", v4, "--proto", "udp",
                                                                    "--port", "7,53,446"]),
            ("a network the router cannot reach", ["probe", "198.18.9.9", "--port", "443"]),
            ("dropped upstream, explained", ["probe", v4, "--port", "444", "--explain"]),
            ("path MTU", ["pmtu", v4]),
            ("path MTU over IPv6", ["pmtu", v6]),
        ]
        for title, args in cases:
            _run_case(lab, path.client, title, args)
        _server_side_case(lab, path, v4)
        lab.nft(path.client, PROBE_CLIENT_RULESET)
        _run_case(lab, path.client, "dropped by this host's own output rule, explained",
                  ["probe", v4, "--port", "8443", "--explain"])
        _run_case(lab, path.client, "refused by this host's own reject rule, explained",
                  ["probe", v4, "--port", "8444", "--explain"])
        lab.nft(path.router, ROUTER_BLOCKS_ICMP)
        _run_case(lab, path.client, "the router drops its ICMP errors: a black hole", ["pmtu", v4])
        out.write("removing the lab\n")
    return 0


def _run_case(lab: Lab, client, title: str, args: list[str]) -> None:
    sys.stdout.write(f"--- {title}\n$ tracer {' '.join(args)}\n")
    sys.stdout.flush()
    res = lab.run(client, [sys.executable, "-m", "tracer", *args], check=False)
    sys.stdout.write(res.stdout + (res.stderr if res.returncode == 2 else "") + f"(exit {res.returncode})\n\n")
    sys.stdout.flush()


def _server_side_case(lab: Lab, path, v4: str) -> None:
    """A watch on the server names the rule that dropped the client's probe, by probe id."""
    import subprocess

    import orjson

    from tracer.event.model import DropEvent
    from tracer.event.text import one_line

    server = path.server.name or ""
    sys.stdout.write(f"--- the server's own tracer sees the probe\n$ tracer watch --netns {server} "
                     f"--port 444 --count 1   # on the server\n")
    watch = subprocess.Popen([sys.executable, "-m", "tracer", "watch", "--netns", server, "--port", "444",
                              "--count", "1", "--duration", "20", "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while "tracer_mark" not in lab.nft_list(path.server) and time.monotonic() < deadline:
            time.sleep(0.1)
        _run_case(lab, path.client, "(meanwhile, on the client)", ["probe", v4, "--port", "444"])
        assert watch.stdout is not None  # stdout=PIPE
        line = watch.stdout.readline()
        if line:
            event = orjson.loads(line)
            sys.stdout.write(f"server: {one_line(DropEvent.from_ecs(event))}\n\n")
    finally:
        watch.kill()
        watch.wait()
