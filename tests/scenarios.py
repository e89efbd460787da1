"""Broken-firewall labs, one per diagnosis cause (issue 10's "Tests").

Each `build_<name>(lab)` sets up namespaces, links, routes, rulesets and
listeners so that ONE connection attempt fails for that scenario's cause,
and returns a `Scenario`: who talks to whom, how to try the connection now
(`attempt()`), where the fix belongs and what it must name, and the fix a
person would type (`hand_fix`), which tests/test_scenarios.py applies with
`run_fix` to prove the lab breaks for the stated reason and nothing else.

Everything stays inside the lab: lab addresses only (198.18.0.0/15,
2001:db8::/32), no route out, sysctls only of lab namespaces (they are per
namespace), never the root namespace's firewall. `Lab.close()` removes all of
it, the listener processes a fix starts included (they live in a lab namespace).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import shlex
import socket
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tests import ctlab
from tracer import netns as netns_mod
from tracer.lab import LAB_V4, LAB_V6, Lab, LabError, Link, routed_path
from tracer.netns import Netns

#: How long one attempt may wait for an answer; the labs answer in milliseconds when they work.
TIMEOUT = 1.0

#: linux/in.h and linux/in6.h (Python's socket module lacks them): always set DF, never fragment locally.
IP_MTU_DISCOVER, IPV6_MTU_DISCOVER, PMTUDISC_DO = 10, 23, 2


class FixFailed(LabError):
    """A fix command exited non-zero; the message carries its stderr."""


@dataclass
class Scenario:
    """One broken lab and what a right diagnosis of it says.

    `fix_table`/`fix_chain`/`fix_port` are what the printed fix must name
    (None: nothing of that kind, e.g. a sysctl fix); `fix_family` is the nft
    family of that table ("inet", "ip", "ip6"; for iptables "ip"/"ip6").
    `fix_terms` are words a right fix contains whatever its wording (a sysctl
    name, an interface). `alt_fixes` are other fixes that also repair the lab,
    each written for `fix_ns` or prefixed `ip netns exec NAME` (run_fix runs both).
    """

    name: str
    cause: str
    client: Netns
    server: Netns
    router: Netns | None
    target: str
    port: int
    proto: str  # "tcp" or "udp"
    family: int  # 4 or 6
    backend: str  # "nftables", "iptables-nft", or "kernel" (sysctl, route, socket)
    fix_ns: Netns
    fix_family: str | None
    fix_table: str | None
    fix_chain: str | None
    fix_port: int | None
    hand_fix: list[str]
    probe: Callable[[], str] = field(repr=False)
    fix_terms: tuple[str, ...] = ()
    alt_fixes: list[list[str]] = field(default_factory=list)
    description: str = ""

    def outcome(self) -> str:
        """"ok" when the connection works now, else how it failed ("timeout", "refused", "stalled", ...)."""
        return self.probe()

    def attempt(self) -> bool:
        """Whether the scenario's connection succeeds now (one try, short timeouts)."""
        return self.outcome() == "ok"


# ------------------------------------------------------------------ running fixes


def run_fix(lab: Lab, ns: Netns, commands: Sequence[str]) -> None:
    """Runs each fix command inside `ns` (argv by shlex.split, never a shell).

    A command that starts with `ip netns exec NAME` already says where it
    runs; it is run as is, but only when NAME is one of this lab's
    namespaces. Raises FixFailed with the command's stderr when one fails.
    """
    own = {n.name for n in lab.namespaces.values()}
    for command in commands:
        argv = shlex.split(command)
        if not argv:
            raise FixFailed(f"empty fix command: {command!r}")
        if argv[:3] == ["ip", "netns", "exec"]:
            if len(argv) < 5 or argv[3] not in own:
                raise FixFailed(f"refusing {command!r}: not a namespace of lab {lab.suffix}")
            res = subprocess.run(argv, capture_output=True, text=True, check=False)
        else:
            res = lab.run(ns, argv, check=False)
        if res.returncode != 0:
            raise FixFailed(f"{ns.label}: {command}: exit {res.returncode}: {res.stderr.strip()}")


# ------------------------------------------------------------------ attempts


def _socket(ns: Netns, addr: str, kind: int) -> socket.socket:
    """A socket created in `ns` for a lab address (refuses any other address)."""
    ip = ipaddress.ip_address(addr)
    if ip not in (LAB_V4 if ip.version == 4 else LAB_V6):
        raise LabError(f"refusing to talk to {addr}: not a lab address")
    with netns_mod.entered(ns):
        return socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6, kind)


def _connect(sock: socket.socket, addr: str, port: int) -> str:
    try:
        sock.connect((addr, port))
    except ConnectionRefusedError:
        return "refused"
    except TimeoutError:
        return "timeout"
    except OSError as exc:
        return _errno_name(exc)
    return "ok"


def _errno_name(exc: OSError) -> str:
    """EHOSTUNREACH, EPERM, ...: says more than the exception's class."""
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def tcp_connect(ns: Netns, addr: str, port: int, timeout: float = TIMEOUT) -> str:
    """A TCP handshake from `ns`: "ok", "refused", "timeout" or the error's name."""
    with _socket(ns, addr, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        return _connect(sock, addr, port)


def udp_echo(ns: Netns, addr: str, port: int, timeout: float = TIMEOUT) -> str:
    """One UDP request from `ns`; "ok" when the echo comes back."""
    with _socket(ns, addr, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        payload = b"scenario-echo"
        try:
            sock.sendto(payload, (addr, port))
            data, _peer = sock.recvfrom(2048)
        except ConnectionRefusedError:
            return "refused"
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return _errno_name(exc)
        return "ok" if data == payload else "garbled"


def _unacked(sock: socket.socket) -> int:
    """Bytes written but not yet acknowledged by the peer (SIOCOUTQ)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4)
    return int(struct.unpack("i", buf)[0])


def _all_acked(sock: socket.socket, deadline: float) -> bool:
    while _unacked(sock) > 0:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def tcp_bulk(ns: Netns, addr: str, port: int, size: int = 64 * 1024, timeout: float = 1.5) -> str:
    """Connects and sends `size` bytes with DF set; "ok" once the peer acknowledged all of them.

    Full-size segments need path MTU discovery when a link on the way is
    smaller: if the ICMP "fragmentation needed" never arrives they are
    retransmitted unchanged forever ("stalled").
    """
    with _socket(ns, addr, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if sock.family == socket.AF_INET:
            sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, PMTUDISC_DO)
        else:
            sock.setsockopt(socket.IPPROTO_IPV6, IPV6_MTU_DISCOVER, PMTUDISC_DO)
        deadline = time.monotonic() + timeout
        if (res := _connect(sock, addr, port)) != "ok":
            return res
        try:
            sock.sendall(b"x" * size)
        except TimeoutError:
            return "stalled"
        return "ok" if _all_acked(sock, deadline) else "stalled"


def tcp_across_flush(client: Netns, server: Netns, addr: str, port: int, timeout: float = TIMEOUT) -> str:
    """A connection that loses its conntrack entry mid-stream: data, flush the server's table, data.

    "ok" when the second write is acknowledged too: the server's conntrack
    accepted a segment of a connection it no longer knew.
    """
    with _socket(client, addr, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if (res := _connect(sock, addr, port)) != "ok":
            return res
        sock.sendall(b"a" * 100)
        if not _all_acked(sock, time.monotonic() + timeout):
            return "first write lost"
        ctlab.flush(server)
        sock.sendall(b"b" * 100)
        return "ok" if _all_acked(sock, time.monotonic() + timeout) else "stalled"


# ------------------------------------------------------------------ lab helpers

UDP_ECHO = (
    "import socket, sys\n"
    "s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)\n"
    "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
    "s.bind(('::', int(sys.argv[1])))\n"
    "print('READY', flush=True)\n"
    "while True:\n"
    "    data, peer = s.recvfrom(2048)\n"
    "    s.sendto(data, peer)\n"
)

#: A TCP service that detaches (so a fix command that starts it returns): binds first,
#: then forks; the child, left in the lab namespace, is killed by Lab.close().
TCP_SERVICE = (
    "import os, signal, socket, sys\n"
    "s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)\n"
    "s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('::', int(sys.argv[1])))\n"
    "s.listen(64)\n"
    "if os.fork():\n"
    "    os._exit(0)\n"
    "os.setsid()\n"
    "null = os.open(os.devnull, os.O_RDWR)\n"
    "for fd in (0, 1, 2):\n"
    "    os.dup2(null, fd)\n"
    "while True:\n"
    "    signal.pause()\n"
)


def start_udp_echo(lab: Lab, ns: Netns, port: int) -> None:
    """A UDP echo service on `port` (IPv4 and IPv6) in `ns`; returns once it is bound."""
    proc = lab.spawn(ns, [sys.executable, "-c", UDP_ECHO, str(port)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "READY":
        raise LabError(f"{ns.label}: the UDP echo service on port {port} did not start")


def sysctl(lab: Lab, ns: Netns, *settings: str) -> None:
    """Sets sysctls of a lab namespace (net.* ones are per namespace)."""
    lab.run(ns, ["sysctl", "-qw", *settings])


def nft_handle(lab: Lab, ns: Netns, family: str, table: str, chain: str, comment: str) -> int:
    """The handle of the rule whose comment is `comment` (a comment this module wrote)."""
    out = lab.run(ns, ["nft", "-a", "list", "chain", family, table, chain]).stdout
    for line in out.splitlines():
        if f'comment "{comment}"' in line and "# handle " in line:
            return int(line.rsplit("# handle ", 1)[1])
    raise LabError(f"{ns.label}: no rule commented {comment!r} in {family} {table} {chain}")


def ipt(lab: Lab, ns: Netns, v6: bool, *rules: str) -> None:
    """iptables-nft (ip6tables-nft) commands in a lab namespace, one rule line each."""
    tool = "ip6tables-nft" if v6 else "iptables-nft"
    for rule in rules:
        lab.run(ns, [tool, *shlex.split(rule)])


def pair(lab: Lab) -> tuple[Netns, Netns, Link]:
    """client -- server on one link (client .1/::1, server .2/::2)."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    return client, server, lab.link(client, server)


def addr(link: Link, side: str, family: int) -> str:
    """The address of side "a" or "b" of a link, for one family."""
    if family == 4:
        return str((link.a_v4 if side == "a" else link.b_v4).ip)
    return str((link.a_v6 if side == "a" else link.b_v6).ip)


# ------------------------------------------------------------------ the scenarios


def build_rule_order_nft_v4(lab: Lab) -> Scenario:
    """A stale range drop above the accept for 8443 (nftables, inet table, IPv4)."""
    client, server, link = pair(lab)
    port = 8443
    lab.nft(server, f"""
table inet fw {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "lo" accept
        tcp dport 22 accept
        tcp dport 8000-8999 drop comment "old app range"
        tcp dport {port} accept comment "new app"
    }}
}}
""")
    lab.listen(server, port)
    handle = nft_handle(lab, server, "inet", "fw", "input", "old app range")
    target = addr(link, "b", 4)
    return Scenario(
        name="rule_order_nft_v4", cause="rule_order", client=client, server=server, router=None,
        target=target, port=port, proto="tcp", family=4, backend="nftables",
        fix_ns=server, fix_family="inet", fix_table="fw", fix_chain="input", fix_port=port,
        hand_fix=[f"nft insert rule inet fw input position {handle} tcp dport {port} accept"],
        alt_fixes=[[f"nft delete rule inet fw input handle {handle}"]],
        probe=lambda: tcp_connect(client, target, port),
        description="`tcp dport 8000-8999 drop` comes before `tcp dport 8443 accept`",
    )


def build_rule_order_ipt_v6(lab: Lab) -> Scenario:
    """ip6tables-nft: a DROP for 5432 on line 4, the ACCEPT for the lab's net on line 5."""
    client, server, link = pair(lab)
    port = 5432
    ipt(lab, server, True,
        "-P INPUT DROP",
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -p ipv6-icmp -j ACCEPT",
        f"-A INPUT -p tcp --dport {port} -j DROP",
        f"-A INPUT -s 2001:db8::/32 -p tcp --dport {port} -j ACCEPT")
    lab.listen(server, port)
    target = addr(link, "b", 6)
    return Scenario(
        name="rule_order_ipt_v6", cause="rule_order", client=client, server=server, router=None,
        target=target, port=port, proto="tcp", family=6, backend="iptables-nft",
        fix_ns=server, fix_family="ip6", fix_table="filter", fix_chain="INPUT", fix_port=port,
        hand_fix=[f"ip6tables -I INPUT 4 -p tcp --dport {port} -j ACCEPT"],
        alt_fixes=[["ip6tables -D INPUT 4"]],
        probe=lambda: tcp_connect(client, target, port),
        description="INPUT line 4 drops 5432 before line 5 accepts it from 2001:db8::/32",
    )


def build_default_policy_nft_v6(lab: Lab) -> Scenario:
    """nftables ip6 table, policy drop, nothing accepts 3000/tcp."""
    client, server, link = pair(lab)
    port = 3000
    lab.nft(server, """
table ip6 edge {
    chain in {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "lo" accept
        icmpv6 type { echo-request, nd-neighbor-solicit, nd-neighbor-advert } accept
        tcp dport 22 accept
    }
}
""")
    lab.listen(server, port)
    target = addr(link, "b", 6)
    return Scenario(
        name="default_policy_nft_v6", cause="default_policy", client=client, server=server, router=None,
        target=target, port=port, proto="tcp", family=6, backend="nftables",
        fix_ns=server, fix_family="ip6", fix_table="edge", fix_chain="in", fix_port=port,
        hand_fix=[f"nft add rule ip6 edge in tcp dport {port} accept"],
        probe=lambda: tcp_connect(client, target, port),
        description="the server listens on 3000 but `in` has policy drop and no accept for it",
    )


def build_default_policy_ipt_v4(lab: Lab) -> Scenario:
    """iptables-nft, INPUT policy DROP, a UDP service on 5353 nothing accepts."""
    client, server, link = pair(lab)
    port = 5353
    ipt(lab, server, False,
        "-P INPUT DROP",
        "-A INPUT -m state --state ESTABLISHED,RELATED -j ACCEPT",
        "-A INPUT -i lo -j ACCEPT",
        "-A INPUT -p tcp --dport 22 -j ACCEPT")
    start_udp_echo(lab, server, port)
    target = addr(link, "b", 4)
    return Scenario(
        name="default_policy_ipt_v4", cause="default_policy", client=client, server=server, router=None,
        target=target, port=port, proto="udp", family=4, backend="iptables-nft",
        fix_ns=server, fix_family="ip", fix_table="filter", fix_chain="INPUT", fix_port=port,
        hand_fix=[f"iptables -A INPUT -p udp --dport {port} -j ACCEPT"],
        probe=lambda: udp_echo(client, target, port),
        description="a UDP echo service on 5353; INPUT policy DROP, no rule accepts udp 5353",
    )


def build_missing_established(lab: Lab) -> Scenario:
    """The client's input drops by policy and lacks `ct state established,related accept`: the SYN-ACK dies."""
    client, server, link = pair(lab)
    port = 8000
    lab.nft(client, """
table inet host {
    chain input {
        type filter hook input priority filter; policy drop;
        iif "lo" accept
        tcp dport 22 accept comment "ssh to this host"
    }
}
""")
    lab.listen(server, port)
    target = addr(link, "b", 6)
    return Scenario(
        name="missing_established", cause="missing_established", client=client, server=server, router=None,
        target=target, port=port, proto="tcp", family=6, backend="nftables",
        fix_ns=client, fix_family="inet", fix_table="host", fix_chain="input", fix_port=None,
        hand_fix=["nft insert rule inet host input ct state established,related accept"],
        fix_terms=("established",),
        probe=lambda: tcp_connect(client, target, port),
        description="the client's input chain has no established,related accept, so the SYN-ACK is dropped",
    )


def build_egress_blocked(lab: Lab) -> Scenario:
    """iptables-nft OUTPUT line 2 drops the client's own connections to 6379."""
    client, server, link = pair(lab)
    port = 6379
    ipt(lab, client, False,
        "-A OUTPUT -o lo -j ACCEPT",
        f"-A OUTPUT -p tcp --dport {port} -j DROP")
    lab.listen(server, port)
    target = addr(link, "b", 4)
    return Scenario(
        name="egress_blocked", cause="egress_blocked", client=client, server=server, router=None,
        target=target, port=port, proto="tcp", family=4, backend="iptables-nft",
        fix_ns=client, fix_family="ip", fix_table="filter", fix_chain="OUTPUT", fix_port=port,
        hand_fix=[f"iptables -I OUTPUT 2 -p tcp --dport {port} -j ACCEPT"],
        alt_fixes=[["iptables -D OUTPUT 2"]],
        probe=lambda: tcp_connect(client, target, port),
        description="the client's OUTPUT chain drops tcp dport 6379",
    )


def build_nat_forward_missing(lab: Lab) -> Scenario:
    """The router forwards its 8080 to the server's 80 (DNAT), but forward accepts only established."""
    path = routed_path(lab)
    router_addr, server_addr = str(path.near.b_v4.ip), str(path.far.b_v4.ip)
    lab.nft(path.router, f"""
table ip nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        iifname "{path.near.b_ifname}" tcp dport 8080 dnat to {server_addr}:80
    }}
}}
table inet filter {{
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
    }}
}}
""")
    lab.listen(path.server, 80)
    return Scenario(
        name="nat_forward_missing", cause="nat_forward_missing", client=path.client, server=path.server,
        router=path.router, target=router_addr, port=8080, proto="tcp", family=4, backend="nftables",
        fix_ns=path.router, fix_family="inet", fix_table="filter", fix_chain="forward", fix_port=80,
        hand_fix=[f"nft add rule inet filter forward ip daddr {server_addr} tcp dport 80 accept"],
        alt_fixes=[["nft add rule inet filter forward ct status dnat accept"]],
        probe=lambda: tcp_connect(path.client, router_addr, 8080),
        description="client -> router:8080 DNAT -> server:80; forward policy drop, only established accepted",
    )


def build_ip_forward_disabled(lab: Lab) -> Scenario:
    """The router namespace has net.ipv4.ip_forward=0 (its own sysctl, nobody else's)."""
    path = routed_path(lab)
    sysctl(lab, path.router, "net.ipv4.ip_forward=0")
    port, target = 443, str(path.far.b_v4.ip)
    lab.listen(path.server, port)
    return Scenario(
        name="ip_forward_disabled", cause="ip_forward_disabled", client=path.client, server=path.server,
        router=path.router, target=target, port=port, proto="tcp", family=4, backend="kernel",
        fix_ns=path.router, fix_family=None, fix_table=None, fix_chain=None, fix_port=None,
        hand_fix=["sysctl -w net.ipv4.ip_forward=1"],
        fix_terms=("net.ipv4.ip_forward",),
        probe=lambda: tcp_connect(path.client, target, port),
        description="client -> router -> server:443, the router does not forward IPv4",
    )


def build_no_route(lab: Lab) -> Scenario:
    """The router forwards without masquerade and the server has no route back to the client's net."""
    path = routed_path(lab)
    client_net = str(path.near.a_v4.network)
    lab.ip(path.server, "route", "del", client_net)
    port, target = 8088, str(path.far.b_v4.ip)
    lab.listen(path.server, port)
    out_if = path.far.a_ifname
    return Scenario(
        name="no_route", cause="no_route", client=path.client, server=path.server, router=path.router,
        target=target, port=port, proto="tcp", family=4, backend="kernel",
        fix_ns=path.server, fix_family=None, fix_table=None, fix_chain=None, fix_port=None,
        hand_fix=[f"ip route add {client_net} via {path.far.a_v4.ip}"],
        alt_fixes=[[
            f"ip netns exec {path.router.name} nft add table ip nat",
            (f"ip netns exec {path.router.name} nft add chain ip nat postrouting "
             "{ type nat hook postrouting priority srcnat ; }"),
            f"ip netns exec {path.router.name} nft add rule ip nat postrouting oifname {out_if} masquerade",
        ]],
        fix_terms=("route",),
        probe=lambda: tcp_connect(path.client, target, port),
        description="the SYN reaches the server, whose SYN-ACK to 198.18.0.1 has no route",
    )


def build_rp_filter(lab: Lab) -> Scenario:
    """Asymmetric routing: the client's packets reach the router by link 0 from its link-2 address.

    The router's route to that address leaves by link 2, so strict reverse
    path filtering (rp_filter=1) on the router's link-0 interface drops them
    (IP_RPFILTER); replies go back by link 2. Loose mode (2) lets them through.
    """
    path = routed_path(lab)
    side = lab.link(path.client, path.router)  # 198.18.2.0/24: the way back
    far_net = str(path.far.b_v4.network)
    lab.ip(path.client, "route", "replace", far_net, "via", str(path.near.b_v4.ip), "src", str(side.a_v4.ip))
    lab.ip(path.server, "route", "add", str(side.a_v4.network), "via", str(path.far.a_v4.ip))
    # Explicit settings: a new namespace may inherit the host's rp_filter defaults.
    sysctl(lab, path.client, "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{side.a_ifname}.rp_filter=0",
           f"net.ipv4.conf.{path.near.a_ifname}.rp_filter=0")
    rp_if = path.near.b_ifname
    sysctl(lab, path.router, "net.ipv4.conf.all.rp_filter=0", f"net.ipv4.conf.{side.b_ifname}.rp_filter=0",
           f"net.ipv4.conf.{rp_if}.rp_filter=1")
    port, target = 9000, str(path.far.b_v4.ip)
    lab.listen(path.server, port)
    return Scenario(
        name="rp_filter", cause="rp_filter", client=path.client, server=path.server, router=path.router,
        target=target, port=port, proto="tcp", family=4, backend="kernel",
        fix_ns=path.router, fix_family=None, fix_table=None, fix_chain=None, fix_port=None,
        hand_fix=[f"sysctl -w net.ipv4.conf.{rp_if}.rp_filter=2"],
        alt_fixes=[[f"sysctl -w net.ipv4.conf.{rp_if}.rp_filter=0"]],
        fix_terms=("rp_filter", rp_if),
        probe=lambda: tcp_connect(path.client, target, port),
        description=f"client sends from {side.a_v4.ip} by link 0; the router's way back is link 2",
    )


def build_conntrack_full(lab: Lab) -> Scenario:
    """The server namespace's conntrack table is full of ASSURED entries (tests/ctlab.py's fill).

    The table's max is global and read-only inside a namespace, so the fill
    goes to the host's max (262144 here, ~5 s); the count is per namespace,
    so other namespaces are not affected. The fix empties the table: raising
    nf_conntrack_max would be a global sysctl, which the lab must not touch.
    """
    client, server, link = pair(lab)
    port = 5555
    lab.nft(server, ctlab.SERVER_RULESET)
    lab.listen(server, port)
    target = addr(link, "b", 4)
    reading = ctlab.fill_assured(server, target)
    if not reading.full:
        raise LabError(f"conntrack fill stopped at {reading.count} of {reading.max}")
    return Scenario(
        name="conntrack_full", cause="conntrack_full", client=client, server=server, router=None,
        target=target, port=port, proto="tcp", family=4, backend="kernel",
        fix_ns=server, fix_family=None, fix_table=None, fix_chain=None, fix_port=None,
        hand_fix=["conntrack -F"],
        fix_terms=("conntrack",),
        probe=lambda: tcp_connect(client, target, port),
        description="the server's conntrack table is full: conntrack drops the SYN",
    )


def build_icmp_blocked(lab: Lab) -> Scenario:
    """PMTU black hole: the router's 1400-byte link, and its own output drops the frag-needed it sends.

    Both end hosts keep MTU 1500 (the server's end of the small link too), so
    the client sends 1500-byte DF segments that only PMTU discovery can shrink.
    """
    path = routed_path(lab, far_mtu=1400)
    lab.ip(path.server, "link", "set", path.far.b_ifname, "mtu", "1500")
    sysctl(lab, path.router, "net.ipv4.icmp_ratelimit=0")  # every frag-needed, not one a second
    lab.nft(path.router, """
table ip edge {
    chain output {
        type filter hook output priority filter; policy accept;
        icmp type destination-unreachable drop comment "no icmp errors"
    }
}
""")
    handle = nft_handle(lab, path.router, "ip", "edge", "output", "no icmp errors")
    port, target = 8400, str(path.far.b_v4.ip)
    lab.listen(path.server, port)
    return Scenario(
        name="icmp_blocked", cause="icmp_blocked", client=path.client, server=path.server, router=path.router,
        target=target, port=port, proto="tcp", family=4, backend="nftables",
        fix_ns=path.router, fix_family="ip", fix_table="edge", fix_chain="output", fix_port=None,
        hand_fix=[(f"nft insert rule ip edge output position {handle} "
                   "icmp type destination-unreachable icmp code frag-needed accept")],
        alt_fixes=[[f"nft delete rule ip edge output handle {handle}"]],
        fix_terms=("icmp",),
        probe=lambda: tcp_bulk(path.client, target, port),
        description="a 64 KiB DF transfer over a 1400-byte hop stalls: the router drops its own frag-needed",
    )


def build_neighbor_discovery_blocked(lab: Lab) -> Scenario:
    """The server's input policy drops ICMPv6 neighbour solicitations; the client cannot resolve it.

    The lab's static neighbour entry for the server is removed from the
    client, so the client has to solicit.
    """
    client, server, link = pair(lab)
    port = 9443
    lab.nft(server, f"""
table inet fw {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        iif "lo" accept
        tcp dport {{ 22, {port} }} accept
    }}
}}
""")
    lab.listen(server, port)
    target = addr(link, "b", 6)
    lab.ip(client, "-6", "neigh", "del", target, "dev", link.a_ifname)
    # Solicit every 250 ms, so that an attempt after the fix resolves well within its timeout.
    sysctl(lab, client, f"net.ipv6.neigh.{link.a_ifname}.retrans_time_ms=250")
    return Scenario(
        name="neighbor_discovery_blocked", cause="neighbor_discovery_blocked", client=client, server=server,
        router=None, target=target, port=port, proto="tcp", family=6, backend="nftables",
        fix_ns=server, fix_family="inet", fix_table="fw", fix_chain="input", fix_port=None,
        hand_fix=["nft insert rule inet fw input icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert } accept"],
        fix_terms=("nd-neighbor-solicit",),
        probe=lambda: tcp_connect(client, target, port, timeout=1.5),
        description="no icmpv6 accept under policy drop: the server never sees the client's NS",
    )


def build_closed_port(lab: Lab) -> Scenario:
    """Nothing listens on 9999 and no firewall: the kernel answers RST (NO_SOCKET)."""
    client, server, link = pair(lab)
    port = 9999
    target = addr(link, "b", 4)
    return Scenario(
        name="closed_port", cause="closed_port", client=client, server=server, router=None,
        target=target, port=port, proto="tcp", family=4, backend="kernel",
        fix_ns=server, fix_family=None, fix_table=None, fix_chain=None, fix_port=port,
        hand_fix=[shlex.join([sys.executable, "-c", TCP_SERVICE, str(port)])],
        probe=lambda: tcp_connect(client, target, port),
        description="connection refused by the server's kernel: no socket on 9999 (the fix starts one)",
    )


def build_rejected(lab: Lab) -> Scenario:
    """The service listens on 8081, but an ip6 table's `reject with tcp reset` refuses it (IPv6).

    A TCP reset, not the default ICMPv6 port-unreachable: over veth the ICMP
    error reaches the client while connect() still holds the socket lock,
    and the kernel drops it (TcpExtLockDroppedIcmps), so the attempt would
    time out instead of being refused.
    """
    client, server, link = pair(lab)
    port = 8081
    lab.nft(server, f"""
table ip6 guard {{
    chain input {{
        type filter hook input priority filter; policy accept;
        tcp dport {port} reject with tcp reset comment "admin port"
    }}
}}
""")
    lab.listen(server, port)
    handle = nft_handle(lab, server, "ip6", "guard", "input", "admin port")
    target = addr(link, "b", 6)
    return Scenario(
        name="rejected", cause="rejected", client=client, server=server, router=None,
        target=target, port=port, proto="tcp", family=6, backend="nftables",
        fix_ns=server, fix_family="ip6", fix_table="guard", fix_chain="input", fix_port=port,
        hand_fix=[f"nft delete rule ip6 guard input handle {handle}"],
        alt_fixes=[[f"nft insert rule ip6 guard input position {handle} tcp dport {port} accept"]],
        probe=lambda: tcp_connect(client, target, port),
        description="refused by the firewall's reject rule although a socket listens on 8081",
    )


def build_invalid_state(lab: Lab) -> Scenario:
    """`ct state invalid drop`, nf_conntrack_tcp_loose=0, and the table flushed mid-connection.

    With loose pickup off, conntrack does not adopt a mid-stream segment of a
    connection it no longer knows: the segment is invalid and dropped. The
    flush is part of `attempt()` (an established connection loses its entry).
    """
    client, server, link = pair(lab)
    port = 2222
    lab.nft(server, f"""
table inet srv {{
    chain input {{
        type filter hook input priority filter; policy drop;
        ct state invalid drop comment "invalid"
        ct state established,related accept
        iif "lo" accept
        tcp dport {port} accept
    }}
}}
""")
    sysctl(lab, server, "net.netfilter.nf_conntrack_tcp_loose=0")
    lab.listen(server, port)
    handle = nft_handle(lab, server, "inet", "srv", "input", "invalid")
    target = addr(link, "b", 4)
    return Scenario(
        name="invalid_state", cause="invalid_state", client=client, server=server, router=None,
        target=target, port=port, proto="tcp", family=4, backend="nftables",
        fix_ns=server, fix_family="inet", fix_table="srv", fix_chain="input", fix_port=None,
        hand_fix=["sysctl -w net.netfilter.nf_conntrack_tcp_loose=1"],
        alt_fixes=[[f"nft delete rule inet srv input handle {handle}"]],
        probe=lambda: tcp_across_flush(client, server, target, port),
        description="after a conntrack flush the next segment is invalid (no loose pickup) and dropped",
    )


def build_rule_blocks(lab: Lab) -> Scenario:
    """A blocklist rule drops the client's address outright and nothing later accepts it (ip table, IPv4)."""
    client, server, link = pair(lab)
    port = 7070
    source = addr(link, "a", 4)
    lab.nft(server, f"""
table ip shield {{
    chain input {{
        type filter hook input priority filter; policy accept;
        ip saddr {source} drop comment "blocklist"
    }}
}}
""")
    lab.listen(server, port)
    handle = nft_handle(lab, server, "ip", "shield", "input", "blocklist")
    target = addr(link, "b", 4)
    return Scenario(
        name="rule_blocks", cause="rule_blocks", client=client, server=server, router=None,
        target=target, port=port, proto="tcp", family=4, backend="nftables",
        fix_ns=server, fix_family="ip", fix_table="shield", fix_chain="input", fix_port=port,
        hand_fix=[f"nft insert rule ip shield input position {handle} tcp dport {port} accept"],
        alt_fixes=[[f"nft delete rule ip shield input handle {handle}"]],
        probe=lambda: tcp_connect(client, target, port),
        description="`ip saddr <client> drop` blocks it on purpose; the policy would accept",
    )


#: Every scenario by name, in a stable order.
SCENARIOS: dict[str, Callable[[Lab], Scenario]] = {
    "rule_order_nft_v4": build_rule_order_nft_v4,
    "rule_order_ipt_v6": build_rule_order_ipt_v6,
    "default_policy_nft_v6": build_default_policy_nft_v6,
    "default_policy_ipt_v4": build_default_policy_ipt_v4,
    "missing_established": build_missing_established,
    "egress_blocked": build_egress_blocked,
    "nat_forward_missing": build_nat_forward_missing,
    "ip_forward_disabled": build_ip_forward_disabled,
    "no_route": build_no_route,
    "rp_filter": build_rp_filter,
    "conntrack_full": build_conntrack_full,
    "icmp_blocked": build_icmp_blocked,
    "neighbor_discovery_blocked": build_neighbor_discovery_blocked,
    "closed_port": build_closed_port,
    "rejected": build_rejected,
    "invalid_state": build_invalid_state,
    "rule_blocks": build_rule_blocks,
}
