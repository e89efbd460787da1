"""Throw-away network-namespace labs for tests and the demo.

A lab is a few namespaces joined by veth pairs, addressed only from the
benchmarking (198.18.0.0/15) and documentation (2001:db8::/32) ranges and
with no default route, so nothing a test sends can leave the lab. Every
namespace and process a lab creates is removed by `close()`, which also
runs at interpreter exit in case a test forgot.
"""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import secrets
import signal
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from tracer import netns as netns_mod
from tracer.netns import Netns

log = structlog.get_logger(__name__)

PREFIX = "trl-"
LAB_V4 = ipaddress.ip_network("198.18.0.0/15")
LAB_V6 = ipaddress.ip_network("2001:db8::/32")


class LabError(RuntimeError):
    """A lab command failed; the message carries its stderr."""


@dataclass(frozen=True)
class Link:
    """One veth pair; side `a` has host .1/::1, side `b` has .2/::2."""

    a: Netns
    b: Netns
    a_ifname: str
    b_ifname: str
    a_v4: ipaddress.IPv4Interface
    b_v4: ipaddress.IPv4Interface
    a_v6: ipaddress.IPv6Interface
    b_v6: ipaddress.IPv6Interface


def _run(argv: Sequence[str], *, input: str | None = None) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(list(argv), input=input, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")
    return res


class Lab:
    """Namespaces named `trl-<suffix>-<role>`, unique per lab so labs never collide."""

    def __init__(self) -> None:
        self.suffix = secrets.token_hex(3)
        self.namespaces: dict[str, Netns] = {}
        self.links: list[Link] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._sockets: list[socket.socket] = []
        self._closed = False
        atexit.register(self.close)

    # --- building -----------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """What the names of this lab's namespaces start with."""
        return f"{PREFIX}{self.suffix}-"

    def add_ns(self, role: str) -> Netns:
        """Creates a namespace with `lo` up; nothing else is configured."""
        name = f"{self.prefix}{role}"
        _run(["ip", "netns", "add", name])
        ns = netns_mod.by_name(name)
        self.namespaces[role] = ns
        self.ip(ns, "link", "set", "lo", "up")
        return ns

    def link(self, a: Netns, b: Netns) -> Link:
        """Joins two lab namespaces with a veth pair and addresses both ends.

        The pair is created inside `a` with its peer moved straight into `b`,
        so no interface ever appears in the host's namespace.
        """
        self._check_own(a, b)
        index = len(self.links)
        if index > 255:
            raise LabError("a lab holds at most 256 links")
        a_if, b_if = f"veth{index}a", f"veth{index}b"
        self.ip(a, "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name or b.path)
        v4 = ipaddress.ip_network(f"198.18.{index}.0/24")
        v6 = ipaddress.ip_network(f"2001:db8:0:{index:x}::/64")
        link = Link(
            a=a,
            b=b,
            a_ifname=a_if,
            b_ifname=b_if,
            a_v4=ipaddress.IPv4Interface(f"{v4[1]}/24"),
            b_v4=ipaddress.IPv4Interface(f"{v4[2]}/24"),
            a_v6=ipaddress.IPv6Interface(f"{v6[1]}/64"),
            b_v6=ipaddress.IPv6Interface(f"{v6[2]}/64"),
        )
        for ns, ifname, v4addr, v6addr in ((a, a_if, link.a_v4, link.a_v6), (b, b_if, link.b_v4, link.b_v6)):
            self.ip(ns, "addr", "add", str(v4addr), "dev", ifname)
            self.ip(ns, "-6", "addr", "add", str(v6addr), "dev", ifname, "nodad")
            self.ip(ns, "link", "set", ifname, "up")
        # Static neighbours: a firewall under test that drops ARP/ND must not
        # stop the packets the test is about, and no resolution traffic adds noise.
        a_mac, b_mac = self.mac(a, a_if), self.mac(b, b_if)
        for ns, ifname, peer_v4, peer_v6, peer_mac in (
            (a, a_if, link.b_v4, link.b_v6, b_mac),
            (b, b_if, link.a_v4, link.a_v6, a_mac),
        ):
            for addr in (peer_v4.ip, peer_v6.ip):
                self.ip(ns, "neigh", "replace", str(addr), "lladdr", peer_mac, "dev", ifname, "nud", "permanent")
        self.links.append(link)
        return link

    def mac(self, ns: Netns, ifname: str) -> str:
        """The MAC address of an interface in a lab namespace."""
        return self.ip(ns, "-br", "link", "show", "dev", ifname).split()[2]

    def delete_ns(self, role: str) -> None:
        """Deletes one lab namespace now (to test namespaces vanishing)."""
        ns = self.namespaces.pop(role)
        for pid in _pids_in(ns):
            _kill_pid(pid)
        _run(["ip", "netns", "del", ns.name or ""])

    # --- running things inside -------------------------------------------------------

    def ip(self, ns: Netns, *args: str) -> str:
        """Runs `ip -n <ns> ...` and returns its output."""
        self._check_own(ns)
        return _run(["ip", "-n", ns.name or "", *args]).stdout

    def run(
        self, ns: Netns, argv: Sequence[str], *, check: bool = True, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Runs a command inside a lab namespace and waits for it."""
        self._check_own(ns)
        res = netns_mod.run_in(ns, argv, input=input)
        if check and res.returncode != 0:
            raise LabError(f"{ns.name}: {' '.join(argv)}: exit {res.returncode}: {res.stderr.strip()}")
        return res

    def spawn(self, ns: Netns, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Starts a long-running command inside a lab namespace; close() kills it."""
        self._check_own(ns)
        proc = subprocess.Popen(["nsenter", f"--net={ns.path}", "--", *argv], **kw)
        self._procs.append(proc)
        return proc

    def send_ip(self, ns: Netns, datagram: bytes) -> bool:
        """Sends a complete IPv4/IPv6 datagram (header included) from a lab namespace.

        The destination must be a lab address: the lab has no route anywhere
        else. Returns False when the sender's own output hook dropped it
        (the kernel answers EPERM then).
        """
        self._check_own(ns)
        version = datagram[0] >> 4
        if version == 4:
            family, dst = socket.AF_INET, str(ipaddress.IPv4Address(datagram[16:20]))
        elif version == 6:
            family, dst = socket.AF_INET6, str(ipaddress.IPv6Address(datagram[24:40]))
        else:
            raise LabError(f"not an IP datagram (version {version})")
        if ipaddress.ip_address(dst) not in (LAB_V4 if version == 4 else LAB_V6):
            raise LabError(f"refusing to send to {dst}: not a lab address")
        with netns_mod.entered(ns):
            # IPPROTO_RAW sockets take the IP header from us (IP_HDRINCL implied).
            sock = socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_RAW)
        with sock:
            try:
                sock.sendto(datagram, (dst, 0))
            except PermissionError:
                return False
        return True

    def _lab_socket(self, ns: Netns, addr: str, kind: int) -> socket.socket:
        """A socket created inside `ns`, for talking to a lab address only."""
        self._check_own(ns)
        ip = ipaddress.ip_address(addr)
        if ip not in (LAB_V4 if ip.version == 4 else LAB_V6):
            raise LabError(f"refusing to talk to {addr}: not a lab address")
        with netns_mod.entered(ns):
            return socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6, kind)

    def listen(self, ns: Netns, *ports: int) -> None:
        """TCP listeners on all addresses of `ns` (IPv4 and IPv6), closed by close().

        The kernel answers SYNs for a listening socket by itself, so no
        process is needed: the sockets live in this process.
        """
        self._check_own(ns)
        for port in ports:
            with netns_mod.entered(ns):
                sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("::", port))
            sock.listen(64)
            self._sockets.append(sock)

    def tcp_connect(self, ns: Netns, addr: str, port: int, timeout: float = 0.5) -> str:
        """Connects from `ns`: "open", "refused", "timeout" or the error's name."""
        with self._lab_socket(ns, str(addr), socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((str(addr), port))
                return "open"
            except ConnectionRefusedError:
                return "refused"
            except TimeoutError:
                return "timeout"
            except OSError as exc:
                return type(exc).__name__

    def udp_send(self, ns: Netns, addr: str, port: int, payload: bytes = b"x") -> None:
        """Sends one UDP datagram from `ns` to a lab address."""
        with self._lab_socket(ns, str(addr), socket.SOCK_DGRAM) as sock:
            sock.sendto(payload, (str(addr), port))

    def nft(self, ns: Netns, ruleset: str) -> None:
        """Loads ruleset text with `nft -f -` inside a lab namespace."""
        self.run(ns, ["nft", "-f", "-"], input=ruleset)

    def nft_list(self, ns: Netns, stateless: bool = False) -> str:
        """`nft list ruleset` as the namespace's owner would see it (`-s`: without counter values)."""
        return self.run(ns, ["nft", *(["-s"] if stateless else []), "list", "ruleset"]).stdout

    def _check_own(self, *nss: Netns) -> None:
        """Refuses to touch a namespace this lab did not create (the host's above all)."""
        for ns in nss:
            if ns not in self.namespaces.values():
                raise LabError(f"{ns.label} does not belong to lab {self.suffix}")

    # --- teardown ---------------------------------------------------------------------

    def close(self) -> None:
        """Kills the lab's processes and deletes its namespaces; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for sock in self._sockets:
            sock.close()
        for proc in self._procs:
            _stop(proc)
        for ns in self.namespaces.values():
            # Anything still running inside a lab namespace was started there by a test.
            for pid in _pids_in(ns):
                _kill_pid(pid)
            res = subprocess.run(["ip", "netns", "del", ns.name or ""], capture_output=True, text=True, check=False)
            if res.returncode != 0 and os.path.exists(ns.path):
                log.warning("lab.netns_delete_failed", netns=ns.name, stderr=res.stderr.strip())
        self.namespaces.clear()

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stop(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        proc.kill()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        log.warning("lab.process_did_not_exit", pid=proc.pid)


def _pids_in(ns: Netns) -> list[int]:
    res = subprocess.run(["ip", "netns", "pids", ns.name or ""], capture_output=True, text=True, check=False)
    me = os.getpid()
    return [int(p) for p in res.stdout.split() if p.isdigit() and int(p) != me]


def _kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass(frozen=True)
class RoutedPath:
    """client -- router -- server, the router's link to the server with a smaller MTU.

    Routes reach only lab subnets: the far one, and 198.18.9.0/24 and
    2001:db8:9::/64, which the router does not know (so it answers
    "network unreachable").
    """

    client: Netns
    router: Netns
    server: Netns
    near: Link
    far: Link


def routed_path(lab: Lab, far_mtu: int = 1400) -> RoutedPath:
    client, router, server = lab.add_ns("client"), lab.add_ns("router"), lab.add_ns("server")
    near, far = lab.link(client, router), lab.link(router, server)
    for ns, ifname in ((router, far.a_ifname), (server, far.b_ifname)):
        lab.ip(ns, "link", "set", ifname, "mtu", str(far_mtu))
    lab.run(router, ["sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1"])
    for net in (str(far.b_v4.network), "198.18.9.0/24"):
        lab.ip(client, "route", "add", net, "via", str(near.b_v4.ip))
    for net in (str(far.b_v6.network), "2001:db8:9::/64"):
        lab.ip(client, "-6", "route", "add", net, "via", str(near.b_v6.ip))
    lab.ip(server, "route", "add", str(near.a_v4.network), "via", str(far.a_v4.ip))
    lab.ip(server, "-6", "route", "add", str(near.a_v6.network), "via", str(far.a_v6.ip))
    return RoutedPath(client, router, server, near, far)
