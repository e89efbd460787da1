"""The skb collector: packet headers and netfilter context of a drop record.

Reads the fields of `struct drop_event` that describe the packet itself;
the numbers it turns into names are kernel UAPI constants
(tracer.netfilter.constants), stable across kernels, unlike drop reasons.
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

from tracer.event.packet import (
    ETH_P_IP,
    ETH_P_IPV6,
    PacketHeaders,
    decode,
    fingerprint,
)
from tracer.netfilter.constants import (
    NF_ARP_HOOKS,
    NF_INET_HOOKS,
    NF_NETDEV_HOOKS,
    NFPROTO_ARP,
    NFPROTO_FAMILIES,
    NFPROTO_NETDEV,
)

if TYPE_CHECKING:
    from tracer.sources.drop import NfContext

_NF_SOURCES = {1: "fexit", 2: "kprobe"}
_NF_BACKENDS = {1: "nftables", 2: "iptables-legacy", 3: "iptables-legacy"}


def hook_name(pf: int, hook: int) -> str | None:
    """Hook name of a (NFPROTO, hook number) pair as nft spells it."""
    names: tuple[str, ...]
    if pf == NFPROTO_NETDEV:
        names = NF_NETDEV_HOOKS
    elif pf == NFPROTO_ARP:
        names = NF_ARP_HOOKS
    else:
        names = NF_INET_HOOKS
    return names[hook] if 0 <= hook < len(names) else None


def _cstr(raw: bytes) -> str | None:
    text = raw.split(b"\0", 1)[0].decode(errors="replace")
    return text or None


def nf_context(nf: ctypes.Structure) -> NfContext | None:
    """What the fentry/kprobe netfilter programs left for this packet, if any."""
    from tracer.sources.drop import NfContext

    source = _NF_SOURCES.get(nf.source)
    if source is None:
        return None
    backend = _NF_BACKENDS.get(nf.backend, "other")
    family = NFPROTO_FAMILIES.get(nf.family) if nf.family else None
    if backend == "iptables-legacy":
        family = "ip6" if nf.backend == 3 else "ip"
    return NfContext(
        source=source,
        backend=backend,
        pf=nf.pf,
        hook=hook_name(nf.pf, nf.hook),
        family=family,
        table=_cstr(bytes(nf.table)),
        chain=_cstr(bytes(nf.chain)),
        verdict=None if nf.verdict < 0 else nf.verdict & 0xFF,
    )


def headers(rec: ctypes.Structure) -> tuple[PacketHeaders | None, bytes | None]:
    """Decoded headers and the join fingerprint of an IP packet's drop record."""
    if not rec.l3_off_valid or rec.l3proto not in (ETH_P_IP, ETH_P_IPV6):
        return None, None
    l3 = bytes(rec.l3)
    l4 = bytes(rec.l4)[: rec.l4_len]
    return decode(l3, l4, rec.l4proto), fingerprint(l3, l4)
