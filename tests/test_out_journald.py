"""The journald output: against a real systemd-journald the test starts, and on a socket the test owns.

The real journald runs in namespaces of its own (user, mount, network):
its /run/systemd/journal, /run/log, /var/log/journal and journald.conf are
directories and a file under the test's tmp dir, bind-mounted there, so the
host's journal and sockets are never touched, and in a user namespace it
cannot change the host's audit settings (journald 252 enables audit at
start). Entries are read back with `journalctl -D DIR -o json`.

The framing tests parse datagrams with a parser written here from the
protocol's description (systemd.io/JOURNAL_NATIVE_PROTOCOL), independent of
the transport's code.
"""

from __future__ import annotations

import array
import fcntl
import json
import os
import signal
import socket
import struct
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support import doc_examples, stop_process, wait_for_n, wait_started
from tests.test_out_syslog import HOSTILE, down_then_back, drop_record, notice_record
from tracer.config import ConfigError
from tracer.outputs import journald
from tracer.outputs.transport import OutputDown, Record, SendResult

JOURNALD = "/lib/systemd/systemd-journald"

#: A comment that tries to end its field and start others, in both of the protocol's forms.
INJECTION = "legacy\nTRACER_REASON=FAKE\nPRIORITY=0\nINJECTED\n\x05\x00\x00\x00\x00\x00\x00\x00EVIL!\n" + HOSTILE

START = """set -e
root=$1
mount -t tmpfs tmpfs /run/systemd
mkdir /run/systemd/journal
mount --bind "$root/run" /run/systemd/journal
mount --bind "$root/runlog" /run/log
if [ -d /var/log/journal ]; then mount --bind "$root/varlog" /var/log/journal; fi
mount --bind "$root/journald.conf" /etc/systemd/journald.conf
exec /lib/systemd/systemd-journald
"""

CONF = """[Journal]
Storage=volatile
ForwardToSyslog=no
ForwardToKMsg=no
ForwardToConsole=no
ForwardToWall=no
ReadKMsg=no
RateLimitIntervalSec=0
"""


# ------------------------------------------------------------ an independent parser of the protocol


def parse_fields(data: bytes) -> list[tuple[str, bytes]]:
    """A native-protocol datagram as (name, value) pairs, in order; AssertionError on any framing fault."""
    out = []
    i = 0
    while i < len(data):
        end = data.index(b"\n", i)
        line = data[i:end]
        if b"=" in line:
            name, value = line.split(b"=", 1)
            i = end + 1
        else:
            name = line
            (length,) = struct.unpack("<Q", data[end + 1:end + 9])
            value = data[end + 9:end + 9 + length]
            assert len(value) == length, "binary value cut short"
            assert data[end + 9 + length:end + 10 + length] == b"\n", "binary value not followed by a newline"
            i = end + 10 + length
        assert journald.FIELD_NAME.fullmatch(name.decode("ascii")), f"bad field name {name!r}"
        out.append((name.decode("ascii"), value))
    return out


def as_dict(fields: list[tuple[str, bytes]]) -> dict[str, bytes]:
    names = [n for n, _ in fields]
    assert len(names) == len(set(names)), f"a field appears twice: {names}"
    return dict(fields)


class OwnSocket:
    """A datagram socket the test binds where journald's would be, and reads like journald."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
        self.sock.settimeout(5)

    def receive(self) -> tuple[bytes, bool]:
        """The next entry's bytes, and whether it came in a memfd."""
        fds = array.array("i")
        data, ancdata, _, _ = self.sock.recvmsg(1 << 20, socket.CMSG_SPACE(4 * fds.itemsize))
        for level, kind, payload in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(payload[: len(payload) - len(payload) % fds.itemsize])
        if not fds:
            return data, False
        assert data == b"" and len(fds) == 1
        fd = fds[0]
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            assert seals & fcntl.F_SEAL_WRITE and seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
            size = os.fstat(fd).st_size
            return os.pread(fd, size, 0), True
        finally:
            os.close(fd)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def own(tmp_path: Path) -> Iterator[OwnSocket]:
    s = OwnSocket(tmp_path / "socket")
    yield s
    s.close()


def transport_to(path: str, **kw: Any) -> journald.JournaldTransport:
    options = journald.Options(socket=path, **kw)
    options.check()
    t = options.transport()
    t.open()
    return t


def timed_sends(t: journald.JournaldTransport, records: list[Record], total: int) -> float:
    """Sends `records` again and again until `total` are sent, each batch taken whole; closes `t`.
    Returns the seconds the sends took."""
    try:
        started = time.perf_counter()
        for _ in range(total // len(records)):
            assert t.send(records) == SendResult()
        return time.perf_counter() - started
    finally:
        t.close()


# ------------------------------------------------------------ framing, on the test's socket


def test_fields_and_values_as_the_protocol_frames_them(own: OwnSocket) -> None:
    record = drop_record(INJECTION)
    t = transport_to(own.path, identifier="tracer-test")
    try:
        assert t.send([record]) == SendResult()
    finally:
        t.close()
    data, in_memfd = own.receive()
    assert not in_memfd
    fields = as_dict(parse_fields(data))
    doc = record.doc()
    assert fields["MESSAGE"] == record.text.encode()
    assert fields["PRIORITY"] == b"4"
    assert fields["SYSLOG_IDENTIFIER"] == b"tracer-test"
    assert fields["SYSLOG_FACILITY"] == b"3"
    assert fields["TRACER_RULE_COMMENT"] == INJECTION.encode()
    assert fields["TRACER_REASON"] == b"NETFILTER_DROP"
    assert "INJECTED" not in fields and "EVIL" not in fields
    assert orjson.loads(fields["TRACER_JSON"]) == doc
    assert fields["TRACER_RULE"] == b"tcp dport 443 drop"
    assert fields["TRACER_RULE_HANDLE"] == b"4"
    assert fields["TRACER_TABLE"] == b"fw" and fields["TRACER_CHAIN"] == b"web" and fields["TRACER_HOOK"] == b"input"
    assert fields["TRACER_NETNS"] == b"lab-server" and fields["TRACER_NETNS_INODE"] == b"4026532211"
    assert (fields["TRACER_SRC"], fields["TRACER_DST"]) == (b"198.18.0.1", b"198.18.0.2")
    assert (fields["TRACER_SPORT"], fields["TRACER_DPORT"], fields["TRACER_PROTO"]) == (b"40000", b"443", b"tcp")
    assert fields["TRACER_COUNT"] == b"1" and fields["TRACER_DATASET"] == b"tracer.drop"
    assert fields["TRACER_ACTION"] == b"dropped"
    assert fields["TRACER_TIMESTAMP"] == doc["@timestamp"].encode()
    # The comment went in the binary form: its newlines are data.
    assert b"TRACER_RULE_COMMENT\n" + struct.pack("<Q", len(INJECTION.encode())) in data


def lookup(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        doc = doc.get(key) if isinstance(doc, dict) else None  # type: ignore[assignment]
    return doc


@pytest.mark.parametrize("doc", doc_examples() + doc_examples(notices=True),
                         ids=lambda d: f"{d['event']['dataset']}-{d['event']['action']}")
def test_a_field_is_there_exactly_when_the_event_has_it(own: OwnSocket, doc: dict[str, Any]) -> None:
    record = Record(orjson.dumps(doc), "text")
    t = transport_to(own.path)
    try:
        t.send([record])
    finally:
        t.close()
    fields = as_dict(parse_fields(own.receive()[0]))
    for name, path in journald.FIELDS:
        value = lookup(doc, path)
        if value is None or isinstance(value, list | dict):
            assert name not in fields
        else:
            expected = str(value).lower() if isinstance(value, bool) else str(value)
            assert fields[name] == expected.encode(), name
    assert orjson.loads(fields["TRACER_JSON"]) == doc


def test_field_names_are_what_journald_accepts() -> None:
    names = [name for name, _ in journald.FIELDS] + ["MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER", "TRACER_JSON"]
    for name in names:
        assert journald.FIELD_NAME.fullmatch(name) and not name.startswith("_") and len(name) <= 64


def test_a_large_event_goes_through_a_sealed_memfd(own: OwnSocket) -> None:
    record = drop_record(stack=tuple(f"frame_number_{i}+0x{i:x}" for i in range(20000)))
    small = drop_record("small")
    sndbuf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    assert len(record.json) > sndbuf
    t = transport_to(own.path)
    try:
        assert t.send([small, record, small]) == SendResult()
    finally:
        t.close()
    got = [own.receive() for _ in range(3)]
    assert [m for _, m in got] == [False, True, False]
    fields = as_dict(parse_fields(got[1][0]))
    assert fields["TRACER_JSON"] == record.json


def test_severity_follows_the_event(own: OwnSocket) -> None:
    t = transport_to(own.path, facility="local1")
    try:
        t.send([notice_record("tracer.conntrack", "conntrack_table_full_drop", 80),
                notice_record("tracer.loss", "events_lost", 40, kind="event")])
    finally:
        t.close()
    first, second = (as_dict(parse_fields(own.receive()[0])) for _ in range(2))
    assert (first["PRIORITY"], second["PRIORITY"], first["SYSLOG_FACILITY"]) == (b"3", b"4", b"17")
    assert "TRACER_REASON" not in first and first["TRACER_ACTION"] == b"conntrack_table_full_drop"


def test_no_journald_is_output_down(tmp_path: Path) -> None:
    path = str(tmp_path / "socket")
    t = journald.Options(socket=path).transport()
    with pytest.raises(OutputDown, match="does not exist"):
        t.open()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    t.open()
    sock.close()  # the file stays, nobody listens
    with pytest.raises(OutputDown, match="ECONNREFUSED"):
        t.send([drop_record()])
    os.unlink(path)
    with pytest.raises(OutputDown, match="ENOENT"):
        t.send([drop_record()])
    t.close()


def test_a_journald_that_stops_reading_gets_only_the_rest_again(own: OwnSocket) -> None:
    t = journald.Options(socket=own.path).transport()
    t = journald.JournaldTransport(t.path, t._head, timeout=0.2)
    t.open()
    try:
        records = [drop_record(f"n{i}") for i in range(journald.MAX_BATCH)]
        result = t.send(records)
        first = result.retry[0]
        assert result.retry == tuple(range(first, len(records)))
        with pytest.raises(OutputDown, match="timed out"):  # still full: nothing of this batch was taken
            t.send(records[first:])
        got = [as_dict(parse_fields(own.receive()[0]))["TRACER_RULE_COMMENT"] for _ in range(first)]
        assert got == [f"n{i}".encode() for i in range(first)]
        own.sock.settimeout(0.2)
        with pytest.raises(TimeoutError):
            own.receive()
    finally:
        t.close()


@pytest.mark.parametrize(("options", "message"), [
    ({"socket": "run/journal"}, "socket: 'run/journal'"),
    ({"identifier": ""}, "identifier: ''"),
    ({"identifier": "two words"}, "identifier:"),
    ({"identifier": "x\ny"}, "identifier:"),
    ({"facility": "nope"}, "facility: 'nope' is not a syslog facility"),
])
def test_check_names_the_key(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        journald.Options(**options).check()
    assert str(err.value).startswith(message)


def test_defaults() -> None:
    journald.Options().check()
    assert journald.Options().transport().name == "journald /run/systemd/journal/socket"


# ------------------------------------------------------------ a real systemd-journald


class Journald:
    """systemd-journald in its own user, mount and network namespaces, its files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for d in ("run", "runlog", "varlog"):
            (root / d).mkdir(exist_ok=True)
        (root / "journald.conf").write_text(CONF)
        (root / "start.sh").write_text(START)
        self.socket = str(root / "run" / "socket")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if not os.path.exists(JOURNALD):
            pytest.fail(f"{JOURNALD} is missing: scripts/install-deps.sh installs systemd")
        self.proc = subprocess.Popen(
            ["unshare", "--user", "--map-root-user", "--mount", "--net", "--propagation", "private",
             "sh", str(self.root / "start.sh"), str(self.root)],
            stdout=subprocess.DEVNULL, stderr=(self.root / "stderr").open("ab"))
        why = wait_started(self.proc, lambda: os.path.exists(self.socket) and bool(self.journal_files()),
                           self.root / "stderr")
        if why is not None:
            pytest.fail(f"systemd-journald {why}")

    def journal_files(self) -> list[Path]:
        return list((self.root / "runlog").glob("journal/*/*.journal"))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 10)
        self.proc = None
        if os.path.exists(self.socket):
            os.unlink(self.socket)  # as systemd would on a real stop; a new journald binds it again

    def entries(self, identifier: str) -> list[dict[str, Any]]:
        (directory,) = {p.parent for p in self.journal_files()}
        out = subprocess.run(["journalctl", "-D", str(directory), "-o", "json", "--all", "--no-pager",
                              f"SYSLOG_IDENTIFIER={identifier}"],
                             capture_output=True, check=True, timeout=30).stdout
        return [json.loads(line) for line in out.splitlines()]

    def wait_entries(self, identifier: str, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        return wait_for_n(lambda: self.entries(identifier), n, timeout, 0.1,
                          lambda got: f"{len(got)} of {n} entries in the journal")


def value_of(entry: dict[str, Any], name: str) -> bytes:
    """journalctl's JSON: a string for printable UTF-8, an array of bytes otherwise."""
    value = entry[name]
    assert not (isinstance(value, list) and value and isinstance(value[0], str | list)), f"{name} appears twice"
    return bytes(value) if isinstance(value, list) else value.encode()


@pytest.fixture
def real_journald(tmp_path: Path) -> Iterator[Journald]:
    j = Journald(tmp_path)
    try:
        j.start()
        yield j
    finally:
        j.stop()


def unique_identifier() -> str:
    return f"tracer-{uuid.uuid4().hex[:12]}"


def test_journald_stores_every_field_intact(real_journald: Journald) -> None:
    ident = unique_identifier()
    records = [drop_record(INJECTION), notice_record("tracer.conntrack", "conntrack_table_full_drop", 80)]
    t = transport_to(real_journald.socket, identifier=ident)
    try:
        assert t.send(records) == SendResult()
    finally:
        t.close()
    drop, alert = real_journald.wait_entries(ident, 2)
    assert value_of(drop, "MESSAGE") == records[0].text.encode()
    assert value_of(drop, "PRIORITY") == b"4" and value_of(alert, "PRIORITY") == b"3"
    assert value_of(drop, "TRACER_RULE_COMMENT") == INJECTION.encode()
    assert value_of(drop, "TRACER_REASON") == b"NETFILTER_DROP"
    assert "INJECTED" not in drop and "EVIL" not in drop
    assert orjson.loads(value_of(drop, "TRACER_JSON")) == records[0].doc()
    assert orjson.loads(value_of(alert, "TRACER_JSON")) == records[1].doc()
    for name, path in journald.FIELDS:
        expected = lookup(records[0].doc(), path)
        if expected is not None:
            assert value_of(drop, name) == str(expected).encode(), name
    assert drop["_TRANSPORT"] == "journal"


def test_journald_takes_a_large_event_through_a_memfd(real_journald: Journald) -> None:
    ident = unique_identifier()
    record = drop_record(stack=tuple(f"frame_number_{i}+0x{i:x}" for i in range(20000)))
    t = transport_to(real_journald.socket, identifier=ident)
    try:
        assert t.send([record, drop_record("after")]) == SendResult()
    finally:
        t.close()
    big, after = real_journald.wait_entries(ident, 2)
    assert value_of(big, "TRACER_JSON") == record.json
    assert value_of(after, "TRACER_RULE_COMMENT") == b"after"


def test_journald_down_then_back(real_journald: Journald) -> None:
    ident = unique_identifier()
    t = transport_to(real_journald.socket, identifier=ident)
    down_then_back(t, real_journald, lambda n: real_journald.wait_entries(ident, n),
                   down="is systemd-journald running")
    got = real_journald.wait_entries(ident, 2)
    assert [value_of(e, "TRACER_RULE_COMMENT") for e in got] == [b"before", b"after"]


def test_journald_throughput(real_journald: Journald) -> None:
    """Entries/s into a real journald (printed; asserted only to be far above need)."""
    ident = unique_identifier()
    records = [drop_record(f"n{i}") for i in range(journald.MAX_BATCH)]
    total = 20 * len(records)
    t = transport_to(real_journald.socket, identifier=ident)
    elapsed = timed_sends(t, records, total)
    assert len(real_journald.wait_entries(ident, total, timeout=60)) == total
    print(f"\njournald: {total} entries in {elapsed:.2f} s = {total / elapsed:,.0f} entries/s (accepted by journald)")
    assert total / elapsed > 1000


def test_own_socket_throughput(own: OwnSocket) -> None:
    """The transport's own cost: datagrams built and sent to a socket a thread drains."""
    import threading

    records = [drop_record(f"n{i}") for i in range(journald.MAX_BATCH)]
    total = 40 * len(records)
    received: list[bytes] = []

    def drain() -> None:
        received.extend(own.sock.recv(1 << 20) for _ in range(total))

    reader = threading.Thread(target=drain)
    reader.start()
    t = transport_to(own.path)
    elapsed = timed_sends(t, records, total)
    reader.join(10)
    assert len(received) == total
    print(f"\njournald framing: {total / elapsed:,.0f} entries/s built and sent")


def test_the_syslog_output_to_journalds_dev_log(real_journald: Journald) -> None:
    """On systemd hosts /dev/log is journald's: the local format gives it identifier, pid and the JSON."""
    from tracer.outputs import syslog

    ident = unique_identifier()
    record = drop_record(INJECTION)
    dev_log = str(Path(real_journald.socket).parent / "dev-log")
    options = syslog.Options(address=f"unix://{dev_log}", app_name=ident)
    options.check()
    t = options.transport()
    t.open()
    try:
        assert t.send([record]) == SendResult()
    finally:
        t.close()
    (got,) = real_journald.wait_entries(ident, 1)
    assert got["_TRANSPORT"] == "syslog" and got["SYSLOG_PID"] == str(os.getpid()) and got["PRIORITY"] == "4"
    assert orjson.loads(value_of(got, "MESSAGE")) == record.doc()
