"""The skb collector: packet headers and netfilter context of a drop record.

Reads the fields of `struct drop_event` that describe the packet itself;
the numbers it turns into names are kernel UAPI constants
(tracer.netfilter.constants), stable across kernels, unlike drop reasons,
and the tracer's own `enum nf_source` / `enum nf_backend`, read from the
object's BTF with the record's layout.
"""

from __future__ import annotations

import ctypes
import dataclasses
import ipaddress
import socket
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

from tracer.bpf.layout import BtfStruct, Constants
from tracer.event.packet import (
    ARP_HEADER_BYTES,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    IPPROTO_ICMPV6,
    ND_TYPES,
    PORT_PROTOCOLS,
    Neighbor,
    PacketHeaders,
    decode,
    decode_arp,
    decode_quoted,
    fingerprint,
)
from tracer.event.sections import CtTuple
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


@dataclass(frozen=True)
class RelatedBits:
    """`enum tracer_related` and `enum tracer_match` of one BPF object, by meaning."""

    quoted: int
    ct_tuples: int
    nd: int
    arp: int
    matches: dict[int, str]  # drop_event.matched -> name; TRACER_MATCH_NONE is absent

    @classmethod
    def of(cls, constants: Constants) -> RelatedBits:
        def bit(name: str) -> int:
            return constants.value("tracer_related", name)

        matches = {value: member.removeprefix("TRACER_MATCH_").lower()
                   for member, value in constants.members("tracer_match").items() if member != "TRACER_MATCH_NONE"}
        return cls(bit("TRACER_REL_QUOTED"), bit("TRACER_REL_CT_TUPLES"), bit("TRACER_REL_ND"),
                   bit("TRACER_REL_ARP"), matches)


@cache
def related_bits(constants: Constants) -> RelatedBits:
    """RelatedBits of an object's constants, computed once per object."""
    return RelatedBits.of(constants)


def _bits(rec: ctypes.Structure) -> RelatedBits:
    return related_bits(type(rec).constants)


def headers(rec: ctypes.Structure) -> tuple[PacketHeaders | None, bytes | None]:
    """Decoded headers and the join fingerprint of an IP packet's drop record.

    An ICMP error's headers carry the packet it quotes (`PacketHeaders.quoted`)
    when the kernel could read it.
    """
    if not rec.l3_off_valid or rec.l3proto not in (ETH_P_IP, ETH_P_IPV6):
        return None, None
    l3 = bytes(rec.l3)
    l4 = bytes(rec.l4)[: rec.l4_len]
    decoded = decode(l3, l4, rec.l4proto)
    if decoded is not None and rec.related & _bits(rec).quoted:
        quoted = decode_quoted(bytes(rec.quoted_l3), bytes(rec.quoted_l4)[: rec.quoted_l4_len], rec.quoted_l4proto)
        decoded = dataclasses.replace(decoded, quoted=quoted)
    return decoded, fingerprint(l3, l4)


def _address(family: int, raw: bytes) -> str:
    """Canonical text of a 16-byte address field (IPv4 in the first 4 bytes)."""
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return _ipv6(raw)


def _ipv6(raw: bytes) -> str:
    return ipaddress.IPv6Address(raw[:16]).compressed


def ct_tuples(rec: ctypes.Structure) -> tuple[CtTuple | None, CtTuple | None]:
    """The conntrack entry's original and reply tuples, when the kernel read them."""
    if not rec.related & _bits(rec).ct_tuples or rec.ct_family not in (4, 6):
        return None, None
    ported = rec.ct_l4proto in PORT_PROTOCOLS

    def one(t: ctypes.Structure) -> CtTuple:
        return CtTuple(_address(rec.ct_family, bytes(t.saddr)), _address(rec.ct_family, bytes(t.daddr)),
                       t.sport if ported else None, t.dport if ported else None)

    return one(rec.ct_orig), one(rec.ct_reply)


def neighbor(rec: ctypes.Structure, packet: PacketHeaders | None) -> Neighbor | None:
    """What an ARP or neighbour-discovery drop is about; None for any other packet."""
    bits = _bits(rec)
    if rec.l3proto == ETH_P_ARP and rec.related & bits.arp:
        return decode_arp(bytes(rec.l3)[:ARP_HEADER_BYTES])
    if packet is None or packet.protocol != IPPROTO_ICMPV6 or packet.icmp_type not in ND_TYPES:
        return None
    target = _ipv6(bytes(rec.nd_target)) if rec.related & bits.nd else None
    return Neighbor("nd", packet.icmp_type, packet.src, target)


def matched(rec: ctypes.Structure) -> str | None:
    """Which view of the packet the kernel's --port/--host/--proto filter selected it by:
    headers, quoted, ct_original, ct_reply or neighbor; None without such a filter."""
    return _bits(rec).matches.get(rec.matched)
