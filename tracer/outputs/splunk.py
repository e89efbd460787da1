"""The `splunk_hec` output: Splunk's HTTP Event Collector, event endpoint.

A request is the batch's envelopes one after another (newline-separated,
which HEC accepts between JSON objects):
`{"time":<epoch.micros>,"host":..,"source":..,"sourcetype":..,"index":..,"fields":{..},"event":<the ECS document>}`.
`time` is the event's `@timestamp`, written digit for digit (no float
rounding); `index` only when set (else the token's default index); `fields`
(indexed fields) only for the paths `indexed_fields` lists. The event is the
record's JSON byte for byte, so what Splunk stores is what the stream holds.

Default sourcetype `tracer:drop`, as docs/drop-event.md configures for the
file route: the same props.conf (`KV_MODE = json` at search time, or
`INDEXED_EXTRACTIONS = json`) serves both. Indexed fields are off by
default: with search-time JSON extraction a field both indexed and in the
event shows its value twice; list only paths you want for `tstats`.

HEC answers `{"text": .., "code": N}`:
- 0: delivered;
- 1-4 (token disabled, missing, malformed, unknown) and HTTP 401/403:
  "token refused", the output is down until an operator acts;
- 6 (invalid data format), 12, 13, 15 with `invalid-event-number` N: HEC
  indexed the events before N and stopped there; N is rejected, the ones
  after it are sent again;
- 7 (index not allowed for the token), 10/11 (the token wants indexer
  acknowledgement, which this output does not use): down, with the fix;
- 8, 9 (server busy) and 18-20 (unhealthy, queues full), any 5xx, 429: down.
"""

from __future__ import annotations

import functools
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from tracer.config import ConfigError
from tracer.event.text import printable
from tracer.outputs.http import (
    ChunkedHttpTransport,
    Chunker,
    HttpClient,
    TooLarge,
    check_ca_file,
    check_max_batch,
    check_readable,
    check_text,
    check_timeout,
    check_token,
    check_url,
    clip,
    down_for_status,
    read_secret,
)
from tracer.outputs.transport import OutputDown, Record, SendResult, Transport

EVENT_PATH = "/services/collector/event"
#: HEC codes about the token (Splunk's "HTTP Event Collector status codes").
_TOKEN_CODES = frozenset({1, 2, 3, 4})
#: HEC codes about one event of the batch, which `invalid-event-number` then names.
_EVENT_CODES = frozenset({6, 12, 13, 15})
_SPLUNK_INDEX = re.compile(r"[a-z0-9][a-z0-9_-]*")
_FIELD_PATH = re.compile(r"[A-Za-z0-9_@]+(\.[A-Za-z0-9_@]+)*")
_TS_KEY = b'{"@timestamp":"'
_TIMESTAMP = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d{1,9}))?Z")


@dataclass(frozen=True)
class Options:
    """The keys of an `[[output]] type = "splunk_hec"` table.

    `url` is the HEC base (`https://splunk:8088`, the event endpoint is
    appended) or a full endpoint path, kept as given. `host` defaults to
    this machine's hostname.
    """

    url: str
    token: str | None = None
    token_file: str | None = None
    index: str | None = None
    source: str = "tracer"
    sourcetype: str = "tracer:drop"
    host: str | None = None
    indexed_fields: tuple[str, ...] = ()
    ca_file: str | None = None
    verify_tls: bool = True
    gzip: bool = True
    timeout: float = 10.0
    max_batch: int = 500

    def check(self) -> None:
        url = check_url("url", self.url)
        if (self.token is None) == (self.token_file is None):
            raise ConfigError("token: give token or token_file (one of them)")
        check_token("token", self.token)
        check_readable("token_file", self.token_file)
        if self.index is not None and not _SPLUNK_INDEX.fullmatch(self.index):
            raise ConfigError(f"index: {printable(self.index)!r}: lower-case letters, digits, '_' and '-', "
                              "starting with a letter or digit")
        check_text("source", self.source)
        check_text("sourcetype", self.sourcetype)
        check_text("host", self.host)
        for path in self.indexed_fields:
            if not _FIELD_PATH.fullmatch(path):
                raise ConfigError(f"indexed_fields: {printable(path)!r} is not a dotted field path (drop.reason)")
        check_ca_file("ca_file", self.ca_file, url)
        check_timeout("timeout", self.timeout)
        check_max_batch("max_batch", self.max_batch)

    def read_token(self) -> str:
        if self.token is not None:
            return self.token
        assert self.token_file is not None
        token = read_secret("token_file", self.token_file)
        check_token("token_file", token)
        return token

    def transport(self) -> Transport:
        return SplunkTransport(self)


class SplunkTransport(ChunkedHttpTransport):
    """Batches of HEC envelopes to the event endpoint."""

    def __init__(self, options: Options) -> None:
        url = check_url("url", options.url)
        self.path = url.path if url.path not in ("", "/") else EVENT_PATH
        self.index = options.index
        self.name = f"splunk_hec {url.origin}{self.path}" + (f" index {options.index}" if options.index else "")
        self.max_batch = options.max_batch
        headers = {"Authorization": f"Splunk {options.read_token()}", "Accept": "application/json"}
        self.client = HttpClient(url, name=self.name, headers=headers, timeout=options.timeout,
                                 gzip=options.gzip, ca_file=options.ca_file, verify_tls=options.verify_tls)
        meta: dict[str, str] = {"host": options.host or socket.gethostname(),
                                "source": options.source, "sourcetype": options.sourcetype}
        if options.index is not None:
            meta["index"] = options.index
        self._meta = orjson.dumps(meta)[1:-1]  # '"host":..,"source":..' to splice into each envelope
        self._fields = tuple((p, p.split(".")) for p in options.indexed_fields)
        self.chunker = Chunker(options.max_batch)

    def envelope(self, record: Record) -> bytes:
        """One event's HEC envelope, the record's JSON inside unchanged."""
        head = b"{"
        ts = timestamp_of(record)
        epoch = epoch_text(ts) if ts is not None else None
        if epoch is not None:
            head += b'"time":' + epoch.encode("ascii") + b","
        head += self._meta
        if self._fields:
            fields = indexed(record.doc(), self._fields)
            if fields:
                head += b',"fields":' + orjson.dumps(fields)
        return head + b',"event":' + record.json + b"}"

    def body(self, records: Sequence[Record]) -> bytes:
        return b"\n".join([self.envelope(r) for r in records])

    def _send_chunk(self, records: Sequence[Record]) -> SendResult:
        reply = self.client.post(self.path, self.body(records), "application/json")
        if reply.status == 413:
            raise TooLarge
        answer = reply.json()
        if not isinstance(answer, dict):
            answer = {}
        code, text = answer.get("code"), str(answer.get("text") or "")
        if 200 <= reply.status < 300 and code in (0, None):
            return SendResult()
        hec = f"HEC code {code}: {clip(text)}" if isinstance(code, int) else ""
        if code in _TOKEN_CODES or reply.status in (401, 403):
            raise OutputDown(f"token refused ({hec or f'HTTP {reply.status}'})")
        if code == 7:
            raise OutputDown(f"index {self.index or '(default)'} refused: not in the token's allowed indexes ({hec})")
        if code in (10, 11):
            raise OutputDown(f"the token requires indexer acknowledgement, which tracer does not use: "
                             f"turn it off for this token ({hec})")
        if code in _EVENT_CODES:
            return bad_event(answer.get("invalid-event-number"), len(records), hec)
        raise down_for_status(reply.status, hec)


def bad_event(number: Any, count: int, why: str) -> SendResult:
    """HEC stopped at event `number`: those before it are indexed, it is rejected, the rest go again.

    Without a usable number the first event is taken as the bad one, so a
    batch HEC keeps refusing shrinks by one each time instead of looping.
    """
    n = number if isinstance(number, int) and not isinstance(number, bool) and 0 <= number < count else 0
    return SendResult(retry=tuple(range(n + 1, count)), rejected=((n, why),))


def timestamp_of(record: Record) -> str | None:
    """The event's `@timestamp`, without parsing the JSON when it comes first, as tracer writes it.

    Parsing a 1 kB event costs more than the rest of its envelope together.
    """
    j = record.json
    if j.startswith(_TS_KEY):
        end = j.find(b'"', len(_TS_KEY))
        if 0 < end - len(_TS_KEY) <= 40:
            return j[len(_TS_KEY):end].decode("ascii", "replace")
    ts = record.doc().get("@timestamp")
    return ts if isinstance(ts, str) else None


def epoch_text(ts: str) -> str | None:
    """`2026-11-21T11:50:00.123456Z` -> `1795261800.123456`, digit for digit; None if not that shape."""
    m = _TIMESTAMP.fullmatch(ts)
    seconds = _epoch_seconds(m.group(1)) if m is not None else None
    if m is None or seconds is None:
        return None
    return f"{seconds}.{m.group(2)}" if m.group(2) else str(seconds)


@functools.lru_cache(maxsize=256)
def _epoch_seconds(utc: str) -> int | None:
    """`2026-11-21T11:50:00` (UTC) -> seconds since the epoch; the events of a batch share a few."""
    try:
        return int(datetime.fromisoformat(utc + "+00:00").timestamp())
    except ValueError:
        return None


def indexed(doc: dict[str, Any], paths: tuple[tuple[str, list[str]], ...]) -> dict[str, Any]:
    """The indexed fields present in `doc`: strings, or lists of strings, as HEC wants them."""
    out: dict[str, Any] = {}
    for name, parts in paths:
        value: Any = doc
        for p in parts:
            value = value.get(p) if isinstance(value, dict) else None
        if isinstance(value, list):
            items = [str(v) for v in value if isinstance(v, str | int | float) and not isinstance(v, bool)]
            if items:
                out[name] = items
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            out[name] = str(value)
        elif isinstance(value, bool):
            out[name] = "true" if value else "false"
    return out
