"""Naming the netfilter rule, chain and table behind a drop.

Three sources, best first:
- nftrace: the kernel's own per-rule trace of the packet (exact rule, user
  chains, policy), joined to the drop by packet fingerprint; for
  iptables-legacy the same nf_trace bit makes ip_tables log TRACE lines,
  read through nfnetlink_log;
- fexit/kprobe context: table, base chain and hook recorded by the BPF
  programs on nft_do_chain / ipt_do_table / nf_hook_slow;
- the stack: hook from the caller of nf_hook_slow, subsystem from frames.
A field a source cannot know is left out rather than guessed.
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING, Protocol

from tracer.event.model import Netfilter, Rule
from tracer.netfilter.constants import IPTABLES_CHAINS
from tracer.sources.drop import KernelDrop

if TYPE_CHECKING:
    from tracer.collectors.nftrace import TraceVerdict
    from tracer.collectors.xtrace import LegacyVerdict


class RulesetView(Protocol):
    """What attribution needs from a namespace's nftables ruleset."""

    def backend_of(self, family: str, table: str) -> str: ...


def _traced(drop: KernelDrop, v: TraceVerdict | LegacyVerdict, backend: str, rule: Rule | None) -> Netfilter:
    """A Netfilter from a traced verdict (nftables or iptables-legacy TRACE)."""
    return Netfilter(
        backend=backend,
        attribution="nftrace",
        family=v.family,
        hook=v.hook or drop.hook,
        table=v.table,
        chain=v.chain,
        base_chain=v.base_chain,
        rule=rule,
        policy=True if v.policy else (False if rule else None),
        verdict=v.verdict,
    )


def from_trace(drop: KernelDrop, v: TraceVerdict) -> Netfilter:
    rule = None
    if not v.policy and v.handle is not None:
        rule = Rule(handle=v.handle, text=v.text, comment=v.comment, iptables=v.iptables,
                    number=v.iptables_number)
    return _traced(drop, v, v.backend, rule)


def from_legacy(drop: KernelDrop, v: LegacyVerdict) -> Netfilter:
    """An iptables-legacy TRACE verdict: rule number as handle, `iptables -S` line as text.

    TRACE's rule number counts the rules of the chain from 1, as `iptables -L --line-numbers`
    does, so it is also the rule's line `number`.
    """
    rule = None
    if not v.policy and v.rule_number is not None and v.iptables is not None:
        rule = Rule(handle=v.rule_number, text=v.iptables, comment=v.comment, iptables=v.iptables,
                    number=v.rule_number)
    return _traced(drop, v, "iptables-legacy", rule)


def with_legacy_table(nf: Netfilter, candidates: list[str]) -> Netfilter:
    """Adds the table of an untraced iptables-legacy drop when only one table could have dropped it."""
    if nf.backend != "iptables-legacy" or nf.table is not None or len(candidates) != 1:
        return nf
    return replace(nf, table=candidates[0])


def from_context(drop: KernelDrop, ruleset: RulesetView | None) -> Netfilter | None:
    nf = drop.nf
    if nf is None or (nf.table is None and nf.backend != "iptables-legacy"):
        return None
    hook = nf.hook or drop.hook
    if nf.backend == "iptables-legacy":
        return Netfilter(
            backend="iptables-legacy",
            attribution=nf.source,
            family=nf.family,
            hook=hook,
            table=nf.table,
            base_chain=IPTABLES_CHAINS.get(hook or ""),
            verdict="drop",
        )
    backend = "nftables"
    if ruleset is not None and nf.family and nf.table:
        backend = ruleset.backend_of(nf.family, nf.table)
    return Netfilter(
        backend=backend,
        attribution=nf.source,
        family=nf.family,
        hook=hook,
        table=nf.table,
        base_chain=nf.chain,
        verdict="drop",
    )


def from_stack(drop: KernelDrop, legacy_present: bool) -> Netfilter | None:
    """Only what the stack proves: hook and subsystem."""
    if not drop.in_netfilter:
        return None
    backend = {
        "nftables": "nftables",
        "iptables-legacy": "iptables-legacy",
        "conntrack": "conntrack",
    }.get(drop.subsystem)
    if backend is None:
        # A verdict from a hook other than nft_do_chain: on kernels where
        # nftables frees packets itself, that is iptables-legacy when such
        # tables exist in the namespace, otherwise something we cannot name.
        backend = "iptables-legacy" if legacy_present else "other"
    return Netfilter(
        backend=backend,
        attribution="stack",
        hook=drop.hook,
        base_chain=IPTABLES_CHAINS.get(drop.hook or "") if backend == "iptables-legacy" else None,
        verdict="drop",
    )


def attribute(drop: KernelDrop, verdict: TraceVerdict | None, ruleset: RulesetView | None,
              legacy_present: bool = False, legacy: LegacyVerdict | None = None) -> Netfilter | None:
    if verdict is not None:
        return from_trace(drop, verdict)
    if legacy is not None:
        return from_legacy(drop, legacy)
    return from_context(drop, ruleset) or from_stack(drop, legacy_present)


class PressureView(Protocol):
    """What conntrack attribution needs from tracer.collectors.ctpressure.ConntrackPressure."""

    def dropping(self, netns_inode: int, at_ns: int | None = None) -> bool: ...


#: Hooks where conntrack looks a packet up (nf_conntrack_in) and can refuse it for want of room:
#: prerouting for packets that arrive, output for locally sent ones.
CONNTRACK_HOOKS = frozenset({"prerouting", "output"})
#: NF_DROP, as the netfilter probes record a table's verdict.
_NF_DROP = 0


def conntrack_shaped(drop: KernelDrop, verdict: TraceVerdict | None, legacy: LegacyVerdict | None) -> bool:
    """Whether a drop looks like conntrack's own: no rule can have made it.

    Conntrack refuses a packet it finds no room for by returning NF_DROP
    from its hook, so `nf_hook_slow` frees it (NETFILTER_DROP) at prerouting
    or output, no chain traced a drop verdict for it (nftrace or
    iptables-legacy TRACE), no table's verdict was drop (where netfilter
    probes ran), no nftables frame freed it (recent kernels, 6.18 here,
    free rule drops inside nft_do_chain), and it carries no entry (it never got one).
    """
    if verdict is not None or legacy is not None or drop.conntrack is not None:
        return False
    if drop.reason != "NETFILTER_DROP" or drop.hook not in CONNTRACK_HOOKS:
        return False
    if drop.subsystem not in ("netfilter", "conntrack"):
        return False
    return drop.nf is None or drop.nf.verdict != _NF_DROP


def conntrack_full(drop: KernelDrop, verdict: TraceVerdict | None, legacy: LegacyVerdict | None,
                   pressure: PressureView | None) -> Netfilter | None:
    """The netfilter section of a packet conntrack dropped (its table full), or None.

    Shape alone cannot tell conntrack from an untraced rule on kernels that
    free rule drops in nf_hook_slow, so the namespace's conntrack counters
    decide: `pressure.dropping` says whether its `drop` statistic rose
    around the drop's time. The section names no table, chain, rule or
    policy: none decided, and `subsystem()` makes the drop `conntrack`.
    Asked before `attribute`, which would otherwise guess from the stack.
    """
    if pressure is None or not conntrack_shaped(drop, verdict, legacy):
        return None
    if not pressure.dropping(drop.netns, at_ns=drop.mono_ns):
        return None
    return Netfilter(backend="conntrack", attribution="stack", hook=drop.hook, verdict="drop")


def subsystem(drop: KernelDrop, nf: Netfilter | None) -> str:
    """nftables, iptables-legacy, conntrack, routing, socket or other: who dropped it, in one word."""
    if nf is not None:
        if nf.backend in ("nftables", "iptables-nft"):
            return "nftables"
        if nf.backend in ("iptables-legacy", "conntrack"):
            return nf.backend
    return drop.subsystem if drop.subsystem != "netfilter" else "other"
