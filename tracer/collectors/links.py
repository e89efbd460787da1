"""Interface names by (network namespace, ifindex), through pyroute2.

Interface indexes are only unique inside a namespace, so names are looked up
in the namespace of the drop. The BPF side already copies the name of the
device the packet was on; this resolves the others (the interface a
forwarded packet arrived on).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import structlog
from pyroute2 import IPRoute

from tracer.collectors.base import Evidence
from tracer.event.model import DropEvent, Interface, Interfaces
from tracer.netfilter.constants import IPTABLES_CHAINS
from tracer.netns import Netns, entered

log = structlog.get_logger("tracer.links")


class LinkNames:
    def __init__(self, min_refresh: float = 1.0) -> None:
        self._names: dict[int, dict[int, str]] = {}
        self._refreshed: dict[int, float] = {}
        self._min_refresh = min_refresh
        self._lock = threading.Lock()

    def remember(self, netns: int, ifindex: int, name: str) -> None:
        if ifindex and name:
            with self._lock:
                self._names.setdefault(netns, {})[ifindex] = name

    def name(self, ns: Netns | None, ifindex: int) -> str | None:
        if not ifindex or ns is None:
            return None
        with self._lock:
            known = self._names.get(ns.inode, {}).get(ifindex)
        if known is not None:
            return known
        if time.monotonic() - self._refreshed.get(ns.inode, 0.0) < self._min_refresh:
            return None
        return self._refresh(ns).get(ifindex)

    def _refresh(self, ns: Netns) -> dict[int, str]:
        self._refreshed[ns.inode] = time.monotonic()
        try:
            with entered(ns), IPRoute() as ipr:
                names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.get_links()}
        except OSError as exc:
            log.debug("cannot list links", netns=ns.label, error=str(exc))
            return {}
        with self._lock:
            self._names[ns.inode] = names
        return names


class LinksCollector:
    """The interfaces section: which device a drop came in on and went out of."""

    name = "links"

    def __init__(self) -> None:
        self.names = LinkNames()

    def unavailable(self) -> str | None:
        return None

    def start(self, namespaces: Sequence[Netns]) -> None:
        pass  # names are looked up when a drop needs them

    def namespaces_changed(self, namespaces: Sequence[Netns]) -> None:
        pass

    def enrich(self, event: DropEvent, evidence: Evidence) -> None:
        """Ingress and egress as the hook implies; the netfilter hook, once known, wins over the stack's."""
        drop, ns = evidence.drop, evidence.netns
        nf = event.netfilter
        hook = nf.hook if nf is not None and nf.hook else drop.hook
        self.names.remember(drop.netns, drop.ifindex, drop.dev_name)
        ingress = egress = None
        if drop.iif:
            name = drop.dev_name if drop.iif == drop.ifindex else self.names.name(ns, drop.iif)
            ingress = Interface(drop.iif, name)
        if hook in ("output", "postrouting", "egress") and drop.ifindex:
            egress = Interface(drop.ifindex, drop.dev_name or None)
            if hook == "output" and drop.iif == drop.ifindex:
                ingress = None
        elif not drop.iif and drop.ifindex and hook not in IPTABLES_CHAINS:
            ingress = None
        event.interfaces = None if ingress is None and egress is None else Interfaces(ingress, egress)

    def stop(self) -> None:
        pass
