"""The `journald` output: one journal entry per event, through the native protocol.

systemd's native protocol (systemd.io/JOURNAL_NATIVE_PROTOCOL): one datagram
per entry on the AF_UNIX SOCK_DGRAM socket `/run/systemd/journal/socket`,
made of fields, each either `KEY=value\\n` or, for a value that holds a
newline, `KEY\\n`, the value's length as a 64-bit little-endian integer,
the value and `\\n`. An entry too large for one datagram goes in a sealed
memfd whose descriptor is the datagram's only content (SCM_RIGHTS).

The entry's fields:
- `MESSAGE`: the one-line text view (`journalctl` shows it);
- `PRIORITY`: the syslog severity (tracer.outputs.syslog.severity_of: drops
  are warnings), `SYSLOG_FACILITY` (`daemon` by default) and
  `SYSLOG_IDENTIFIER`, so `journalctl -t tracer -p warning` and journald's
  forwarding to syslog work as for any daemon;
- `TRACER_*`: the facts people filter on (`journalctl TRACER_REASON=NO_SOCKET`,
  `TRACER_TABLE=fw`), each only when the event has it (`FIELDS`);
- `TRACER_JSON`: the whole event, for a SIEM that reads the journal
  (Filebeat's or Vector's journald input, Splunk's journald input).

Values come from the event, and names in it (tables, chains, rule comments,
namespace names) are chosen by whoever owns a namespace: a newline in one
would start a field of the sender's choosing in the simple form. Every value
holding a newline is therefore written in the binary form, where the length
says where it ends and any byte is data; the field names are constants.

journald takes the entry's time as the time it receives it: `TRACER_TIMESTAMP`
keeps the drop's own time (`@timestamp`), which differs for spooled events.
Note journald's rate limit (RateLimitBurst=10000 per 30 s per unit by
default): the service should set `LogRateLimitIntervalSec=0` or the journal
drops events silently beyond it.
"""

from __future__ import annotations

import array
import contextlib
import errno
import fcntl
import os
import re
import socket
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tracer.config import ConfigError
from tracer.outputs.syslog import facility_number, severity_of
from tracer.outputs.transport import OutputDown, Record, SendResult

#: TRACER_* field and the path of its value in the event document.
FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("TRACER_TIMESTAMP", ("@timestamp",)),
    ("TRACER_DATASET", ("event", "dataset")),
    ("TRACER_ACTION", ("event", "action")),
    ("TRACER_COUNT", ("event", "count")),
    ("TRACER_REASON", ("drop", "reason")),
    ("TRACER_RULE", ("netfilter", "rule", "text")),
    ("TRACER_RULE_HANDLE", ("netfilter", "rule", "handle")),
    ("TRACER_RULE_COMMENT", ("netfilter", "rule", "comment")),
    ("TRACER_TABLE", ("netfilter", "table")),
    ("TRACER_CHAIN", ("netfilter", "chain")),
    ("TRACER_HOOK", ("netfilter", "hook")),
    ("TRACER_NETNS", ("netns", "name")),
    ("TRACER_NETNS_INODE", ("netns", "inode")),
    ("TRACER_SRC", ("source", "ip")),
    ("TRACER_DST", ("destination", "ip")),
    ("TRACER_SPORT", ("source", "port")),
    ("TRACER_DPORT", ("destination", "port")),
    ("TRACER_PROTO", ("network", "transport")),
)
#: What journald accepts as a field name from a client (journal_field_valid).
FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")
#: Seconds a send may wait for journald to make room (a unix datagram socket blocks when its queue is full).
SEND_TIMEOUT = 5.0
MAX_BATCH = 256
_SEALS = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE | fcntl.F_SEAL_SEAL
_IDENTIFIER = re.compile(r"[\x21-\x7e]{1,64}")


def field(name: bytes, value: bytes) -> bytes:
    """One field: `NAME=value\\n`, or the binary form when the value holds a newline."""
    if b"\n" in value:
        return b"%s\n%s%s\n" % (name, struct.pack("<Q", len(value)), value)
    return b"%s=%s\n" % (name, value)


def _value(doc: Mapping[str, Any], path: tuple[str, ...]) -> bytes | None:
    value: Any = doc
    for key in path:
        if not isinstance(value, Mapping):
            return None
        value = value.get(key)
    if isinstance(value, bool):
        return b"true" if value else b"false"
    if isinstance(value, int | float):
        return str(value).encode("ascii")
    if isinstance(value, str):
        return value.encode("utf-8", "surrogateescape")
    return None  # absent, null (a policy drop's rule) or a list/object: not a field


def entry(record: Record, head: bytes) -> bytes:
    """The datagram of one record; `head` holds the fields every entry shares (identifier, facility)."""
    doc = record.doc()
    parts = [field(b"MESSAGE", record.text.encode("utf-8", "backslashreplace")),
             b"PRIORITY=%d\n" % severity_of(doc), head]
    for name, path in FIELDS:
        value = _value(doc, path)
        if value is not None:
            parts.append(field(name.encode("ascii"), value))
    parts.append(field(b"TRACER_JSON", record.json))
    return b"".join(parts)


@dataclass(frozen=True)
class Options:
    """The keys of a `[[output]] type = "journald"` table."""

    socket: str = "/run/systemd/journal/socket"
    identifier: str = "tracer"
    #: SYSLOG_FACILITY: what journald uses when it forwards entries to syslog.
    facility: str = "daemon"

    def check(self) -> None:
        if not self.socket.startswith("/") or "\0" in self.socket:
            raise ConfigError(f"socket: {self.socket!r}: the absolute path of journald's native socket")
        if not _IDENTIFIER.fullmatch(self.identifier):
            raise ConfigError(f"identifier: {self.identifier!r}: 1 to 64 printable US-ASCII characters without spaces")
        facility_number(self.facility)

    def transport(self) -> JournaldTransport:
        head = field(b"SYSLOG_IDENTIFIER", self.identifier.encode("ascii")) + \
            b"SYSLOG_FACILITY=%d\n" % facility_number(self.facility)
        return JournaldTransport(self.socket, head)


class JournaldTransport:
    """Entries to journald's native socket, one datagram (or memfd) each.

    The socket is not connected: each datagram is addressed to the path, so a
    journald that restarted (a new socket at the same path) is reached without
    reopening. An error on the first record of a batch means nothing was taken
    (OutputDown); on a later one, the records before it were, and only the
    rest is returned for a retry.
    """

    max_batch = MAX_BATCH

    def __init__(self, path: str, head: bytes, timeout: float = SEND_TIMEOUT) -> None:
        self.path = path
        self.name = f"journald {path}"
        self._head = head
        self._timeout = timeout
        self._sock: socket.socket | None = None

    def open(self) -> None:
        self.close()
        if not os.path.exists(self.path):
            raise OutputDown(f"{self.path} does not exist (is systemd-journald running?)")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        sock.settimeout(self._timeout)
        self._sock = sock

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()

    def send(self, records: Sequence[Record]) -> SendResult:
        if self._sock is None:
            raise OutputDown("not open")
        for i, record in enumerate(records):
            try:
                self._send_one(entry(record, self._head))
            except OSError as exc:
                if i == 0:
                    raise OutputDown(_why(exc, self.path)) from None
                return SendResult(retry=tuple(range(i, len(records))))
        return SendResult()

    def _send_one(self, data: bytes) -> None:
        sock = self._sock
        assert sock is not None
        try:
            sock.sendto(data, self.path)
        except OSError as exc:
            if exc.errno not in (errno.EMSGSIZE, errno.ENOBUFS):
                raise
            self._send_memfd(data)

    def _send_memfd(self, data: bytes) -> None:
        """Too large for a datagram: the entry in a sealed memfd, passed as the datagram's only content.

        journald accepts a memfd only sealed, so that the sender cannot change
        it while it is read.
        """
        sock = self._sock
        assert sock is not None
        fd = os.memfd_create("tracer-journal-entry", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            sock.sendmsg([], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))], 0, self.path)
        finally:
            os.close(fd)


def _why(exc: OSError, path: str) -> str:
    if isinstance(exc, TimeoutError | socket.timeout):
        return f"timed out: journald is not reading {path}"
    if exc.errno in (errno.ENOENT, errno.ECONNREFUSED):
        return f"nothing listens on {path} ({errno.errorcode[exc.errno]}): is systemd-journald running?"
    if exc.errno is not None:
        return f"{path}: {os.strerror(exc.errno).lower()} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return f"{path}: {exc}"
