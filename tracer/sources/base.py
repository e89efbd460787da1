"""What a source of kernel drops promises the pipeline.

A source owns everything between the kernel and a decoded `KernelDrop`:
attaching, the in-kernel filter, the thread that reads, and decoding. It
hands each drop to `deliver` from its own thread and never waits for the
pipeline, so a slow join costs queue space, never kernel buffer space.
The BPF ring buffer is the source today; NFQUEUE and a replay of recorded
drops are meant to slot in beside it without the pipeline changing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from tracer.bpf.loader import FlowCount
from tracer.sources.drop import KernelDrop


@dataclass(frozen=True, slots=True)
class EpochClosed:
    """A source's marker: every record of counting epoch `epoch` is ahead of it.

    `counts` are the epoch's final counts (tracer.pipeline.summaries turns
    them into summaries); `forgotten` the keys the kernel no longer
    remembers (idle), whose next drop is a first again; `final` marks the
    last marker, sent after the programs were detached.
    """

    epoch: int
    counts: tuple[FlowCount, ...]
    forgotten: tuple[bytes, ...] = ()
    final: bool = False


#: What a source delivers: drops, and the markers that close counting epochs.
Item = KernelDrop | EpochClosed


class Source(Protocol):
    name: str

    def start(self, deliver: Callable[[Item], None]) -> None:
        """Attaches and starts delivering; raises with a clear message when it cannot."""

    def finish(self) -> None:
        """Stops counting and delivers the last EpochClosed (final) with all that is left."""

    def follow_netns(self, inode: int | None) -> None:
        """Limits delivery to one namespace (None: all), as the watch's `--netns` moves."""

    def describe(self) -> str:
        """One line for people: which kernel paths are in use, and why not the others."""

    def stop(self) -> None:
        """Stops delivering (safe from any thread, also while `deliver` runs)."""

    def close(self) -> None:
        """Releases the kernel objects, after `stop`; reports what the kernel lost."""
