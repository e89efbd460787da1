"""The drop collector: kfree_skb events from BPF, decoded and explained.

Turns each raw `struct drop_event` into a `KernelDrop`: reason by name, the
freeing call site and stack as symbols, and what the stack says about where
in the stack of protocols the packet died (netfilter hook, subsystem). The
netfilter hook is read from the function that called `nf_hook_slow`: the
kernel's NF_HOOK call sites are fixed per hook, so the caller names the hook
without any probe on netfilter itself.
"""

from __future__ import annotations

import ctypes
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tracer.bpf.kallsyms import Kallsyms
from tracer.bpf.layout import BtfStruct, Constants, LayoutError
from tracer.bpf.libbpf import Btf
from tracer.collectors import conntrack as ct
from tracer.event.packet import IPV6_MAX_EXT_HEADERS, Neighbor, PacketHeaders
from tracer.event.sections import CtTuple
from tracer.sources import skb as skbmod

REASON_PREFIX = "SKB_DROP_REASON_"

#: Function that calls nf_hook_slow (directly, NF_HOOK being inline) -> hook.
HOOK_CALLERS: dict[str, str] = {
    # IPv4
    "ip_rcv": "prerouting",
    "ip_list_rcv": "prerouting",
    "ip_sublist_rcv": "prerouting",
    "ip_local_deliver": "input",
    "ip_forward": "forward",
    "__ip_local_out": "output",
    "ip_local_out": "output",
    "raw_send_hdrinc": "output",
    "ip_output": "postrouting",
    "ip_mc_output": "postrouting",
    "ip_mr_forward": "forward",
    # IPv6
    "ipv6_rcv": "prerouting",
    "ipv6_list_rcv": "prerouting",
    "ip6_sublist_rcv": "prerouting",
    "ip6_input": "input",
    "ip6_forward": "forward",
    "__ip6_local_out": "output",
    "ip6_local_out": "output",
    "ip6_xmit": "output",
    "rawv6_send_hdrinc": "output",
    "ndisc_send_skb": "output",
    "mld_sendpack": "output",
    "igmp6_send": "output",
    "ip6_output": "postrouting",
    "ip6_finish_output2": "postrouting",
    # netdev family
    "__netif_receive_skb_core": "ingress",
    "nf_hook_ingress": "ingress",
    "__dev_queue_xmit": "egress",
    "nf_hook_egress": "egress",
    # bridge family
    "br_handle_frame": "prerouting",
    "br_pass_frame_up": "input",
    "__br_forward": "forward",
    "br_forward_finish": "postrouting",
    "br_dev_queue_push_xmit": "postrouting",
    "br_dev_xmit": "output",
    # arp family (hooks named input/output by nft)
    "arp_rcv": "input",
    "arp_xmit": "output",
}

#: Frames that name the subsystem a drop happened in, most specific first.
SUBSYSTEM_FRAMES: tuple[tuple[str, str], ...] = (
    ("nft_do_chain", "nftables"),
    ("ipt_do_table", "iptables-legacy"),
    ("ip6t_do_table", "iptables-legacy"),
    ("ebt_do_table", "iptables-legacy"),
    ("nf_conntrack_in", "conntrack"),
    ("nf_hook_slow", "netfilter"),
)

#: Frames of the tracing machinery above the freeing function.
_TRACE_PREFIXES = ("bpf_", "__bpf_", "__traceiter_", "trace_", "perf_trace_", "__probestub")

#: Frames that mean the drop ran in softirq/interrupt context, where the
#: current task has nothing to do with the packet.
_IRQ_FRAMES = frozenset({
    "__do_softirq", "handle_softirqs", "do_softirq", "irq_exit_rcu", "__irq_exit_rcu",
    "net_rx_action", "run_ksoftirqd", "asm_sysvec_apic_timer_interrupt",
    "sysvec_apic_timer_interrupt", "common_interrupt", "asm_common_interrupt",
    "call_timer_fn", "tasklet_action_common",
})
_SYSCALL_FRAMES = frozenset({"do_syscall_64", "entry_SYSCALL_64_after_hwframe", "__do_fast_syscall_32"})

#: Distinct (stack, call site) pairs whose symbols DropDecoder keeps: a flood
#: repeats a handful, a busy host a few hundred.
_STACK_CACHE_LIMIT = 4096


class DropReasons:
    """The running kernel's `enum skb_drop_reason`, numbers to short names.

    Numbers differ between kernels, so they are always read from BTF.
    """

    def __init__(self, btf: Btf | None = None) -> None:
        own = btf is None
        btf = btf or Btf.vmlinux()
        try:
            raw = btf.enum_values("skb_drop_reason")
        finally:
            if own:
                btf.close()
        self.by_value = {v: n.removeprefix(REASON_PREFIX) for v, n in raw.items()}
        self.by_name = {n: v for v, n in self.by_value.items()}

    def name(self, value: int) -> str:
        return self.by_value.get(value, f"UNKNOWN_{value}")

    def value(self, name: str) -> int:
        key = name.upper().removeprefix(REASON_PREFIX)
        try:
            return self.by_name[key]
        except KeyError:
            raise ValueError(f"unknown drop reason {name!r} on this kernel "
                             f"(see `tracer doctor --reasons`)") from None


@dataclass(frozen=True)
class NfContext:
    """What the netfilter hook programs (fentry or kprobe) recorded."""

    source: str  # "fexit" or "kprobe"
    backend: str  # nftables, iptables-legacy
    pf: int
    hook: str | None
    family: str | None
    table: str | None
    chain: str | None
    verdict: int | None


@dataclass
class KernelDrop:
    """One dropped packet as the kernel saw it, before rule attribution."""

    mono_ns: int
    wall_ns: int
    reason: str
    location: str
    stack: list[str]
    netns: int
    hook: str | None
    subsystem: str
    packet: PacketHeaders | None
    fingerprint: bytes | None
    l3proto: int
    length: int
    mark: int
    ifindex: int
    iif: int
    dev_name: str
    process: tuple[int, str] | None
    conntrack: ct.ConntrackInfo | None
    nf: NfContext | None
    #: The raw struct flow_key that counted this drop in the kernel (bpf/tracer.h).
    key: bytes = b""
    #: The counting epoch it was counted in.
    epoch: int = 0
    #: A sample Python asked for (its drop is in the summary), not a first drop to show.
    sample: bool = False
    #: False when the kernel says the packet was not traced (skb->nf_trace clear): no
    #: nftrace or TRACE verdict can come for it, so none is waited for.
    traced: bool = True
    #: The packet's conntrack entry's tuples as the kernel keeps them, whenever it has an
    #: entry (NAT or not): original = as the first packet had it (the pre-DNAT port),
    #: reply = what replies carry (after DNAT its source is the translated peer).
    ct_original: CtTuple | None = None
    ct_reply: CtTuple | None = None
    #: ARP or neighbour discovery: whose link address the packet asks for or announces.
    neighbor: Neighbor | None = None
    #: Which view the kernel's --port/--host/--proto filter selected the drop by: "headers",
    #: "quoted" (an ICMP error's quoted packet), "ct_original", "ct_reply", "neighbor";
    #: None when no such filter was set.
    matched: str | None = None
    received: float = field(default_factory=time.monotonic)

    @property
    def quoted(self) -> PacketHeaders | None:
        """The packet an ICMP error quotes (`packet.quoted`), None for any other drop."""
        return self.packet.quoted if self.packet is not None else None

    @property
    def in_netfilter(self) -> bool:
        return self.subsystem in ("nftables", "iptables-legacy", "netfilter", "conntrack") or (
            self.nf is not None and self.reason == "NETFILTER_DROP")


def stack_addresses(record: ctypes.Structure) -> list[int]:
    """The return addresses bpf_get_stack wrote, innermost first."""
    return [addr for addr in record.stack[: record.stack_bytes // 8] if addr]


def symbolize_stack(ksyms: Kallsyms, record: ctypes.Structure) -> list[str]:
    """The kernel stack from the freeing function down, tracing frames removed."""
    frames = ksyms.format_stack(stack_addresses(record))
    start = 0
    for i, frame in enumerate(frames):
        if frame.startswith(_TRACE_PREFIXES):
            start = i + 1
    return frames[start:]


def _fn(frame: str) -> str:
    return frame.split("+", 1)[0]


def hook_from_stack(functions: Sequence[str]) -> str | None:
    """The netfilter hook whose nf_hook_slow call is on the stack."""
    for i, fn in enumerate(functions):
        if fn in ("nf_hook_slow", "nf_hook_slow_list"):
            for caller in functions[i + 1:i + 4]:
                if caller in HOOK_CALLERS:
                    return HOOK_CALLERS[caller]
            return None
    return None


#: Functions that free a packet on a netfilter verdict.
NETFILTER_LOCATIONS = frozenset({"nf_hook_slow", "nf_hook_slow_list", "nft_do_chain", "ipt_do_table",
                                 "ip6t_do_table", "ebt_do_table", "nf_conntrack_in"})


def netfilter_drop(reason: str, location: str) -> bool:
    """Whether netfilter decided this drop (not merely ran further down the stack).

    A packet can die anywhere below a netfilter hook: a reject rule's RST is
    delivered to the local stack inside nft_do_chain and may die there as
    NO_SOCKET. Only the reason or the freeing function says whose drop it is.
    """
    return reason == "NETFILTER_DROP" or _fn(location) in NETFILTER_LOCATIONS


def subsystem_from_stack(functions: list[str], location: str, reason: str) -> str:
    names = [_fn(location), *functions]
    if netfilter_drop(reason, location):
        # Frames past the first nf_hook_slow belong to an outer hook, not this drop.
        end = next((i for i, f in enumerate(names) if f in ("nf_hook_slow", "nf_hook_slow_list")), len(names))
        own = names[: end + 1]
        return next((sub for frame, sub in SUBSYSTEM_FRAMES if frame in own), "netfilter")
    first = names[0] if names else ""
    if first.startswith(("tcp_", "udp", "raw_", "inet_", "sk_", "sock_", "__udp", "icmp")):
        return "socket"
    if first.startswith(("ip_route", "ip6_route", "fib", "ip_error", "ip6_pkt", "ip_forward",
                         "ip6_forward", "dst_", "neigh", "ip_rcv_finish", "ip6_rcv_finish")):
        return "routing"
    return "other"


def process_of(functions: Sequence[str], pid: int, comm: str, hook: str | None) -> tuple[int, str] | None:
    """The sending process, only when the drop ran in its system call.

    The BPF side records the current task unconditionally; that task is the
    sender only on the synchronous send path (no interrupt frames, a system
    call below) of a locally generated packet.
    """
    if pid <= 0 or hook not in (None, "output", "postrouting", "egress"):
        return None
    names = set(functions)
    if names & _IRQ_FRAMES or not names & _SYSCALL_FRAMES:
        return None
    return pid, comm


@dataclass(frozen=True, slots=True)
class _Where:
    """What a drop's stack and call site say; the same for every drop with the same ones."""

    stack: tuple[str, ...]  # symbolized, tracing frames removed
    functions: tuple[str, ...]  # the stack's function names
    location: str
    hook: str | None  # from the stack (the netfilter probes may know better)
    subsystem: str


def check_shared_constants(constants: Constants) -> None:
    """Refuses an object whose numbers differ from the Python decoders' own.

    The packet and conntrack decoders (tracer.event.packet,
    tracer.collectors.conntrack) know nothing of BPF, so they keep their
    own value of the two numbers the record shares with them; this is
    where both meet, and a mismatch stops the start with a message instead
    of decoding some records wrongly.
    """
    shared = (
        ("tracer_limits", "TRACER_IPV6_MAX_EXT", IPV6_MAX_EXT_HEADERS,
         "tracer.event.packet.IPV6_MAX_EXT_HEADERS"),
        ("tracer_ct_info", "TRACER_CT_INFO_NONE", ct.CT_INFO_NONE, "tracer.collectors.conntrack.CT_INFO_NONE"),
    )
    for enum, member, python_value, python_name in shared:
        bpf_value = constants.value(enum, member)
        if bpf_value != python_value:
            raise LayoutError(f"bpf/tracer.h {member} is {bpf_value} but {python_name} is {python_value}: "
                              "they must be equal")


class DropDecoder:
    """Turns raw ring-buffer records into KernelDrops."""

    def __init__(self, event_type: type[BtfStruct], reasons: DropReasons,
                 ksyms: Kallsyms | None = None) -> None:
        check_shared_constants(event_type.constants)
        self.Event = event_type
        self.reasons = reasons
        self.ksyms = ksyms or Kallsyms()
        self._nf_names = skbmod.nf_names(event_type.constants)
        # bpf_ktime_get_ns() is CLOCK_MONOTONIC; Python's monotonic_ns is the same clock.
        self._wall_offset = time.time_ns() - time.monotonic_ns()
        self._stack_at: int = event_type.stack.offset
        self._sample_record = event_type.constants.value("tracer_record", "TRACER_REC_SAMPLE")
        self._where_cache: dict[tuple[bytes, int, int], _Where] = {}
        self._cache_generation = self.ksyms.generation

    def _where(self, raw: bytes, rec: BtfStruct) -> _Where:
        """Stack, call site and what they imply, cached by the raw stack bytes and call site.

        Naming ~20 frames and reading them costs ~20 us a drop (with the
        symbol caches warm), and a flood repeats a handful of stacks. A
        stack is only kept once every address in it has its final name
        (kallsyms may still re-read the table for one it doubts), and the
        cache is emptied when the table changes.
        """
        ksyms = self.ksyms
        if self._cache_generation != ksyms.generation:
            self._where_cache.clear()
            self._cache_generation = ksyms.generation
        key = (raw[self._stack_at : self._stack_at + rec.stack_bytes], rec.location, rec.reason)
        found = self._where_cache.get(key)
        if found is not None:
            return found
        stack = symbolize_stack(ksyms, rec)
        functions = [_fn(f) for f in stack]
        location = ksyms.format(rec.location) if rec.location else (stack[0] if stack else "")
        reason = self.reasons.name(rec.reason)
        hook = hook_from_stack(functions) if netfilter_drop(reason, location) else None
        found = _Where(tuple(stack), tuple(functions), location, hook,
                       subsystem_from_stack(functions, location, reason))
        if ksyms.settled(stack_addresses(rec) + ([rec.location] if rec.location else [])):
            if len(self._where_cache) >= _STACK_CACHE_LIMIT:
                self._where_cache.clear()
            self._where_cache[key] = found
        return found

    def decode(self, raw: bytes) -> KernelDrop:
        """One ring-buffer record as a KernelDrop.

        Raises ValueError (from ctypes) for a record shorter than
        `struct drop_event`; any record of that size or longer decodes,
        whatever its fields hold (unknown reasons are `UNKNOWN_<n>`, names
        are decoded with replacement characters).
        """
        rec = self.Event.from_buffer_copy(raw)
        where = self._where(raw, rec)
        nf = skbmod.nf_context(rec.nf, self._nf_names)
        hook = (nf.hook if nf and nf.hook else None) or where.hook
        headers, fp = skbmod.headers(rec)
        ct_original, ct_reply = skbmod.ct_tuples(rec)
        return KernelDrop(
            mono_ns=rec.ts_ns,
            wall_ns=rec.ts_ns + self._wall_offset,
            reason=self.reasons.name(rec.reason),
            location=where.location,
            stack=list(where.stack),
            netns=rec.netns_ino,
            hook=hook,
            subsystem=where.subsystem,
            packet=headers,
            fingerprint=fp,
            l3proto=rec.l3proto,
            # The IP length, as people and pcaps count it; skb->len at the
            # drop point may already exclude headers the stack pulled.
            length=headers.length if headers and headers.length else rec.len,
            mark=rec.mark,
            ifindex=rec.ifindex,
            iif=rec.iif,
            dev_name=rec.dev_name.decode(errors="replace"),
            process=process_of(where.functions, rec.pid, rec.comm.decode(errors="replace"), hook),
            conntrack=ct.from_record(rec.ct_info, rec.ct_status, rec.ct_zone, rec.ct_mark),
            nf=nf,
            key=bytes(rec.key),
            epoch=rec.epoch,
            sample=rec.record == self._sample_record,
            traced=rec.traced != 0,
            ct_original=ct_original,
            ct_reply=ct_reply,
            neighbor=skbmod.neighbor(rec, headers),
            matched=skbmod.matched(rec),
        )

    def wall_ns(self, mono_ns: int) -> int:
        """A bpf_ktime_get_ns() time as wall-clock ns since the epoch."""
        return mono_ns + self._wall_offset

    def location(self, address: int) -> str:
        """A call site as `function+0xoff` (a coarse key's location)."""
        return self.ksyms.format(address) if address else ""
