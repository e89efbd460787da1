"""Loss reports: what could not be shown one by one, said as an event, at most once a second.

A drop is never lost from the counts (tracer.pipeline.summaries), but its
details can be: a ring buffer the kernel found full, the join queue full,
or the events-per-second ceiling holding a first drop back. Each is counted
here by kind, and `report()` turns what gathered since the last report into
one `tracer.loss` notice, so a flood makes one line a second, not one a
drop, and nothing goes missing without a word.
"""

from __future__ import annotations

import time
from collections import Counter

from tracer.event.notice import LOSS_DATASET, Notice

#: At most one report this often (seconds).
REPORT_PERIOD = 1.0

#: How each kind reads in the report's sentence.
_KIND_TEXT = {
    "ring_buffer": "the kernel's ring buffer was full",
    "queue": "the event queue was full",
    "ceiling": "held back by the events-per-second ceiling",
    "discarded": "still queued when the watch ended",
}


class LossMeter:
    """Counts losses by kind between two reports."""

    def __init__(self, period: float = REPORT_PERIOD) -> None:
        self.period = period
        self._counts: Counter[str] = Counter()
        self._since_ns = time.time_ns()
        self._last = 0.0
        self.total: Counter[str] = Counter()

    def add(self, kind: str, n: int = 1) -> None:
        if n > 0:
            self._counts[kind] += n
            self.total[kind] += n

    def report(self, *, force: bool = False) -> Notice | None:
        """The notice of what gathered, when there is some and a period has passed (or `force`)."""
        now = time.monotonic()
        if not self._counts or (not force and now - self._last < self.period):
            return None
        counts, self._counts = dict(self._counts), Counter()
        start, end = self._since_ns, time.time_ns()
        self._since_ns, self._last = end, now
        lost = sum(n for kind, n in counts.items() if kind not in ("ceiling", "discarded"))
        why = "; ".join(f"{n} {_KIND_TEXT.get(kind, kind)}" for kind, n in sorted(counts.items()))
        total = sum(counts.values())
        return Notice(
            timestamp_ns=end,
            dataset=LOSS_DATASET,
            action="events_lost" if lost else "events_held_back",
            message=f"{total} drop(s) not shown one by one ({why}); "
                    "they are counted in the next summaries",
            severity=50 if lost else 20,
            details={"loss": {**counts, "total": total, "counted_in_summaries": True}},
            start_ns=start,
            end_ns=end,
        )


#: How each kind of an output's loss reads in the report's sentence.
_OUTPUT_KIND_TEXT = {
    "spool_full": "the spool was full (oldest dropped)",
    "rejected": "refused by the destination",
    "output_down": "the output was down and has no spool",
    "queue": "the output's queue was full",
    "spool_corrupt": "its spool file was damaged and set aside",
    "spool_error": "its spool could not store them",
    "shutdown": "still held at stop, with no spool",
}


def output_loss_notice(output: str, counts: dict[str, int]) -> Notice:
    """One `tracer.loss` report of events an output lost for good (they are in no summary)."""
    total = sum(counts.values())
    why = "; ".join(f"{n} {_OUTPUT_KIND_TEXT.get(kind, kind)}" for kind, n in sorted(counts.items()))
    now = time.time_ns()
    return Notice(
        timestamp_ns=now,
        dataset=LOSS_DATASET,
        action="output_events_lost",
        message=f"{total} event(s) lost by output {output} ({why})",
        severity=70,
        details={"loss": {**counts, "output": output, "total": total, "counted_in_summaries": False}},
    )
