"""The BPF source: kfree_skb drops from the ring buffer, filtered and counted in the kernel.

One thread polls the ring buffer and decodes each record (symbols,
headers) right away, so the kernel's buffer never waits on the join or the
outputs. A record the decoder cannot read is skipped and counted, with at
most one warning a second.

The same thread closes the kernel's counting epochs (tracer.pipeline.summaries):
every `summary_interval` it starts the next epoch, reads what is left in the
ring buffer, drains the closed epoch's counts, and hands them over as an
`EpochClosed` marker behind the epoch's last record. Doing it in the reader
is what orders the marker after every record of its epoch. `finish()`
makes it detach the programs and send a last marker with everything counted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from tracer.bpf import filter as bpf_filter
from tracer.bpf.libbpf import RingBuffer
from tracer.bpf.loader import LoadedTracer
from tracer.config import Config
from tracer.sources.base import EpochClosed, Item
from tracer.sources.drop import DropDecoder, DropReasons, KernelDrop

log = structlog.get_logger("tracer.engine")

#: The ring reader's poll timeout: how quickly it notices `stop`, `finish` and an epoch's end.
_POLL_MS = 100
#: A key with no drop for this long (or three summary intervals, if longer) is forgotten
#: by the kernel: its next drop is shown in full again, and its map slot is free.
IDLE_KEY_SECONDS = 60.0


class RingBufferSource:
    name = "kfree_skb"

    def __init__(self, config: Config, reasons: DropReasons | None = None) -> None:
        self.config = config
        self.reasons = reasons or DropReasons()
        #: The kernel numbers of the reasons the user asked for (empty: all).
        self.user_reasons = [self.reasons.value(r) for r in config.scope.reasons]
        self.tracer: LoadedTracer | None = None
        self._rb: RingBuffer | None = None
        self._decoder: DropDecoder | None = None
        self._deliver: Callable[[Item], None] | None = None
        self._stop = threading.Event()
        self._finish = threading.Event()
        self._admit: Callable[[], bool] | None = None
        self._record_at = 0
        self._first = 0
        #: Totals, written by the reader thread only (the engine reads them for loss reports):
        #: first drops the ceiling held back, and records skipped at the end of the watch.
        self.held_back = 0
        self.discarded = 0
        self._thread: threading.Thread | None = None
        self._bad_records = 0
        self._bad_logged = 0.0
        self.netns_inode: int | None = None

    def load(self, netns_inode: int | None) -> None:
        """Loads and attaches the programs with the filter set; nothing is delivered yet."""
        cfg = self.config
        self.tracer = LoadedTracer(cfg.bpf_object, nf_mode=cfg.nf_mode)
        self.follow_netns(netns_inode)
        self._decoder = DropDecoder(self.tracer.Event, self.reasons)

    @property
    def decoder(self) -> DropDecoder:
        assert self._decoder is not None, "load() first"
        return self._decoder

    def start(self, deliver: Callable[[Item], None], admit: Callable[[], bool] | None = None) -> None:
        """Starts the reader. `admit()` is the ceiling: asked (in the reader thread) for each
        first drop before it is decoded; one it refuses is only counted, as held back."""
        if self.tracer is None:
            self.load(None)
        assert self.tracer is not None
        self._deliver = deliver
        self._admit = admit
        event = self.tracer.Event
        self._record_at = event.record.offset
        self._first = event.constants.value("tracer_record", "TRACER_REC_FIRST")
        self._rb = self.tracer.ring_buffer(self._on_record)
        self._thread = threading.Thread(target=self._read, name="ring-reader", daemon=True)
        self._thread.start()

    def follow_netns(self, inode: int | None) -> None:
        assert self.tracer is not None
        cfg = bpf_filter.build(
            self.tracer.new_filter(), self.config.scope, reasons=self.user_reasons,
            netns_inode=inode, consumed_reason=self.reasons.by_name.get("SKB_CONSUMED"),
            every_drop=self.config.every_drop, nf_context=bool(self.tracer.nf_mode))
        self.tracer.set_filter(cfg)
        self.netns_inode = inode

    def reconfigure(self, config: Config) -> None:
        """New filters (a reload): the kernel's filter is replaced in one map update."""
        self.user_reasons = [self.reasons.value(r) for r in config.scope.reasons]
        self.config = config
        if self.tracer is not None:
            self.follow_netns(self.netns_inode)

    def wanted(self, drop: KernelDrop) -> bool:
        """The user's reasons, checked again here: the kernel filter is a bitmap of 1024."""
        return not self.user_reasons or self.reasons.by_name.get(drop.reason) in self.user_reasons

    def describe(self) -> str:
        t = self.tracer
        if t is None:
            return "not started"
        parts = [f"drops via kfree_skb ({t.drop_mode})"]
        if t.nf_mode:
            parts.append(f"netfilter context via {t.nf_mode}")
        else:
            refused = "; ".join(r.error for r in t.capabilities.nf.values())
            parts.append(f"netfilter context from the stack ({refused or 'not probed'})")
        return "; ".join(parts)

    def _read(self) -> None:
        assert self._rb is not None
        interval = self.config.summary_interval
        due = time.monotonic() + interval
        while not self._stop.is_set():
            self._rb.poll(_POLL_MS)
            if self._finish.is_set():
                self._close_epoch(final=True)
                return
            if time.monotonic() >= due:
                self._close_epoch(final=False)
                due = time.monotonic() + interval

    def _close_epoch(self, *, final: bool) -> None:
        """Closes the current epoch (the last one with `final`, after detaching) and sends its marker."""
        t, rb = self.tracer, self._rb
        assert t is not None and rb is not None and self._deliver is not None
        if final:
            t.detach()
            epoch = t.epoch
        else:
            epoch = t.close_epoch()
        rb.consume()
        counts = tuple(t.drain_counts(epoch))
        forgotten = () if final else tuple(self._forget_idle())
        self._deliver(EpochClosed(epoch, counts, forgotten, final))

    def _forget_idle(self) -> list[bytes]:
        assert self.tracer is not None
        idle_ns = int(max(IDLE_KEY_SECONDS, 3 * self.config.summary_interval) * 1e9)
        now = time.monotonic_ns()
        idle = [key for key, last, _flags in self.tracer.seen_keys() if now - last > idle_ns]
        if idle:
            self.tracer.forget_keys(idle)
        return idle

    def finish(self) -> None:
        """Asks the reader to stop the programs and send the last counts (an EpochClosed, final)."""
        self._finish.set()

    @property
    def reading(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _on_record(self, raw: bytes) -> None:
        """One record: skipped undecoded when the watch is ending or the ceiling refuses it
        (its drop is counted in the kernel's maps, so its summary has it), else decoded and
        handed over. Decoding is most of a record's cost, hence the early checks."""
        assert self._decoder is not None and self._deliver is not None
        if self._finish.is_set():
            self.discarded += 1
            return
        if (self._admit is not None and len(raw) > self._record_at
                and raw[self._record_at] == self._first and not self._admit()):
            self.held_back += 1
            return
        try:
            drop = self._decoder.decode(raw)
        except ValueError as exc:  # the decoder's own error: a record it cannot read
            self._bad_records += 1
            now = time.monotonic()
            if now - self._bad_logged >= 1.0:
                log.warning("unreadable drop records skipped", count=self._bad_records, error=str(exc))
                self._bad_records, self._bad_logged = 0, now
            return
        self._deliver(drop)

    def stop(self) -> None:
        self._stop.set()
        if self._rb is not None:
            self._rb.cancel()

    def close(self) -> None:
        """After `stop`. Frees the kernel objects unless the reader is stuck inside libbpf."""
        self.stop()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                # Freeing the ring buffer under a reader still inside libbpf would
                # crash the process; leaking it until exit is the safe choice.
                log.warning("threads did not stop; BPF objects released at exit", threads=["ring-reader"])
                self.tracer = None
        if self.tracer is not None:
            stats = self.tracer.stats()
            if stats.get("lost"):
                log.warning("ring buffer overflowed: events lost", lost=stats["lost"])
            self.tracer.close()
            self.tracer = None
