"""The `elasticsearch` output: `_bulk` into Elasticsearch or OpenSearch.

Each record becomes two lines of NDJSON: the action
`{"create":{"_index":NAME}}` and the event's own JSON, unchanged, each line
ended by a newline (the last one too: `_bulk` refuses a body without it).
`create` rather than `index`: it works for indices and data streams alike
(a data stream takes nothing else), never overwrites a document, and needs
only the `create_doc` privilege, the least an ingest API key can have.

The answer is read item by item, because `_bulk` says 200 even when some
documents failed:
- 2xx: delivered;
- 429, 5xx: refused for now, sent again (`SendResult.retry`);
- 401, 403, 404 (no privilege on the index, no such index and auto-create
  off): not about the document; the output is down until an operator acts,
  so nothing is lost meanwhile;
- any other 4xx (a mapping conflict, a parse error): this document will
  never be taken, it is rejected with the server's error type and reason.
A 413 splits the batch (`tracer.outputs.http.Chunker`).

OpenSearch speaks the same `_bulk`, `create` and `filter_path`. It has no
API keys (use basic auth), and its data streams need an index template with
`"data_stream": {}` that matches the name, as Elasticsearch's do; without one
a `create` to that name makes a plain index.

A read timeout after the server got the body may have indexed it anyway:
the batch is sent again, so delivery is at least once.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import orjson

from tracer.config import ConfigError
from tracer.event.text import printable
from tracer.outputs.http import (
    ChunkedHttpTransport,
    Chunker,
    HttpClient,
    TooLarge,
    Url,
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

DEFAULT_INDEX = "tracer-drops"
NDJSON = "application/x-ndjson"
#: Only what the item loop reads: a 500-event answer shrinks from ~100 kB to ~12 kB.
FILTER_PATH = "errors,items.*.status,items.*.error"
#: Characters Elasticsearch refuses in an index name (`:` since 7.0), besides upper case.
_INDEX_FORBIDDEN = frozenset('\\/*?"<>| ,#:')
#: Item statuses that are about the destination or our access to it, not about one document.
_DESTINATION_STATUS = frozenset({401, 403, 404})


def check_index_name(key: str, name: str) -> None:
    """Elasticsearch's rules for index and data stream names, so a typo fails at start, not per event."""
    if not name:
        raise ConfigError(f"{key}: empty")
    shown = printable(name)
    if name in (".", ".."):
        raise ConfigError(f"{key}: {shown!r} is not a valid name")
    if name[0] in "-_+":
        raise ConfigError(f"{key}: {shown!r} may not start with '-', '_' or '+'")
    if name != name.lower():
        raise ConfigError(f"{key}: {shown!r} must be lower case")
    bad = sorted({c for c in name if c in _INDEX_FORBIDDEN or not c.isprintable()})
    if bad:
        raise ConfigError(f"{key}: {shown!r} may not contain {' '.join(repr(c) for c in bad)}")
    if len(name.encode()) > 255:
        raise ConfigError(f"{key}: {shown[:40]!r}... is longer than 255 bytes")


@dataclass(frozen=True)
class Options:
    """The keys of an `[[output]] type = "elasticsearch"` table.

    `index` and `data_stream` name where documents go; give at most one.
    With neither, the index is "tracer-drops". Auth: `username` with
    `password` or `password_file` (basic), or `api_key`/`api_key_file`
    (Elasticsearch only): either the `encoded` value the create-API-key call
    returns, or "id:api_key".
    """

    url: str
    index: str | None = None
    data_stream: str | None = None
    username: str | None = None
    password: str | None = None
    password_file: str | None = None
    api_key: str | None = None
    api_key_file: str | None = None
    ca_file: str | None = None
    verify_tls: bool = True
    gzip: bool = True
    timeout: float = 10.0
    max_batch: int = 500
    pipeline: str | None = None

    @property
    def target(self) -> str:
        """The index or data stream every document goes to."""
        return self.data_stream or self.index or DEFAULT_INDEX

    def check(self) -> None:
        url = check_url("url", self.url)
        if self.index is not None and self.data_stream is not None:
            raise ConfigError("index: give index or data_stream, not both")
        if self.data_stream is not None:
            check_index_name("data_stream", self.data_stream)
            if self.data_stream.startswith(".ds-"):
                raise ConfigError("data_stream: may not start with '.ds-' (that names its backing indices)")
        else:
            check_index_name("index", self.target)
        self._check_auth()
        check_ca_file("ca_file", self.ca_file, url)
        check_timeout("timeout", self.timeout)
        check_max_batch("max_batch", self.max_batch)
        check_text("pipeline", self.pipeline)

    def _check_auth(self) -> None:
        if self.password is not None and self.password_file is not None:
            raise ConfigError("password: give password or password_file, not both")
        if self.api_key is not None and self.api_key_file is not None:
            raise ConfigError("api_key: give api_key or api_key_file, not both")
        has_password = self.password is not None or self.password_file is not None
        has_key = self.api_key is not None or self.api_key_file is not None
        if self.username is not None and has_key:
            raise ConfigError("api_key: give username/password or api_key, not both")
        if has_password and self.username is None:
            raise ConfigError("username: required with password or password_file")
        if self.username is not None and not has_password:
            raise ConfigError("password: username is set; give password or password_file too")
        if self.username is not None and (
                not self.username or ":" in self.username or not self.username.isprintable()):
            raise ConfigError(f"username: {printable(self.username)!r}: non-empty, printable, without ':'")
        check_token("password", self.password, basic=True)
        check_token("api_key", self.api_key)
        check_readable("password_file", self.password_file)
        check_readable("api_key_file", self.api_key_file)

    def auth_header(self) -> str | None:
        """The Authorization header's value, secrets read from their files now; None without auth."""
        if self.username is not None:
            password = self.password
            if password is None and self.password_file is not None:
                password = read_secret("password_file", self.password_file)
                check_token("password_file", password, basic=True)
            pair = f"{self.username}:{password}".encode()
            return "Basic " + base64.b64encode(pair).decode("ascii")
        key = self.api_key
        if key is None and self.api_key_file is not None:
            key = read_secret("api_key_file", self.api_key_file)
            check_token("api_key_file", key)
        if key is None:
            return None
        if ":" in key:  # "id:api_key"; the encoded form is base64, which has no ':'
            key = base64.b64encode(key.encode("ascii")).decode("ascii")
        return f"ApiKey {key}"

    def transport(self) -> Transport:
        return ElasticsearchTransport(self)


class ElasticsearchTransport(ChunkedHttpTransport):
    """`_bulk` requests of at most `max_batch` documents to one index or data stream."""

    def __init__(self, options: Options) -> None:
        url = check_url("url", options.url)
        kind = "data_stream" if options.data_stream is not None else "index"
        self.name = f"elasticsearch {url} {kind} {options.target}"
        self.max_batch = options.max_batch
        headers = {"Accept": "application/json"}
        auth = options.auth_header()
        if auth is not None:
            headers["Authorization"] = auth
        self.client = HttpClient(url, name=self.name, headers=headers, timeout=options.timeout,
                                 gzip=options.gzip, ca_file=options.ca_file, verify_tls=options.verify_tls)
        self.path = bulk_path(url, options.pipeline)
        self.action = orjson.dumps({"create": {"_index": options.target}}) + b"\n"
        self.chunker = Chunker(options.max_batch)

    def body(self, records: Sequence[Record]) -> bytes:
        """Action line and document line per record, every line newline-terminated."""
        action = self.action
        parts: list[bytes] = []
        for r in records:
            parts += (action, r.json, b"\n")
        return b"".join(parts)

    def _send_chunk(self, records: Sequence[Record]) -> SendResult:
        reply = self.client.post(self.path, self.body(records), NDJSON)
        if reply.status == 413:
            raise TooLarge
        answer = reply.json()
        if not 200 <= reply.status < 300:
            raise down_for_status(reply.status, error_text(answer))
        if not isinstance(answer, dict) or not isinstance(answer.get("errors"), bool):
            raise OutputDown(f"HTTP {reply.status} without a bulk answer (is the url an Elasticsearch?)")
        if answer["errors"] is False:
            return SendResult()
        return item_results(answer.get("items"), len(records))


def bulk_path(url: Url, pipeline: str | None) -> str:
    """`/_bulk` under the URL's path (a proxy's prefix is kept), with the query the transport needs."""
    path = url.path.rstrip("/") + "/_bulk?filter_path=" + FILTER_PATH
    if pipeline is not None:
        path += "&pipeline=" + quote(pipeline, safe="")
    return path


def error_text(answer: Any) -> str:
    """`type: reason` of an Elasticsearch error object (or of a whole error answer)."""
    if isinstance(answer, dict) and "error" in answer:
        answer = answer["error"]
    if isinstance(answer, dict):
        kind, reason = answer.get("type"), answer.get("reason")
        return ": ".join(str(x) for x in (kind, reason) if x)
    return str(answer) if isinstance(answer, str) else ""


def item_results(items: Any, count: int) -> SendResult:
    """Per-document outcomes of a bulk answer with `errors: true`."""
    if not isinstance(items, list) or len(items) != count:
        n = len(items) if isinstance(items, list) else 0
        raise OutputDown(f"bulk answer has {n} items for {count} documents")
    retry: list[int] = []
    rejected: list[tuple[int, str]] = []
    destination: list[int] = []
    reasons: list[str] = []
    for i, item in enumerate(items):
        result = next(iter(item.values()), None) if isinstance(item, dict) and item else None
        status = result.get("status") if isinstance(result, dict) else None
        if not isinstance(status, int) or not isinstance(result, dict):
            raise OutputDown(f"bulk answer item {i} has no status")
        if status < 300:
            continue
        why = clip(f"HTTP {status}: {error_text(result.get('error'))}")
        if status == 429 or status >= 500:
            retry.append(i)
        elif status in _DESTINATION_STATUS:
            destination.append(i)
            reasons.append(why)
        else:
            rejected.append((i, why))
    if destination and len(destination) + len(retry) == count:
        # Nothing was taken and the server says we may not write there: down, not lost.
        raise OutputDown(f"documents refused: {reasons[0]}")
    return SendResult(retry=tuple(sorted(retry + destination)), rejected=tuple(rejected))
