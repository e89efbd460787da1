"""The marking coordinator: the order in which host changes are made and undone.

Real namespaces, real nftables and iptables-legacy rulesets. What is checked
is the kernel's state at the moment the legacy collector lets go of an
nf_log binding: the namespace's marking table must be gone by then, or the
TRACE lines of marked packets would go to the kernel log.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from typing import Any

import pytest
import structlog

# host_untouched (autouse): the initial namespace's firewall and nf_log stay as they were.
from tests.test_iptables_legacy import IPV4, foreign_users, host_untouched, legacy  # noqa: F401
from tracer.collectors.nftrace import NftCollector
from tracer.collectors.xtrace import LegacyCollector
from tracer.config import Scope
from tracer.lab import Lab
from tracer.netfilter.marking import MARK_TABLE, NF_LOGGER, MarkingCoordinator, read_nf_log
from tracer.netns import Netns

#: What the legacy collector logs when it lets go of a binding: put back, or left to other tracers.
RELEASED = ("legacy.nf_log_restored", "legacy.nf_log_left_bound")

NFT_INPUT = "table inet fw { chain input { type filter hook input priority 0; policy accept; }; }\n"


def marked_when_released(lab: Lab, ns: Netns) -> Any:
    """A log processor that notes, at each release of `ns`'s nf_log binding, whether a
    marking table was still in the namespace's ruleset at that moment."""

    def probe(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if event.get("event") in RELEASED and event.get("netns_inode") == ns.inode:
            event["marking_table_present"] = MARK_TABLE in lab.nft_list(ns)
        return event

    return probe


def releases(logs: list[MutableMapping[str, Any]], ns: Netns) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] in RELEASED and e.get("netns_inode") == ns.inode]


def build(first: str) -> tuple[MarkingCoordinator, NftCollector, LegacyCollector]:
    """Both collectors on one coordinator, attached in the order `first` says."""
    marking = MarkingCoordinator()
    if first == "nft":
        nft = NftCollector(Scope(), marking=marking)
        leg = LegacyCollector(Scope(), marking=marking)
    else:
        leg = LegacyCollector(Scope(), marking=marking)
        nft = NftCollector(Scope(), marking=marking)
    return marking, nft, leg


@pytest.mark.root
@pytest.mark.parametrize("first", ["nft", "legacy"], ids=["nft-attached-first", "legacy-attached-first"])
@pytest.mark.parametrize("nft_chains", [True, False], ids=["nft-and-legacy", "legacy-only"])
def test_stop_unmarks_before_nf_log_is_put_back(lab: Lab, first: str, nft_chains: bool) -> None:
    """A namespace marked for its nftables chains or for its legacy tables alone: stopping
    removes the marking table first, and only then lets go of nf_log, whichever collector
    was made first."""
    ns = lab.add_ns("mixed")
    if nft_chains:
        lab.nft(ns, NFT_INPUT)
    legacy(lab, ns, "-A", "INPUT", "-p", "tcp", "--dport", "443", "-j", "DROP")
    before = read_nf_log(ns, IPV4)
    marking, nft, leg = build(first)
    try:
        marking.start([ns])
        assert nft.marking_table(ns.inode) == MARK_TABLE and MARK_TABLE in lab.nft_list(ns)
        assert leg.tracing(ns.inode) and read_nf_log(ns, IPV4) == NF_LOGGER
        with structlog.testing.capture_logs(processors=[marked_when_released(lab, ns)]) as logs:
            marking.stop()
    finally:
        marking.stop()  # safe twice
    released = releases(logs, ns)
    assert released, logs
    assert not any(e["marking_table_present"] for e in released), released
    events = [e["event"] for e in logs]
    assert events.index("nft.marking_table_removed") < events.index(released[0]["event"])
    assert MARK_TABLE not in lab.nft_list(ns)
    if not foreign_users(ns):
        assert read_nf_log(ns, IPV4) == before


@pytest.mark.root
def test_namespace_leaving_the_watch_is_unmarked_before_nf_log_is_put_back(lab: Lab) -> None:
    """update_namespaces: the namespace no longer listed loses its marking table before its
    binding is let go; the one still listed keeps both."""
    gone, stays = lab.add_ns("gone"), lab.add_ns("stays")
    for ns in (gone, stays):
        legacy(lab, ns, "-A", "INPUT", "-j", "DROP")
    marking, nft, leg = build("legacy")
    with marking:
        marking.start([gone, stays])
        assert nft.marking_table(gone.inode) == MARK_TABLE and leg.tracing(gone.inode)
        with structlog.testing.capture_logs(processors=[marked_when_released(lab, gone)]) as logs:
            marking.update_namespaces([stays])
        released = releases(logs, gone)
        assert released and not any(e["marking_table_present"] for e in released), logs
        assert nft.marking_table(gone.inode) is None and not leg.tracing(gone.inode)
        assert nft.marking_table(stays.inode) == MARK_TABLE and leg.tracing(stays.inode)
        assert read_nf_log(stays, IPV4) == NF_LOGGER


@pytest.mark.root
def test_legacy_only_namespace_is_marked_once_its_tables_can_drop(lab: Lab) -> None:
    """Legacy tables announce nothing: the legacy collector's poll finds the new DROP rule,
    binds nf_log, and the coordinator has nftables mark the namespace (not before)."""
    from tests.support import wait_for

    ns = lab.add_ns("late")
    legacy(lab, ns, "-S")  # the filter table, empty: nothing can drop yet
    marking = MarkingCoordinator()
    leg = LegacyCollector(Scope(), marking=marking, poll_interval=0.2)
    nft = NftCollector(Scope(), marking=marking)
    with marking:
        marking.start([ns])
        assert nft.marking_table(ns.inode) is None and not leg.tracing(ns.inode)
        legacy(lab, ns, "-A", "INPUT", "-p", "udp", "--dport", "53", "-j", "DROP")
        assert wait_for(lambda: nft.marking_table(ns.inode) == MARK_TABLE, 5)
        assert read_nf_log(ns, IPV4) == NF_LOGGER


def test_one_collector_of_each_kind_per_coordinator() -> None:
    marking = MarkingCoordinator()
    NftCollector(Scope(), marking=marking)
    LegacyCollector(Scope(), marking=marking)
    assert marking.legacy_attached
    with pytest.raises(ValueError, match="nftables collector already"):
        NftCollector(Scope(), marking=marking)
    with pytest.raises(ValueError, match="iptables-legacy collector already"):
        LegacyCollector(Scope(), marking=marking)
    with pytest.raises(ValueError, match="state_dir"):
        LegacyCollector(Scope(), marking=MarkingCoordinator(), state_dir=marking.state_dir / "elsewhere")
