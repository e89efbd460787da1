"""An output's on-disk spool: the events its destination could not take yet, oldest first.

One SQLite database per output, `<dir>/<output name>.sqlite`, with one
table `spool(seq INTEGER PRIMARY KEY, json BLOB, text TEXT)`: a `Record`
per row, in the order the sink queued them. Why SQLite and these settings:
- WAL with `synchronous=NORMAL`: a commit is one write() to the log, no
  fsync; once it returns the rows survive a SIGKILL of the process (the
  kernel has them), and only a power cut can lose the last commits. Each
  `append` is one transaction, so a batch is in the spool whole or not at
  all.
- `locking_mode=EXCLUSIVE`: the connection holds the database's lock until
  it closes, so two sinks (two daemons, or an old and a new sink of one
  output during a reload) can never deliver the same rows twice or append
  out of order. A spool that is in use is returned not `ready`; the sink's
  worker waits for it (`wait_ready`). The kernel drops the lock of a killed
  process, so a restart after SIGKILL takes the spool over at once. With an
  exclusive lock SQLite keeps the WAL index in memory: no `-shm` file.
- `auto_vacuum=INCREMENTAL`: once an outage's backlog is delivered the file
  gives its pages back to the filesystem.
- 16 KiB pages, and a WAL checkpointed every 1000 pages (SQLite's default)
  and cut back to 16 MiB: fewer fsyncs (one per checkpoint) for the same
  events.

The bound (`max_bytes`) counts each row's JSON and text bytes; the file is
a little larger (page headers, the WAL until its next checkpoint, at most
`WAL_LIMIT` after it). When an append would pass the bound, the oldest
rows go first: recent events matter most to whoever reads them after an
outage, and every row dropped is counted (`dropped_full`).

A database SQLite calls corrupt, or that cannot be read at all, is renamed
aside (`<file>.corrupt-<time>`, kept for whoever wants to look) with one
log line, and a fresh one is started: a bad file costs its events
(counted, `dropped_corrupt`), never the output.

A Spool is used by one thread at a time (the sink's worker; `close` from
the thread that closes the sink once the worker is done). It is not
locked against concurrent use.
"""

from __future__ import annotations

import contextlib
import os
import re
import sqlite3
import stat
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import structlog

from tracer.outputs.transport import Record

log = structlog.get_logger("tracer.output")

#: What an output name may be: it becomes a file name.
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
#: What the WAL file is cut back to after a checkpoint (SQLite checkpoints every 1000 pages).
WAL_LIMIT = 16 << 20
#: Pages of 16 KiB: an event (about 1.5 KiB of JSON and text) rarely straddles two, and a
#: spool of these took events ~1.7 times as fast as with 4 KiB pages (measured here).
PAGE_SIZE = 16384
#: Rows read per query when the oldest are dropped to make room.
_DROP_CHUNK = 1000
#: SQLite's primary result codes we act on (sqlite3.h).
_SQLITE_IOERR, _SQLITE_CORRUPT, _SQLITE_NOTADB = 10, 11, 26
_SQLITE_BUSY, _SQLITE_LOCKED = 5, 6
#: The statements, written out whole. A row's size, as the bound counts it, is
#: length(json) + length(CAST(text AS BLOB)): its JSON and its text in UTF-8.
_SQL_DEPTH = "SELECT count(*), coalesce(sum(length(json) + length(CAST(text AS BLOB))), 0) FROM spool"
_SQL_OLDEST_SIZES = ("SELECT seq, length(json) + length(CAST(text AS BLOB)) FROM spool "
                     "WHERE seq > ? ORDER BY seq LIMIT ?")
_SQL_DELETE_SEQS = ("DELETE FROM spool WHERE seq IN (SELECT value FROM json_each(?)) "
                    "RETURNING length(json) + length(CAST(text AS BLOB))")
_SQL_DELETE_THROUGH = "DELETE FROM spool WHERE seq <= ? RETURNING length(json) + length(CAST(text AS BLOB))"
_COLUMNS = ["seq", "json", "text"]


class SpoolError(Exception):
    """The spool cannot be used: the message says why, for an operator (no secret in it)."""


class SpoolBusy(SpoolError):
    """Another sink or process holds this spool."""


def _code(exc: sqlite3.Error) -> int:
    return int(getattr(exc, "sqlite_errorcode", 0)) & 0xFF


def _unusable(exc: sqlite3.Error) -> bool:
    """Whether the file itself is bad (set it aside) rather than the place it is in."""
    return _code(exc) in (_SQLITE_CORRUPT, _SQLITE_NOTADB, _SQLITE_IOERR)


def record_size(record: Record) -> int:
    """What one record counts against the spool's bound (as the statements compute it)."""
    return len(record.json) + len(record.text.encode())


class Spool:
    """A bounded on-disk queue of Records, oldest first; see the module's docstring."""

    def __init__(self, directory: Path, name: str, max_bytes: int) -> None:
        """Use `Spool.open`; this only sets the fields."""
        self.name = name
        self.directory = directory
        self.path = directory / f"{name}.sqlite"
        self.max_bytes = max_bytes
        self.dropped_full = 0  # rows dropped (oldest first) to make room, and records too big for it
        self.dropped_corrupt = 0  # rows lost with a database set aside as corrupt
        self._db: sqlite3.Connection | None = None
        self._events = 0
        self._bytes = 0
        self._closed = False

    # ------------------------------------------------------------ opening

    @classmethod
    def open(cls, directory: str | os.PathLike[str], name: str, max_bytes: int) -> Spool:
        """The spool of output `name` in `directory` (made 0700 if missing).

        SpoolError when it cannot be had at all: a name that is no safe file
        name, a directory that cannot be made or written. A spool another sink
        or process holds comes back not `ready` (see `wait_ready`).
        """
        if not _NAME.fullmatch(str(name)) or name in (".", ".."):
            raise SpoolError(f"spool name {name!r}: only letters, digits, '_', '.' and '-' (1 to 200)")
        if isinstance(max_bytes, bool) or max_bytes <= 0:
            raise SpoolError(f"spool max_bytes {max_bytes!r}: a positive number of bytes")
        path = Path(directory)
        if not path.is_absolute():
            path = path.absolute()
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise SpoolError(f"spool directory {str(path)!r}: {exc.strerror or exc}") from None
        if not path.is_dir():
            raise SpoolError(f"spool directory {str(path)!r} is not a directory")
        spool = cls(path, name, max_bytes)
        spool.wait_ready(0.0)
        return spool

    @property
    def ready(self) -> bool:
        """Whether this spool holds its database (it may be in use elsewhere until then)."""
        return self._db is not None

    def wait_ready(self, timeout: float) -> bool:
        """Takes the database, waiting up to `timeout` seconds while another holder has it.

        True once it is held. SpoolError when it cannot be used (the directory
        became unwritable, the disk is full even for a fresh file).
        """
        if self._db is not None:
            return True
        if self._closed:
            raise SpoolError(f"spool {self.name} is closed")
        try:
            self._connect(timeout)
        except SpoolBusy:
            return False
        return True

    def _connect(self, timeout: float) -> None:
        for attempt in (1, 2):
            try:
                self._prepare_file()
                db = sqlite3.connect(self.path, timeout=max(0.0, timeout), isolation_level=None,
                                     check_same_thread=False)
            except (OSError, sqlite3.Error) as exc:
                bad_file = isinstance(exc, _NotAFile) or (isinstance(exc, sqlite3.Error) and _unusable(exc))
                if attempt == 1 and bad_file:
                    self._set_aside(str(exc))
                    continue
                raise SpoolError(f"spool {str(self.path)!r}: {_why(exc)}") from None
            try:
                self._events, self._bytes = self._setup(db)
            except sqlite3.Error as exc:
                db.close()
                if _code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED):
                    raise SpoolBusy(f"spool {str(self.path)!r} is in use by another sink or process") from None
                if attempt == 1 and _unusable(exc):
                    self._set_aside(str(exc))
                    continue
                raise SpoolError(f"spool {str(self.path)!r}: {_why(exc)}") from None
            except _BadSchema as exc:
                db.close()
                if attempt == 1:
                    self._set_aside(str(exc))
                    continue
                raise SpoolError(f"spool {str(self.path)!r}: {exc}") from None
            self._db = db
            return

    def _prepare_file(self) -> None:
        """Creates the database file 0600 before SQLite does (its WAL then gets the same
        mode); refuses a symbolic link or anything that is not a regular file.

        An existing file is never opened here: closing a descriptor of a file drops
        every POSIX lock this process holds on it, SQLite's included (another sink of
        this process may hold this spool), so it is only looked at (lstat).
        """
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:  # also a symlink, dangling or not
            st = os.lstat(self.path)
            if not stat.S_ISREG(st.st_mode):
                raise _NotAFile("not a regular file") from None
            if st.st_mode & 0o077:
                os.chmod(self.path, 0o600)
            return
        os.close(fd)

    @staticmethod
    def _setup(db: sqlite3.Connection) -> tuple[int, int]:
        """Settings, table, lock; the depth, read by a scan of every row (which finds most
        corruption now rather than halfway through a delivery)."""
        db.execute("PRAGMA locking_mode = EXCLUSIVE")
        db.execute(f"PRAGMA page_size = {PAGE_SIZE}")  # these two: only on a new, empty file
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()
        if not mode or str(mode[0]).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot use WAL mode (journal_mode {mode!r})")
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
        db.execute("BEGIN IMMEDIATE")  # takes the write lock now, and keeps it (EXCLUSIVE)
        try:
            db.execute("CREATE TABLE IF NOT EXISTS spool "
                       "(seq INTEGER PRIMARY KEY, json BLOB NOT NULL, text TEXT NOT NULL)")
            columns = [row[1] for row in db.execute("PRAGMA table_info(spool)")]
            if columns != _COLUMNS:
                raise _BadSchema(f"unexpected table layout {columns!r}")
            events, size = db.execute(_SQL_DEPTH).fetchone()
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return int(events), int(size)

    def _set_aside(self, why: str) -> None:
        """Renames a bad database (and its WAL) aside so that a fresh one can start."""
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 0
        while target.exists() or target.is_symlink():
            n += 1
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
        try:
            os.rename(self.path, target)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise SpoolError(f"spool {str(self.path)!r} is unusable ({why}) and cannot be set aside: "
                             f"{exc.strerror or exc}") from None
        for suffix in ("-wal", "-shm", "-journal"):
            side = self.path.with_name(self.path.name + suffix)
            with contextlib.suppress(OSError):
                if suffix == "-wal":
                    os.rename(side, target.with_name(target.name + suffix))
                else:
                    os.unlink(side)
        log.error("spool database unusable: set aside, a fresh one started", output=self.name,
                  reason=why, kept_as=str(target), events_lost=self._events)

    def _corrupt(self, exc: sqlite3.Error) -> None:
        """The database went bad while in use: counted, set aside, and a fresh one opened."""
        lost = self._events
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None
        self._set_aside(str(exc))
        self.dropped_corrupt += lost
        self._events = self._bytes = 0
        self._connect(1.0)

    # ------------------------------------------------------------ use

    @property
    def depth(self) -> tuple[int, int]:
        """(events, bytes) in the spool now; (0, 0) until it is ready."""
        return self._events, self._bytes

    @property
    def dropped(self) -> int:
        """Every event the spool lost: to make room, and with a corrupt file."""
        return self.dropped_full + self.dropped_corrupt

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            if self._closed:
                raise SpoolError(f"spool {self.name} is closed")
            raise SpoolBusy(f"spool {str(self.path)!r} is in use by another sink or process")
        return self._db

    def append(self, records: Sequence[Record]) -> int:
        """Adds the records after every row, in one transaction; returns how many events were
        dropped to keep within `max_bytes` (the oldest rows first, then, for a batch larger
        than the whole spool, its own oldest records). SpoolError if it cannot be written."""
        if not records:
            return 0
        sizes = [record_size(r) for r in records]
        total = sum(sizes)
        skip = 0
        while total > self.max_bytes:  # larger than the spool itself: its oldest records go
            total -= sizes[skip]
            skip += 1
        for attempt in (1, 2):
            try:
                dropped_rows, freed = self._append(records, skip, total)
                break
            except sqlite3.Error as exc:
                if attempt == 1 and _unusable(exc):
                    self._corrupt(exc)
                    continue
                raise SpoolError(f"spool {str(self.path)!r}: {_why(exc)}") from None
        self._events += len(records) - skip - dropped_rows
        self._bytes += total - freed
        self.dropped_full += dropped_rows + skip
        if not self._events:
            self._bytes = 0
        return dropped_rows + skip

    def _append(self, records: Sequence[Record], skip: int, total: int) -> tuple[int, int]:
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            dropped = freed = 0
            need = self._bytes + total - self.max_bytes
            last = None
            while need > freed:
                rows = db.execute(_SQL_OLDEST_SIZES, (last if last is not None else -1, _DROP_CHUNK)).fetchall()
                if not rows:
                    break
                for seq, size in rows:
                    last = seq
                    dropped += 1
                    freed += size
                    if freed >= need:
                        break
            if last is not None:
                db.execute("DELETE FROM spool WHERE seq <= ?", (last,))
            db.executemany("INSERT INTO spool (json, text) VALUES (?, ?)",
                           ((r.json, r.text) for r in records[skip:]))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return dropped, freed

    def oldest(self, n: int) -> list[tuple[int, Record]]:
        """The `n` oldest rows, (seq, Record), oldest first; they stay until deleted."""
        for attempt in (1, 2):
            try:
                rows = self._conn().execute("SELECT seq, json, text FROM spool ORDER BY seq LIMIT ?",
                                            (max(0, n),)).fetchall()
                return [(seq, Record(bytes(data), text)) for seq, data, text in rows]
            except sqlite3.Error as exc:
                if attempt == 1 and _unusable(exc):
                    self._corrupt(exc)
                    continue
                raise SpoolError(f"spool {str(self.path)!r}: {_why(exc)}") from None
        return []

    def delete(self, seqs: Iterable[int]) -> None:
        """Removes these rows (delivered, or refused for good), in one transaction."""
        wanted = sorted(set(seqs))
        if wanted:
            self._delete(_SQL_DELETE_SEQS, (str(wanted),))

    def delete_through(self, seq: int) -> None:
        """Removes every row up to and including `seq`."""
        self._delete(_SQL_DELETE_THROUGH, (seq,))

    def _delete(self, sql: str, args: tuple[object, ...]) -> None:
        db = self._conn()
        try:
            db.execute("BEGIN IMMEDIATE")
            try:
                sizes = db.execute(sql, args).fetchall()
                db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            if _unusable(exc):
                self._corrupt(exc)  # what was to be deleted is gone with the rest
                return
            raise SpoolError(f"spool {str(self.path)!r}: {_why(exc)}") from None
        self._events -= len(sizes)
        self._bytes -= sum(size for (size,) in sizes)
        if self._events <= 0:
            self._events = self._bytes = 0
            with contextlib.suppress(sqlite3.Error):
                db.execute("PRAGMA incremental_vacuum")  # the outage is over: give the disk back

    def close(self) -> None:
        """Closes the database (its WAL is checkpointed and removed); idempotent."""
        self._closed = True
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


class _NotAFile(OSError):
    """The spool's path is a symlink, a directory or a device: set it aside."""


class _BadSchema(Exception):
    """The database has a `spool` table of another layout (not ours)."""


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)
