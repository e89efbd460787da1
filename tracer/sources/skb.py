"""The skb collector: packet headers and netfilter context of a drop record.

Reads the fields of `struct drop_event` that describe the packet itself;
the numbers it turns into names are kernel UAPI constants
(tracer.netfilter.constants), stable across kernels, unlike drop reasons,
and the tracer's own `enum nf_source` / `enum nf_backend`, read from the
object's BTF with the record's layout.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from tracer.bpf.layout import BtfStruct, Constants
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

#: `enum nf_source` member -> the name events carry (the fentry programs'
#: context is complete at fexit). NF_SRC_NONE: no context.
_SOURCE_NAMES = {"NF_SRC_FENTRY": "fexit", "NF_SRC_KPROBE": "kprobe"}
#: `enum nf_backend` member -> backend name, and the nft family it implies
#: (ipt_do_table is IPv4, ip6t_do_table IPv6; nft tables say their own).
_BACKEND_NAMES: dict[str, tuple[str, str | None]] = {
    "NF_BACKEND_NFT": ("nftables", None),
    "NF_BACKEND_IPT": ("iptables-legacy", "ip"),
    "NF_BACKEND_IP6T": ("iptables-legacy", "ip6"),
}


@dataclass(frozen=True)
class NfNames:
    """nf_info.source and .backend numbers of one BPF object -> names."""

    sources: dict[int, str]
    backends: dict[int, tuple[str, str | None]]

    @classmethod
    def of(cls, constants: Constants) -> NfNames:
        return cls(
            sources={constants.value("nf_source", m): name for m, name in _SOURCE_NAMES.items()},
            backends={constants.value("nf_backend", m): names for m, names in _BACKEND_NAMES.items()},
        )


@cache
def nf_names(constants: Constants) -> NfNames:
    """NfNames of an object's constants, computed once per object."""
    return NfNames.of(constants)


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


def nf_context(nf: BtfStruct, names: NfNames | None = None) -> NfContext | None:
    """What the fentry/kprobe netfilter programs left for this packet, if any.

    `names` are those of the object `nf` was laid out from (looked up when
    not given).
    """
    from tracer.sources.drop import NfContext

    names = names or nf_names(type(nf).constants)
    source = names.sources.get(nf.source)
    if source is None:
        return None
    backend, family = names.backends.get(nf.backend, ("other", None))
    if family is None and nf.family:
        family = NFPROTO_FAMILIES.get(nf.family)
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
