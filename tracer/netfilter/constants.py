"""Kernel netfilter numbers, one copy each.

These are kernel ABI (UAPI headers, or tables the kernel prints from):
stable across kernels, unlike drop reasons, which are read from BTF at run
time. Each block names the header it mirrors; everything else in tracer
imports them from here, so a name or a number is written once.
"""

from __future__ import annotations

from typing import Final

# --- include/uapi/linux/netfilter.h: protocol families (enum, NFPROTO_*) ------------

NFPROTO_INET: Final = 1
NFPROTO_IPV4: Final = 2
NFPROTO_ARP: Final = 3
NFPROTO_NETDEV: Final = 5
NFPROTO_BRIDGE: Final = 7
NFPROTO_IPV6: Final = 10

#: NFPROTO_* -> nft family name: of a table, a chain, or a message's nfgen_family.
NFPROTO_FAMILIES: Final[dict[int, str]] = {
    NFPROTO_INET: "inet",
    NFPROTO_IPV4: "ip",
    NFPROTO_ARP: "arp",
    NFPROTO_NETDEV: "netdev",
    NFPROTO_BRIDGE: "bridge",
    NFPROTO_IPV6: "ip6",
}

#: NFPROTO_* -> the protocol family of a packet itself (NFTA_TRACE_NFPROTO), as the drop
#: event spells it. An inet table sees ipv4 and ipv6 packets, never an "inet" one.
NFPROTO_PACKET_FAMILIES: Final[dict[int, str]] = {
    NFPROTO_IPV4: "ipv4",
    NFPROTO_IPV6: "ipv6",
    NFPROTO_ARP: "arp",
    NFPROTO_BRIDGE: "bridge",
}

# --- hooks: include/uapi/linux/netfilter.h (enum nf_inet_hooks, enum nf_dev_hooks) and
# include/uapi/linux/netfilter_arp.h (NF_ARP_IN/OUT/FORWARD), by number, as nft names them

NF_INET_HOOKS: Final = ("prerouting", "input", "forward", "output", "postrouting")
NF_NETDEV_HOOKS: Final = ("ingress", "egress")
NF_ARP_HOOKS: Final = ("input", "output", "forward")

#: The built-in iptables chain each inet hook runs: the `hooknames[]` of
#: net/ipv4/netfilter/ip_tables.c (ip6_tables.c has the same), which its TRACE lines
#: print and iptables-save lists. Legacy tables have no chain names in the kernel.
IPTABLES_CHAINS: Final[dict[str, str]] = {hook: hook.upper() for hook in NF_INET_HOOKS}

# --- include/uapi/linux/netfilter/nf_conntrack_common.h --------------------------------

#: enum ip_conntrack_info: what skb->_nfct's low bits say about the packet.
IP_CT_ESTABLISHED: Final = 0
IP_CT_RELATED: Final = 1
IP_CT_NEW: Final = 2
IP_CT_IS_REPLY: Final = 3
IP_CT_UNTRACKED: Final = 7

#: enum ip_conntrack_status, by bit number, named as the drop event spells them (IPS_*
#: without the prefix, lower case).
CT_STATUS_BITS: Final = (
    "expected", "seen_reply", "assured", "confirmed", "src_nat", "dst_nat",
    "seq_adjust", "src_nat_done", "dst_nat_done", "dying", "fixed_timeout",
    "template", "nat_clash", "helper", "offload", "hw_offload",
)  # fmt: skip

#: NF_CT_STATE_*_BIT -> state name: the bits of nft's `ct state` and of NFTA_TRACE_CT_STATE.
#: NF_CT_STATE_BIT(ctinfo) is 1 << (ctinfo % IP_CT_IS_REPLY + 1).
CT_STATE_BITS: Final[dict[int, str]] = {
    1 << 0: "invalid",  # NF_CT_STATE_INVALID_BIT
    1 << (IP_CT_ESTABLISHED + 1): "established",
    1 << (IP_CT_RELATED + 1): "related",
    1 << (IP_CT_NEW + 1): "new",
    1 << 6: "untracked",  # NF_CT_STATE_UNTRACKED_BIT
}

# --- include/uapi/linux/netfilter/nf_conntrack_tuple_common.h --------------------------

#: enum ip_conntrack_dir.
CT_DIRECTIONS: Final[dict[int, str]] = {0: "original", 1: "reply"}


def ct_status_names(status: int) -> tuple[str, ...]:
    """The names of the bits set in an ip_conntrack_status word, lowest bit first."""
    return tuple(name for bit, name in enumerate(CT_STATUS_BITS) if status & (1 << bit))
