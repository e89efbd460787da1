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
from typing import Protocol

from tracer.sources.drop import KernelDrop


class Source(Protocol):
    name: str

    def start(self, deliver: Callable[[KernelDrop], None]) -> None:
        """Attaches and starts delivering; raises with a clear message when it cannot."""

    def follow_netns(self, inode: int | None) -> None:
        """Limits delivery to one namespace (None: all), as the watch's `--netns` moves."""

    def describe(self) -> str:
        """One line for people: which kernel paths are in use, and why not the others."""

    def stop(self) -> None:
        """Stops delivering (safe from any thread, also while `deliver` runs)."""

    def close(self) -> None:
        """Releases the kernel objects, after `stop`; reports what the kernel lost."""
