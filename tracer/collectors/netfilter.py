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

import time
from collections.abc import Callable, Sequence

from tracer.collectors.base import Evidence
from tracer.collectors.nftrace import NftCollector
from tracer.collectors.xtrace import LegacyCollector, loaded_tables
from tracer.config import Config
from tracer.event.model import DropEvent
from tracer.netns import Netns

#: How long "this namespace has iptables-legacy tables" is believed.
_PRESENT_TTL = 5.0


class XtraceCollector:
    name = "xtrace"

    def __init__(self, config: Config, on_ready: Callable[[], None] | None = None) -> None:
        self.config = config
        self.legacy = LegacyCollector(config.scope, trace=config.nftrace, on_ready=on_ready)
        self._present: dict[int, tuple[float, bool]] = {}

    def unavailable(self) -> str | None:
        return None if self.config.nftrace else "tracing is off (--no-nftrace)"

    def start(self, namespaces: Sequence[Netns]) -> None:
        self.legacy.start(namespaces)

    def namespaces_changed(self, namespaces: Sequence[Netns]) -> None:
        self.legacy.update_namespaces(namespaces)

    def enrich(self, event: DropEvent, evidence: Evidence) -> None:
        evidence.legacy_present = self._tables_loaded(evidence.netns)
        drop = evidence.drop
        if not self.config.nftrace or not drop.in_netfilter or drop.fingerprint is None:
            return
        if drop.subsystem in ("nftables", "conntrack") or not self.legacy.tracing(drop.netns):
            return  # nftables freed it itself, or nothing legacy is traced there
        v = self.legacy.wait_verdict(drop.netns, drop.fingerprint, self.config.verdict_wait, since=drop.received)
        if v is not None and drop.hook is not None and v.hook != drop.hook:
            return  # the packet's last legacy trace is from another hook: not what dropped it
        evidence.legacy = v

    def table_candidates(self, netns_inode: int, hook: str, family: str) -> list[str]:
        return self.legacy.table_candidates(netns_inode, hook, family)

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

    def stop(self) -> None:
        self.legacy.stop()


class NftraceCollector:
    name = "nftrace"

    def __init__(self, config: Config, xtrace: XtraceCollector | None) -> None:
        self.config = config
        self.nft = NftCollector(config.scope, rate=config.trace_rate,
                                mark_legacy=xtrace.legacy if xtrace is not None else None)

    def unavailable(self) -> str | None:
        return None

    def start(self, namespaces: Sequence[Netns]) -> None:
        self.nft.start(namespaces)

    def namespaces_changed(self, namespaces: Sequence[Netns]) -> None:
        self.nft.update_namespaces(namespaces)

    def enrich(self, event: DropEvent, evidence: Evidence) -> None:
        drop = evidence.drop
        if not drop.in_netfilter or drop.fingerprint is None:
            return
        if evidence.legacy is None:
            # A burst of untraced drops delays output by verdict_wait once, not once per drop.
            wait = max(0.0, drop.received + self.config.verdict_wait - time.monotonic())
            evidence.verdict = self.nft.wait_verdict(drop.netns, drop.fingerprint, wait,
                                                     dropped_at=drop.mono_ns / 1e9)
        evidence.ruleset = self.nft.ruleset(drop.netns)

    def watching(self) -> int:
        return len(self.nft.watched)

    def stop(self) -> None:
        self.nft.stop()
