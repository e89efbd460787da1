"""The tracer's own logs (not drop events): structlog to stderr.

Drop events own stdout; everything the tracer says about itself goes to
stderr, readable on a terminal and one JSON object per line otherwise, so a
service's journal stays machine-readable.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import threading
from typing import TextIO, cast

import structlog

from tracer.config import log_level

#: Log lines queued for a stuck stderr at most; more are dropped (there is nowhere to say so).
STDERR_LINES = 2_000

_stderr_lock = threading.Lock()
_stderr: _LineStream | None = None


def clean(text: str) -> str:
    """`text` with every unprintable character escaped: a value a user (or a
    namespace's owner) chose cannot add lines or terminal escapes to ours."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


class _LineStream(io.TextIOBase):
    """A text stream whose complete lines go to fd 2 through a non-blocking FdWriter.

    A reader that stops reading stderr (a stuck journal pipe) then costs
    lost log lines, never a thread blocked in write(): a blocked main
    thread could not even run its signal handlers.
    """

    def __init__(self, fd: int, encoding: str) -> None:
        from tracer.outputs.writer import FdWriter

        self.writer = FdWriter(fd, name="stderr", max_items=STDERR_LINES, max_bytes=4 << 20)
        self._encoding = encoding
        self._partial: list[str] = []
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            self._partial.append(s)
            if "\n" in s:
                text = "".join(self._partial)
                complete, _, rest = text.rpartition("\n")
                self._partial = [rest] if rest else []
                self.writer.put((complete + "\n").encode(self._encoding, "backslashreplace"))
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return os.isatty(self.writer.fd)


def _nonblocking_stderr() -> TextIO:
    """The shared non-blocking stderr stream; sys.stderr itself when it has no descriptor."""
    global _stderr
    with _stderr_lock:
        if _stderr is None:
            try:
                fd = sys.stderr.fileno()
                sys.stderr.flush()
                _stderr = _LineStream(fd, getattr(sys.stderr, "encoding", None) or "utf-8")
            except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
                return sys.stderr
        # A TextIOBase with the write/flush/isatty structlog's PrintLogger uses.
        return cast(TextIO, _stderr)


def say(line: str) -> None:
    """One line for people on stderr, through the same path as the logs (in order with them)."""
    stream = _stderr if _stderr is not None else sys.stderr
    try:
        stream.write(clean(line) + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # stderr is gone: there is nobody left to tell


def close(timeout: float) -> None:
    """Gives queued log lines at most `timeout` seconds to reach stderr; then stops."""
    global _stderr
    with _stderr_lock:
        stream, _stderr = _stderr, None
    if stream is not None:
        stream.writer.close(timeout)
        structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr))


def configure(level: str | None = None, *, json: bool | None = None, nonblocking: bool = False) -> None:
    """Log level and format; with `nonblocking`, stderr writes go through a
    queue (see _LineStream) until `close()` (long-running commands: watch)."""
    level = log_level(level or "warning")
    if json is None:
        json = not sys.stderr.isatty()
    out = _nonblocking_stderr() if nonblocking else sys.stderr
    renderer = (structlog.processors.JSONRenderer() if json
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=out),
        cache_logger_on_first_use=False,
    )
