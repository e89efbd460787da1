"""Which network namespaces exist, and which of them the watch covers.

Rulesets, trace sockets and interface names are per namespace, so every
collector needs to know when namespaces come and go. One scanner finds them
(every `scan_interval`) and tells the pipeline; `--netns NAME` is followed:
resolved afresh at every scan, so a namespace deleted and made again under
the same name is watched again, and while the name is missing nothing is
(not whatever namespace reuses the old inode). A number must be a live
namespace.
"""

from __future__ import annotations

import structlog

from tracer import netns as netnsmod
from tracer.config import Scope

log = structlog.get_logger("tracer.engine")

#: What the in-kernel netns filter is set to while a named namespace does not exist:
#: no namespace has this inode, so nothing matches until it appears.
NO_NETNS = 0xFFFFFFFF


class Namespaces:
    def __init__(self, scope: Scope) -> None:
        self.scope = scope
        self.all: dict[int, netnsmod.Netns] = {}

    def scan(self) -> dict[int, netnsmod.Netns]:
        """The namespaces now (the last known ones if the scan fails)."""
        try:
            return netnsmod.discover()
        except OSError as exc:
            log.warning("namespace scan failed", error=str(exc))
            return dict(self.all)

    def target(self) -> int | None:
        """The inode the watch is limited to now: None for all namespaces."""
        want = self.scope.netns
        if want is None:
            return None
        if want.isdigit():
            return int(want)
        try:
            return netnsmod.by_name(want).inode
        except OSError:
            return NO_NETNS

    def check(self) -> None:
        """Refuses an inode that is no live namespace; warns about a name that does not exist yet."""
        want = self.scope.netns
        if want is None:
            return
        if want.isdigit():
            if int(want) not in self.all:
                raise ValueError(f"--netns {want}: no live network namespace has inode {want} "
                                 "(see `lsns -t net`, or give an `ip netns` name)")
        elif self.target() == NO_NETNS:
            log.warning("netns not found; waiting for it", netns=want,
                        hint="watching starts when `ip netns add` creates it")

    def watched(self, target: int | None) -> list[netnsmod.Netns]:
        return [ns for ns in self.all.values() if target is None or ns.inode == target]

    def get(self, inode: int) -> netnsmod.Netns | None:
        return self.all.get(inode)
