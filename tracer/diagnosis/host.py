"""What a namespace's own state says about a drop: sysctls, routes, listening sockets.

The diagnosis reads these at the time of the drop, inside the drop's
namespace (a thread's setns: /proc/sys/net and /proc/thread-self/net show
the namespace of the thread that opens them). Every reader answers None
when it cannot know (the namespace vanished, the file is absent): unknown
is never turned into a finding.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from tracer import netns
from tracer.netns import Netns

P = ParamSpec("P")
R = TypeVar("R")

#: How long a namespace's sysctl, socket or route answer is reused. Entering a namespace
#: (setns) costs milliseconds, and a flood of drops of one cause must not cost one each:
#: within this time a drop sees its namespace as the previous one did.
TTL = 1.0
_CACHE_MAX = 4096


def _cached(fn: Callable[P, R]) -> Callable[P, R]:
    """Reuses `fn`'s answer for the same arguments for TTL seconds (bounded, thread-safe)."""
    memo: dict[Any, tuple[float, R]] = {}
    lock = threading.Lock()

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        key = (args, tuple(sorted(kwargs.items())))
        now = time.monotonic()
        with lock:
            hit = memo.get(key)
        if hit is not None and now - hit[0] < TTL:
            return hit[1]
        value = fn(*args, **kwargs)
        with lock:
            if len(memo) >= _CACHE_MAX:
                memo.clear()
            memo[key] = (now, value)
        return value

    return wrapper


@functools.cache
def _own_inode() -> int:
    return netns.current_inode()


def own(ns: Netns | None) -> bool:
    """Whether `ns` is the tracer's own namespace (None counts as it: where the thread is)."""
    return ns is None or ns.inode == _own_inode()


def label_of(ns: Netns | None) -> str | None:
    """A namespace as reports name it: its label, None for the tracer's own."""
    return None if ns is None or own(ns) else ns.label


def where(ns: Netns | None) -> str:
    """`this namespace` or `netns NAME` (escaped), for sentences."""
    from tracer.event.text import printable

    return "this namespace" if own(ns) else f"netns {printable(ns.label if ns else '')}"


@contextlib.contextmanager
def _inside(ns: Netns | None) -> Iterator[None]:
    """The body in `ns` (None: where the thread already is)."""
    if ns is None:
        yield
        return
    with netns.entered(ns):
        yield


def sysctl_path(*parts: str) -> str:
    """/proc/sys/net/... for a key given as parts, so that an interface name is one part whatever it holds."""
    return "/proc/sys/" + "/".join(parts)


@_cached
def read_sysctl(ns: Netns | None, *parts: str) -> str | None:
    """A sysctl's value in `ns` (`read_sysctl(ns, "net", "ipv4", "ip_forward")`), None if unknown."""
    if any("/" in p or p in ("", ".", "..") for p in parts):
        return None  # not a name the kernel can have: never a path outside /proc/sys
    try:
        with _inside(ns), open(sysctl_path(*parts), encoding="ascii", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return None


def sysctl_int(ns: Netns | None, *parts: str) -> int | None:
    value = read_sysctl(ns, *parts)
    try:
        return None if value is None else int(value.split()[0])
    except (ValueError, IndexError):
        return None


#: /proc/net/tcp's st column for a listening socket (TCP_LISTEN); UDP sockets are "07" (unconnected).
_LISTEN, _UDP_UNCONNECTED = "0A", "07"


def listening(ns: Netns | None, proto: str, port: int) -> bool | None:
    """Whether a socket listens on `proto` port `port` in `ns` (any address), None if unknown."""
    addresses = listeners(ns, proto, port)
    return None if addresses is None else bool(addresses)


@_cached
def listeners(ns: Netns | None, proto: str, port: int) -> tuple[str, ...] | None:
    """The local addresses that sockets listen on for `proto` port `port` in `ns` (`0.0.0.0`, `::`
    for any), none when nothing listens; None if unknown."""
    if proto not in ("tcp", "udp"):
        return None
    state = _LISTEN if proto == "tcp" else _UDP_UNCONNECTED
    seen = False
    found: list[str] = []
    try:
        with _inside(ns):
            for name in (proto, proto + "6"):
                with contextlib.suppress(FileNotFoundError), open(f"/proc/thread-self/net/{name}") as f:
                    seen = True
                    next(f, None)
                    for line in f:
                        cols = line.split()
                        if len(cols) > 3 and cols[3] == state:
                            addr, _, hexport = cols[1].rpartition(":")
                            if int(hexport, 16) == port:
                                found.append(_proc_address(addr))
    except (OSError, ValueError, IndexError):
        return None
    return tuple(dict.fromkeys(found)) if seen else None


def _proc_address(hexaddr: str) -> str:
    """/proc/net/tcp's address column (host-order 32-bit words in hex) as text."""
    raw = bytes.fromhex(hexaddr)
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words))


@dataclass(frozen=True)
class Route:
    """The route `ip route get` finds for an address: where the packet would leave, and through whom."""

    dst: str
    gateway: str | None
    device: str | None
    source: str | None = None  # the preferred source address for it


def route_to(ns: Netns | None, dst: str) -> Route | bool | None:
    """The route to `dst` in `ns`; False when the kernel has none (unreachable), None when unknown."""
    try:
        ipaddress.ip_address(dst)
    except ValueError:
        return None
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        with _inside(ns), IPRoute() as ipr:
            try:
                routes = ipr.route("get", dst=dst)
            except NetlinkError:
                return False
            if not routes:
                return False
            msg = routes[0]
            oif = msg.get_attr("RTA_OIF")
            device = None
            if oif:
                links = ipr.get_links(oif)
                device = links[0].get_attr("IFLA_IFNAME") if links else None
            if msg.get("type") not in (None, 1, 2):  # RTN_UNICAST, RTN_LOCAL; unreachable/prohibit/blackhole
                return False
            return Route(dst, msg.get_attr("RTA_GATEWAY"), device, msg.get_attr("RTA_PREFSRC"))
    except OSError:
        return None


def forwarding(ns: Netns | None, family: int, ifname: str | None = None) -> int | None:
    """IPv4 forwarding (net.ipv4.ip_forward, or the interface's conf) or IPv6 conf/all/forwarding."""
    if family == 6:
        return sysctl_int(ns, "net", "ipv6", "conf", ifname or "all", "forwarding")
    if ifname is not None:
        return sysctl_int(ns, "net", "ipv4", "conf", ifname, "forwarding")
    return sysctl_int(ns, "net", "ipv4", "ip_forward")


def rp_filter(ns: Netns | None, ifname: str | None) -> tuple[int | None, int | None]:
    """(conf/all, conf/<ifname>) rp_filter: the kernel applies the larger of the two."""
    every = sysctl_int(ns, "net", "ipv4", "conf", "all", "rp_filter")
    mine = sysctl_int(ns, "net", "ipv4", "conf", ifname, "rp_filter") if ifname else None
    return every, mine


@_cached
def addresses(ns: Netns | None) -> list[tuple[str, int, str | None]]:
    """Every (address, prefix length, device) of `ns`; empty when unknown."""
    from pyroute2 import IPRoute

    try:
        with _inside(ns), IPRoute() as ipr:
            names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
            return [(a.get_attr("IFA_ADDRESS"), a["prefixlen"], names.get(a["index"])) for a in ipr.get_addr()
                    if a.get_attr("IFA_ADDRESS")]
    except OSError:
        return []
