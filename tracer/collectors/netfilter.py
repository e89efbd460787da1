"""The two trace collectors as the pipeline sees them: nftrace and xtrace.

Each wraps the machinery that follows its kernel source in every namespace
(`NftCollector`, `LegacyCollector`) and, per drop, fills its slot of the
evidence: the iptables-legacy TRACE verdict, or the nftrace verdict and the
namespace's ruleset. Attribution then merges them into the netfilter section.

xtrace goes first, and a netfilter drop it proves is not waited for in
nftables: its lookup only waits until its trace socket has been drained
(exact and quick), while an nftables verdict that cannot come would cost the
whole `verdict_wait`.
"""

from __future__ import annotations

import socket
import time

from tracer.collectors.base import Evidence, OnDemand
from tracer.collectors.nftrace import NftCollector
from tracer.collectors.xtrace import LegacyCollector
from tracer.config import Config
from tracer.loop import EventLoop
from tracer.netfilter.marking import FLOW_TIMEOUT, FlowKey, MarkingCoordinator
from tracer.netfilter.nftables import NftContext, NftError
from tracer.netfilter.xtables import XtTable, loaded_tables
from tracer.netns import Netns

#: linux/netlink.h: the nfnetlink family (nftrace, nfnetlink_log).
NETLINK_NETFILTER = 12

#: How long "this namespace has iptables-legacy tables" is believed.
_PRESENT_TTL = 5.0


class _Coordinated(OnDemand):
    """Started, followed and stopped by the MarkingCoordinator, which alone knows the order
    the two trace collectors' host changes need (see tracer/netfilter/marking.py): the
    collector's own start, follow and stop do nothing."""


class XtraceCollector(_Coordinated):
    name = "xtrace"

    def __init__(self, config: Config, marking: MarkingCoordinator, loop: EventLoop | None = None) -> None:
        self.config = config
        self.legacy = LegacyCollector(config.scope, trace=config.nftrace, marking=marking, loop=loop)
        self._present: dict[int, tuple[float, bool]] = {}

    def unavailable(self) -> str | None:
        if not self.config.nftrace:
            return "tracing is off (--no-nftrace)"
        try:
            socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER).close()
        except OSError as exc:
            return f"no nfnetlink socket ({exc.strerror or exc}): iptables-legacy TRACE cannot be read"
        return None


    def gather(self, evidence: Evidence) -> None:
        evidence.legacy_present = self._tables_loaded(evidence.netns)
        drop = evidence.drop
        if not self.config.nftrace or not drop.in_netfilter or drop.fingerprint is None or not drop.traced:
            return
        if drop.subsystem in ("nftables", "conntrack") or not self.legacy.tracing(drop.netns):
            return  # nftables freed it itself, or nothing legacy is traced there
        v = self.legacy.wait_verdict(drop.netns, drop.fingerprint, self.config.verdict_wait, since=drop.received)
        if v is not None and drop.hook is not None and v.hook != drop.hook:
            return  # the packet's last legacy trace is from another hook: not what dropped it
        evidence.legacy = v

    def table_candidates(self, netns_inode: int, hook: str, family: str) -> list[str]:
        return self.legacy.table_candidates(netns_inode, hook, family)

    def legacy_table(self, netns_inode: int, family: str, name: str) -> XtTable | None:
        return self.legacy.table(netns_inode, family, name)

    def tracing_in(self) -> int:
        return sum(self.legacy.tracing(inode) for inode in self.legacy.watched)

    def _tables_loaded(self, ns: Netns | None) -> bool:
        """Whether iptables-legacy tables are loaded in the namespace (cached a few seconds)."""
        if ns is None:
            return False
        now = time.monotonic()
        cached = self._present.get(ns.inode)
        if cached is not None and now - cached[0] < _PRESENT_TTL:
            return cached[1]
        try:
            present = bool(loaded_tables(ns))
        except OSError:  # the namespace vanished
            present = False
        self._present[ns.inode] = (now, present)
        return present



class NftraceCollector(_Coordinated):
    name = "nftrace"

    def __init__(self, config: Config, marking: MarkingCoordinator, loop: EventLoop | None = None,
                 flow_timeout: int = FLOW_TIMEOUT) -> None:  # fmt: skip
        self.config = config
        self.nft = NftCollector(config.scope, rate=config.trace_rate, marking=marking, loop=loop,
                                flow_timeout=flow_timeout)

    def unavailable(self) -> str | None:
        try:
            with NftContext():
                pass
        except (OSError, NftError) as exc:
            return f"libnftables cannot be used ({exc}): drops get no rule text"
        return None


    def gather(self, evidence: Evidence) -> None:
        drop = evidence.drop
        if not drop.in_netfilter or drop.fingerprint is None:
            return
        if evidence.legacy is None and drop.traced:  # an untraced packet has no verdict to wait for
            # A burst of untraced drops delays output by verdict_wait once, not once per drop.
            wait = max(0.0, drop.received + self.config.verdict_wait - time.monotonic())
            evidence.verdict = self.nft.wait_verdict(drop.netns, drop.fingerprint, wait,
                                                     dropped_at=drop.mono_ns / 1e9)
        evidence.ruleset = self.nft.ruleset(drop.netns)

    def watching(self) -> int:
        return len(self.nft.watched)

    def trace_flow(self, netns_inode: int, flow: FlowKey) -> None:
        """Traces `flow`'s later packets in namespace `netns_inode` (for `flow_timeout`
        seconds, 30 by default, after the last call), so that the rule dropping a
        flow whose first drop came without one (an established connection, a
        drop before conntrack) becomes known.

        Call it for each drop key that has no rule; calling again for the same
        flow is cheap. Never blocks, never raises (NftCollector.trace_flow).
        """
        self.nft.trace_flow(netns_inode, flow)

