"""The watch engine: drops from BPF, verdicts from nftrace, events out.

Threads and why:
- the ring reader drains the BPF ring buffer and decodes records (symbols,
  headers) so the kernel's buffer never waits on output;
- the namespace scanner follows namespaces appearing and vanishing, because
  rulesets and trace sockets are per namespace;
- the caller's thread joins each drop with its nftrace verdict and writes
  the event. A netfilter drop waits for its verdict at most `verdict_wait`
  seconds after it arrived, so a burst of untraced drops delays output by
  that much once, not once per drop. A drop the stack does not place in
  nftables is first looked up in the iptables-legacy traces: that lookup
  only waits until the trace socket has been drained (exact and quick), so
  legacy drops do not wait for an nftables verdict that cannot come.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from tracer.pipeline import attribution
from tracer.bpf import filter as bpf_filter
from tracer.probe import marker as probe_marker
from tracer import netns as netnsmod
from tracer.collectors import conntrack as ct
from tracer.collectors.conntrack import ConntrackInfo
from tracer.sources.drop import DropDecoder, DropReasons, KernelDrop
from tracer.collectors.xtrace import loaded_tables
from tracer.event.model import DropEvent, Interface
from tracer.config import WatchFilter
from tracer.collectors.links import LinkNames
from tracer.bpf.libbpf import RingBuffer
from tracer.bpf.loader import LoadedTracer
from tracer.outputs.stream import Sink

log = structlog.get_logger("tracer.engine")


@dataclass
class WatchOptions:
    filter: WatchFilter = field(default_factory=WatchFilter)
    count: int | None = None
    duration: float | None = None
    stack: bool = False
    nftrace: bool = True
    nf_mode: str | None = "auto"  # auto, fentry, kprobe or None
    verdict_wait: float = 0.3
    trace_rate: int = 1000
    scan_interval: float = 1.0
    object_path: Path | None = None


class Engine:
    def __init__(self, options: WatchOptions, sink: Sink) -> None:
        self.options = options
        self.sink = sink
        self.emitted = 0
        self._stop = threading.Event()
        self._queue: queue.Queue[KernelDrop] = queue.Queue(maxsize=100_000)
        self._threads: list[threading.Thread] = []
        self._namespaces: dict[int, netnsmod.Netns] = {}
        self._links = LinkNames()
        self._legacy_cache: dict[int, tuple[float, bool]] = {}
        self._reasons = DropReasons()
        self._user_reasons = self._reason_numbers()
        self.tracer: LoadedTracer | None = None
        self._rb: RingBuffer | None = None
        self.nft = None
        self.legacy = None
        self.ready = threading.Event()
        self._queue_lost = 0  # events lost to a full queue since the last warning
        self._queue_lost_logged = 0.0
        self._netns_inode: int | None = None
        self._bad_records = 0
        self._bad_logged = 0.0

    # ---------------------------------------------------------- set-up

    def _reason_numbers(self) -> list[int]:
        return [self._reasons.value(r) for r in self.options.filter.reasons]

    #: What the in-kernel netns filter is set to while a named namespace does not exist:
    #: no namespace has this inode, so nothing matches until it appears.
    NO_NETNS = 0xFFFFFFFF

    def _netns_filter(self) -> int | None:
        """The inode the watch is limited to now: None for all namespaces.

        A name is followed: resolved afresh at every namespace scan, so a
        namespace deleted and made again under the same name is watched
        again, and while the name is missing nothing is (not whatever
        namespace reuses the old inode). A number must be a live namespace.
        """
        want = self.options.filter.netns
        if want is None:
            return None
        if want.isdigit():
            return int(want)
        try:
            return netnsmod.by_name(want).inode
        except OSError:
            return self.NO_NETNS

    def _check_netns(self) -> None:
        """Refuses an inode that is no live namespace; warns about a name that does not exist yet."""
        want = self.options.filter.netns
        if want is None:
            return
        if want.isdigit():
            if int(want) not in self._namespaces:
                raise ValueError(f"--netns {want}: no live network namespace has inode {want} "
                                 "(see `lsns -t net`, or give an `ip netns` name)")
        elif self._netns_filter() == self.NO_NETNS:
            log.warning("netns not found; waiting for it", netns=want,
                        hint="watching starts when `ip netns add` creates it")

    def _apply_filter(self, netns_inode: int | None) -> None:
        """Loads the watch filter into the BPF map (also to follow a renamed namespace's inode)."""
        assert self.tracer is not None
        cfg = bpf_filter.build(
            self.tracer.new_filter(), self.options.filter, reasons=self._user_reasons,
            netns_inode=netns_inode, consumed_reason=self._reasons.by_name.get("SKB_CONSUMED"))
        self.tracer.set_filter(cfg)
        self._netns_inode = netns_inode

    def start(self) -> None:
        """Attaches everything; raises with a clear message when it cannot."""
        opts = self.options
        self._namespaces = self._scan()
        self._check_netns()
        netns_inode = self._netns_filter()
        self.tracer = LoadedTracer(opts.object_path, nf_mode=opts.nf_mode)
        self._apply_filter(netns_inode)
        self._decoder = DropDecoder(self.tracer.Event, self._reasons)
        from tracer.collectors.xtrace import LegacyCollector

        watched = self._watched(self._namespaces.values(), netns_inode)
        # Legacy first: it binds nfnetlink_log before nftables marks (and so traces) anything.
        self.legacy = LegacyCollector(opts.filter, trace=opts.nftrace, on_ready=self._legacy_ready)
        self.legacy.start(watched)
        if opts.nftrace:
            from tracer.collectors.nftrace import NftCollector

            self.nft = NftCollector(opts.filter, rate=opts.trace_rate, mark_legacy=self.legacy)
            self.nft.start(watched)
        self._rb = self.tracer.ring_buffer(self._on_record)
        self._spawn(self._read_ring, "ring-reader")
        self._spawn(self._scan_loop, "netns-scanner")
        self.ready.set()
        log.info("watching", drop_program=self.tracer.drop_mode,
                 netfilter_context=self.tracer.nf_mode or "none",
                 nftrace=bool(self.nft), namespaces=len(self._namespaces))

    def describe(self) -> str:
        """One line for people: which kernel paths are in use, and why not the others."""
        t = self.tracer
        if t is None:
            return "not started"
        parts = [f"drops via kfree_skb ({t.drop_mode})"]
        if t.nf_mode:
            parts.append(f"netfilter context via {t.nf_mode}")
        else:
            refused = "; ".join(r.error for r in t.capabilities.nf.values())
            parts.append(f"netfilter context from the stack ({refused or 'not probed'})")
        if self.nft is not None:
            parts.append(f"rules via nftrace in {len(self.nft.watched)} namespace(s)")
            if self.legacy is not None:
                traced = sum(self.legacy.tracing(inode) for inode in self.legacy.watched)
                parts.append(f"iptables-legacy TRACE read in {traced} namespace(s)")
        else:
            parts.append("no rule text (nftrace off)")
        return "; ".join(parts)

    def _watched(self, namespaces, netns_inode: int | None) -> list[netnsmod.Netns]:
        return [ns for ns in namespaces if netns_inode is None or ns.inode == netns_inode]

    def _spawn(self, fn, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _scan(self) -> dict[int, netnsmod.Netns]:
        try:
            return netnsmod.discover()
        except OSError as exc:
            log.warning("namespace scan failed", error=str(exc))
            return dict(self._namespaces)

    # ---------------------------------------------------------- threads

    def _on_record(self, raw: bytes) -> None:
        try:
            drop = self._decoder.decode(raw)
        except ValueError as exc:  # the decoder's own error: a record it cannot read
            self._bad_records += 1
            now = time.monotonic()
            if now - self._bad_logged >= 1.0:
                log.warning("unreadable drop records skipped", count=self._bad_records, error=str(exc))
                self._bad_records, self._bad_logged = 0, now
            return
        try:
            self._queue.put_nowait(drop)
        except queue.Full:
            self._queue_lost += 1
            self._warn_queue_lost()

    def _warn_queue_lost(self, final: bool = False) -> None:
        """At most one warning a second, with the count: a full queue loses thousands of
        events a second, and a log line for each would slow the ring reader further."""
        now = time.monotonic()
        if self._queue_lost and (final or now - self._queue_lost_logged >= 1.0):
            log.warning("event queue full, drop event lost", lost=self._queue_lost)
            self._queue_lost, self._queue_lost_logged = 0, now

    def _read_ring(self) -> None:
        while not self._stop.is_set():
            self._rb.poll(100)

    def _scan_loop(self) -> None:
        while not self._stop.wait(self.options.scan_interval):
            found = self._scan()
            netns_inode = self._netns_filter()
            if netns_inode != self._netns_inode:
                log.info("netns followed", netns=self.options.filter.netns,
                         inode=None if netns_inode == self.NO_NETNS else netns_inode)
                self._apply_filter(netns_inode)
            if found.keys() != self._namespaces.keys():
                self._namespaces = found
                watched = self._watched(found.values(), netns_inode)
                # nftables first: a namespace leaving the watch is unmarked before its nf_log is restored.
                if self.nft is not None:
                    self.nft.update_namespaces(watched)
                if self.legacy is not None:
                    self.legacy.update_namespaces(watched)

    def _legacy_ready(self) -> None:
        """A namespace's legacy tables became traceable: let nftables mark it."""
        nft = self.nft
        if nft is not None:
            nft.update_namespaces(self._watched(self._namespaces.values(), self._netns_inode))

    # ---------------------------------------------------------- events

    def run(self) -> int:
        """Writes events until count, duration or stop(); returns how many."""
        if self.tracer is None:
            self.start()
        deadline = None if self.options.duration is None else time.monotonic() + self.options.duration
        try:
            while not self._stop.is_set():
                timeout = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
                try:
                    drop = self._queue.get(timeout=timeout)
                except queue.Empty:
                    if deadline is not None and time.monotonic() >= deadline:
                        break
                    continue
                event = self.build_event(drop)
                if event is None:
                    continue
                self.sink.write(event.to_ecs())
                self.emitted += 1
                if self.options.count is not None and self.emitted >= self.options.count:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
        finally:
            self.close()
        return self.emitted

    def build_event(self, drop: KernelDrop) -> DropEvent | None:
        if self._user_reasons and self._reasons.by_name.get(drop.reason) not in self._user_reasons:
            return None
        verdict = None
        ruleset = None
        legacy = None
        if self.nft is not None and drop.in_netfilter and drop.fingerprint is not None:
            legacy = self._legacy_verdict(drop)
            if legacy is None:
                wait = max(0.0, drop.received + self.options.verdict_wait - time.monotonic())
                verdict = self.nft.wait_verdict(drop.netns, drop.fingerprint, wait, dropped_at=drop.mono_ns / 1e9)
            ruleset = self.nft.ruleset(drop.netns)
        ns = self._namespaces.get(drop.netns)
        nf = attribution.attribute(drop, verdict, ruleset, self._legacy_present(ns), legacy)
        if nf is not None and nf.backend == "iptables-legacy" and nf.table is None and self.legacy is not None:
            family = {0x0800: "ip", 0x86DD: "ip6"}.get(drop.l3proto)
            if family and nf.hook:
                nf = attribution.with_legacy_table(nf, self.legacy.table_candidates(drop.netns, nf.hook, family))
        conntrack = drop.conntrack
        if conntrack is None and verdict is not None:
            conntrack = verdict.conntrack
        if conntrack is None and nf is not None and ruleset is not None:
            conntrack = self._inferred_invalid(ruleset, nf)
        ingress, egress = self._interfaces(drop, ns, nf.hook if nf and nf.hook else drop.hook)
        return DropEvent(
            timestamp_ns=drop.wall_ns,
            reason=drop.reason,
            location=drop.location or None,
            stack=drop.stack if self.options.stack else None,
            action="rejected" if nf is not None and nf.verdict == "reject" else "dropped",
            packet=drop.packet,
            length=drop.length,
            mark=drop.mark,
            ingress=ingress,
            egress=egress,
            netns_inode=drop.netns or None,
            netns_name=ns.name if ns else None,
            netfilter=nf,
            conntrack=conntrack,
            process=drop.process,
            hook=drop.hook,
            subsystem=self._subsystem(drop, nf),
            probe_id=probe_marker.recognise(drop.packet),
        )

    def _legacy_verdict(self, drop: KernelDrop):
        """The iptables-legacy verdict of a drop nftables did not free itself, if traced."""
        if self.legacy is None or drop.subsystem in ("nftables", "conntrack") or drop.fingerprint is None:
            return None
        if not self.legacy.tracing(drop.netns):
            return None
        v = self.legacy.wait_verdict(drop.netns, drop.fingerprint, self.options.verdict_wait, since=drop.received)
        if v is not None and drop.hook is not None and v.hook != drop.hook:
            return None  # the packet's last legacy trace is from another hook: not what dropped it
        return v

    @staticmethod
    def _subsystem(drop: KernelDrop, nf) -> str:
        """nftables, iptables-legacy, conntrack, routing, socket or other."""
        if nf is not None:
            if nf.backend in ("nftables", "iptables-nft"):
                return "nftables"
            if nf.backend in ("iptables-legacy", "conntrack"):
                return nf.backend
        return drop.subsystem if drop.subsystem != "netfilter" else "other"

    @staticmethod
    def _inferred_invalid(ruleset, nf) -> ConntrackInfo | None:
        chains = list(ruleset.chains.values())
        active = ct.tracking_active([r.text for r in ruleset.rules.values()], [c.type for c in chains])
        base = ruleset.chain(nf.family, nf.table, nf.base_chain) if nf.base_chain and nf.table else None
        return ct.invalid_if_tracked(active, nf.hook, base.priority if base else None)

    def _interfaces(self, drop: KernelDrop, ns, hook: str | None) -> tuple[Interface | None, Interface | None]:
        self._links.remember(drop.netns, drop.ifindex, drop.dev_name)
        ingress = egress = None
        if drop.iif:
            name = drop.dev_name if drop.iif == drop.ifindex else self._links.name(ns, drop.iif)
            ingress = Interface(drop.iif, name)
        if hook in ("output", "postrouting", "egress") and drop.ifindex:
            egress = Interface(drop.ifindex, drop.dev_name or None)
            if hook == "output" and drop.iif == drop.ifindex:
                ingress = None
        elif not drop.iif and drop.ifindex and hook not in attribution.IPTABLES_CHAINS:
            ingress = None
        return ingress, egress

    def _legacy_present(self, ns: netnsmod.Netns | None) -> bool:
        """Whether iptables-legacy tables are loaded in the namespace (cached 5 s)."""
        if ns is None:
            return False
        now = time.monotonic()
        cached = self._legacy_cache.get(ns.inode)
        if cached is not None and now - cached[0] < 5.0:
            return cached[1]
        try:
            present = bool(loaded_tables(ns))
        except OSError:  # the namespace vanished
            present = False
        self._legacy_cache[ns.inode] = (now, present)
        return present

    # ---------------------------------------------------------- stop

    def stop(self) -> None:
        self._stop.set()

    def close(self) -> None:
        self._stop.set()
        if self._rb is not None:
            self._rb.cancel()
        stuck = []
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
                if t.is_alive():
                    stuck.append(t.name)
        self._threads = []
        if stuck:
            # Freeing the ring buffer under a reader still inside libbpf would
            # crash the process; leaking it until exit is the safe choice.
            log.warning("threads did not stop; BPF objects released at exit", threads=stuck)
            self.tracer = None
        if self.nft is not None:
            self.nft.stop()  # unmark before nf_log bindings are restored
            self.nft = None
        if self.legacy is not None:
            self.legacy.stop()
            self.legacy = None
        self._warn_queue_lost(final=True)  # the ring reader has stopped: what is left to say
        if self.tracer is not None:
            stats = self.tracer.stats()
            if stats.get("lost"):
                log.warning("ring buffer overflowed: events lost", lost=stats["lost"])
            self.tracer.close()
            self.tracer = None
        if os.environ.get("TRACER_DEBUG_STATS"):
            log.info("stopped", emitted=self.emitted)
