"""The watch filter as the BPF program's `struct filter_cfg`.

Filtering in the kernel means a busy host pays only for the drops a user
watches: everything else is discarded before a ring-buffer record exists.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket

from tracer.config import PROTO_NUMBERS, Scope

FILTER_PORTS = 1 << 0
FILTER_PROTO = 1 << 1
FILTER_NETS = 1 << 2
FILTER_NETNS = 1 << 3
FILTER_IFACE = 1 << 4
FILTER_REASONS = 1 << 5
FILTER_IP_ONLY = 1 << 6

NO_REASON = 0xFFFFFFFF


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


def build(cfg: ctypes.Structure, f: Scope, *, reasons: list[int],
          netns_inode: int | None, consumed_reason: int | None) -> ctypes.Structure:
    """Fills `cfg` (a fresh filter_cfg) from the filter; returns it."""
    cfg.ignore_reason = NO_REASON if consumed_reason is None else consumed_reason
    if len(f.ports) > len(cfg.ports):
        raise ValueError(f"at most {len(cfg.ports)} ports can be watched at once")
    if f.ports:
        cfg.flags |= FILTER_PORTS
        cfg.nports = len(f.ports)
        for i, port in enumerate(f.ports):
            cfg.ports[i] = port
    proto = protocol_number(f.proto)
    if proto is not None:
        cfg.flags |= FILTER_PROTO
        cfg.l4proto = proto
    if f.hosts:
        if len(f.hosts) > len(cfg.nets):
            raise ValueError(f"at most {len(cfg.nets)} hosts or networks can be watched at once")
        cfg.flags |= FILTER_NETS
        cfg.nnets = len(f.hosts)
        for i, net in enumerate(f.hosts):
            slot = cfg.nets[i]
            slot.family = net.version
            slot.prefixlen = net.prefixlen
            packed = net.network_address.packed
            ctypes.memmove(slot.addr, packed, len(packed))
    if f.ports or f.hosts or proto is not None:
        cfg.flags |= FILTER_IP_ONLY
    if netns_inode is not None:
        cfg.flags |= FILTER_NETNS
        cfg.netns_ino = netns_inode
    if f.iface:
        name = f.iface.encode()
        if len(name) > 15:
            raise ValueError(f"interface name {f.iface!r} is longer than 15 characters")
        cfg.flags |= FILTER_IFACE
        cfg.iface = name  # a char[] field reads back as a bytes copy: assign, don't memmove
    words = len(cfg.reasons)
    kernel_side = [r for r in reasons if r < words * 64]
    if reasons and len(kernel_side) == len(reasons):
        # Subsystem reasons (high bits set) do not fit the bitmap: those
        # filters stay in user space (see Engine).
        cfg.flags |= FILTER_REASONS
        for r in kernel_side:
            cfg.reasons[r // 64] |= 1 << (r % 64)
    return cfg
