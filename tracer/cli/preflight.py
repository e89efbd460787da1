"""Checks of `watch`/`probe` flags against this host, before anything is changed.

A flag can be well formed and still useless here: a namespace inode that is
no live namespace, an interface no watched namespace has, a drop reason that
is never a drop, netfilter probes this kernel refuses. Each is found before
the marking tables go in, so a failed start leaves the host as it was, and
the user learns why from one line rather than from a silent, empty watch.

Errors raise `FlagError` (a bad value: exit 2) or `CannotRun` (the host
cannot do it: exit 1); what can work but will show nothing is returned as a
warning for the caller to print.
"""

from __future__ import annotations

import difflib
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from tracer import netns as netnsmod

CAP_NET_ADMIN, CAP_NET_RAW, CAP_SYS_ADMIN, CAP_PERFMON, CAP_BPF = 12, 13, 21, 38, 39
_CAP_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_RAW: "CAP_NET_RAW", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
              CAP_PERFMON: "CAP_PERFMON", CAP_BPF: "CAP_BPF"}

#: Reasons in `enum skb_drop_reason` that the kernel never reports for a dropped packet.
NEVER_DROPS = {
    "SKB_CONSUMED": "marks packets freed after normal use, not drops (the watch ignores them)",
    "SKB_NOT_DROPPED_YET": "is the kernel's 'not dropped yet' placeholder, never a drop",
    "MAX": "is the end marker of the kernel's list, never a drop",
}


class FlagError(ValueError):
    """A flag's value is wrong for this host: exit 2."""


class CannotRun(Exception):
    """The host cannot do what the flags ask (privileges, kernel): exit 1."""


def effective_capabilities(status: str = "/proc/self/status") -> int:
    """The CapEff bit mask of this process (0 when it cannot be read)."""
    try:
        with open(status) as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _missing(caps: int, *needs: tuple[int, ...]) -> list[str]:
    """Names of the needs not met; each need is met by any one of its capabilities."""
    return [_CAP_NAMES[need[0]] for need in needs if not any(caps >> c & 1 for c in need)]


def require_watch_privileges(caps: int | None = None) -> None:
    """watch loads BPF tracing programs (CAP_BPF and CAP_PERFMON, or CAP_SYS_ADMIN)
    and traces netfilter (CAP_NET_ADMIN); without them libbpf's EPERM would
    be reported as whichever fallback failed last (tracefs, say)."""
    caps = effective_capabilities() if caps is None else caps
    missing = _missing(caps, (CAP_BPF, CAP_SYS_ADMIN), (CAP_PERFMON, CAP_SYS_ADMIN), (CAP_NET_ADMIN,))
    if missing:
        raise CannotRun(f"watching drops needs root: CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_ADMIN "
                        f"(this process lacks {', '.join(missing)}); run it with sudo")


def require_raw_sockets(caps: int | None = None) -> None:
    """probe and pmtu send and receive raw packets."""
    caps = effective_capabilities() if caps is None else caps
    if not caps >> CAP_NET_RAW & 1:
        raise CannotRun("probes need raw sockets: run as root (or with CAP_NET_RAW)")


# ------------------------------------------------------------------ reasons


def check_reasons(names: Iterable[str], known: Iterable[str]) -> list[str]:
    """Warnings for reasons that never match; FlagError for names this kernel lacks."""
    known = set(known)
    warnings = []
    for name in names:
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise FlagError(f"--reason: unknown drop reason {name!r} on this kernel{hint}; "
                            "`tracer doctor --reasons` lists them")
        if name in NEVER_DROPS:
            warnings.append(f"--reason {name}: {name} {NEVER_DROPS[name]}, so it never matches")
    return warnings


# ------------------------------------------------------------------ namespaces


@dataclass(frozen=True)
class NetnsChoice:
    """What `--netns` names now: a live namespace, or a name to wait for."""

    value: str
    present: netnsmod.Netns | None

    @property
    def waiting(self) -> bool:
        return self.present is None


def check_netns(value: str, namespaces: dict[int, netnsmod.Netns] | None = None) -> NetnsChoice:
    """An inode must be a live namespace now; a name may appear later (it is followed)."""
    if value.isascii() and value.isdigit():
        inode = int(value)
        namespaces = netnsmod.discover() if namespaces is None else namespaces
        if inode not in namespaces:
            raise FlagError(f"--netns {value}: no live network namespace has inode {value} "
                            "(`lsns -t net` lists them; or give an `ip netns` name)")
        return NetnsChoice(value, namespaces[inode])
    namespaces = netnsmod.discover() if namespaces is None else namespaces
    return NetnsChoice(value, named(value, namespaces))


def named(name: str, namespaces: dict[int, netnsmod.Netns]) -> netnsmod.Netns | None:
    """The `ip netns` namespace of that name, None when there is none now (a file
    left in /var/run/netns without its mount is none)."""
    return next((ns for ns in namespaces.values() if ns.name == name), None)


def interfaces(ns: netnsmod.Netns) -> set[str]:
    """Interface names in a namespace now (empty when it cannot be entered)."""
    try:
        with netnsmod.entered(ns):
            return {name for _, name in socket.if_nameindex()}
    except OSError:
        return set()


def _has_iface(iface: str, namespaces: list[netnsmod.Netns]) -> bool:
    """Looked up from a helper thread: /proc/PID/ns/net shows the main thread's
    namespace, and whoever lists a namespace's processes (`ip netns pids`, to
    kill them before deleting it) must never find this process there."""
    found: list[bool] = []

    def scan() -> None:
        found.append(any(iface in interfaces(ns) for ns in namespaces))

    worker = threading.Thread(target=scan, name="iface-check", daemon=True)
    worker.start()
    worker.join(10)
    return bool(found and found[0]) or worker.is_alive()


def check_iface(iface: str, namespaces: Iterable[netnsmod.Netns]) -> str | None:
    """A warning when no watched namespace has the interface now (it may appear later)."""
    if _has_iface(iface, list(namespaces)):
        return None
    return (f"--iface {iface!r}: no interface by that name in any watched network namespace now; "
            "its drops show if it appears")


# ------------------------------------------------------------------ kernel


def check_nf_probes(mode: str, object_path: Path | None = None) -> None:
    """An explicit `--nf-probes fentry|kprobe` must load here; `auto` falls back by design."""
    from tracer.bpf.loader import probe

    caps = probe(object_path, drop_modes=(), nf_modes=(mode,))
    result = caps.nf.get(mode)
    if result is None or not result.ok:
        why = result.error if result is not None else "not tried"
        raise CannotRun(f"--nf-probes {mode}: {why}; `tracer doctor` shows what this kernel allows "
                        "(--nf-probes auto uses the best available, or the kernel stack)")
