"""The `syslog` output: RFC 5424 messages over UDP, TCP, TLS or the local socket.

Each event is one syslog message whose MSG is the event's JSON, so a SIEM
that parses JSON out of syslog (rsyslog's mmjsonparse, Elastic's and
Splunk's syslog inputs with a JSON extraction) gets every field, and the
header still says what kind of event it is without parsing anything:

    <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID - MSG
    <28>1 2026-11-21T11:50:00.123456Z web-1 tracer 4242 drop - {"@timestamp":...}

- PRI: the configured facility and a severity from the event (`severity_of`):
  drops are warnings, alerts follow `event.severity`, loss reports are
  warnings when events were lost, notices when they were only held back.
- TIMESTAMP: the event's own `@timestamp` (RFC 3339 with microseconds and
  Z, which RFC 5424 takes as it is), not the time of sending: a spooled
  event keeps the time of its drop.
- MSGID: `event.dataset` without `tracer.`: `drop`, `drop.summary`,
  `conntrack`, `loss`, so a receiver can route on it.
- STRUCTURED-DATA: `-`. An SD-ID of our own needs a registered Private
  Enterprise Number (`name@PEN`); every fact is in the JSON anyway.
- MSG: the JSON in pure US-ASCII (`ascii_json`): non-ASCII characters and
  DEL become `\\uXXXX` escapes, which any JSON parser reads back to the same
  string. There is no BOM: rsyslog keeps a BOM in `%msg%` (checked with
  Debian's 8.2302), where it sits before the `{` and makes JSON parsers
  (mmjsonparse, Logstash's and Vector's JSON codecs, Splunk's KV_MODE=json)
  fail; ASCII-only text is valid whatever the receiver assumes about the
  encoding, and relays that escape 8-bit bytes cannot damage it.

Transports (the `address` key):
- `udp://host[:port]` (RFC 5426, port 514 by default): one datagram per event;
- `tcp://host:port` (RFC 6587 octet counting, `LEN SP MSG`): no default port,
  because none is standard (rsyslog's examples use 514, IANA lists 601 for
  RFC 3195), so a guess could send events to the wrong service silently;
- `tls://host[:port]` (RFC 5425: the same framing over TLS, port 6514 by
  default): the server's certificate and name are verified, against
  `ca_file` or the system's CAs;
- `unix:///path` (the local socket, `/dev/log` by default): datagrams, or a
  stream when the socket is SOCK_STREAM (each message followed by a NUL, as
  glibc's syslog(3) sends). Local receivers do not parse RFC 5424 in their
  default setup (rsyslog's imuxsock uses its special parser, which reads
  "1" as the tag; journald reads the header as text), so the local socket
  gets glibc's format, `<PRI>Mmm dd hh:mm:ss APP-NAME[PID]: MSG`, unless
  `format = "rfc5424"` asks for RFC 5424 there too (rsyslog with
  `UseSpecialParser="off"`, syslog-ng).

Hostnames and IPv6 literals (`udp://[2001:db8::1]:514`) are resolved in
`open`, once per connection. TCP has no acknowledgments: a batch written
while the receiver is going away can be lost with no error. Before each
batch the transport checks whether the receiver has closed the connection
(a restarted rsyslog) and reports OutputDown then, which covers the common
case; RELP would be needed for more.

Messages longer than `max_message` (8192 by default, rsyslog's default
maxMessageSize: a longer one it truncates, and truncated JSON is no longer
JSON) are sent without the kernel stack if that makes them fit, else
rejected with the reason, never cut.
"""

from __future__ import annotations

import calendar
import contextlib
import errno
import os
import re
import select
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tracer.config import ConfigError
from tracer.outputs.transport import OutputDown, Record, SendResult

# Severities (RFC 5424 §6.2.1).
EMERG, ALERT, CRIT, ERR, WARNING, NOTICE, INFO, DEBUG = range(8)

#: Facility names as syslog(3) and logger(1) spell them (RFC 5424 §6.2.1 numbers).
#: "security" is left out: rsyslog and glibc read it as a deprecated alias of auth.
FACILITIES: dict[str, int] = {
    "kern": 0, "user": 1, "mail": 2, "daemon": 3, "auth": 4, "syslog": 5, "lpr": 6, "news": 7,
    "uucp": 8, "cron": 9, "authpriv": 10, "ftp": 11,
    **{f"local{i}": 16 + i for i in range(8)},
}

DEFAULT_PORTS = {"udp": 514, "tls": 6514}
SCHEMES = ("udp", "tcp", "tls", "unix")
FORMATS = ("auto", "rfc5424", "local")
#: RFC 5426 §3.2: every receiver takes 480 octets over IPv4; below that nothing is safe.
MIN_MESSAGE = 480
#: The largest UDP payload over IPv4 (65535 - 8 - 20).
MAX_UDP_MESSAGE = 65507
#: A bound for stream transports, far above any event, so a typo cannot ask for gigabytes.
MAX_STREAM_MESSAGE = 16 * 1024 * 1024
#: Records per `send`: one write for a TCP batch; few enough to keep a retry small.
MAX_BATCH = 256

_PRINTUSASCII = re.compile(r"[\x21-\x7e]+")
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)")
_NOT_ASCII_JSON = re.compile(r"[^\x00-\x7e]")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def severity_of(doc: Mapping[str, Any]) -> int:
    """The syslog severity of an event (journald's PRIORITY uses the same).

    A drop is a warning: something was refused, which is what a firewall is
    for, but someone may want to know. An alert maps its ECS `event.severity`
    (0-100): a full conntrack table (80) is an error (new connections fail),
    early eviction (60) and filling up (50) warnings, recovery (20) a notice.
    A loss report is a warning when events were lost, a notice when they
    were only held back by the rate ceiling (they are in the summaries).
    """
    event = doc.get("event")
    if not isinstance(event, Mapping):
        return NOTICE
    dataset = event.get("dataset")
    if isinstance(dataset, str) and (dataset == "tracer.drop" or dataset.startswith("tracer.drop.")):
        return WARNING
    if dataset == "tracer.loss":
        return WARNING if event.get("action") == "events_lost" else NOTICE
    severity = event.get("severity")
    if isinstance(severity, int) and not isinstance(severity, bool):
        return _ecs_severity(severity)
    return NOTICE


def _ecs_severity(severity: int) -> int:
    if severity >= 90:
        return CRIT
    if severity >= 70:
        return ERR
    if severity >= 40:
        return WARNING
    if severity >= 10:
        return NOTICE
    return INFO


def msgid_of(doc: Mapping[str, Any]) -> str:
    """RFC 5424 MSGID: `event.dataset` without its `tracer.` prefix, or `-`."""
    event = doc.get("event")
    dataset = event.get("dataset") if isinstance(event, Mapping) else None
    if not isinstance(dataset, str):
        return "-"
    token = dataset.removeprefix("tracer.")
    return token if len(token) <= 32 and _PRINTUSASCII.fullmatch(token) else "-"


def facility_number(name: str, key: str = "facility") -> int:
    """The number of a facility name; ConfigError naming `key` for any other name."""
    try:
        return FACILITIES[name]
    except KeyError:
        raise ConfigError(f"{key}: {name!r} is not a syslog facility (one of {', '.join(FACILITIES)})") from None


def ascii_json(data: bytes) -> bytes:
    """The same JSON in US-ASCII: non-ASCII characters and DEL as `\\uXXXX` escapes.

    orjson writes UTF-8 and escapes only control characters below 0x20, and
    in its output those characters can only occur inside strings, where an
    escape means the same character. Characters outside the BMP become a
    surrogate pair, as JSON spells them.
    """
    if data.isascii() and b"\x7f" not in data:
        return data
    return _NOT_ASCII_JSON.sub(_escape_char, data.decode("utf-8")).encode("ascii")


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


@dataclass(frozen=True, slots=True)
class Address:
    """A parsed `address`: scheme and host and port, or the socket path for `unix`."""

    scheme: str
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_address(text: str, key: str = "address") -> Address:
    """`udp://host[:port]`, `tcp://host:port`, `tls://host[:port]` or `unix:///path`; ConfigError otherwise."""
    try:
        url = urllib.parse.urlsplit(text)
    except ValueError as exc:  # e.g. an unbalanced '[' of an IPv6 literal
        raise ConfigError(f"{key}: {text!r} is not a URL ({exc})") from None
    scheme = url.scheme.lower()
    if scheme not in SCHEMES:
        raise ConfigError(f"{key}: {text!r} has no known scheme (one of {', '.join(s + '://' for s in SCHEMES)})")
    if url.query or url.fragment or url.username is not None or url.password is not None:
        raise ConfigError(f"{key}: {text!r}: only scheme, host and port (or a path for unix://) are allowed")
    if scheme == "unix":
        if url.netloc or not url.path.startswith("/"):
            raise ConfigError(f"{key}: {text!r}: a unix socket is given by its absolute path, as unix:///dev/log")
        return Address("unix", path=url.path)
    if url.path not in ("", "/"):
        raise ConfigError(f"{key}: {text!r}: a {scheme} address has no path")
    host = url.hostname or ""
    if not host:
        raise ConfigError(f"{key}: {text!r} has no host")
    try:
        port = url.port
    except ValueError:
        raise ConfigError(f"{key}: {text!r}: the port is a number from 1 to 65535") from None
    if port is None:
        if scheme not in DEFAULT_PORTS:
            raise ConfigError(f"{key}: {text!r} has no port (syslog over {scheme} has no standard one)")
        port = DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ConfigError(f"{key}: {text!r}: the port is a number from 1 to 65535")
    return Address(scheme, host=host, port=port)


def _check_name(key: str, value: str, limit: int) -> None:
    if not (len(value) <= limit and _PRINTUSASCII.fullmatch(value)):
        raise ConfigError(f"{key}: {value!r}: 1 to {limit} printable US-ASCII characters without spaces (RFC 5424)")


@dataclass(frozen=True)
class Options:
    """The keys of a `[[output]] type = "syslog"` table."""

    address: str = "unix:///dev/log"
    facility: str = "daemon"
    app_name: str = "tracer"
    #: HOSTNAME of the header; the host's name when unset.
    hostname: str | None = None
    #: PEM CA bundle that signs the server's certificate (tls:// only); the system's CAs when unset.
    ca_file: str | None = None
    #: Seconds a connect, a TLS handshake or a send may take.
    timeout: float = 5.0
    #: Longest message sent (header included); rsyslog's default maxMessageSize.
    max_message: int = 8192
    #: "auto": RFC 5424 on the network, glibc's local format on unix://; or "rfc5424" or "local" everywhere.
    format: str = "auto"

    def check(self) -> None:
        address = parse_address(self.address)
        facility_number(self.facility)
        _check_name("app_name", self.app_name, 48)
        if any(c in self.app_name for c in ":[]"):
            # The local format's TAG ends at ':' or '['; receivers' 3164 parsers too.
            raise ConfigError(f"app_name: {self.app_name!r}: ':', '[' and ']' would end the tag early")
        if self.hostname is not None:
            _check_name("hostname", self.hostname, 255)
        if self.format not in FORMATS:
            raise ConfigError(f"format: {self.format!r} is not one of {', '.join(FORMATS)}")
        if not (self.timeout > 0 and self.timeout < 3600):
            raise ConfigError(f"timeout: {self.timeout!r}: seconds, above 0 and below 3600")
        limit = MAX_UDP_MESSAGE if address.scheme == "udp" else MAX_STREAM_MESSAGE
        if not MIN_MESSAGE <= self.max_message <= limit:
            raise ConfigError(f"max_message: {self.max_message}: from {MIN_MESSAGE} to {limit} bytes "
                              f"over {address.scheme}")
        if self.ca_file is not None:
            if address.scheme != "tls":
                raise ConfigError(f"ca_file: only for tls:// addresses, not {address.scheme}://")
            _tls_context(self.ca_file)

    def transport(self) -> SyslogTransport:
        address = parse_address(self.address)
        fmt = self.format
        if fmt == "auto":
            fmt = "local" if address.scheme == "unix" else "rfc5424"
        hostname = self.hostname or _local_hostname()
        header = Header(facility_number(self.facility) * 8, hostname, self.app_name, str(os.getpid()))
        return SyslogTransport(
            address,
            header.rfc5424 if fmt == "rfc5424" else header.local,
            max_message=self.max_message,
            timeout=self.timeout,
            tls=_tls_context(self.ca_file) if address.scheme == "tls" else None,
        )


def _tls_context(ca_file: str | None) -> ssl.SSLContext:
    """Verifies the server's certificate chain and name; TLS 1.2 at least (RFC 9325)."""
    try:
        context = ssl.create_default_context(cafile=ca_file)
    except FileNotFoundError:
        raise ConfigError(f"ca_file: {ca_file!r} does not exist") from None
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"ca_file: {ca_file!r} is not a readable PEM CA bundle ({exc})") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _local_hostname() -> str:
    """The host's name when it is a valid HOSTNAME, else the NILVALUE."""
    name = socket.gethostname()
    return name if len(name) <= 255 and _PRINTUSASCII.fullmatch(name) else "-"


@dataclass(frozen=True, slots=True)
class Header:
    """What every message's header shares; `rfc5424` and `local` make one message each."""

    facility_pri: int  # facility * 8
    hostname: str
    app_name: str
    procid: str

    def rfc5424(self, doc: Mapping[str, Any], msg: bytes) -> bytes:
        stamp = doc.get("@timestamp")
        timestamp = stamp if isinstance(stamp, str) and _TIMESTAMP.fullmatch(stamp) else "-"
        head = (f"<{self.facility_pri + severity_of(doc)}>1 {timestamp} {self.hostname} {self.app_name} "
                f"{self.procid} {msgid_of(doc)} - ")
        return head.encode("ascii") + msg

    def local(self, doc: Mapping[str, Any], msg: bytes) -> bytes:
        head = f"<{self.facility_pri + severity_of(doc)}>{_local_stamp(doc)} {self.app_name}[{self.procid}]: "
        return head.encode("ascii") + msg


def _local_stamp(doc: Mapping[str, Any]) -> str:
    """`Nov 21 12:50:00`, local time, as syslog(3) writes it: the event's time, else now."""
    stamp = doc.get("@timestamp")
    seconds = time.time()
    if isinstance(stamp, str) and _TIMESTAMP.fullmatch(stamp) and stamp.endswith("Z"):
        seconds = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S"))
    t = time.localtime(seconds)
    return f"{_MONTHS[t.tm_mon - 1]} {t.tm_mday:2d} {t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"


Formatter = Callable[[Mapping[str, Any], bytes], bytes]


class SyslogTransport:
    """One syslog destination: a socket, opened in `open`, and a message format.

    Datagram sockets (udp, unix) send one message per datagram. On a unix
    socket an error is about the datagram being sent: the records before it
    arrived and only the rest is returned for a retry, so a receiver that goes
    away or stops reading duplicates nothing. Over UDP an error (ECONNREFUSED
    from an ICMP port unreachable) tells of an earlier datagram that was lost
    without one, so the whole batch is sent again. Stream sockets
    (tcp, tls, unix stream) write the batch framed in one `sendall`; an
    error there leaves unknown how much arrived, so the batch is sent again
    whole (at least once).
    """

    max_batch = MAX_BATCH

    def __init__(self, address: Address, formatter: Formatter, *, max_message: int, timeout: float,
                 tls: ssl.SSLContext | None = None) -> None:
        self.address = address
        self.name = f"syslog {address}"
        self._format = formatter
        self._max_message = max_message
        self._timeout = timeout
        self._tls = tls
        self._sock: socket.socket | None = None
        self._stream = False

    # -- connection --------------------------------------------------------

    def open(self) -> None:
        self.close()
        try:
            if self.address.scheme == "unix":
                self._sock, self._stream = _unix_socket(self.address.path, self._timeout)
            elif self.address.scheme == "udp":
                self._sock, self._stream = _udp_socket(self.address, self._timeout), False
            else:
                self._sock, self._stream = self._tcp_socket(), True
        except (OSError, ssl.SSLError) as exc:
            raise OutputDown(_why(exc)) from None

    def _tcp_socket(self) -> socket.socket:
        sock = socket.create_connection((self.address.host, self.address.port), timeout=self._timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if self._tls is not None:
                return self._tls.wrap_socket(sock, server_hostname=self.address.host)
        except BaseException:
            sock.close()
            raise
        return sock

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is None:
            return
        if isinstance(sock, ssl.SSLSocket):
            # close_notify, so that the receiver logs a clean end rather than a TLS error.
            with contextlib.suppress(OSError, ValueError):
                sock.settimeout(min(self._timeout, 1.0))
                sock.unwrap()
        with contextlib.suppress(OSError):
            sock.close()

    # -- sending -----------------------------------------------------------

    def send(self, records: Sequence[Record]) -> SendResult:
        if self._sock is None:
            raise OutputDown("not connected")
        messages: list[tuple[int, bytes]] = []
        rejected: list[tuple[int, str]] = []
        for i, record in enumerate(records):
            message = self.message(record)
            if isinstance(message, str):
                rejected.append((i, message))
            else:
                messages.append((i, message))
        if self._stream:
            self._send_stream([m for _, m in messages])
            return SendResult(rejected=tuple(rejected))
        result = self._send_datagrams(messages, rejected)
        return SendResult(retry=result.retry, rejected=tuple(sorted(result.rejected)))

    def message(self, record: Record) -> bytes | str:
        """The message for one record, or why it cannot be sent (it is too long even without its stack)."""
        doc = record.doc()
        message = self._format(doc, ascii_json(record.json))
        if len(message) <= self._max_message:
            return message
        drop = doc.get("drop")
        if isinstance(drop, Mapping) and "stack" in drop:
            lighter = {k: ({dk: dv for dk, dv in v.items() if dk != "stack"} if k == "drop" else v)
                       for k, v in doc.items()}
            message = self._format(lighter, ascii_json(orjson.dumps(lighter)))
            if len(message) <= self._max_message:
                return message
        return f"{len(message)} bytes, more than max_message ({self._max_message}) for {self.address}"

    def _send_stream(self, messages: list[bytes]) -> None:
        sock = self._sock
        assert sock is not None
        if self.address.scheme == "unix":
            data = b"".join(m + b"\0" for m in messages)
        else:
            data = b"".join(b"%d %s" % (len(m), m) for m in messages)
        try:
            if _peer_closed(sock):
                raise OutputDown("the receiver closed the connection")
            sock.sendall(data)
        except (OSError, ssl.SSLError) as exc:
            self.close()
            raise OutputDown(_why(exc)) from None
        except OutputDown:
            self.close()
            raise

    def _send_datagrams(self, messages: list[tuple[int, bytes]], rejected: list[tuple[int, str]]) -> SendResult:
        sock = self._sock
        assert sock is not None
        for n, (i, message) in enumerate(messages):
            try:
                sock.send(message)
            except OSError as exc:
                if exc.errno == errno.EMSGSIZE:
                    rejected.append((i, f"{len(message)} bytes: too long for one datagram to {self.address}"))
                    continue
                if n == 0 or self.address.scheme == "udp":
                    # UDP errors are mostly an ICMP error about an earlier datagram, lost with
                    # no error of its own: the whole batch is sent again (at least once).
                    self.close()
                    raise OutputDown(_why(exc)) from None
                # The earlier ones went out: only the rest is sent again. The socket stays, so
                # that the next send fails (OutputDown, with the reason) if the receiver is still gone.
                return SendResult(retry=tuple(j for j, _ in messages[n:]), rejected=tuple(rejected))
        return SendResult(rejected=tuple(rejected))


def _udp_socket(address: Address, timeout: float) -> socket.socket:
    """A connected UDP socket: the kernel then reports an ICMP port unreachable as ECONNREFUSED."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.settimeout(timeout)
        sock.connect(sockaddr)
    except BaseException:
        sock.close()
        raise
    return sock


def _unix_socket(path: str, timeout: float) -> tuple[socket.socket, bool]:
    """Connected to `path`, as a datagram socket, or a stream one if that is what listens there."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        sock = socket.socket(socket.AF_UNIX, kind)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EPROTOTYPE and kind == socket.SOCK_DGRAM:
                continue
            raise
        return sock, kind == socket.SOCK_STREAM
    raise OSError(errno.EPROTOTYPE, os.strerror(errno.EPROTOTYPE))  # not reached: the stream connect raises


def _peer_closed(sock: socket.socket) -> bool:
    """Whether the receiver closed the connection (a syslog receiver never writes).

    Readable means end of file, a reset, or bytes a TLS stack sends by
    itself (TLS 1.3 session tickets): only the first two count.
    """
    readable, _, _ = select.select([sock], [], [], 0)
    if not readable:
        return False
    timeout = sock.gettimeout()
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    except OSError:
        return True
    finally:
        sock.settimeout(timeout)


def _why(exc: BaseException) -> str:
    """The reason an operator reads: "connection refused", "timed out", the TLS verification error."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: the server's certificate failed verification: {exc.verify_message or exc.reason or exc}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or exc}"
    if isinstance(exc, socket.gaierror):
        return f"cannot resolve the host: {exc.strerror}"
    if isinstance(exc, TimeoutError | socket.timeout):
        return "timed out"
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{os.strerror(exc.errno).lower()} ({errno.errorcode.get(exc.errno, exc.errno)})"
    return str(exc) or type(exc).__name__
