"""Loading the BPF object: choosing programs the running kernel accepts.

Kernels differ in what they let us attach. tp_btf on kfree_skb is the
cheapest and works on every kernel with BTF; raw_tp and the classic
tracepoint are fallbacks. The netfilter context programs need fentry/fexit
(BPF trampolines) or kprobes, which some kernels refuse (lockdown, missing
CONFIG_KPROBES, no direct-call ftrace). Rather than guess from config files,
each candidate is actually loaded and attached once; what worked is
reported and reused.
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from tracer.bpf.layout import BtfStruct, Constants, object_structs
from tracer.bpf.libbpf import (
    BpfError,
    BpfObject,
    Link,
    RingBuffer,
    num_possible_cpus,
    program_run_stats,
)
from tracer.libc import wait_for_rcu_readers

log = structlog.get_logger("tracer.loader")

#: kfree_skb program variants, best first.
DROP_PROGRAMS = {
    "tp_btf": "kfree_skb_btf",
    "raw_tp": "kfree_skb_raw",
    "tracepoint": "kfree_skb_tp",
}

#: Netfilter context programs by mode; each pair is (kernel function, programs).
NF_PROGRAMS = {
    "fentry": {
        "nf_hook_slow": ("fentry_nf_hook_slow", "fexit_nf_hook_slow"),
        "nft_do_chain": ("fentry_nft_do_chain", "fexit_nft_do_chain"),
        "ipt_do_table": ("fentry_ipt_do_table", "fexit_ipt_do_table"),
        "ip6t_do_table": ("fentry_ip6t_do_table", "fexit_ip6t_do_table"),
    },
    "kprobe": {
        "nf_hook_slow": ("kprobe_nf_hook_slow", "kretprobe_nf_hook_slow"),
        "nft_do_chain": ("kprobe_nft_do_chain", "kretprobe_nft_do_chain"),
        "ipt_do_table": ("kprobe_ipt_do_table", "kretprobe_ipt_do_table"),
        "ip6t_do_table": ("kprobe_ip6t_do_table", "kretprobe_ip6t_do_table"),
    },
}

NF_MODES = ("fentry", "kprobe")


@dataclass(frozen=True)
class FlowCount:
    """The drops of one key in one closed epoch, as the kernel counted them.

    `key` is the raw struct flow_key (bpf/tracer.h), the same bytes a record
    of that key carries, so Python matches the two without decoding either.
    Times are CLOCK_MONOTONIC ns.
    """

    key: bytes
    count: int
    first_ns: int
    last_ns: int


#: The object the command line was pointed at (TRACER_BPF_OBJECT, read by tracer.config).
_chosen_object: Path | None = None


def use_object(path: Path | None) -> None:
    """Makes `path` the object every load uses unless given another (None: the built one)."""
    global _chosen_object
    _chosen_object = path


def default_object_path() -> Path:
    """Where the built object is: the one chosen (`use_object`), the package's, or the checkout's."""
    if _chosen_object is not None:
        return _chosen_object
    here = Path(__file__).resolve().parent.parent  # the package: tracer/bpf/ -> tracer/
    for candidate in (here / "data" / "tracer.bpf.o", here.parent / "build" / "tracer.bpf.o"):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        "tracer.bpf.o not found: build it with `make -C bpf` (needs clang and bpftool), "
        "or set TRACER_BPF_OBJECT"
    )


def kernel_functions(names: list[str], path: str = "/proc/kallsyms") -> set[str]:
    """Which of `names` the running kernel (and its loaded modules) has."""
    wanted = set(names)
    found: set[str] = set()
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] in wanted:
                found.add(parts[2])
    return found


@dataclass
class ProbeResult:
    """What loading each program kind did on this kernel."""

    ok: bool
    error: str = ""


@dataclass
class Capabilities:
    drop: dict[str, ProbeResult] = field(default_factory=dict)
    nf: dict[str, ProbeResult] = field(default_factory=dict)
    nf_functions: set[str] = field(default_factory=set)

    @property
    def drop_mode(self) -> str | None:
        return next((m for m, r in self.drop.items() if r.ok), None)

    @property
    def nf_mode(self) -> str | None:
        return next((m for m, r in self.nf.items() if r.ok), None)


def _try(obj_path: Path, programs: list[str]) -> ProbeResult:
    """Loads `programs` alone from a fresh copy of the object and attaches them."""
    try:
        with BpfObject(str(obj_path)) as obj:
            for prog in obj.programs():
                prog.set_autoload(prog.name in programs)
            obj.load()
            links = [obj.program(p).attach() for p in programs]
            for link in links:
                link.destroy()
        return ProbeResult(True)
    except BpfError as exc:
        first = str(exc).splitlines()[0]
        return ProbeResult(False, first)


def probe(obj_path: Path | None = None, *, drop_modes: tuple[str, ...] = tuple(DROP_PROGRAMS),
          nf_modes: tuple[str, ...] = NF_MODES, stop_at_first: bool = True) -> Capabilities:
    """Tries each program kind; with stop_at_first, stops at the first that works."""
    obj_path = obj_path or default_object_path()
    caps = Capabilities()
    for mode in drop_modes:
        caps.drop[mode] = _explain(mode, _try(obj_path, [DROP_PROGRAMS[mode]]))
        if caps.drop[mode].ok and stop_at_first:
            break
    caps.nf_functions = kernel_functions(list(NF_PROGRAMS["fentry"]))
    if "nf_hook_slow" not in caps.nf_functions:
        for mode in nf_modes:
            caps.nf[mode] = ProbeResult(False, "nf_hook_slow not in kallsyms (no netfilter)")
        return caps
    for mode in nf_modes:
        caps.nf[mode] = _explain(mode, _try(obj_path, list(NF_PROGRAMS[mode]["nf_hook_slow"])))
        if caps.nf[mode].ok and stop_at_first:
            break
    return caps


def _explain(mode: str, result: ProbeResult) -> ProbeResult:
    """Replaces libbpf's errno text with the reason a person can act on."""
    if result.ok:
        return result
    if mode == "kprobe" and not os.path.exists("/sys/bus/event_source/devices/kprobe"):
        return ProbeResult(False, "kernel has no kprobes (CONFIG_KPROBES off)")
    if mode == "tracepoint" and not os.path.exists("/sys/kernel/tracing/events"):
        return ProbeResult(False, "tracefs is not mounted")
    if mode == "fentry" and "Operation not permitted" in result.error:
        return ProbeResult(False, "kernel refuses fentry/fexit programs (EPERM)")
    return result


class LoadedTracer:
    """The BPF programs attached for one watch, and their maps.

    Call `set_filter` before reading; `ring_buffer(callback)` drains events.
    Everything is detached by `close()` (and by process exit: BPF links of a
    dead process are released by the kernel, so a crash leaves nothing).
    """

    def __init__(self, obj_path: Path | None = None, *, nf_mode: str | None = "auto",
                 drop_mode: str | None = None, ringbuf_bytes: int = 8 << 20) -> None:
        self.obj_path = obj_path or default_object_path()
        self.structs = object_structs(str(self.obj_path))
        self.Event = self.structs["drop_event"]
        self.constants: Constants = self.Event.constants
        caps = probe(self.obj_path, drop_modes=(drop_mode,) if drop_mode else tuple(DROP_PROGRAMS),
                     nf_modes=NF_MODES if nf_mode == "auto" else ((nf_mode,) if nf_mode else ()))
        self.capabilities = caps
        drop_mode = caps.drop_mode
        if drop_mode is None:
            errors = "; ".join(f"{m}: {r.error}" for m, r in caps.drop.items())
            raise BpfError(f"no kfree_skb program type could be attached ({errors})", 1)
        self.drop_mode: str = drop_mode
        self.nf_mode = caps.nf_mode
        self.nf_functions = sorted(caps.nf_functions) if self.nf_mode else []
        self._obj = BpfObject(str(self.obj_path))
        self._links: list[Link] = []
        self._rings: list[RingBuffer] = []
        self._epoch = 0
        # Loaded programs' descriptors, for program_stats() from another thread (a metrics
        # scrape); emptied under the lock before close() frees them.
        self._stats_lock = threading.Lock()
        self._program_fds: dict[str, int] = {}
        try:
            self._load(ringbuf_bytes)
        except BaseException:
            self.close()
            raise
        log.info("bpf attached", drop_program=self.drop_mode, netfilter=self.nf_mode or "none",
                 nf_functions=self.nf_functions)

    def _load(self, ringbuf_bytes: int) -> None:
        wanted = [DROP_PROGRAMS[self.drop_mode]]
        if self.nf_mode:
            for fn in self.nf_functions:
                wanted.extend(NF_PROGRAMS[self.nf_mode][fn])
        for prog in self._obj.programs():
            prog.set_autoload(prog.name in wanted)
        self._obj.map("events").set_max_entries(_ring_size(ringbuf_bytes))
        try:
            self._obj.load()
        except BpfError:
            if not self.nf_mode:
                raise
            # A hook module (ip_tables...) can vanish between probe and load:
            # the drop program alone still gives a useful tracer.
            log.warning("netfilter programs failed to load; continuing without",
                        mode=self.nf_mode)
            self._obj.close()
            self._obj = BpfObject(str(self.obj_path))
            self.nf_mode, self.nf_functions = None, []
            self._load(ringbuf_bytes)
            return
        self._links = [self._obj.program(p).attach() for p in wanted]
        with self._stats_lock:
            self._program_fds = {p: self._obj.program(p).fd for p in wanted}

    # ---------------------------------------------------------- counting epochs

    @property
    def epoch(self) -> int:
        """The epoch the drop program counts in now."""
        return self._epoch

    def close_epoch(self) -> int:
        """Starts the next counting epoch and returns the closed one.

        On return no program run still counts into the closed epoch's maps
        (see the counting maps in bpf/tracer.bpf.c), so `drain_counts` of it
        reads final figures.
        """
        closed = self._epoch
        self._epoch = (closed + 1) & 0xFFFFFFFF
        self._obj.map("epoch").update(ctypes.c_uint32(0), ctypes.c_uint32(self._epoch))
        wait_for_rcu_readers()
        return closed

    def drain_counts(self, epoch: int) -> list[FlowCount]:
        """The counts of a closed epoch (flow keys, coarse keys, the overflow counter), emptied."""
        parity = epoch & 1
        key_size = ctypes.sizeof(self.structs["flow_key"])
        count_t = self.structs["flow_count"]
        out: list[FlowCount] = []
        for name in (f"flow_counts_{parity}", f"coarse_counts_{parity}"):
            for key, raw in self._obj.map(name).batches(key_size, ctypes.sizeof(count_t), delete=True):
                c = count_t.from_buffer_copy(raw)
                out.append(FlowCount(key, c.count, c.first_ns, c.last_ns))
        overflow = self._drain_overflow(parity)
        if overflow is not None:
            out.append(overflow)
        return out

    def _drain_overflow(self, parity: int) -> FlowCount | None:
        """The per-CPU overflow counter of `parity`, summed and zeroed (no program writes it now)."""
        count_t = self.structs["flow_count"]
        ncpu = num_possible_cpus()
        cells = (count_t * ncpu)()
        index = ctypes.c_uint32(parity)
        self._obj.map("overflow_counts").lookup(index, cells)
        used = [c for c in cells if c.count]
        if not used:
            return None
        self._obj.map("overflow_counts").update(index, (count_t * ncpu)())
        key = self.structs["flow_key"]()
        key.kind = self.constants.value("tracer_counted", "TRACER_COUNTED_OVERFLOW")
        return FlowCount(bytes(key), sum(c.count for c in used), min(c.first_ns for c in used),
                         max(c.last_ns for c in used))

    def seen_keys(self) -> list[tuple[bytes, int, int]]:
        """(key, last drop ns, flags) of every key that has had its first record."""
        seen_t = self.structs["flow_seen"]
        key_size = ctypes.sizeof(self.structs["flow_key"])
        out = []
        for key, raw in self._obj.map("flow_seen").batches(key_size, ctypes.sizeof(seen_t), delete=False):
            v = seen_t.from_buffer_copy(raw)
            out.append((key, v.last_ns, v.flags))
        return out

    def forget_keys(self, keys: list[bytes]) -> int:
        """Removes keys from flow_seen: their next drop makes a first record again."""
        return self._obj.map("flow_seen").delete_keys(keys, ctypes.sizeof(self.structs["flow_key"]))

    def want_sample(self, key: bytes, last_ns: int, *, traced: bool = False) -> bool:
        """Asks for the next drop of `key` in full (a sample record), with `traced` the next
        one nftrace traced; False when the key is gone."""
        key_t = self.structs["flow_key"]
        value = self.structs["flow_seen"]()
        value.last_ns = last_ns
        value.flags = self.constants.value("flow_seen_flags", "FLOW_WANT_SAMPLE")
        if traced:
            value.flags |= self.constants.value("flow_seen_flags", "FLOW_WANT_TRACED")
        return self._obj.map("flow_seen").update_existing(key_t.from_buffer_copy(key), value)

    def detach(self) -> None:
        """Stops the programs, keeping the maps and ring buffer readable (the final drain)."""
        for link in self._links:
            link.destroy()
        self._links = []
        wait_for_rcu_readers()

    def set_filter(self, cfg: ctypes.Structure) -> None:
        self._obj.map("filter").update(ctypes.c_uint32(0), cfg)

    def new_filter(self) -> BtfStruct:
        return self.structs["filter_cfg"]()

    def ring_buffer(self, callback: Callable[[bytes], None]) -> RingBuffer:
        rb = RingBuffer(self._obj.map("events"), callback)
        self._rings.append(rb)
        return rb

    def stats(self) -> dict[str, int]:
        """Sums of the per-CPU counters kept by the drop program, by name ("seen", "lost"...)."""
        ncpu = num_possible_cpus()
        out = {}
        stats = self._obj.map("stats")
        for name, index in counter_indices(self.constants).items():
            vals = (ctypes.c_uint64 * ncpu)()
            stats.lookup(ctypes.c_uint32(index), vals)
            out[name] = sum(vals)
        return out

    def program_stats(self) -> dict[str, tuple[int, int]]:
        """(run_cnt, run_time_ns) of each loaded program, by name; {} once closed. Any thread.

        The kernel counts only while kernel.bpf_stats_enabled is 1 (or a
        BPF_ENABLE_STATS descriptor is held): else the figures stand still.
        """
        with self._stats_lock:
            return {name: program_run_stats(fd) for name, fd in self._program_fds.items()}

    def close(self) -> None:
        with self._stats_lock:
            self._program_fds = {}
        for link in self._links:
            link.destroy()
        self._links = []
        for rb in self._rings:
            rb.close()
        self._rings = []
        self._obj.close()


def counter_indices(constants: Constants) -> dict[str, int]:
    """`enum drop_counter` of bpf/tracer.h as name -> index: STAT_SEEN -> "seen" (STAT_MAX is the count)."""
    return {member.removeprefix("STAT_").lower(): index
            for member, index in constants.members("drop_counter").items() if member != "STAT_MAX"}


def _ring_size(n: int) -> int:
    """Ring buffers must be a power of two pages; round up."""
    page = os.sysconf("SC_PAGE_SIZE")
    size = max(n, page)
    return 1 << (size - 1).bit_length()
