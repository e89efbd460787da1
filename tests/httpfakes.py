"""Local HTTP(S) servers that speak Elasticsearch's `_bulk` and Splunk HEC, for the HTTP outputs' tests.

They run in a thread on 127.0.0.1 (a random port), check the wire format
the way the real servers do (and more strictly: every deviation is listed
in `problems`), and answer with the shapes the real servers give: the bulk
answer with per-item `status`/`error` (ES 8 and OpenSearch 2 share it),
ES's `security_exception` 401, HEC's `{"text","code","invalid-event-number"}`.
The answers' content is written from the servers' documentation, not
copied from captures.

Also used by tests/bench/outputs.py, where `check=False` keeps the
server's own work small so the figure is the transport's.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import socket
import ssl
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qs, urlsplit

#: An item outcome: (status, error object or None).
ItemPolicy = Callable[[int, dict[str, Any]], tuple[int, dict[str, Any] | None]]


@dataclass
class Request:
    """One request as the server saw it: `raw` as sent, `body` decompressed."""

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    raw: bytes
    body: bytes


@dataclass
class Answer:
    status: int
    body: bytes = b""
    content_type: str = "application/json; charset=UTF-8"

    @classmethod
    def json(cls, status: int, obj: Any) -> Answer:
        return cls(status, json.dumps(obj, separators=(",", ":")).encode())


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real servers
    disable_nagle_algorithm = True  # as they do too: else headers and body wait on a delayed ACK (40 ms)
    server: _Server

    def do_POST(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n)
        headers = {k.lower(): v for k, v in self.headers.items()}
        try:
            body = gzip.decompress(raw) if headers.get("content-encoding") == "gzip" else raw
        except OSError:
            body = b""
            self.server.owner.problems.append("body is not gzip although Content-Encoding says so")
        parts = urlsplit(self.path)
        req = Request("POST", parts.path, parse_qs(parts.query), headers, raw, body)
        owner = self.server.owner
        with owner.lock:
            owner.requests.append(req)
        answer = owner.answer(req)
        self.send_response(answer.status)
        self.send_header("Content-Type", answer.content_type)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: FakeServer

    def finish_request(self, request: Any, client_address: Any) -> None:
        # TLS in the connection's own thread: a client refusing the certificate ends only that one.
        if self.owner.tls is not None:
            try:
                request = self.owner.tls.wrap_socket(request, server_side=True)
            except (ssl.SSLError, OSError):
                return
        with self.owner.lock:
            self.owner.connections.add(request)
        try:
            super().finish_request(request, client_address)
        except OSError:
            pass
        finally:
            with self.owner.lock:
                self.owner.connections.discard(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class FakeServer:
    """A server on 127.0.0.1; `answer(req)` is what it says. Stop it with `stop()` (or use `with`).

    For the subclasses: `override` answers a request outright, `check=False` skips the wire
    format checks (the benchmark's), `seen` counts what arrived.
    """

    def __init__(self, tls: ssl.SSLContext | None = None, *,
                 override: Callable[[Request], Answer | None] | None = None, check: bool = True) -> None:
        self.tls = tls
        self.override = override
        self.check = check
        self.seen = 0  # documents or events received, for the subclasses' policies that count
        self.requests: list[Request] = []
        self.problems: list[str] = []
        self.connections: set[Any] = set()
        self.lock = threading.Lock()
        self._httpd: _Server | None = None
        self.port = 0

    def overridden(self, req: Request) -> Answer | None:
        """`override`'s answer to `req`, if it gives one: the subclasses ask once auth passed."""
        return None if self.override is None else self.override(req)

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> Self:
        httpd = _Server(("127.0.0.1", self.port), _Handler)
        httpd.owner = self
        self.port = httpd.server_address[1]
        self._httpd = httpd
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                         name=f"fake-http-{self.port}", daemon=True).start()
        return self

    def stop(self) -> None:
        """Stops listening and cuts open connections, as a server that went away."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        with self.lock:
            conns = list(self.connections)
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def answer(self, req: Request) -> Answer:
        return Answer.json(200, {})


# ---------------------------------------------------------------- Elasticsearch / OpenSearch


def es_error(kind: str, reason: str, **extra: Any) -> dict[str, Any]:
    return {"type": kind, "reason": reason, **extra}


def es_top_error(status: int, kind: str, reason: str) -> Answer:
    """ES's whole-request error: `{"error": {"root_cause": [...], "type", "reason"}, "status"}`."""
    err = es_error(kind, reason)
    return Answer.json(status, {"error": {"root_cause": [err], **err}, "status": status})


def mapping_error(doc_id: str, field_name: str, value: str) -> dict[str, Any]:
    """A 400 item error as ES 8 gives it for a value its mapping cannot take."""
    return es_error(
        "document_parsing_exception",
        f"[1:42] failed to parse field [{field_name}] of type [ip] in document with id '{doc_id}'. "
        f"Preview of field's value: '{value}'",
        caused_by=es_error("illegal_argument_exception", f"'{value}' is not an IP string literal."))


REJECTED_429 = es_error(
    "es_rejected_execution_exception",
    "rejected execution of coordinating operation [coordinating_and_primary_bytes=0, replica_bytes=0, "
    "all_bytes=0, coordinating_operation_bytes=52428800, max_coordinating_and_primary_bytes=53687091]")


@dataclass
class Bulk:
    """One parsed `_bulk` request: per document its op, action metadata and document line."""

    ops: list[str] = field(default_factory=list)
    meta: list[dict[str, Any]] = field(default_factory=list)
    lines: list[bytes] = field(default_factory=list)


class FakeElasticsearch(FakeServer):
    """`POST [/prefix]/_bulk`: NDJSON pairs, answered per item by `item_policy`.

    `auth` is the Authorization value required (401 security_exception
    otherwise, like ES with security on); `max_body` refuses larger request
    bodies with 413 and an empty body (ES's http.max_content_length, or a
    proxy's limit); `override` answers a request outright (503, ...).
    Accepted documents are in `stored` in arrival order.
    """

    def __init__(self, *, tls: ssl.SSLContext | None = None, auth: str | None = None,
                 item_policy: ItemPolicy | None = None, max_body: int | None = None,
                 override: Callable[[Request], Answer | None] | None = None, check: bool = True,
                 prefix: str = "") -> None:
        super().__init__(tls, override=override, check=check)
        self.auth = auth
        self.item_policy = item_policy
        self.max_body = max_body
        self.prefix = prefix
        self.stored: list[bytes] = []
        self.bulks: list[Bulk] = []

    def answer(self, req: Request) -> Answer:
        if self.max_body is not None and len(req.raw) > self.max_body:
            return Answer(413, b"", "text/plain")
        if self.auth is not None and req.headers.get("authorization") != self.auth:
            return es_top_error(401, "security_exception",
                                "unable to authenticate with provided credentials and anonymous access "
                                "is not allowed for this request")
        if (answer := self.overridden(req)) is not None:
            return answer
        if req.path != self.prefix + "/_bulk":
            return es_top_error(400, "invalid_index_name_exception", f"Invalid index name [{req.path}]")
        if not self.check:
            n = req.body.count(b"\n") // 2
            with self.lock:
                self.seen += n
            return Answer(200, b'{"errors":false,"items":[' + b",".join([b'{"create":{"status":201}}'] * n) + b"]}")
        bulk = self.parse(req)
        if bulk is None:
            return es_top_error(400, "illegal_argument_exception",
                                "The bulk request must be terminated by a newline [\\n]")
        self.bulks.append(bulk)
        items = []
        errors = False
        for op, meta, line in zip(bulk.ops, bulk.meta, bulk.lines, strict=True):
            doc = json.loads(line)
            with self.lock:
                n = self.seen
                self.seen += 1
            status, error = self.item_policy(n, doc) if self.item_policy else (201, None)
            doc_id = base64.urlsafe_b64encode(uuid.uuid4().bytes[:15]).decode()
            item: dict[str, Any] = {"_index": meta.get("_index"), "_id": doc_id}
            if status < 300:
                self.stored.append(line)
                item.update({"_version": 1, "result": "created",
                             "_shards": {"total": 2, "successful": 1, "failed": 0},
                             "_seq_no": len(self.stored) - 1, "_primary_term": 1, "status": status})
            else:
                errors = True
                item.update({"status": status, "error": error or es_error("x", "y")})
            items.append({op: item})
        full = {"took": 7, "errors": errors, "items": items}
        return Answer.json(200, self.filtered(full, req.query.get("filter_path", [""])[0]))

    def parse(self, req: Request) -> Bulk | None:
        ctype = req.headers.get("content-type", "")
        if ctype != "application/x-ndjson":
            self.problems.append(f"content type {ctype!r}")
        body = req.body
        if not body.endswith(b"\n"):
            self.problems.append("body not newline-terminated")
            return None
        lines = body[:-1].split(b"\n")
        if len(lines) % 2:
            self.problems.append(f"odd number of lines: {len(lines)}")
            return None
        bulk = Bulk()
        for action_line, doc_line in zip(lines[::2], lines[1::2], strict=True):
            action = json.loads(action_line)
            if len(action) != 1:
                self.problems.append(f"action with {len(action)} keys")
            op, meta = next(iter(action.items()))
            if op not in ("create", "index"):
                self.problems.append(f"op {op!r}")
            json.loads(doc_line)  # a document line must be one JSON object
            bulk.ops.append(op)
            bulk.meta.append(meta)
            bulk.lines.append(doc_line)
        return bulk

    @staticmethod
    def filtered(full: dict[str, Any], filter_path: str) -> dict[str, Any]:
        """ES's `filter_path`, for the one form the output asks (`errors,items.*.status,items.*.error`)."""
        if not filter_path:
            return full
        wanted = set(filter_path.split(","))
        out: dict[str, Any] = {}
        if "errors" in wanted:
            out["errors"] = full["errors"]
        keep = {p.split(".")[2] for p in wanted if p.startswith("items.*.")}
        if keep:
            out["items"] = [{op: {k: v for k, v in body.items() if k in keep}}
                            for item in full["items"] for op, body in item.items()]
        return out


# ---------------------------------------------------------------- Splunk HEC


def hec(status: int, text: str, code: int, **extra: Any) -> Answer:
    return Answer.json(status, {"text": text, "code": code, **extra})


class FakeSplunk(FakeServer):
    """`POST /services/collector/event`: concatenated envelopes, checked, answered as HEC does.

    `bad_event(n, envelope)` returns a HEC code (6, 12, ...) for an event
    HEC would refuse; events before it are stored, as HEC indexes them.
    `indexes` is the token's allowed list (code 7 otherwise).
    """

    def __init__(self, *, token: str = "00000000-0000-4000-8000-000000000000", tls: ssl.SSLContext | None = None,  # noqa: S107
                 path: str = "/services/collector/event", bad_event: Callable[[int, dict[str, Any]], int] | None = None,
                 indexes: set[str] | None = None, override: Callable[[Request], Answer | None] | None = None,
                 check: bool = True) -> None:
        super().__init__(tls, override=override, check=check)
        self.token = token
        self.path = path
        self.bad_event = bad_event
        self.indexes = indexes
        self.stored: list[dict[str, Any]] = []
        self.raw_events: list[bytes] = []  # each stored envelope, bytes as sent

    def answer(self, req: Request) -> Answer:
        auth = req.headers.get("authorization")
        if auth is None:
            return hec(401, "Token is required", 2)
        if not auth.startswith("Splunk "):
            return hec(401, "Invalid authorization", 3)
        if auth != f"Splunk {self.token}":
            return hec(403, "Invalid token", 4)
        if (answer := self.overridden(req)) is not None:
            return answer
        if req.path != self.path:
            return Answer(404, b"<html>Not Found</html>", "text/html")
        if not self.check:
            with self.lock:
                self.seen += req.body.count(b'{"time":')
            return hec(200, "Success", 0)
        if req.headers.get("content-type") != "application/json":
            self.problems.append(f"content type {req.headers.get('content-type')!r}")
        envelopes = self.split(req.body)
        if not envelopes:
            return hec(400, "No data", 5)
        for n, (raw, env) in enumerate(envelopes):
            if not isinstance(env, dict) or "event" not in env:
                return hec(400, "Event field is required", 12, **{"invalid-event-number": n})
            if self.indexes is not None and env.get("index") not in self.indexes:
                return hec(400, "Incorrect index", 7, **{"invalid-event-number": n})
            code = self.bad_event(self.seen, env) if self.bad_event else 0
            self.seen += 1
            if code:
                return hec(400, {6: "Invalid data format", 12: "Event field is required"}.get(code, "error"), code,
                           **{"invalid-event-number": n})
            self.stored.append(env)
            self.raw_events.append(raw)
        return hec(200, "Success", 0)

    def split(self, body: bytes) -> list[tuple[bytes, Any]]:
        """Concatenated JSON objects (whitespace between allowed), each with its own bytes."""
        text = body.decode("utf-8")
        decoder = json.JSONDecoder()
        out: list[tuple[bytes, Any]] = []
        i = 0
        while True:
            while i < len(text) and text[i] in " \t\r\n":
                i += 1
            if i == len(text):
                return out
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError:
                self.problems.append(f"not JSON at {i}")
                return out
            out.append((text[i:end].encode("utf-8"), obj))
            i = end
