"""The `file` output: NDJSON, one event per line, in a file of mode 0600 rotated by size.

```toml
[[output]]
type = "file"
path = "/var/log/tracer/drops.ndjson"   # absolute; its directory is made 0750 if missing
max_bytes = 104857600                    # rotate before a write would pass this size
keep = 5                                 # drops.ndjson.1 ... drops.ndjson.5; 0 keeps none
```

Why it is written this way:
- The file is opened O_APPEND|O_CREAT|O_CLOEXEC|O_NOFOLLOW, mode 0600: the
  events name hosts, addresses and rules, which not every local user should
  read, and a symbolic link planted where the file should be (a log
  directory others can write to) is refused rather than followed.
- Rotation is by size, before the write that would pass `max_bytes`, at a
  line boundary: path -> path.1 -> ... -> path.<keep>, the oldest replaced.
  A line longer than `max_bytes` alone gets a file of its own.
- logrotate works too: after it moves the file, SIGHUP makes the sink
  reopen the transport (`close` + `open`), which creates a new file.
- A write that fails (ENOSPC, EIO) raises OutputDown: the sink spools and
  retries. A half-written line is cut off again, so the file only ever
  holds whole lines; when part of a batch was written, only the rest is
  sent again (`SendResult.retry`), so nothing is written twice.

The transport buffers nothing and never syncs: once `send` returns, the
lines are in the kernel's page cache, where a crash of the process cannot
lose them.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass

from tracer.config import ConfigError
from tracer.outputs.transport import OutputDown, Record, SendResult

MiB = 1 << 20
#: The smallest rotation size: a few events per file at least.
MIN_BYTES = 4096
MAX_KEEP = 1000
#: Records per send: one write() of about a MiB of typical events.
MAX_BATCH = 1000

_OPEN_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK


@dataclass(frozen=True)
class Options:
    """The keys of a `type = "file"` output."""

    path: str
    max_bytes: int = 100 * MiB
    keep: int = 5

    def check(self) -> None:
        """ConfigError (its message starts with the key) for a file the daemon could never
        write: a relative path, a directory that cannot be made or written, a symlink."""
        problem = path_problem(self.path)
        if problem:
            raise ConfigError(f"path: {problem}")
        if self.max_bytes < MIN_BYTES:
            raise ConfigError(f"max_bytes: {self.max_bytes} is less than {MIN_BYTES}")
        if not 0 <= self.keep <= MAX_KEEP:
            raise ConfigError(f"keep: {self.keep} is not between 0 and {MAX_KEEP}")

    def transport(self) -> FileTransport:
        return FileTransport(self.path, max_bytes=self.max_bytes, keep=self.keep)


def path_problem(path: str) -> str | None:
    """Why the file output cannot write `path` (None: it can, or its directory can be made).

    Root ignores permission bits, not a read-only filesystem: access(2)
    reports EROFS to root too, so it is what is asked.
    """
    if not path or "\0" in path:
        return f"{path!r} is not a file name"
    if not os.path.isabs(path):
        return f"{path!r} is not an absolute path"
    if path.endswith("/") or os.path.basename(path) in (".", ".."):
        return f"{path!r} names a directory, not a file"
    if os.path.lexists(path):
        if os.path.islink(path):
            return f"{path!r} is a symbolic link (refused: the output never follows one)"
        if not os.path.isfile(path):
            return f"{path!r} is not a regular file"
        if not os.access(path, os.W_OK):
            return f"{path!r} is not writable"
    probe = os.path.dirname(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        return f"{probe!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"directory {probe!r} is not writable"
    return None


class _Failed(Exception):
    """A write or a rotation failed; `send` decides what the sink is told.

    `written`: the lines of the failed write that are whole in the file."""

    def __init__(self, message: str, written: int = 0) -> None:
        super().__init__(message)
        self.written = written


class FileTransport:
    """NDJSON lines appended to `path`, rotated by size (see the module's docstring)."""

    max_batch = MAX_BATCH

    def __init__(self, path: str, *, max_bytes: int = 100 * MiB, keep: int = 5) -> None:
        self.path = path
        self.name = f"file {path}"
        self.max_bytes = max_bytes
        self.keep = keep
        self._fd: int | None = None
        self._size = 0  # of the open file, as far as this transport wrote it

    def open(self) -> None:
        """Makes the directory (0750) if missing and opens the file (0600 if new)."""
        if self._fd is not None:
            return
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, mode=0o750, exist_ok=True)
        except FileExistsError:
            raise OutputDown(f"{directory!r} is not a directory") from None
        except OSError as exc:
            raise OutputDown(f"cannot make directory {directory!r}: {exc.strerror or exc}") from None
        try:
            self._open_file()
        except _Failed as exc:
            raise OutputDown(str(exc)) from None

    def _open_file(self) -> None:
        try:
            fd = os.open(self.path, _OPEN_FLAGS, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _Failed(f"{self.path!r} is a symbolic link (refused)") from None
            raise _Failed(f"cannot open {self.path!r}: {exc.strerror or exc}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise _Failed(f"{self.path!r} is not a regular file")
        self._fd, self._size = fd, st.st_size

    def send(self, records: Sequence[Record]) -> SendResult:
        """Appends one line per record, rotating where the next line would not fit."""
        if self._fd is None:
            self.open()
        lines = [r.json + b"\n" for r in records]
        done = 0  # records whose line is whole in a file
        try:
            while done < len(lines):
                end, size = done, 0
                while end < len(lines) and (self._size + size + len(lines[end]) <= self.max_bytes
                                            or self._size + size == 0):
                    size += len(lines[end])
                    end += 1
                if end == done:  # the next line does not fit in what is left of this file
                    self._rotate()
                    continue
                done += self._write(lines[done:end])
        except _Failed as exc:
            done += exc.written
            if done:
                return SendResult(retry=tuple(range(done, len(lines))))
            raise OutputDown(str(exc)) from None
        return SendResult()

    def _write(self, lines: list[bytes]) -> int:
        """Writes whole lines; returns how many. On a failure cuts off a partial line and
        raises _Failed with the number of lines that are whole."""
        fd = self._fd
        assert fd is not None
        data = memoryview(b"".join(lines))
        start, offset = self._size, 0
        try:
            while offset < len(data):
                n = os.write(fd, data[offset:])
                if n <= 0:  # no progress, no error: as if the device were full
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                offset += n
        except OSError as exc:
            whole = ends = 0
            for line in lines:
                if ends + len(line) > offset:
                    break
                ends += len(line)
                whole += 1
            if offset > ends:  # half a line went out: take it back, the file holds whole lines
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start + ends)
            self._size = start + ends
            raise _Failed(f"write to {self.path!r} failed: {exc.strerror or exc}", whole) from None
        finally:
            data.release()
        self._size = start + offset
        return len(lines)

    def _rotate(self) -> None:
        """path -> path.1 -> ... -> path.<keep> (the oldest replaced), then a new path."""
        self.close()
        try:
            if self.keep == 0:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.path)
            else:
                for n in range(self.keep - 1, 0, -1):
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(f"{self.path}.{n}", f"{self.path}.{n + 1}")
                with contextlib.suppress(FileNotFoundError):  # moved away already (logrotate)
                    os.rename(self.path, f"{self.path}.1")
        except OSError as exc:
            raise _Failed(f"cannot rotate {self.path!r}: {exc.strerror or exc}") from None
        self._open_file()

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)
