"""The syslog output against a real rsyslogd that each test starts, over UDP, TCP, TLS and unix sockets.

rsyslog writes what it parsed out of each message (PRI, TIMESTAMP,
HOSTNAME, APP-NAME, PROCID, MSGID, STRUCTURED-DATA, MSG) one input per
file, so every assertion is about what a real receiver understood, not
about the bytes the transport believes it wrote.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import orjson
import pytest
import trustme

from tests.support import stop_process, wait_for_n, wait_started
from tests.test_event_model import RULE_DROP, full_event
from tracer.config import ConfigError
from tracer.event.rendered import Rendered
from tracer.event.sections import Rule
from tracer.outputs import syslog
from tracer.outputs.transport import OutputDown, Record, SendResult, Transport

#: A rule comment an unprivileged namespace owner could choose: a fake second
#: message after a newline, quotes and brackets that end SD and JSON strings,
#: a backslash, a right-to-left override, control bytes, DEL, non-ASCII and a
#: character outside the BMP.
HOSTILE = 'x\n<13>1 - evil - - - [a="b"] fake\r\t"]\\\\u0041\u202e\x00\x1b[31m\x7f\xe9\u4e2d\U0001f525 end'

FIELDS = ("input", "pri", "timestamp", "hostname", "app", "procid", "msgid", "sd", "msg")


def drop_record(comment: str | None = "legacy block", stack: tuple[str, ...] | None = None) -> Record:
    """A drop event as the queued sink holds it: the model's JSON (no newline) and its text line."""
    changes: dict[str, Any] = {"netfilter": replace(RULE_DROP, rule=Rule(4, "tcp dport 443 drop", comment))}
    if stack is not None:
        base = full_event().drop
        changes["drop"] = replace(base, stack=stack)
    rendered = Rendered(full_event(**changes))
    return Record(rendered.json().rstrip(b"\n"), rendered.text())


def notice_record(dataset: str, action: str, severity: int, kind: str = "alert") -> Record:
    doc = {"@timestamp": "2026-12-01T13:09:52.489628Z", "ecs": {"version": "8.11.0"},
           "event": {"kind": kind, "category": ["network"], "type": ["info"], "action": action,
                     "dataset": dataset, "severity": severity},
           "message": f"{action} happened", "observer": {"hostname": "web-1", "type": "host"}}
    return Record(orjson.dumps(doc), f"ALERT  {action} happened")


class Restartable(Protocol):
    """A receiver a test stops and starts again (Rsyslog here, Journald in tests/test_out_journald.py)."""

    def stop(self) -> None: ...

    def start(self) -> None: ...


def down_then_back(t: Transport, receiver: Restartable, wait: Callable[[int], object],
                   down: str | None = None) -> None:
    """Sends "before" on the open `t`, stops `receiver`: the send and a reopen raise OutputDown
    (the send's message matching `down`); starts it: a reopen sends "after". `t` is closed after
    each failure as the queued sink closes it, and at the end; `wait(n)` waits until the receiver
    has n records. The caller reads the two records back."""
    try:
        assert t.send([drop_record("before")]) == SendResult()
        wait(1)
        receiver.stop()
        with pytest.raises(OutputDown, match=down):
            t.send([drop_record("while down")])
        t.close()
        with pytest.raises(OutputDown):
            t.open()
        receiver.start()
        t.close()
        t.open()
        assert t.send([drop_record("after")]) == SendResult()
    finally:
        t.close()


# ------------------------------------------------------------ a real rsyslogd


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Certs:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that signed nothing rsyslog has


class Rsyslog:
    """rsyslogd -n with a config of its own: every input writes its own file of parsed fields."""

    INPUTS = ("udp", "tcp", "tls", "uxlocal", "ux5424")

    def __init__(self, root: Path, certs: Certs) -> None:
        self.root = root
        self.certs = certs
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.tcp_port = free_port(socket.SOCK_STREAM)
        self.tls_port = free_port(socket.SOCK_STREAM)
        # Two local sockets: rsyslog's default special parser, and the RFC 5424-capable generic chain.
        self.local_socket = root / "log.sock"
        self.rfc5424_socket = root / "log5424.sock"
        self.proc: subprocess.Popen[bytes] | None = None
        (root / "rsyslog.conf").write_text(self._config())

    def _config(self) -> str:
        r, c = self.root, self.certs
        template = "|".join(f"%{p}%" for p in (
            "inputname", "pri", "timereported:::date-rfc3339", "hostname", "app-name", "procid", "msgid",
            "structured-data", "msg"))
        rulesets = "\n".join(
            f'ruleset(name="{name}") {{ action(type="omfile" file="{r}/{name}.log" template="fields") }}'
            for name in self.INPUTS)
        # maxMessageSize takes effect only in the legacy form, before any module is loaded.
        return f"""
$MaxMessageSize 64k
global(workDirectory="{r}")
module(load="imuxsock" SysSock.Use="off")
module(load="imudp")
module(load="imtcp")
template(name="fields" type="string" string="{template}\\n")
{rulesets}
input(type="imudp" address="127.0.0.1" port="{self.udp_port}" ruleset="udp" rcvbufSize="16m")
input(type="imtcp" address="127.0.0.1" port="{self.tcp_port}" ruleset="tcp")
input(type="imtcp" address="127.0.0.1" port="{self.tls_port}" ruleset="tls"
      streamDriver.name="ossl" streamDriver.mode="1" streamDriver.authMode="anon"
      streamDriver.CAFile="{c.ca}" streamDriver.CertFile="{c.cert}" streamDriver.KeyFile="{c.key}")
input(type="imuxsock" Socket="{self.local_socket}" ruleset="uxlocal" RateLimit.Interval="0")
input(type="imuxsock" Socket="{self.rfc5424_socket}" ruleset="ux5424" RateLimit.Interval="0"
      UseSpecialParser="off" ParseHostname="on" IgnoreTimestamp="off")
"""

    def start(self) -> None:
        conf, pidfile = self.root / "rsyslog.conf", self.root / "rsyslogd.pid"
        self.proc = subprocess.Popen(["rsyslogd", "-n", "-f", str(conf), "-i", str(pidfile)],
                                     stdout=subprocess.DEVNULL, stderr=(self.root / "stderr").open("ab"))
        if (why := wait_started(self.proc, self._ready, self.root / "stderr")) is not None:
            raise RuntimeError(f"rsyslogd {why} (its inputs)")

    def _ready(self) -> bool:
        if not (self.local_socket.exists() and self.rfc5424_socket.exists()):
            return False
        try:
            socket.create_connection(("127.0.0.1", self.tcp_port), timeout=1).close()
            context = ssl.create_default_context(cafile=str(self.certs.ca))
            with socket.create_connection(("127.0.0.1", self.tls_port), timeout=1) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.unwrap()
        except OSError:
            return False
        # UDP: a datagram to a port nobody has bound yet comes back as ECONNREFUSED.
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("127.0.0.1", self.udp_port))
            try:
                s.send(b"<13>1 - - probe - probe - ready")
                time.sleep(0.02)
                s.send(b"<13>1 - - probe - probe - ready")
            except ConnectionRefusedError:
                return False
        return True

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc, signal.SIGTERM, 10)
        self.proc = None

    def lines(self, name: str) -> list[dict[str, str]]:
        """What rsyslog parsed from each message on input `name` (probes left out)."""
        path = self.root / f"{name}.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
            parsed = dict(zip(FIELDS, line.split("|", len(FIELDS) - 1), strict=True))
            if parsed["app"] != "probe":
                out.append(parsed)
        return out

    def wait_count(self, name: str, n: int, timeout: float = 60.0) -> int:
        """Until `n` messages are in the file or it stops growing for a second; how many are."""
        path = self.root / f"{name}.log"
        deadline = time.monotonic() + timeout
        last, still = -1, time.monotonic()
        while time.monotonic() < deadline:
            data = path.read_bytes() if path.exists() else b""
            count = sum(1 for line in data.splitlines() if b"|probe|" not in line)
            if count >= n:
                return count
            if count != last:
                last, still = count, time.monotonic()
            elif time.monotonic() - still > 1.0:
                return count
            time.sleep(0.01)
        return last

    def wait_lines(self, name: str, n: int, timeout: float = 10.0) -> list[dict[str, str]]:
        return wait_for_n(lambda: self.lines(name), n, timeout, 0.05,
                          lambda got: f"{name}: {len(got)} of {n} messages arrived: {got[-3:]}")


def make_certs(d: Path) -> Certs:
    """rsyslog's server certificate, its CA, and a CA that signed nothing (trustme), in `d`."""
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    server.private_key_pem.write_to_path(str(d / "key.pem"))
    trustme.CA().cert_pem.write_to_path(str(d / "other-ca.pem"))
    return Certs(d / "ca.pem", d / "cert.pem", d / "key.pem", d / "other-ca.pem")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def rsyslog(tmp_path: Path, certs: Certs) -> Iterator[Rsyslog]:
    server = Rsyslog(tmp_path, certs)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def opened(options: syslog.Options) -> Iterator[syslog.SyslogTransport]:
    options.check()
    transport = options.transport()
    transport.open()
    try:
        yield transport
    finally:
        transport.close()


def address_of(rs: Rsyslog, scheme: str) -> str:
    return {
        "udp": f"udp://127.0.0.1:{rs.udp_port}",
        "tcp": f"tcp://127.0.0.1:{rs.tcp_port}",
        "tls": f"tls://127.0.0.1:{rs.tls_port}",
        "uxlocal": f"unix://{rs.local_socket}",
        "ux5424": f"unix://{rs.rfc5424_socket}",
    }[scheme]


# ------------------------------------------------------------ RFC 5424 as rsyslog parses it


@pytest.mark.parametrize("scheme", ["udp", "tcp", "tls", "ux5424"])
def test_rsyslog_parses_every_header_field_and_the_json(rsyslog: Rsyslog, certs: Certs, scheme: str) -> None:
    options = syslog.Options(address=address_of(rsyslog, scheme), facility="local3", app_name="tracer-test",
                             hostname="web-1.example", ca_file=str(certs.ca) if scheme == "tls" else None,
                             format="rfc5424")
    records = [drop_record(), notice_record("tracer.conntrack", "conntrack_table_full_drop", 80),
               notice_record("tracer.loss", "events_held_back", 20, kind="event")]
    with opened(options) as t:
        assert t.send(records) == SendResult()
    got = rsyslog.wait_lines(scheme, 3)
    assert [g["pri"] for g in got] == [str(19 * 8 + 4), str(19 * 8 + 3), str(19 * 8 + 5)]
    assert [g["msgid"] for g in got] == ["drop", "conntrack", "loss"]
    assert {g["hostname"] for g in got} == {"web-1.example"}
    assert {g["app"] for g in got} == {"tracer-test"}
    assert {g["procid"] for g in got} == {str(os.getpid())}
    assert {g["sd"] for g in got} == {"-"}
    # rsyslog prints the reported time in its own RFC 3339 form: the same instant, to the microsecond.
    assert got[0]["timestamp"] in ("2026-11-21T11:50:00.123456Z", "2026-11-21T11:50:00.123456+00:00")
    assert [orjson.loads(g["msg"]) for g in got] == [r.doc() for r in records]


def test_the_local_socket_gets_the_format_rsyslogs_default_parser_reads(rsyslog: Rsyslog) -> None:
    """imuxsock's special parser (its default) reads glibc's format: tag, pid and the JSON intact."""
    record = drop_record()
    with opened(syslog.Options(address=address_of(rsyslog, "uxlocal"))) as t:
        assert t.send([record]) == SendResult()
    (got,) = rsyslog.wait_lines("uxlocal", 1)
    assert (got["pri"], got["app"], got["procid"]) == (str(3 * 8 + 4), "tracer", str(os.getpid()))
    assert orjson.loads(got["msg"]) == record.doc()


@pytest.mark.parametrize("scheme", ["udp", "tcp", "tls", "uxlocal"])
def test_hostile_rule_comments_arrive_intact_as_json(rsyslog: Rsyslog, certs: Certs, scheme: str) -> None:
    records = [drop_record(HOSTILE), drop_record("after")]
    options = syslog.Options(address=address_of(rsyslog, scheme), ca_file=str(certs.ca) if scheme == "tls" else None)
    with opened(options) as t:
        assert t.send(records) == SendResult()
    got = rsyslog.wait_lines(scheme, 2)
    assert len(got) == 2, "the newline in the comment made no second message"
    docs = [orjson.loads(g["msg"]) for g in got]
    assert docs[0]["netfilter"]["rule"]["comment"] == HOSTILE
    assert docs == [r.doc() for r in records]
    assert got[0]["msg"].isascii()


def test_tcp_batches_are_octet_counted_in_one_write(rsyslog: Rsyslog) -> None:
    """A batch is one write with several frames; rsyslog splits it into exactly these messages."""
    records = [drop_record(f"n{i}") for i in range(200)]
    with opened(syslog.Options(address=address_of(rsyslog, "tcp"))) as t:
        assert t.send(records) == SendResult()
        assert t.send(records[:1]) == SendResult()
    got = rsyslog.wait_lines("tcp", 201)
    comments = [orjson.loads(g["msg"])["netfilter"]["rule"]["comment"] for g in got]
    assert comments == [f"n{i}" for i in range(200)] + ["n0"]


def test_tcp_wire_format_is_len_sp_msg() -> None:
    """The exact bytes on a socket the test owns: `LEN SP MSG`, LEN the octets of MSG, nothing else."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        records = [drop_record("a"), drop_record(HOSTILE)]
        with opened(syslog.Options(address=f"tcp://127.0.0.1:{port}", hostname="h")) as t:
            conn, _ = server.accept()
            t.send(records)
        data = b""
        with conn:
            while chunk := conn.recv(65536):
                data += chunk
    frames = []
    while data:
        length, _, rest = data.partition(b" ")
        frames.append(rest[: int(length)])
        data = rest[int(length):]
    assert len(frames) == 2
    for frame, record in zip(frames, records, strict=True):
        head, _, msg = frame.partition(b" - {")
        assert head.startswith(b"<28>1 2026-11-21T11:50:00.123456Z h tracer ")
        assert head.endswith(b" drop")
        assert orjson.loads(b"{" + msg) == record.doc()
        assert not frame.startswith(b"\xef\xbb\xbf") and b"\xef\xbb\xbf" not in frame


# ------------------------------------------------------------ TLS verification


def test_tls_refuses_a_server_its_ca_did_not_sign(rsyslog: Rsyslog, certs: Certs) -> None:
    t = syslog.Options(address=address_of(rsyslog, "tls"), ca_file=str(certs.other_ca)).transport()
    with pytest.raises(OutputDown, match="certificate failed verification"):
        t.open()
    t.close()


def test_tls_checks_the_server_name(tmp_path: Path) -> None:
    """A server whose certificate (from the right CA) names another host is refused."""
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("other.example").configure_cert(server_context)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]

        def serve() -> None:
            conn, _ = listener.accept()
            with conn, contextlib.suppress(OSError):
                server_context.wrap_socket(conn, server_side=True)

        thread = threading.Thread(target=serve)
        thread.start()
        t = syslog.Options(address=f"tls://127.0.0.1:{port}", ca_file=str(tmp_path / "ca.pem")).transport()
        try:
            with pytest.raises(OutputDown, match=r"IP address mismatch|hostname mismatch"):
                t.open()
        finally:
            t.close()
            thread.join(5)


def test_an_ipv6_literal_address_is_reached() -> None:
    with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as server:
        server.bind(("::1", 0))
        server.settimeout(5)
        port = server.getsockname()[1]
        with opened(syslog.Options(address=f"udp://[::1]:{port}", hostname="h")) as t:
            assert t.name == f"syslog udp://[::1]:{port}"
            t.send([drop_record("v6")])
        assert server.recv(65536).startswith(b"<28>1 2026-11-21T11:50:00.123456Z h tracer ")


# ------------------------------------------------------------ receiver down, then back


@pytest.mark.parametrize("scheme", ["tcp", "tls", "uxlocal"])
def test_rsyslog_down_raises_output_down_and_open_after_restart_works(
        rsyslog: Rsyslog, certs: Certs, scheme: str) -> None:
    options = syslog.Options(address=address_of(rsyslog, scheme), ca_file=str(certs.ca) if scheme == "tls" else None)
    t = options.transport()
    t.open()
    down_then_back(t, rsyslog, lambda n: rsyslog.wait_lines(scheme, n))
    got = rsyslog.wait_lines(scheme, 2)
    assert [orjson.loads(g["msg"])["netfilter"]["rule"]["comment"] for g in got] == ["before", "after"]


def test_udp_receiver_gone_is_output_down_for_the_whole_batch(rsyslog: Rsyslog) -> None:
    """A connected UDP socket hears the ICMP port unreachable; the lost datagram had no error of its own,
    so the batch that hears of it is sent again whole."""
    t = syslog.Options(address=address_of(rsyslog, "udp")).transport()
    try:
        t.open()
        rsyslog.stop()
        for _ in range(20):  # the first datagram to a closed port only brings the ICMP error back
            try:
                assert t.send([drop_record("a"), drop_record("b")]) == SendResult()
            except OutputDown as exc:
                assert "refused" in str(exc)
                break
            time.sleep(0.01)
        else:
            pytest.fail("no OutputDown after 20 batches")
        rsyslog.start()
        t.open()
        assert t.send([drop_record("back")]) == SendResult()
    finally:
        t.close()
    assert [orjson.loads(g["msg"])["netfilter"]["rule"]["comment"] for g in rsyslog.wait_lines("udp", 1)] == ["back"]


def test_a_unix_receiver_that_stops_reading_gets_only_the_rest_again(tmp_path: Path) -> None:
    """Datagrams the receiver's queue took are delivered; the rest comes back as `retry`, after `timeout`."""
    path = str(tmp_path / "dgram.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        t = syslog.Options(address=f"unix://{path}", timeout=0.2).transport()
        t.open()
        try:
            records = [drop_record(f"n{i}") for i in range(syslog.MAX_BATCH)]
            result = t.send(records)
            assert result.retry and result.retry == tuple(range(result.retry[0], len(records)))
            server.setblocking(False)
            got = []
            with contextlib.suppress(BlockingIOError):
                while True:
                    got.append(orjson.loads(server.recv(65536).partition(b"]: ")[2]))
            assert [d["netfilter"]["rule"]["comment"] for d in got] == [f"n{i}" for i in range(result.retry[0])]
            rest = [records[i] for i in result.retry]
            assert t.send(rest[:1]) == SendResult()  # room again
        finally:
            t.close()


def test_unix_socket_missing_is_output_down(tmp_path: Path) -> None:
    t = syslog.Options(address=f"unix://{tmp_path}/nothing").transport()
    with pytest.raises(OutputDown, match="ENOENT"):
        t.open()
    t.close()
    with pytest.raises(OutputDown, match="not connected"):
        t.send([drop_record()])


def test_a_stream_unix_socket_gets_nul_terminated_messages(tmp_path: Path) -> None:
    path = str(tmp_path / "stream.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(path)
        server.listen()
        with opened(syslog.Options(address=f"unix://{path}")) as t:
            conn, _ = server.accept()
            t.send([drop_record("a"), drop_record("b")])
        data = b""
        with conn:
            while chunk := conn.recv(65536):
                data += chunk
    messages = data.split(b"\0")
    assert messages[-1] == b"" and len(messages) == 3
    assert [orjson.loads(m.partition(b"]: ")[2])["netfilter"]["rule"]["comment"] for m in messages[:2]] == ["a", "b"]


def test_connect_timeout_is_output_down() -> None:
    """A listener whose backlog is full never completes the handshake: open gives up after `timeout`."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        port = server.getsockname()[1]
        fillers = []
        try:
            for _ in range(8):  # fill the accept queue (backlog 0 takes one, SYNs beyond it are dropped)
                s = socket.socket()
                s.setblocking(False)
                with contextlib.suppress(BlockingIOError):
                    s.connect(("127.0.0.1", port))
                fillers.append(s)
            time.sleep(0.2)
            t = syslog.Options(address=f"tcp://127.0.0.1:{port}", timeout=0.5).transport()
            started = time.monotonic()
            with pytest.raises(OutputDown, match="timed out"):
                t.open()
            assert time.monotonic() - started < 5
        finally:
            for s in fillers:
                s.close()


def test_a_receiver_that_stops_reading_times_out_instead_of_blocking() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        t = syslog.Options(address=f"tcp://127.0.0.1:{port}", timeout=0.5).transport()
        t.open()
        conn, _ = server.accept()
        try:
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            records = [drop_record("x" * 100)] * 256
            with pytest.raises(OutputDown, match="timed out"):  # noqa: PT012
                for _ in range(1000):
                    t.send(records)
        finally:
            conn.close()
            t.close()


# ------------------------------------------------------------ sizes


def test_an_event_too_long_loses_its_stack_then_is_rejected(rsyslog: Rsyslog) -> None:
    stack = tuple(f"frame_{i}+0x{i:x}" for i in range(600))
    long_stack = drop_record(stack=stack)
    huge_comment = drop_record("c" * 9000)
    assert len(long_stack.json) > 8192
    with opened(syslog.Options(address=address_of(rsyslog, "udp"))) as t:
        result = t.send([drop_record("first"), long_stack, huge_comment, drop_record("last")])
    assert [i for i, _ in result.rejected] == [2] and "max_message (8192)" in result.rejected[0][1]
    assert result.retry == ()
    got = rsyslog.wait_lines("udp", 3)
    docs = [orjson.loads(g["msg"]) for g in got]
    assert "stack" not in docs[1]["drop"]
    assert {k: v for k, v in long_stack.doc()["drop"].items() if k != "stack"} == docs[1]["drop"]
    assert [d["netfilter"]["rule"]["comment"] for d in (docs[0], docs[2])] == ["first", "last"]


def test_max_message_can_be_raised_for_tcp(rsyslog: Rsyslog) -> None:
    stack = tuple(f"frame_{i}+0x{i:x}" for i in range(600))
    record = drop_record(stack=stack)
    with opened(syslog.Options(address=address_of(rsyslog, "tcp"), max_message=65536)) as t:
        assert t.send([record]) == SendResult()
    (got,) = rsyslog.wait_lines("tcp", 1)
    assert orjson.loads(got["msg"]) == record.doc()


# ------------------------------------------------------------ the pieces


def test_ascii_json_means_the_same_json() -> None:
    raw = orjson.dumps({"s": HOSTILE, "k\u00e9": ["\U0001f525", "\x7f"]})
    out = syslog.ascii_json(raw)
    assert out.isascii() and b"\x7f" not in out
    assert orjson.loads(out) == orjson.loads(raw)
    plain = b'{"a":1}'
    assert syslog.ascii_json(plain) is plain


@pytest.mark.parametrize(("doc", "severity"), [
    ({"event": {"dataset": "tracer.drop"}}, syslog.WARNING),
    ({"event": {"dataset": "tracer.drop.summary"}}, syslog.WARNING),
    ({"event": {"dataset": "tracer.conntrack", "kind": "alert", "severity": 80}}, syslog.ERR),
    ({"event": {"dataset": "tracer.conntrack", "kind": "alert", "severity": 60}}, syslog.WARNING),
    ({"event": {"dataset": "tracer.conntrack", "kind": "alert", "severity": 50}}, syslog.WARNING),
    ({"event": {"dataset": "tracer.conntrack", "kind": "alert", "severity": 20}}, syslog.NOTICE),
    ({"event": {"dataset": "tracer.loss", "action": "events_lost", "severity": 40}}, syslog.WARNING),
    ({"event": {"dataset": "tracer.loss", "action": "events_held_back", "severity": 20}}, syslog.NOTICE),
    ({}, syslog.NOTICE),
])
def test_severity_of(doc: dict[str, Any], severity: int) -> None:
    assert syslog.severity_of(doc) == severity


@pytest.mark.parametrize(("address", "expected"), [
    ("udp://127.0.0.1", "udp://127.0.0.1:514"),
    ("udp://[2001:db8::1]:1514", "udp://[2001:db8::1]:1514"),
    ("tcp://log.example:6514", "tcp://log.example:6514"),
    ("tls://log.example", "tls://log.example:6514"),
    ("unix:///dev/log", "unix:///dev/log"),
    ("UDP://h:1", "udp://h:1"),
])
def test_addresses(address: str, expected: str) -> None:
    assert str(syslog.parse_address(address)) == expected


@pytest.mark.parametrize(("options", "message"), [
    ({"address": "tcp://127.0.0.1"}, "address: 'tcp://127.0.0.1' has no port"),
    ({"address": "http://h:1"}, "address: 'http://h:1' has no known scheme"),
    ({"address": "udp://:514"}, "has no host"),
    ({"address": "udp://h:0"}, "port is a number from 1 to 65535"),
    ({"address": "udp://h:65536"}, "port is a number from 1 to 65535"),
    ({"address": "udp://h:x"}, "port is a number"),
    ({"address": "udp://[2001:db8::1:514"}, "is not a URL"),
    ({"address": "unix://dev/log"}, "absolute path"),
    ({"address": "tcp://h:1/path"}, "has no path"),
    ({"address": "tcp://u:p@h:1"}, "only scheme, host and port"),
    ({"facility": "local8"}, "facility: 'local8' is not a syslog facility"),
    ({"facility": "security"}, "facility:"),
    ({"app_name": "a" * 49}, "app_name:"),
    ({"app_name": "two words"}, "app_name:"),
    ({"app_name": "t\u00e9"}, "app_name:"),
    ({"app_name": "tag:x"}, "app_name:"),
    ({"hostname": "h" * 256}, "hostname:"),
    ({"hostname": ""}, "hostname:"),
    ({"format": "json"}, "format:"),
    ({"timeout": 0.0}, "timeout:"),
    ({"max_message": 100}, "max_message:"),
    ({"address": "udp://h:1", "max_message": 70000}, "max_message:"),
    ({"address": "tcp://h:1", "ca_file": "/etc/hostname"}, "ca_file: only for tls://"),
    ({"address": "tls://h:1", "ca_file": "/nonexistent/ca.pem"}, "ca_file: '/nonexistent/ca.pem' does not exist"),
    ({"address": "tls://h:1", "ca_file": "/etc/hostname"}, "ca_file: '/etc/hostname' is not a readable PEM"),
])
def test_check_names_the_key(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        syslog.Options(**options).check()
    key = "address" if "address" in options else next(iter(options))
    if key == "address" and len(options) > 1:
        key = next(k for k in options if k != "address")
    assert str(err.value).startswith(f"{key}: ")
    assert message in str(err.value)


def test_defaults_check_and_name_has_no_secret() -> None:
    syslog.Options().check()
    assert syslog.Options().transport().name == "syslog unix:///dev/log"
    assert syslog.Options(address="tcp://[2001:db8::5]:601").transport().name == "syslog tcp://[2001:db8::5]:601"


def test_an_unreachable_address_is_not_a_config_error() -> None:
    options = syslog.Options(address="tcp://127.0.0.1:9")
    options.check()
    with pytest.raises(OutputDown, match="refused"):
        options.transport().open()


# ------------------------------------------------------------ figures


@pytest.mark.parametrize("scheme", ["udp", "tcp", "tls", "uxlocal"])
def test_throughput(rsyslog: Rsyslog, certs: Certs, scheme: str) -> None:
    """Events/s into a real rsyslog, until written to its file (printed; asserted only to be far above need).

    UDP has no flow control: datagrams beyond the receiver's socket buffer
    (16 MiB here) are lost with no error anywhere. Its figure is the rate
    of sending, with the share that arrived.
    """
    records = [drop_record(f"n{i}") for i in range(syslog.MAX_BATCH)]
    total = 40 * syslog.MAX_BATCH
    options = syslog.Options(address=address_of(rsyslog, scheme), ca_file=str(certs.ca) if scheme == "tls" else None)
    with opened(options) as t:
        started = time.perf_counter()
        for _ in range(total // len(records)):
            assert t.send(records) == SendResult()
        sent = time.perf_counter() - started
        arrived = rsyslog.wait_count(scheme, total)
        elapsed = time.perf_counter() - started
    if scheme == "udp":
        print(f"\nsyslog udp: {total / sent:,.0f} events/s sent; {arrived} of {total} arrived")
        assert arrived > total // 2
    else:
        assert arrived == total
        print(f"\nsyslog {scheme}: {total} events in {elapsed:.2f} s = {total / elapsed:,.0f} events/s "
              f"(into rsyslog, written to its file)")
    assert total / elapsed > 1000


def test_tls_context_is_strict(certs: Certs) -> None:
    context = syslog._tls_context(str(certs.ca))
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
