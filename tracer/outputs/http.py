"""What the HTTP outputs share: one connection pool to one server, and the rules for what went wrong.

Elasticsearch/OpenSearch `_bulk` and Splunk HEC differ in their bodies and
answers, not in their transport: a URL, TLS verified against the system's
CAs or a CA file, a connect and a read timeout, an optional gzip body and a
User-Agent. This module holds that part, plus the checks their `Options`
share (URL, CA file, secrets) and the split of a batch the server finds too
large (HTTP 413).

urllib3 never retries (`retries=False`) nor follows redirects: the queued
sink retries with backoff and spools meanwhile, and a retry hidden in here
would stack a second backoff under the sink's. Every failure to reach the
server, or a server that says it cannot take the batch now (429, 5xx),
becomes `OutputDown` with a short reason an operator can act on. No reason
ever holds a secret: headers are never echoed, and URLs may not carry
credentials (`check_url` refuses `user:password@`).
"""

from __future__ import annotations

import contextlib
import gzip as gziplib
import math
import os
import ssl
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    InsecureRequestWarning,
    LocationParseError,
    NameResolutionError,
    NewConnectionError,
    ProtocolError,
    ReadTimeoutError,
    SSLError,
)

from tracer import __version__
from tracer.config import MAX_TIMEOUT, ConfigError
from tracer.event.text import printable
from tracer.outputs.transport import OutputDown, Record, SendResult

USER_AGENT = f"tracer/{__version__}"
#: zlib level 1: JSON shrinks ~8x at a fraction of level 6's CPU (Filebeat's default too).
GZIP_LEVEL = 1
#: Records per request at most: 10 000 events of a few kB is already tens of MB per request.
MAX_BATCH_LIMIT = 10_000
#: A secret file larger than this is not a secret file (a key, a token are < 1 kB).
SECRET_FILE_MAX = 64 * 1024
#: Characters of a server's error text kept in a reason: enough to read it, not a whole page.
REASON_MAX = 300

log = structlog.get_logger("tracer.output")


# ---------------------------------------------------------------- checks shared by the Options


@dataclass(frozen=True, slots=True)
class Url:
    """A checked http(s) URL without credentials, query or fragment."""

    scheme: str
    host: str  # IPv6 in brackets, as in the URL
    port: int
    path: str  # "" or "/..." as given

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.origin + self.path


def check_url(key: str, text: str) -> Url:
    """The URL of `key`, or ConfigError naming what is wrong with it.

    Credentials in the URL are refused without echoing it: they would end
    up in the output's name, in logs and in metrics labels.
    """
    if not text.strip():
        raise ConfigError(f"{key}: empty (give an http:// or https:// URL)")
    try:
        u = urllib3.util.parse_url(text.strip())
    except LocationParseError:
        raise ConfigError(f"{key}: {printable(text)!r} is not a URL") from None
    if u.auth is not None:
        raise ConfigError(f"{key}: the URL holds credentials (user:password@); "
                          "give them as username and password_file (or a token/api_key option) instead")
    if u.scheme not in ("http", "https"):
        raise ConfigError(f"{key}: {printable(text)!r}: the scheme must be http:// or https://")
    if not u.host:
        raise ConfigError(f"{key}: {printable(text)!r} has no host")
    if u.query is not None or u.fragment is not None:
        raise ConfigError(f"{key}: {printable(text)!r}: no query string or fragment (the options set the parameters)")
    port = u.port if u.port is not None else (443 if u.scheme == "https" else 80)
    if not 0 < port < 65536:
        raise ConfigError(f"{key}: {printable(text)!r}: port {port} is not 1-65535")
    return Url(u.scheme, u.host, port, u.path or "")


def check_ca_file(key: str, path: str | None, url: Url) -> None:
    """A CA file must exist and hold certificates, and only makes sense with https."""
    if path is None:
        return
    if url.scheme != "https":
        raise ConfigError(f"{key}: set, but the url is {url.scheme}:// (no TLS); use https://")
    try:
        ssl.create_default_context(cafile=path)
    except FileNotFoundError:
        raise ConfigError(f"{key}: {printable(path)!r} does not exist") from None
    except ssl.SSLError:  # before OSError, which it subclasses
        raise ConfigError(f"{key}: {printable(path)!r} holds no PEM certificate") from None
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {printable(path)!r}: {exc.strerror}") from None


def check_readable(key: str, path: str | None) -> None:
    """A secret file must be a readable regular file now: the daemon reads it when it opens the output."""
    if path is None:
        return
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: {printable(path)!r} is not a file")
    if not os.access(path, os.R_OK):
        raise ConfigError(f"{key}: {printable(path)!r} is not readable")


def check_token(key: str, value: str | None, *, basic: bool = False) -> None:
    """A secret given inline must fit in an HTTP header; the message never shows it.

    Tokens and API keys are printable ASCII without spaces (GUIDs, base64);
    a password (`basic`, base64-encoded on the wire) may be any printable text.
    """
    if value is None:
        return
    if not value:
        raise ConfigError(f"{key}: empty")
    if basic:
        if not value.isprintable():
            raise ConfigError(f"{key}: holds control characters (a newline?)")
    elif not (value.isascii() and value.isprintable() and " " not in value):
        raise ConfigError(f"{key}: only printable ASCII without spaces can be sent in a header")


def read_secret(key: str, path: str) -> str:
    """The secret in `path` (key names the `*_file` option), without its trailing newline.

    Read when the transport is made, not when the config is parsed, so a
    rotated secret is picked up on reload and never kept in the Options.
    """
    try:
        with open(path, "rb") as f:
            data = f.read(SECRET_FILE_MAX + 1)
    except OSError as exc:
        raise ConfigError(f"{key}: cannot read {printable(path)!r}: {exc.strerror}") from None
    if len(data) > SECRET_FILE_MAX:
        raise ConfigError(f"{key}: {printable(path)!r} is larger than {SECRET_FILE_MAX} bytes: not a secret file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {printable(path)!r} is not UTF-8 text") from None
    if text.endswith("\r\n"):
        text = text[:-2]
    elif text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise ConfigError(f"{key}: {printable(path)!r} is empty")
    return text


def check_timeout(key: str, value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= MAX_TIMEOUT):
        raise ConfigError(f"{key}: {value!r} is not a number of seconds above 0 and at most {MAX_TIMEOUT:g}")


def check_max_batch(key: str, value: int) -> None:
    if not 1 <= value <= MAX_BATCH_LIMIT:
        raise ConfigError(f"{key}: {value!r} is not a number of events from 1 to {MAX_BATCH_LIMIT}")


def check_text(key: str, value: str | None) -> None:
    """A name sent as is (source, sourcetype, host, pipeline): non-empty and printable."""
    if value is not None and (not value.strip() or not value.isprintable()):
        raise ConfigError(f"{key}: {printable(value)!r} must be non-empty printable text")


# ---------------------------------------------------------------- the client


@dataclass(frozen=True, slots=True)
class Reply:
    """A server's answer: status, body (decompressed), and its JSON when it is JSON."""

    status: int
    data: bytes

    def json(self) -> Any:
        """The body parsed, or None when it is not JSON (a proxy's HTML page, an empty 413)."""
        try:
            return orjson.loads(self.data) if self.data else None
        except orjson.JSONDecodeError:
            return None


class TooLarge(Exception):
    """The server refused the body as too large (HTTP 413): the batch must be split."""


class HttpClient:
    """One server, one connection kept alive, used by one worker thread.

    `headers` are sent with every request (auth, User-Agent); they are never
    logged. Building the pool connects nothing: the first request connects,
    and a failure there is an `OutputDown` like any other.
    """

    def __init__(self, url: Url, *, name: str, headers: Mapping[str, str], timeout: float,
                 gzip: bool, ca_file: str | None = None, verify_tls: bool = True) -> None:
        self.url = url
        self.name = name
        self.gzip = gzip
        self.timeout = timeout
        self.ca_file = ca_file
        self.verify_tls = verify_tls
        self._headers = {"User-Agent": USER_AGENT, **headers}
        self._pool: urllib3.HTTPConnectionPool | None = None
        self._warned = False

    def open(self) -> None:
        if self._pool is not None:
            return
        kw: dict[str, Any] = {
            "timeout": urllib3.Timeout(connect=self.timeout, read=self.timeout),
            "retries": False, "maxsize": 1, "block": False,
        }
        if self.url.scheme == "https":
            if self.verify_tls:
                self._pool = urllib3.HTTPSConnectionPool(
                    self.url.host, self.url.port, cert_reqs="CERT_REQUIRED", ca_certs=self.ca_file, **kw)
            else:
                self._warn_unverified()
                self._pool = urllib3.HTTPSConnectionPool(
                    self.url.host, self.url.port, cert_reqs="CERT_NONE", assert_hostname=False, **kw)
        else:
            self._pool = urllib3.HTTPConnectionPool(self.url.host, self.url.port, **kw)

    def _warn_unverified(self) -> None:
        """Once per output: the operator chose it, but should see it in the log."""
        if not self._warned:
            self._warned = True
            log.warning("output.tls_not_verified", output=self.name,
                        detail="verify_tls = false: the server's certificate and name are not checked")
        # Our own warning said it once; urllib3 would say it again on every request.
        warnings.filterwarnings("ignore", category=InsecureRequestWarning)

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            with contextlib.suppress(Exception):  # close never raises, by the Transport contract
                pool.close()

    def post(self, path: str, body: bytes, content_type: str) -> Reply:
        """POSTs `body`; OutputDown when the server cannot be reached or does not answer in time."""
        self.open()
        assert self._pool is not None
        headers = dict(self._headers)
        headers["Content-Type"] = content_type
        if self.gzip:
            body = gziplib.compress(body, compresslevel=GZIP_LEVEL, mtime=0)
            headers["Content-Encoding"] = "gzip"
        try:
            r = self._pool.urlopen("POST", path, body=body, headers=headers, retries=False,
                                   redirect=False, assert_same_host=False, preload_content=True)
        except HTTPError as exc:
            self.close()  # a half-used connection is worth nothing; the next send reconnects
            raise OutputDown(self.describe(exc)) from None
        return Reply(r.status, r.data)

    def describe(self, exc: HTTPError) -> str:
        """The operator's reason for a failed request, from urllib3's exception (never a header)."""
        if isinstance(exc, NameResolutionError):
            return f"cannot resolve {self.url.host}"
        if isinstance(exc, NewConnectionError):  # before ConnectTimeoutError: it subclasses it
            return f"cannot connect: {_os_reason(exc)}"
        if isinstance(exc, ConnectTimeoutError):
            return f"no connection within {self.timeout:g} s"
        if isinstance(exc, ReadTimeoutError):
            return f"no answer within {self.timeout:g} s"
        if isinstance(exc, SSLError):
            return _tls_reason(exc)
        if isinstance(exc, ProtocolError):
            return f"connection lost: {_os_reason(exc)}"
        return f"request failed: {type(exc).__name__}"


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception, its causes and the exceptions in its args: where urllib3 keeps the real error."""
    seen: list[BaseException] = []
    todo: list[BaseException] = [exc]
    while todo and len(seen) < 10:
        e = todo.pop(0)
        if e in seen:
            continue
        seen.append(e)
        todo.extend(x for x in (e.__cause__, e.__context__, *e.args) if isinstance(x, BaseException))
    return seen


def _os_reason(exc: BaseException) -> str:
    for e in _chain(exc):
        if isinstance(e, OSError) and e.strerror:
            return e.strerror.lower()
    causes = _chain(exc)[1:]
    if causes:
        return printable(str(causes[0]) or type(causes[0]).__name__)[:REASON_MAX]
    return type(exc).__name__


def _tls_reason(exc: BaseException) -> str:
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS: server certificate not accepted: {e.verify_message or e.reason}"
    for e in _chain(exc):
        if isinstance(e, ssl.SSLError) and e.reason:
            return f"TLS handshake failed: {e.reason}"
    return "TLS handshake failed"


def down_for_status(status: int, detail: str = "") -> OutputDown:
    """The OutputDown for an HTTP status that is about the server or our access, not a document."""
    what = {401: "authentication failed", 403: "not authorized", 404: "not found (check the url's path)",
            408: "request timed out on the server", 429: "too many requests",
            502: "bad gateway", 503: "unavailable", 504: "gateway timeout"}.get(status)
    if what is None:
        if 300 <= status < 400:
            what = "redirected (set url to the address the server redirects to)"
        elif status >= 500:
            what = "server error"
        else:
            what = "refused"
    text = f"{what} (HTTP {status}"
    if detail:
        text += f": {clip(detail)}"
    return OutputDown(text + ")")


def clip(text: str) -> str:
    """A server's text as a reason may hold it: escaped, and short."""
    s = printable(text)
    return s if len(s) <= REASON_MAX else s[:REASON_MAX] + "..."


# ---------------------------------------------------------------- too large: split, never loop


class Chunker:
    """Sends a batch in chunks, halving the chunk when the server answers 413.

    What it learnt is kept (a proxy's 1 MB body limit stays), so only the
    first batch pays for the discovery. A single record that is still too
    large is rejected: that ends every split after at most log2(batch)
    halvings. If the server goes down after some chunks were delivered,
    the rest is returned as `retry` rather than raising: OutputDown would
    make the sink send the delivered part again.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit

    def send(self, records: Sequence[Record], send_chunk: Callable[[Sequence[Record]], SendResult]) -> SendResult:
        retry: list[int] = []
        rejected: list[tuple[int, str]] = []
        start = 0
        while start < len(records):
            n = min(self.limit, len(records) - start)
            try:
                result = send_chunk(records[start:start + n])
            except TooLarge:
                if n == 1:
                    rejected.append((start, "event too large for the server (HTTP 413)"))
                    start += 1
                else:
                    self.limit = max(1, n // 2)
                continue
            except OutputDown:
                if start == 0:
                    raise
                retry.extend(range(start, len(records)))
                break
            retry.extend(start + i for i in result.retry)
            rejected.extend((start + i, why) for i, why in result.rejected)
            start += n
        return SendResult(retry=tuple(retry), rejected=tuple(rejected))


class ChunkedHttpTransport:
    """What both HTTP outputs share: one client, batches halved on 413 (Chunker).

    A subclass sets `name`, `max_batch`, `client` and `chunker`, and sends one
    chunk in `_send_chunk`.
    """

    name: str
    max_batch: int
    client: HttpClient
    chunker: Chunker

    def open(self) -> None:
        self.client.open()

    def close(self) -> None:
        self.client.close()

    def send(self, records: Sequence[Record]) -> SendResult:
        if not records:
            return SendResult()
        return self.chunker.send(records, self._send_chunk)

    def _send_chunk(self, records: Sequence[Record]) -> SendResult:
        raise NotImplementedError
