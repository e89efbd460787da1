"""The conntrack collector: the connection-tracking state of a dropped packet.

State comes from the packet itself (skb->_nfct, read by BPF), or from the
nftrace message of the verdict when nftables traced it. The table's fill
level comes from pyroute2's conntrack netlink support and feeds diagnoses
("conntrack table full").
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from tracer.event.sections import ConntrackInfo, CtTuple
from tracer.netfilter.constants import (
    CT_STATE_BITS,
    IP_CT_ESTABLISHED,
    IP_CT_IS_REPLY,
    IP_CT_NEW,
    IP_CT_RELATED,
    IP_CT_UNTRACKED,
    ct_status_names,
)

if TYPE_CHECKING:
    from tracer.collectors.base import Evidence
    from tracer.event.model import DropEvent
    from tracer.netns import Netns

#: What the BPF side stores in place of enum ip_conntrack_info when the packet has no entry.
CT_INFO_NONE = 0xFF


def from_record(info: int, status: int, zone: int, mark: int) -> ConntrackInfo | None:
    """From skb->_nfct as BPF read it; None when the packet carries no entry.

    A packet with no entry is either untouched by conntrack or judged invalid
    by it: only the context can tell (see `invalid_if_tracked`).
    """
    if info == CT_INFO_NONE:
        return None
    if info == IP_CT_UNTRACKED:
        return ConntrackInfo("untracked")
    base = info % IP_CT_IS_REPLY
    state = {IP_CT_ESTABLISHED: "established", IP_CT_RELATED: "related", IP_CT_NEW: "new"}[base]
    direction = "reply" if info >= IP_CT_IS_REPLY else "original"
    return ConntrackInfo(state, direction, ct_status_names(status), zone, mark)


def from_trace(state_bits: int | None, direction: int | None, status: int | None) -> ConntrackInfo | None:
    """From the NFTA_TRACE_CT_* attributes of an nftrace message (kernel 6.6+)."""
    if state_bits is None:
        return None
    state = next((name for bit, name in CT_STATE_BITS.items() if state_bits & bit), None)
    if state is None:
        return None
    dirname = None if direction is None else ("reply" if direction else "original")
    if state in ("invalid", "untracked"):
        return ConntrackInfo(state)
    return ConntrackInfo(state, dirname, ct_status_names(status or 0))


def reversed_tuple(t: CtTuple) -> CtTuple:
    """The tuple a reply carries when no NAT touched the flow."""
    return CtTuple(t.dst, t.src, t.dport, t.sport)


def with_nat_tuples(info: ConntrackInfo, original: CtTuple | None, reply: CtTuple | None) -> ConntrackInfo:
    """`info` with the entry's tuples, kept only when NAT changed the flow.

    Without NAT the reply tuple is the original reversed and the packet's own
    headers already say everything; with it, the original tuple is what the
    client asked for (the pre-DNAT address and port) and the reply tuple names
    the translated peer (DNAT) or the address replies return to (SNAT).
    """
    if original is None or reply is None or info.state in ("invalid", "untracked"):
        return info
    if reply == reversed_tuple(original):
        return info
    return dataclasses.replace(info, original=original, reply=reply)


@dataclass(frozen=True)
class TableFill:
    count: int
    max: int

    @property
    def full(self) -> bool:
        return self.max > 0 and self.count >= self.max


def table_fill(proc_root: str = "/proc/sys/net/netfilter") -> TableFill | None:
    """Entries in the conntrack table and its limit, for this netns."""
    try:
        with open(f"{proc_root}/nf_conntrack_count") as f:
            count = int(f.read())
        with open(f"{proc_root}/nf_conntrack_max") as f:
            limit = int(f.read())
    except OSError:
        return None
    return TableFill(count, limit)


#: Priority of conntrack's own hook (NF_IP_PRI_CONNTRACK): chains at or
#: below it run before conntrack has looked at the packet.
CONNTRACK_PRIORITY = -200
_AFTER_CONNTRACK_HOOKS = frozenset({"input", "forward", "postrouting"})
_CT_USERS = re.compile(r"\bct\s|\bmasquerade\b|\b[sd]nat\b|\bredirect\b|-m (?:conntrack|state)\b")


def tracking_active(rule_texts: list[str], chain_types: list[str | None]) -> bool:
    """Whether conntrack runs in a namespace, judged from its ruleset.

    Since 6.x conntrack registers its hooks in a namespace only when a rule
    there needs it (a `ct` match, NAT); without one, no packet carries an
    entry and "no entry" means nothing.
    """
    if "nat" in chain_types:
        return True
    return any(_CT_USERS.search(text) for text in rule_texts)


def invalid_if_tracked(active: bool, hook: str | None, priority: int | None) -> ConntrackInfo | None:
    """`invalid` for a packet without an entry where conntrack had seen it.

    Conntrack leaves no entry on packets it judges invalid. If it is active
    in the namespace and the drop happened after its hook ran (input,
    forward, postrouting, or a prerouting/output chain with a priority after
    conntrack's), an entry-less packet was invalid.
    """
    if not active or hook is None:
        return None
    if hook in _AFTER_CONNTRACK_HOOKS:
        return ConntrackInfo("invalid")
    if hook in ("prerouting", "output") and priority is not None and priority > CONNTRACK_PRIORITY:
        return ConntrackInfo("invalid")
    return None


class ConntrackCollector:
    """The conntrack section: the packet's own state (read by BPF), else its nftrace verdict's,
    else `invalid` when the ruleset tracks connections and the drop came before conntrack could
    have attached an entry (see `invalid_if_tracked`)."""

    name = "conntrack"

    def unavailable(self) -> str | None:
        if table_fill() is None:
            return "nf_conntrack is not loaded here: drops carry no connection state until a ruleset uses it"
        return None

    def start(self, namespaces: Sequence[Netns]) -> None:
        pass  # the state travels with each drop; nothing to follow

    def namespaces_changed(self, namespaces: Sequence[Netns]) -> None:
        pass

    def enrich(self, event: DropEvent, evidence: Evidence) -> None:
        info = evidence.drop.conntrack
        if info is None and evidence.verdict is not None:
            info = evidence.verdict.conntrack
        nf, rs = event.netfilter, evidence.ruleset
        if info is None and nf is not None and rs is not None:
            # A rule whose text could not be told for certain (Rule.text None) says nothing here.
            texts = [r.text for r in rs.rules.values() if r.text is not None]
            active = tracking_active(texts, [c.type for c in rs.chains.values()])
            base = None
            if nf.family and nf.table and nf.base_chain:
                base = rs.chain(nf.family, nf.table, nf.base_chain)
            info = invalid_if_tracked(active, nf.hook, base.priority if base else None)
        if info is not None:
            info = with_nat_tuples(info, evidence.drop.ct_original, evidence.drop.ct_reply)
        event.conntrack = info

    def stop(self) -> None:
        pass
