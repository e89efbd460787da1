"""The diagnosis collector: names each drop's cause and fix (the event's `diagnosis` section).

It runs last in the join, because the cause rests on what the others
found: the netfilter attribution, the conntrack state, the interfaces, the
neighbour. It reads the namespace's ruleset snapshot that nftrace already
holds for the drop (the same generation the verdict came from), and the
namespace's sysctls at the time of the drop. It changes nothing on the host.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from tracer.collectors.base import Evidence, OnDemand
from tracer.diagnosis import causes
from tracer.event.model import Diagnosis, DropEvent
from tracer.netfilter.xtables import XtTable

log = structlog.get_logger(__name__)

#: Neighbour-discovery fixes kept for the NEIGH_FAILED drops that follow them.
_ND_KEPT = 1024


class DiagnosisCollector(OnDemand):
    name = "diagnosis"

    def __init__(self, legacy_table: Callable[[int, str, str], XtTable | None] | None = None) -> None:
        self._nd: dict[str, Diagnosis] = {}
        #: (namespace inode, family, table) -> the iptables-legacy table, for rule order there
        self._legacy_table = legacy_table

    def enrich(self, event: DropEvent, evidence: Evidence) -> None:
        if len(self._nd) > _ND_KEPT:
            self._nd.clear()
        verdict, find = evidence.verdict, self._legacy_table
        inode = evidence.drop.netns
        ctx = causes.Context(ruleset=evidence.ruleset, netns=evidence.netns, nd_fixes=self._nd,
                             firewalld=causes.firewalld_zone,
                             xt_lines=verdict.iptables_lines if verdict is not None else None,
                             legacy_table=None if find is None else lambda family, name: find(inode, family, name))
        try:
            event.diagnosis = causes.diagnose(event, ctx)
        except Exception:  # a diagnosis must never cost the drop its event
            log.warning("diagnosis failed", exc_info=True)
