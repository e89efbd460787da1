"""The watch filter as the BPF program's `struct filter_cfg`.

Filtering in the kernel means a busy host pays only for the drops a user
watches: everything else is discarded before a ring-buffer record exists.
The flag bits are those of the object the struct was laid out from
(`enum filter_flags` in bpf/tracer.h, read from its BTF).
"""

from __future__ import annotations

import ctypes
import socket
from dataclasses import dataclass

from tracer.bpf.layout import BtfStruct, Constants
from tracer.config import PROTO_NUMBERS, Scope


@dataclass(frozen=True)
class FilterFlags:
    """`enum filter_flags` and `FILTER_NO_REASON` of bpf/tracer.h, by meaning."""

    ports: int
    proto: int
    nets: int
    netns: int
    iface: int
    reasons: int
    ip_only: int
    every_drop: int
    nf_context: int
    no_reason: int  # filter_cfg.ignore_reason when no reason is ignored

    @classmethod
    def of(cls, constants: Constants) -> FilterFlags:
        """Read by name, so a renamed or missing member fails here and not in the kernel."""

        def flag(name: str) -> int:
            return constants.value("filter_flags", name)

        return cls(
            ports=flag("FILTER_PORTS"),
            proto=flag("FILTER_PROTO"),
            nets=flag("FILTER_NETS"),
            netns=flag("FILTER_NETNS"),
            iface=flag("FILTER_IFACE"),
            reasons=flag("FILTER_REASONS"),
            ip_only=flag("FILTER_IP_ONLY"),
            every_drop=flag("FILTER_EVERY_DROP"),
            nf_context=flag("FILTER_NF_CONTEXT"),
            no_reason=constants.value("filter_reason", "FILTER_NO_REASON"),
        )


def protocol_number(proto: str | int | None) -> int | None:
    """The IP protocol number of a Scope protocol: a table name or a number 0-255."""
    if proto is None:
        return None
    if isinstance(proto, int):
        number = proto
    else:
        text = proto.strip().lower()
        if text in PROTO_NUMBERS:
            return PROTO_NUMBERS[text]
        if text == "icmp6":
            return 58
        if text.isascii() and text.isdigit():
            number = int(text)
        else:
            try:
                number = socket.getprotobyname(text)
            except (OSError, ValueError):
                raise ValueError(f"protocol {proto!r} is not a known name or a number 0-255") from None
    if not 0 <= number <= 255:
        raise ValueError(f"protocol number {number} is out of range 0-255")
    return number


def build(cfg: BtfStruct, f: Scope, *, reasons: list[int],
          netns_inode: int | None, consumed_reason: int | None, every_drop: bool = False,
          nf_context: bool = False) -> BtfStruct:
    """Fills `cfg` (a fresh filter_cfg) from the filter; returns it.

    `every_drop` makes the kernel send a record for every drop instead of a
    flow's first only (counting goes on, so summaries still cover the lost).
    `nf_context` says netfilter programs are attached (their context is looked up).
    """
    bits = FilterFlags.of(type(cfg).constants)
    if every_drop:
        cfg.flags |= bits.every_drop
    if nf_context:
        cfg.flags |= bits.nf_context
    cfg.ignore_reason = bits.no_reason if consumed_reason is None else consumed_reason
    if len(f.ports) > len(cfg.ports):
        raise ValueError(f"at most {len(cfg.ports)} ports can be watched at once")
    if f.ports:
        cfg.flags |= bits.ports
        cfg.nports = len(f.ports)
        for i, port in enumerate(f.ports):
            cfg.ports[i] = port
    proto = protocol_number(f.proto)
    if proto is not None:
        cfg.flags |= bits.proto
        cfg.l4proto = proto
    if f.hosts:
        if len(f.hosts) > len(cfg.nets):
            raise ValueError(f"at most {len(cfg.nets)} hosts or networks can be watched at once")
        cfg.flags |= bits.nets
        cfg.nnets = len(f.hosts)
        for i, net in enumerate(f.hosts):
            slot = cfg.nets[i]
            slot.family = net.version
            slot.prefixlen = net.prefixlen
            packed = net.network_address.packed
            ctypes.memmove(slot.addr, packed, len(packed))
            mask = net.netmask.packed  # the kernel compares under it, byte by byte
            ctypes.memmove(slot.mask, mask, len(mask))
    if f.ports or f.hosts or proto is not None:
        cfg.flags |= bits.ip_only
    if netns_inode is not None:
        cfg.flags |= bits.netns
        cfg.netns_ino = netns_inode
    if f.iface:
        name = f.iface.encode()
        longest = type(cfg).iface.size - 1  # char iface[IFNAMSIZ], NUL-terminated
        if len(name) > longest:
            raise ValueError(f"interface name {f.iface!r} is longer than {longest} characters")
        cfg.flags |= bits.iface
        cfg.iface = name  # a char[] field reads back as a bytes copy: assign, don't memmove
    words = len(cfg.reasons)
    kernel_side = [r for r in reasons if r < words * 64]
    if reasons and len(kernel_side) == len(reasons):
        # Subsystem reasons (high bits set) do not fit the bitmap: those
        # filters stay in user space (see Engine).
        cfg.flags |= bits.reasons
        for r in kernel_side:
            cfg.reasons[r // 64] |= 1 << (r % 64)
    return cfg
