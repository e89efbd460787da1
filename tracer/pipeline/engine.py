"""The pipeline: a source's drops, joined with what each collector knows, out to the sink.

The path of one drop (docs/architecture.md draws it):
- the source (the BPF ring buffer) decodes it in its own thread and hands
  it over through a bounded queue, so the kernel never waits on the join;
- the join thread (the caller of `run`) builds the event's base from the
  drop, lets each collector fill its part in a fixed order (xtrace, then
  nftrace, evidence for attribution; attribution, which writes the netfilter
  section; then conntrack and links, which read it), and submits the event
  to the sink, whose own worker renders and writes it;
- the namespace scanner follows namespaces appearing and vanishing and tells
  the collectors, and moves the source's filter when `--netns` names one.

A netfilter drop waits for its nftrace verdict at most `verdict_wait` seconds
after it arrived, so a burst of untraced drops delays output by that much
once, not once per drop.

Floods (issue 8): the kernel counts every drop and sends only the first of
each flow (and samples asked for), so the join sees few records however many
packets die. First drops are shown within the `max_rate` ceiling; every
`summary_interval` the source closes a counting epoch and the join turns its
counts into exact summaries (tracer.pipeline.summaries). What could not be
shown one by one is reported as `tracer.loss` (tracer.pipeline.losses).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from tracer.bpf.loader import LoadedTracer
from tracer.collectors.base import Collector, Evidence, TraceCollector
from tracer.collectors.conntrack import ConntrackCollector
from tracer.collectors.counters import CounterCollector
from tracer.collectors.ctpressure import ConntrackPressure
from tracer.collectors.diagnosis import DiagnosisCollector
from tracer.collectors.links import LinksCollector
from tracer.collectors.neighbors import NeighborsCollector
from tracer.collectors.netfilter import NftraceCollector, XtraceCollector
from tracer.collectors.xtrace import LegacyCollector
from tracer.config import Config
from tracer.event.counter import CounterEvent
from tracer.event.model import DropEvent, Namespace, Netfilter, Packet, Probe, Process
from tracer.event.notice import Notice
from tracer.event.rendered import Rendered
from tracer.event.sections import Drop
from tracer.loop import EventLoop
from tracer.netfilter.marking import FlowKey, MarkingCoordinator
from tracer.netns import Netns
from tracer.outputs.base import Sink
from tracer.pipeline import attribution
from tracer.pipeline.losses import LossMeter, output_loss_notice
from tracer.pipeline.namespaces import NO_NETNS, Namespaces
from tracer.pipeline.summaries import Summaries, key_flow
from tracer.probe import marker as probe_marker
from tracer.sources.base import EpochClosed, Item
from tracer.sources.drop import KernelDrop
from tracer.sources.ringbuf import RingBufferSource

log = structlog.get_logger("tracer.engine")

#: Drops decoded but not yet joined, at most; a stuck join costs this much memory.
QUEUE_DROPS = 100_000
#: How long the end of a watch waits for the source's last counts (seconds).
FINISH_TIMEOUT = 1.5
#: How long the source may wait to queue an epoch's marker behind a stuck join (seconds).
MARKER_TIMEOUT = 5.0
#: Settings `reconfigure` applies to a running watch; the others need a restart.
LIVE_SETTINGS = ("scope", "every_drop", "max_rate", "stack")


class Engine:
    def __init__(self, config: Config, sink: Sink | None) -> None:
        self.config = config
        self.sink = sink
        self.emitted = 0
        self.ready = threading.Event()
        self.source = RingBufferSource(config)
        self.namespaces = Namespaces(config.scope)
        self.xtrace: XtraceCollector | None = None
        self.nftrace: NftraceCollector | None = None
        self.collectors: list[Collector | TraceCollector] = []
        self._trace_collectors: list[TraceCollector] = []
        self._section_collectors: list[Collector] = []
        self.marking: MarkingCoordinator | None = None
        self.loop: EventLoop | None = None
        self._stop = threading.Event()
        self._queue: queue.Queue[Item] = queue.Queue(maxsize=QUEUE_DROPS)
        self._threads: list[threading.Thread] = []
        self._queue_lost = 0  # drops lost to a full queue since the last warning
        self._queue_lost_logged = 0.0
        self._queue_lost_total = 0  # read by the join thread for loss reports
        self.summaries: Summaries | None = None
        self.pressure: ConntrackPressure | None = None
        self.counters: CounterCollector | None = None  # the SNMP counters of drops kfree_skb never sees
        self.losses = LossMeter()
        self._count_reached = False
        self._losses_checked = 0.0
        self._finishing = False
        self._discarded = 0  # drops skipped by the join at the end (in the last summaries)
        self._reported = {"ceiling": 0, "discarded": 0, "ring_buffer": 0}
        #: Called by the join thread at least every 0.2 s (the daemon's watchdog).
        self.tick: Callable[[], None] | None = None
        self._output_losses: Counter[tuple[str, str]] = Counter()  # (output, kind): from output workers
        self._output_losses_lock = threading.Lock()

    # ---------------------------------------------------------- set-up

    @property
    def tracer(self) -> LoadedTracer | None:
        return self.source.tracer

    @property
    def legacy(self) -> LegacyCollector | None:
        return self.xtrace.legacy if self.xtrace is not None else None

    def start(self) -> None:
        """Attaches everything; raises with a clear message when it cannot."""
        cfg = self.config
        self.namespaces.all = self.namespaces.scan()
        self.namespaces.check()
        target = self.namespaces.target()
        self.source.load(target)
        self._make_summaries()
        watched = self.namespaces.watched(target)
        self.marking = MarkingCoordinator()
        # One loop reads the netlink sockets of every namespace, for both trace collectors.
        self.loop = EventLoop("netlink-loop", log)
        self.xtrace = XtraceCollector(cfg, self.marking, self.loop)
        # xtrace first: a drop it proves is not waited for in nftables.
        self._trace_collectors = [self.xtrace]
        if cfg.nftrace:
            self.nftrace = NftraceCollector(cfg, self.marking, self.loop)
            self._trace_collectors.append(self.nftrace)
        # They read the netfilter section; the diagnosis reads every section before it, so it is last.
        self._section_collectors = [ConntrackCollector(), LinksCollector(), NeighborsCollector(),
                                    DiagnosisCollector(legacy_table=self.xtrace.legacy_table)]
        self.collectors = [*self._trace_collectors, *self._section_collectors]
        self.marking.start(watched)  # the trace collectors, in the order their host changes need
        for c in self.collectors:
            c.start(watched)
        self.pressure = ConntrackPressure(threshold=cfg.conntrack_threshold, emit=self._alert, log=log)
        self.pressure.start(watched)
        self.counters = CounterCollector(emit=self._alert, interval=1.0, log=log)
        self.counters.start(watched)  # reads the baseline now, then polls in its own thread
        assert self.summaries is not None
        self.source.start(self._deliver, admit=self.summaries.ceiling.take)
        self._spawn(self._scan_loop, "netns-scanner")
        self.ready.set()
        tracer = self.source.tracer
        assert tracer is not None
        log.info("watching", drop_program=tracer.drop_mode, netfilter_context=tracer.nf_mode or "none",
                 nftrace=self.nftrace is not None, namespaces=len(self.namespaces.all))

    def _make_summaries(self) -> None:
        tracer = self.source.tracer
        assert tracer is not None
        consts = tracer.constants
        self.summaries = Summaries(
            self.source.decoder, tracer.structs["flow_key"], max_rate=self.config.max_rate,
            interval=self.config.summary_interval, namespace_name=self._namespace_name,
            want_sample=self._want_sample, capacity=consts.value("tracer_limits", "TRACER_FLOW_ENTRIES"),
            rule_holds=self._rule_holds)

    def _rule_holds(self, event: DropEvent) -> bool:
        """Whether an event's nftables rule (same handle, text and comment), or its chain for
        a policy, is in the newest snapshot of its namespace's ruleset; True when unknown."""
        nf = event.netfilter
        if nf is None or self.nftrace is None or event.netns is None or nf.backend not in (
                "nftables", "iptables-nft") or nf.family is None or nf.table is None:
            return True
        rs = self.nftrace.nft.ruleset(event.netns.inode)
        if rs is None:
            return True
        if nf.rule is None:
            return nf.chain is None or rs.chain(nf.family, nf.table, nf.chain) is not None
        now = rs.rule(nf.family, nf.table, nf.rule.handle)
        return now is not None and now.text == nf.rule.text and now.comment == nf.rule.comment

    def _namespace_name(self, inode: int) -> str | None:
        ns = self.namespaces.get(inode)
        return ns.name if ns is not None else None

    def _want_sample(self, key: bytes) -> bool:
        """Asks the kernel for one more full drop of `key`, to learn its rule.

        With nftrace, only a traced drop can name its rule: the flow is added to
        the marking table's known flows (its established packets are traced
        too, then) and the sample waits for a traced drop.
        """
        tracer = self.source.tracer
        if tracer is None:
            return False
        if self.nftrace is not None:
            found = key_flow(tracer.structs["flow_key"], key)
            if found is not None:
                netns, h = found
                self.nftrace.trace_flow(netns, FlowKey(h.version, h.src, h.dst, h.protocol,
                                                       h.sport or 0, h.dport or 0))
        return tracer.want_sample(key, time.monotonic_ns(), traced=self.nftrace is not None)

    def describe(self) -> str:
        """One line for people: which kernel paths are in use, and why not the others."""
        if self.source.tracer is None:
            return "not started"
        parts = [self.source.describe()]
        if self.nftrace is not None:
            parts.append(f"rules via nftrace in {self.nftrace.watching()} namespace(s)")
            if self.xtrace is not None:
                parts.append(f"iptables-legacy TRACE read in {self.xtrace.tracing_in()} namespace(s)")
        else:
            parts.append("no rule text (nftrace off)")
        return "; ".join(parts)

    def _spawn(self, fn: Any, name: str) -> None:
        t = threading.Thread(target=fn, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    # ---------------------------------------------------------- threads

    def _deliver(self, item: Item) -> None:
        """The source's hand-over (in its thread): queue the drop, count it when the queue is full.

        An epoch's marker is never dropped: it waits for room (the join
        empties the queue), since the summaries depend on it.
        """
        if isinstance(item, EpochClosed):
            try:
                self._queue.put(item, timeout=MARKER_TIMEOUT)
            except queue.Full:
                log.warning("join stuck: counts of an epoch not reported", epoch=item.epoch)
            return
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            self._queue_lost += 1
            self._queue_lost_total += 1
            self._warn_queue_lost()

    def _warn_queue_lost(self, final: bool = False) -> None:
        """At most one warning a second, with the count: a full queue loses thousands of
        events a second, and a log line for each would slow the ring reader further."""
        now = time.monotonic()
        if self._queue_lost and (final or now - self._queue_lost_logged >= 1.0):
            log.warning("event queue full, drop event lost", lost=self._queue_lost)
            self._queue_lost, self._queue_lost_logged = 0, now

    def _scan_loop(self) -> None:
        while not self._stop.wait(self.config.scan_interval):
            found = self.namespaces.scan()
            target = self.namespaces.target()
            if target != self.source.netns_inode:
                log.info("netns followed", netns=self.config.scope.netns,
                         inode=None if target == NO_NETNS else target)
                self.source.follow_netns(target)
            if found.keys() != self.namespaces.all.keys():
                self.namespaces.all = found
                self._namespaces_changed(self.namespaces.watched(target))

    def _namespaces_changed(self, watched: Sequence[Netns]) -> None:
        if self.marking is not None:
            self.marking.update_namespaces(watched)
        for c in self.collectors:
            c.namespaces_changed(watched)
        if self.pressure is not None:
            self.pressure.namespaces_changed(watched)
        if self.counters is not None:
            self.counters.namespaces_changed(watched)

    # ---------------------------------------------------------- events

    def run(self) -> int:
        """Writes events until count, duration or stop(); returns how many."""
        if self.source.tracer is None:
            self.start()
        cfg = self.config
        deadline = None if cfg.duration is None else time.monotonic() + cfg.duration
        try:
            while not self._stop.is_set():
                timeout = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
                try:
                    item = self._queue.get(timeout=timeout)
                except queue.Empty:
                    item = None
                if item is not None:
                    self._handle(item)
                self._report_losses()
                if self.tick is not None:
                    self.tick()
                if self._count_reached or (deadline is not None and time.monotonic() >= deadline):
                    break
            if not self._count_reached:
                self._finish()
        finally:
            self.close()
        return self.emitted

    def _handle(self, item: Item) -> None:
        """One record or marker from the source: show it, learn from it, or summarise an epoch."""
        summaries = self.summaries
        assert summaries is not None
        if isinstance(item, EpochClosed):
            for event in summaries.close(item):
                self._emit(event)
            return
        if self._finishing:  # the watch is ending: its last summary counts it
            self._discarded += 1
            return
        if item.sample:  # asked for its attribution: it is counted in its summary
            learnt = self.build_event(item)
            if learnt is not None:
                summaries.learn(item.key, learnt)
            return
        shown = self.build_event(item)
        if shown is not None:
            summaries.showing(item.epoch, item.key, shown)
            self._emit(shown)

    def _alert(self, notice: Notice | CounterEvent) -> None:
        """A conntrack alert or a counter's rise, from their threads: straight to the sink (it is thread-safe)."""
        if self.sink is not None and not self._count_reached:
            self.sink.submit(Rendered(notice))

    def _emit(self, event: DropEvent | Notice) -> None:
        if self._count_reached:
            return
        if self.sink is not None:
            self.sink.submit(Rendered(event))
        if isinstance(event, DropEvent):
            self.emitted += 1
            if self.config.count is not None and self.emitted >= self.config.count:
                self._count_reached = True

    def _report_losses(self, *, force: bool = False) -> None:
        """Once a second (or `force`): the ring buffer's, the queue's and the ceiling's new
        losses, as one loss report when there are any."""
        now = time.monotonic()
        if not force and now - self._losses_checked < self.losses.period:
            return
        self._losses_checked = now
        tracer = self.source.tracer
        totals = {"ceiling": self.source.held_back, "discarded": self.source.discarded + self._discarded,
                  "queue": self._queue_lost_total}
        if tracer is not None:
            totals["ring_buffer"] = tracer.stats().get("lost", 0)
        for kind, n in totals.items():
            self.losses.add(kind, n - self._reported.get(kind, 0))
            self._reported[kind] = n
        notice = self.losses.report(force=True)
        if notice is not None:
            self._emit(notice)
        for notice in self._output_loss_notices():
            self._emit(notice)

    def output_lost(self, output: str, kind: str, n: int) -> None:
        """An output lost events (spool full, refused by its destination, down without a
        spool): counted here from its worker thread, reported by the join as `tracer.loss`."""
        if n > 0:
            with self._output_losses_lock:
                self._output_losses[(output, kind)] += n

    def _output_loss_notices(self) -> list[Notice]:
        with self._output_losses_lock:
            counts, self._output_losses = self._output_losses, Counter()
        by_output: dict[str, dict[str, int]] = {}
        for (output, kind), n in counts.items():
            by_output.setdefault(output, {})[kind] = n
        return [output_loss_notice(output, kinds) for output, kinds in sorted(by_output.items())]

    def reconfigure(self, new: Config) -> tuple[str, ...]:
        """Applies a reloaded configuration to the running watch, from any thread; returns the
        settings that changed but need a restart (they keep their old values).

        The filters move without a gap: the BPF filter is one map update, and
        each marking table gets its new matches in one nft transaction. The
        namespaces watched (`netns`), the probes and the marking rate stay as
        they were started.
        """
        old = self.config
        scope = dataclasses.replace(new.scope, netns=old.scope.netns)
        live = dataclasses.replace(old, scope=scope, every_drop=new.every_drop, max_rate=new.max_rate,
                                   stack=new.stack)
        needs_restart = tuple(f.name for f in dataclasses.fields(Config)
                              if f.name not in (*LIVE_SETTINGS, "count", "duration", "json", "log_level")
                              and getattr(new, f.name) != getattr(old, f.name))
        if new.scope.netns != old.scope.netns:
            needs_restart += ("netns",)
        if live == old:
            return needs_restart
        self.config = live
        self.source.reconfigure(live)
        if self.nftrace is not None and scope != old.scope:
            self.nftrace.nft.change_scope(scope)
        if self.summaries is not None and live.max_rate != old.max_rate:
            self.summaries.ceiling.rate = self.summaries.ceiling.burst = live.max_rate
        log.info("watch reconfigured", ports=list(scope.ports), hosts=[str(h) for h in scope.hosts],
                 proto=scope.proto, iface=scope.iface, reasons=list(scope.reasons), every_drop=live.every_drop,
                 max_rate=live.max_rate)
        return needs_restart

    def _finish(self) -> None:
        """The end of a watch: the source's last counts become the last summaries."""
        if not self.source.reading:
            return
        self._finishing = True
        self.source.finish()
        end = time.monotonic() + FINISH_TIMEOUT
        while (left := end - time.monotonic()) > 0:
            try:
                item = self._queue.get(timeout=left)
            except queue.Empty:
                break
            self._handle(item)
            if isinstance(item, EpochClosed) and item.final:
                break
        self._report_losses(force=True)

    def build_event(self, drop: KernelDrop) -> DropEvent | None:
        """The one place a drop becomes an event: the trace collectors' evidence, attribution,
        the event built once from the drop's facts and the netfilter section, then each
        collector's section."""
        if not self.source.wanted(drop):
            return None
        ns = self.namespaces.get(drop.netns)
        evidence = Evidence(drop, ns)
        for t in self._trace_collectors:
            t.gather(evidence)
        nf = self._attribute(evidence)
        process = drop.process
        probe_id = probe_marker.recognise(drop.packet)
        event = DropEvent(
            timestamp_ns=drop.wall_ns,
            drop=Drop(drop.reason, drop.location or None, tuple(drop.stack) if self.config.stack else None,
                      attribution.subsystem(drop, nf), drop.hook),
            action="rejected" if nf is not None and nf.verdict == "reject" else "dropped",
            packet=Packet(drop.packet, drop.length, drop.mark),
            netns=Namespace(drop.netns, ns.name if ns else None) if drop.netns else None,
            netfilter=nf,
            process=Process(*process) if process is not None else None,
            probe=Probe(probe_id) if probe_id else None,
        )
        for c in self._section_collectors:
            c.enrich(event, evidence)
        return event

    def _attribute(self, evidence: Evidence) -> Netfilter | None:
        """The netfilter section, from the trace collectors' evidence and the kernel's context."""
        drop = evidence.drop
        # A packet conntrack dropped (its table full) is conntrack's, whatever chain it passed.
        nf = (attribution.conntrack_full(drop, evidence.verdict, evidence.legacy, self.pressure)
              or attribution.attribute(drop, evidence.verdict, evidence.ruleset, evidence.legacy_present,
                                       evidence.legacy))
        if nf is not None and nf.backend == "iptables-legacy" and nf.table is None and self.xtrace is not None:
            family = {0x0800: "ip", 0x86DD: "ip6"}.get(drop.l3proto)
            if family and nf.hook:
                nf = attribution.with_legacy_table(nf, self.xtrace.table_candidates(drop.netns, nf.hook, family))
        return nf

    # ---------------------------------------------------------- stop

    def stop(self) -> None:
        """Ends `run` (from any thread): it then reports the last counts and closes."""
        self._stop.set()

    def close(self) -> None:
        self.stop()
        self.source.stop()
        stuck = []
        for t in self._threads:
            if t is not threading.current_thread():
                t.join(timeout=5)
                if t.is_alive():
                    stuck.append(t.name)
        self._threads = []
        if stuck:
            log.warning("threads did not stop", threads=stuck)
        try:
            if self.marking is not None:
                self.marking.stop()  # marking tables off, then nf_log bindings back
        finally:
            if self.pressure is not None:
                self.pressure.stop()
                self.pressure = None
            if self.counters is not None:
                self.counters.stop()
                self.counters = None
            for c in self.collectors:
                c.stop()
            self.collectors, self.nftrace, self.xtrace, self.marking = [], None, None, None
            if self.loop is not None:
                self.loop.close()  # after the collectors: their readers are off it by now
                self.loop = None
        self.source.close()
        self._warn_queue_lost(final=True)  # the source has stopped: what is left to say
        if self.config.debug_stats:
            log.info("stopped", emitted=self.emitted)

