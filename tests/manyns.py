"""Many network namespaces at once, for the scale test and the scale bench.

Why not `tracer.lab.Lab`: it runs three or four processes per namespace
(`ip netns add`, `ip link set lo up`, `nsenter nft -f`), and deletes each
one with two more, so 300 namespaces take half a minute either way. Here
one `ip -batch` creates them all and one deletes them, `lo` is brought up
with an ioctl on a socket made inside the namespace, and the ruleset is
loaded through libnftables in this process: a few seconds for 300.

Each namespace is a lab of its own: named `trl-<suffix>-n<index>`, only
`lo` (no link to anything), traffic on loopback only. `close()` deletes
them all, also at interpreter exit; tests call it from a finalizer.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from tracer import netns as netns_mod
from tracer.lab import PREFIX
from tracer.netfilter.nftables import NftContext
from tracer.netns import Netns

#: The UDP port every namespace's ruleset drops (on loopback).
DROP_PORT = 7777

#: A small ruleset with conntrack, a few rules and the drop rule the tests look for.
RULESET = f"""
table inet fw {{
    chain input {{
        type filter hook input priority filter; policy accept;
        ct state established,related accept
        ct state invalid drop comment "invalid"
        tcp dport 22 accept
        udp dport {DROP_PORT} counter drop comment "scale drop"
        udp dport 53 accept
    }}
    chain output {{
        type filter hook output priority filter; policy accept;
        tcp dport 25 drop comment "no mail"
    }}
}}
"""
DROP_RULE_TEXT = f"udp dport {DROP_PORT} counter drop"

_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH14x")


def _ip_batch(lines: Iterable[str]) -> subprocess.CompletedProcess[str]:
    """One `ip -batch -` run; `-force` goes on after a failed line (deleting what is left)."""
    return subprocess.run(
        ["ip", "-force", "-batch", "-"],
        input="".join(f"{line}\n" for line in lines),
        capture_output=True,
        text=True,
        check=False,
    )


def _lo_up(ns: Netns) -> None:
    """`ip link set lo up` without a process: SIOCSIFFLAGS on a socket of the namespace."""
    with netns_mod.entered(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    with sock:
        flags = _IFREQ.unpack(fcntl.ioctl(sock, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0)))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | _IFF_UP))


def _load(ns: Netns, ruleset: str) -> None:
    """The ruleset through libnftables, in this process (no nsenter, no nft process)."""
    with netns_mod.entered(ns):
        ctx = NftContext()
    with ctx:
        ctx.cmd(ruleset)


@dataclass
class Farm:
    """`count` namespaces, each with `lo` up and RULESET loaded."""

    count: int
    ruleset: str = RULESET
    suffix: str = field(default_factory=lambda: secrets.token_hex(3))
    namespaces: list[Netns] = field(default_factory=list)
    build_seconds: float = 0.0
    _closed: bool = False

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.suffix}-"

    def name(self, index: int) -> str:
        return f"{self.prefix}n{index:03d}"

    def build(self) -> Farm:
        """Creates everything; on any failure removes what was made and raises."""
        atexit.register(self.close)
        started = time.monotonic()
        try:
            names = [self.name(i) for i in range(self.count)]
            res = _ip_batch(f"netns add {name}" for name in names)
            self.namespaces = [netns_mod.by_name(name) for name in names if _exists(name)]
            if res.returncode != 0 or len(self.namespaces) != self.count:
                raise RuntimeError(f"ip netns add: {res.stderr.strip()}")
            for ns in self.namespaces:  # ~3 ms each; NftContext() is not safe beside other threads' sockets
                self._prepare(ns)
        except BaseException:
            self.close()
            raise
        self.build_seconds = time.monotonic() - started
        return self

    def _prepare(self, ns: Netns) -> None:
        _lo_up(ns)
        _load(ns, self.ruleset)

    @property
    def last(self) -> Netns:
        return self.namespaces[-1]

    def sender(self, ns: Netns) -> socket.socket:
        """A UDP socket inside `ns`, for datagrams to its own loopback."""
        with netns_mod.entered(ns):
            return socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    def close(self) -> None:
        """Deletes every namespace of the farm (one `ip -batch`); safe to call twice."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        names = [self.name(i) for i in range(self.count)]
        with contextlib.suppress(OSError):
            _ip_batch(f"netns del {name}" for name in names if _exists(name))
        self.namespaces = []


def _exists(name: str) -> bool:
    try:
        netns_mod.by_name(name)
    except OSError:
        return False
    return True
