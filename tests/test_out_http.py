"""The HTTP outputs (Elasticsearch/OpenSearch `_bulk`, Splunk HEC) against local servers that check the wire.

The servers (tests/httpfakes.py) run in threads on 127.0.0.1, over HTTP or
over TLS with certificates from trustme, and answer as the real ones do:
partial bulk failures, 401, 413, 503, HEC codes. A stopped server gives a
real "connection refused", an unknown CA a real verification failure.
"""

from __future__ import annotations

import base64
import copy
import gzip
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog
import trustme

from tests.httpfakes import (
    REJECTED_429,
    Answer,
    FakeElasticsearch,
    FakeSplunk,
    Request,
    es_error,
    es_top_error,
    hec,
    mapping_error,
)
from tracer import __version__
from tracer.config import ConfigError
from tracer.event.schema import validate
from tracer.outputs import elasticsearch, splunk
from tracer.outputs.http import Chunker, check_url, read_secret
from tracer.outputs.transport import OutputDown, Record, SendResult

TOKEN = "6f1c2a9e-52d3-4b7f-9a41-0c8e2b7d5f13"  # noqa: S105 - a test token
PASSWORD = "s3cr3t-pässword"  # noqa: S105 - a test password
HOSTILE = 'say "hi"\n{"event":"fake"}\r\n\t\\x41 \u202eevil\u202c é 日本 🚀 </script> \x1b[31m'

EVENT: dict[str, Any] = {
    "@timestamp": "2026-11-21T11:50:00.123456Z",
    "ecs": {"version": "8.11.0"},
    "event": {"kind": "event", "category": ["network"], "type": ["connection", "denied"],
              "action": "dropped", "dataset": "tracer.drop", "count": 1},
    "drop": {"reason": "NETFILTER_DROP", "location": "nf_hook_slow+0xa1", "subsystem": "nftables"},
    "netfilter": {"backend": "nftables", "family": "inet", "hook": "input", "table": "fw", "chain": "web",
                  "base_chain": "input", "rule": {"handle": 4, "text": "tcp dport 443 drop", "comment": "legacy block"},
                  "policy": False, "verdict": "drop", "attribution": "nftrace"},
    "conntrack": {"state": "new", "direction": "original", "status": ["confirmed"], "zone": 0, "mark": 0},
    "source": {"ip": "198.18.0.1", "port": 40000},
    "destination": {"ip": "198.18.0.2", "port": 443},
    "network": {"transport": "tcp", "type": "ipv4", "iana_number": "6", "direction": "ingress",
                "community_id": "1:nzmqH0i9ojhj6zrI5caNuu9uoEk="},
    "tcp": {"flags": ["SYN"]},
    "observer": {"hostname": "web-1", "type": "host", "ingress": {"interface": {"name": "veth0", "id": "5"}}},
    "netns": {"inode": 4026532211, "name": "lab-server"},
    "packet": {"length": 60, "mark": 0},
}


def event(i: int = 0, comment: str | None = None) -> dict[str, Any]:
    doc = copy.deepcopy(EVENT)
    doc["source"]["port"] = 1024 + i % 60000
    doc["@timestamp"] = f"2026-11-21T11:50:{i // 1_000_000 % 60:02d}.{i % 1_000_000:06d}Z"
    if comment is not None:
        doc["netfilter"]["rule"]["comment"] = comment
    return doc


def record(i: int = 0, comment: str | None = None) -> Record:
    doc = event(i, comment)
    return Record(orjson.dumps(doc), f"drop {i}")


def records(n: int, start: int = 0) -> list[Record]:
    return [record(i) for i in range(start, start + n)]


def es(url: str, **kw: Any) -> elasticsearch.ElasticsearchTransport:
    opts = elasticsearch.Options(url=url, **kw)
    opts.check()
    t = opts.transport()
    assert isinstance(t, elasticsearch.ElasticsearchTransport)
    return t


def hec_out(url: str, **kw: Any) -> splunk.SplunkTransport:
    kw.setdefault("token", TOKEN)
    opts = splunk.Options(url=url, **kw)
    opts.check()
    t = opts.transport()
    assert isinstance(t, splunk.SplunkTransport)
    return t


def down(transport: Any, batch: list[Record]) -> str:
    with pytest.raises(OutputDown) as info:
        transport.send(batch)
    return str(info.value)


# ---------------------------------------------------------------- TLS material


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_tls(ca: trustme.CA, *names: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(*(names or ("127.0.0.1", "localhost"))).configure_cert(ctx)
    return ctx


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def esrv() -> Iterator[FakeElasticsearch]:
    with FakeElasticsearch() as s:
        yield s
    assert not s.problems


@pytest.fixture
def hsrv() -> Iterator[FakeSplunk]:
    with FakeSplunk(token=TOKEN) as s:
        yield s
    assert not s.problems


# ================================================================ Elasticsearch: the wire


def test_bulk_body_is_create_pairs_newline_terminated_ndjson(esrv: FakeElasticsearch) -> None:
    t = es(esrv.url, gzip=False)
    batch = records(3)
    assert t.send(batch) == SendResult()
    (req,) = esrv.requests
    assert req.path == "/_bulk"
    assert req.query["filter_path"] == ["errors,items.*.status,items.*.error"]
    assert req.headers["content-type"] == "application/x-ndjson"
    assert req.headers["user-agent"] == f"tracer/{__version__}"
    assert "content-encoding" not in req.headers and "authorization" not in req.headers
    action = b'{"create":{"_index":"tracer-drops"}}\n'
    assert req.raw == b"".join(action + r.json + b"\n" for r in batch)
    assert req.raw.endswith(b"\n") and not req.raw.endswith(b"\n\n")
    assert esrv.stored == [r.json for r in batch]


def test_gzip_body_decompresses_to_the_plain_body(esrv: FakeElasticsearch) -> None:
    t = es(esrv.url)  # gzip is on by default
    batch = records(50)
    assert t.send(batch) == SendResult()
    (req,) = esrv.requests
    assert req.headers["content-encoding"] == "gzip"
    assert gzip.decompress(req.raw) == t.body(batch)
    assert len(req.raw) * 5 < len(req.body)  # the point of it: JSON events shrink a lot
    assert esrv.stored == [r.json for r in batch]


def test_data_stream_gets_create_actions_to_the_stream(esrv: FakeElasticsearch) -> None:
    t = es(esrv.url, data_stream="logs-tracer.drop-default")
    assert t.send(records(2)) == SendResult()
    assert esrv.bulks[0].ops == ["create", "create"]
    assert esrv.bulks[0].meta == [{"_index": "logs-tracer.drop-default"}] * 2
    assert "data_stream logs-tracer.drop-default" in t.name


def test_path_prefix_and_pipeline_are_kept(tmp_path: Path) -> None:
    with FakeElasticsearch(prefix="/es") as srv:
        t = es(srv.url + "/es/", index="drops-a", pipeline="geo ip&x")
        assert t.send(records(1)) == SendResult()
        (req,) = srv.requests
        assert req.path == "/es/_bulk"
        assert req.query["pipeline"] == ["geo ip&x"]
        assert srv.bulks[0].meta == [{"_index": "drops-a"}]


def test_basic_auth_header_utf8_and_password_file(esrv: FakeElasticsearch, tmp_path: Path) -> None:
    expected = "Basic " + base64.b64encode(f"tracer:{PASSWORD}".encode()).decode()
    esrv.auth = expected
    assert es(esrv.url, username="tracer", password=PASSWORD).send(records(1)) == SendResult()
    secret = tmp_path / "pw"
    secret.write_text(PASSWORD + "\n")
    t = es(esrv.url, username="tracer", password_file=str(secret))
    assert t.send(records(1)) == SendResult()
    assert [r.headers["authorization"] for r in esrv.requests] == [expected, expected]
    assert PASSWORD not in t.name


@pytest.mark.parametrize("given", ["VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw==",
                                   "VuaCfGcBCdbkQm-e5aOx:ui2lp2axTNmsyakw9tvNnw"])
def test_api_key_header_encoded_or_id_colon_key(esrv: FakeElasticsearch, tmp_path: Path, given: str) -> None:
    # Elastic's own example key: `encoded` is base64("id:api_key").
    esrv.auth = "ApiKey VnVhQ2ZHY0JDZGJrUW0tZTVhT3g6dWkybHAyYXhUTm1zeWFrdzl0dk5udw=="
    assert es(esrv.url, api_key=given).send(records(1)) == SendResult()
    key_file = tmp_path / "key"
    key_file.write_text(given + "\r\n")
    assert es(esrv.url, api_key_file=str(key_file)).send(records(1)) == SendResult()
    assert len(esrv.requests) == 2


def test_hostile_event_round_trips_byte_exact(esrv: FakeElasticsearch) -> None:
    r = record(7, comment=HOSTILE)
    validate(r.doc())  # still a valid drop event: hostility is in the names, not the shape
    assert b"\n" not in r.json
    assert es(esrv.url).send([r]) == SendResult()
    assert esrv.stored == [r.json]
    assert json.loads(esrv.stored[0])["netfilter"]["rule"]["comment"] == HOSTILE


def test_opensearch_shaped_answer_without_filter_path_is_read_too() -> None:
    # An answer with every item field (what a proxy that drops the query would get back).
    def strip_filter(req: Request) -> Answer | None:
        req.query.pop("filter_path", None)
        return None

    with FakeElasticsearch(override=strip_filter,
                           item_policy=lambda n, doc: (400, mapping_error("a1", "source.ip", "x"))
                           if n == 1 else (201, None)) as srv:
        result = es(srv.url).send(records(3))
    assert result.retry == ()
    assert [i for i, _ in result.rejected] == [1]


# ================================================================ Elasticsearch: answers


def test_partial_failure_retries_429_and_rejects_mapping_errors() -> None:
    def policy(n: int, doc: dict[str, Any]) -> tuple[int, dict[str, Any] | None]:
        if n in (1, 4):
            return 429, REJECTED_429
        if n == 2:
            return 400, mapping_error("t3sCz5IB", "source.ip", doc["source"]["ip"])
        if n == 5:
            return 503, es_error("unavailable_shards_exception", "[tracer-drops][0] primary shard is not active")
        return 201, None

    with FakeElasticsearch(item_policy=policy) as srv:
        batch = records(7)
        result = es(srv.url).send(batch)
    assert result.retry == (1, 4, 5)
    ((i, why),) = result.rejected
    assert i == 2
    assert why.startswith("HTTP 400: document_parsing_exception: [1:42] failed to parse field [source.ip]")
    assert srv.stored == [batch[k].json for k in (0, 3, 6)]


def test_rejection_reason_is_escaped_and_short() -> None:
    long_value = HOSTILE * 40
    with FakeElasticsearch(item_policy=lambda n, d: (400, mapping_error("x", "f", long_value))) as srv:
        ((_, why),) = es(srv.url).send(records(1)).rejected
    assert "\n" not in why and "\x1b" not in why and "\u202e" not in why
    assert len(why) < 400


def test_401_is_down_with_a_clear_reason_and_no_secret(esrv: FakeElasticsearch) -> None:
    esrv.auth = "Basic nobody-has-this"
    t = es(esrv.url, username="tracer", password=PASSWORD)
    reason = down(t, records(2))
    assert reason.startswith("authentication failed (HTTP 401: security_exception")
    assert PASSWORD not in reason and base64.b64encode(PASSWORD.encode()).decode() not in reason
    assert esrv.stored == []


def test_opensearch_plain_text_401_is_down() -> None:
    with FakeElasticsearch(override=lambda r: Answer(401, b"Unauthorized", "text/plain")) as srv:
        assert down(es(srv.url), records(1)) == "authentication failed (HTTP 401)"


def test_item_403_everywhere_is_down_but_mixed_is_retried() -> None:
    denied = es_error("security_exception", "action [indices:data/write/bulk[s]] is unauthorized for API key "
                      "id [NzgjmnoBq3Eup03vg25H] of user [tracer] on indices [tracer-drops]")
    with FakeElasticsearch(item_policy=lambda n, d: (403, denied)) as srv:
        reason = down(es(srv.url), records(3))
    assert reason.startswith("documents refused: HTTP 403: security_exception")
    with FakeElasticsearch(item_policy=lambda n, d: (403, denied) if n == 1 else (201, None)) as srv:
        assert es(srv.url).send(records(3)) == SendResult(retry=(1,))


@pytest.mark.parametrize(("answer", "expected"), [
    (es_top_error(503, "cluster_block_exception",
                  "blocked by: [SERVICE_UNAVAILABLE/1/state not recovered / initialized];"),
     "unavailable (HTTP 503: cluster_block_exception: blocked by: [SERVICE_UNAVAILABLE/1/state not recovered"),
    (es_top_error(429, "circuit_breaking_exception", "[parent] Data too large"),
     "too many requests (HTTP 429: circuit_breaking_exception"),
    (Answer(502, b"<html>Bad Gateway</html>", "text/html"), "bad gateway (HTTP 502)"),
    (Answer(301, b"", "text/plain"), "redirected"),
    (Answer(200, b"<html>hello</html>", "text/html"), "HTTP 200 without a bulk answer"),
])
def test_whole_request_failures_are_down(answer: Answer, expected: str) -> None:
    with FakeElasticsearch(override=lambda r: answer) as srv:
        assert down(es(srv.url), records(2)).startswith(expected)


def test_413_splits_the_batch_keeps_order_and_learns_the_limit() -> None:
    batch = records(40)
    one = len(es("http://127.0.0.1:1", gzip=False).body(batch[:1]))
    with FakeElasticsearch(max_body=one * 7) as srv:
        t = es(srv.url, gzip=False)
        assert t.send(batch) == SendResult()
        assert srv.stored == [r.json for r in batch]  # in order, each once
        assert t.chunker.limit == 5  # 40 -> 20 -> 10 -> 5
        before = len(srv.requests)
        assert t.send(records(10, start=40)) == SendResult()
        assert len(srv.requests) - before == 2  # no more 413s: the limit was kept


def test_413_for_one_event_rejects_it_and_never_loops() -> None:
    big = record(1, comment="x" * 5000)
    with FakeElasticsearch(max_body=3000) as srv:
        result = es(srv.url, gzip=False).send([record(0), big, record(2)])
        assert result.retry == ()
        assert result.rejected == ((1, "event too large for the server (HTTP 413)"),)
        assert len(srv.stored) == 2
        assert len(srv.requests) < 10


def test_down_after_a_delivered_chunk_retries_only_the_rest() -> None:
    batch = records(8)
    calls = {"n": 0}

    def second_chunk_fails(req: Request) -> Answer | None:
        if len(req.raw) > 4 * len(batch[0].json) + 4 * 60:
            return Answer(413)
        calls["n"] += 1
        return Answer(503, b"", "text/plain") if calls["n"] == 2 else None

    with FakeElasticsearch(override=second_chunk_fails) as srv:
        result = es(srv.url, gzip=False).send(batch)
        assert result == SendResult(retry=(4, 5, 6, 7))
        assert srv.stored == [r.json for r in batch[:4]]


def test_chunker_on_its_own_never_loops() -> None:
    def always_too_large(chunk: Any) -> SendResult:
        from tracer.outputs.http import TooLarge
        raise TooLarge

    c = Chunker(500)
    result = c.send(records(5), always_too_large)
    assert [i for i, _ in result.rejected] == [0, 1, 2, 3, 4]
    assert c.limit == 1


# ================================================================ connection and TLS failures


def test_server_stopped_is_connection_refused_then_back() -> None:
    srv = FakeElasticsearch().start()
    t = es(srv.url)
    assert t.send(records(1)) == SendResult()  # a kept-alive connection now exists
    srv.stop()
    assert down(t, records(1)) == "cannot connect: connection refused"
    assert down(t, records(1)) == "cannot connect: connection refused"
    back = FakeElasticsearch()
    back.port = srv.port
    with back:
        assert t.send(records(2)) == SendResult()
        assert len(back.stored) == 2


def test_a_server_that_does_not_answer_is_a_timeout() -> None:
    def slow(req: Request) -> Answer | None:
        time.sleep(1.5)
        return None

    with FakeElasticsearch(override=slow) as srv:
        t = es(srv.url, timeout=0.3)
        assert down(t, records(1)) == "no answer within 0.3 s"


def test_tls_with_the_ca_file(ca: trustme.CA, ca_file: str) -> None:
    with FakeElasticsearch(tls=server_tls(ca)) as srv:
        assert srv.url.startswith("https://")
        assert es(srv.url, ca_file=ca_file).send(records(2)) == SendResult()
        assert len(srv.stored) == 2


def test_tls_unknown_ca_fails_verification(ca: trustme.CA, tmp_path: Path) -> None:
    other = trustme.CA()
    other_file = tmp_path / "other.pem"
    other.cert_pem.write_to_path(str(other_file))
    with FakeElasticsearch(tls=server_tls(ca)) as srv:
        reason = down(es(srv.url, ca_file=str(other_file)), records(1))
        assert reason.startswith("TLS: server certificate not accepted: unable to get local issuer certificate")
        reason = down(es(srv.url), records(1))  # the system's CAs do not know trustme's either
        assert reason.startswith("TLS: server certificate not accepted")
        assert srv.requests == []


def test_tls_name_mismatch_fails(ca: trustme.CA, ca_file: str) -> None:
    with FakeElasticsearch(tls=server_tls(ca, "es.example.org")) as srv:
        reason = down(es(srv.url, ca_file=ca_file), records(1))
    assert reason.startswith("TLS: server certificate not accepted: IP address mismatch")


def test_verify_tls_off_works_and_warns_once(ca: trustme.CA) -> None:
    with FakeSplunk(token=TOKEN, tls=server_tls(ca, "elsewhere.example.org")) as srv, \
            structlog.testing.capture_logs() as logs:
        t = hec_out(srv.url, verify_tls=False)
        t.open()
        assert t.send(records(2)) == SendResult()
        t.close()
        t.open()
        assert t.send(records(1)) == SendResult()
    warnings = [e for e in logs if e["event"] == "output.tls_not_verified"]
    assert len(warnings) == 1 and warnings[0]["output"] == t.name
    assert TOKEN not in str(logs)


def test_plain_http_to_a_tls_server_is_down(ca: trustme.CA) -> None:
    with FakeElasticsearch(tls=server_tls(ca)) as srv:
        reason = down(es(srv.url.replace("https://", "http://")), records(1))
    assert reason.startswith(("connection lost", "cannot connect"))


# ================================================================ Splunk HEC: the wire


def test_hec_envelope_and_authorization(hsrv: FakeSplunk) -> None:
    t = hec_out(hsrv.url, gzip=False, host="web-1")
    batch = records(3)
    assert t.send(batch) == SendResult()
    (req,) = hsrv.requests
    assert req.path == "/services/collector/event"
    assert req.headers["authorization"] == f"Splunk {TOKEN}"
    assert req.headers["content-type"] == "application/json"
    assert req.headers["user-agent"] == f"tracer/{__version__}"
    first = hsrv.raw_events[0]
    assert first == (b'{"time":1795261800.000000,"host":"web-1","source":"tracer","sourcetype":"tracer:drop",'
                     b'"event":' + batch[0].json + b"}")
    assert [e["event"] for e in hsrv.stored] == [r.doc() for r in batch]
    assert "index" not in hsrv.stored[0] and "fields" not in hsrv.stored[0]
    assert [e["time"] for e in hsrv.stored] == [1795261800.0, 1795261800.000001, 1795261800.000002]


def test_hec_time_is_written_digit_for_digit() -> None:
    assert splunk.epoch_text("2026-11-21T11:50:00.123456Z") == "1795261800.123456"
    assert splunk.epoch_text("1970-01-01T00:00:01Z") == "1"
    assert splunk.epoch_text("2026-11-21 11:50:00") is None


def test_hec_index_fields_gzip_and_a_full_path() -> None:
    with FakeSplunk(token=TOKEN, path="/services/collector/event/1.0", indexes={"network"}) as srv:
        t = hec_out(srv.url + "/services/collector/event/1.0", index="network", sourcetype="_json",
                    indexed_fields=("drop.reason", "netfilter.table", "tcp.flags", "nothing.here"))
        batch = records(20)
        assert t.send(batch) == SendResult()
        (req,) = srv.requests
        assert req.headers["content-encoding"] == "gzip"
        assert gzip.decompress(req.raw) == t.body(batch)
        env = srv.stored[0]
        assert env["index"] == "network" and env["sourcetype"] == "_json"
        assert env["fields"] == {"drop.reason": "NETFILTER_DROP", "netfilter.table": "fw", "tcp.flags": ["SYN"]}
        assert not srv.problems


def test_hec_hostile_event_round_trips_byte_exact(hsrv: FakeSplunk) -> None:
    r = record(3, comment=HOSTILE)
    assert hec_out(hsrv.url).send([r]) == SendResult()
    (raw,) = hsrv.raw_events
    assert raw.endswith(b',"event":' + r.json + b"}")
    assert hsrv.stored[0]["event"]["netfilter"]["rule"]["comment"] == HOSTILE


def test_hec_token_file_newline_stripped(hsrv: FakeSplunk, tmp_path: Path) -> None:
    f = tmp_path / "token"
    f.write_text(TOKEN + "\n")
    t = hec_out(hsrv.url, token=None, token_file=str(f))
    assert t.send(records(1)) == SendResult()
    assert TOKEN not in t.name


# ================================================================ Splunk HEC: answers


def test_hec_invalid_event_rejects_it_and_retries_the_rest() -> None:
    with FakeSplunk(token=TOKEN, bad_event=lambda n, env: 6 if n == 2 else 0) as srv:
        batch = records(5)
        result = hec_out(srv.url).send(batch)
        assert result.rejected == ((2, "HEC code 6: Invalid data format"),)
        assert result.retry == (3, 4)
        assert [e["event"] for e in srv.stored] == [r.doc() for r in batch[:2]]  # HEC kept those before it


def test_hec_invalid_token_is_down_without_the_token() -> None:
    with FakeSplunk(token="another-token") as srv:  # noqa: S106
        reason = down(hec_out(srv.url), records(1))
    assert reason == "token refused (HEC code 4: Invalid token)"
    assert TOKEN not in reason


def test_hec_token_disabled_403_is_down() -> None:
    with FakeSplunk(token=TOKEN, override=lambda r: hec(403, "Token disabled", 1)) as srv:
        assert down(hec_out(srv.url), records(1)) == "token refused (HEC code 1: Token disabled)"


@pytest.mark.parametrize(("answer", "expected"), [
    (hec(503, "Server is busy", 9), "unavailable (HTTP 503: HEC code 9: Server is busy)"),
    (hec(503, "HEC is unhealthy, queues are full", 18), "unavailable (HTTP 503: HEC code 18"),
    (hec(500, "Internal server error", 8), "server error (HTTP 500: HEC code 8: Internal server error)"),
    (hec(400, "Data channel is missing", 10), "the token requires indexer acknowledgement"),
    (Answer(404, b"<html>Not Found</html>", "text/html"), "not found (check the url's path) (HTTP 404)"),
])
def test_hec_busy_and_broken_are_down(answer: Answer, expected: str) -> None:
    with FakeSplunk(token=TOKEN, override=lambda r: answer) as srv:
        assert down(hec_out(srv.url), records(2)).startswith(expected)


def test_hec_index_not_allowed_is_down() -> None:
    with FakeSplunk(token=TOKEN, indexes={"main"}) as srv:
        reason = down(hec_out(srv.url, index="network"), records(2))
    assert reason.startswith("index network refused: not in the token's allowed indexes (HEC code 7")


def test_hec_server_stopped_and_tls(ca: trustme.CA, ca_file: str) -> None:
    srv = FakeSplunk(token=TOKEN, tls=server_tls(ca)).start()
    t = hec_out(srv.url, ca_file=ca_file)
    assert t.send(records(2)) == SendResult()
    srv.stop()
    assert down(t, records(1)) == "cannot connect: connection refused"


# ================================================================ check()


@pytest.mark.parametrize(("kw", "message"), [
    ({"url": "ftp://h:21"}, "url: 'ftp://h:21': the scheme must be http:// or https://"),
    ({"url": "http://"}, "url: 'http://' has no host"),
    ({"url": ""}, "url: empty"),
    ({"url": "http://h:9200/?x=1"}, "url: 'http://h:9200/?x=1': no query string"),
    ({"url": "http://h:99999"}, "url: 'http://h:99999' is not a URL"),
    ({"index": "Drops"}, "index: 'Drops' must be lower case"),
    ({"index": "drops 1"}, "index: 'drops 1' may not contain ' '"),
    ({"index": "a/b*c"}, "index: 'a/b*c' may not contain '*' '/'"),
    ({"index": "_drops"}, "index: '_drops' may not start with"),
    ({"index": ".."}, "index: '..' is not a valid name"),
    ({"index": "x", "data_stream": "y"}, "index: give index or data_stream, not both"),
    ({"data_stream": "Logs"}, "data_stream: 'Logs' must be lower case"),
    ({"data_stream": ".ds-x"}, "data_stream: may not start with '.ds-'"),
    ({"password": "p"}, "username: required with password or password_file"),
    ({"username": "u"}, "password: username is set"),
    ({"username": "u:v", "password": "p"}, "username: 'u:v': non-empty, printable, without ':'"),
    ({"username": "u", "password": "p", "api_key": "k"}, "api_key: give username/password or api_key"),
    ({"api_key": "k", "api_key_file": "/etc/hostname"}, "api_key: give api_key or api_key_file"),
    ({"api_key": "a key"}, "api_key: only printable ASCII"),
    ({"username": "u", "password_file": "/nonexistent/pw"}, "password_file: '/nonexistent/pw' is not a file"),
    ({"url": "https://h", "ca_file": "/nonexistent/ca.pem"}, "ca_file: '/nonexistent/ca.pem' does not exist"),
    ({"url": "https://h", "ca_file": "/etc/hostname"}, "ca_file: '/etc/hostname' holds no PEM certificate"),
    ({"ca_file": "/etc/hostname"}, "ca_file: set, but the url is http://"),
    ({"timeout": 0.0}, "timeout: 0.0 is not a number of seconds"),
    ({"timeout": float("nan")}, "timeout: nan"),
    ({"max_batch": 0}, "max_batch: 0 is not a number of events"),
    ({"pipeline": ""}, "pipeline: '' must be non-empty"),
])
def test_elasticsearch_check_names_the_key(kw: dict[str, Any], message: str) -> None:
    kw.setdefault("url", "http://127.0.0.1:9200")
    with pytest.raises(ConfigError) as info:
        elasticsearch.Options(**kw).check()
    assert str(info.value).startswith(message)


def test_credentials_in_the_url_are_refused_without_echo() -> None:
    with pytest.raises(ConfigError) as info:
        elasticsearch.Options(url=f"https://tracer:{PASSWORD}@es:9200").check()
    assert str(info.value).startswith("url: the URL holds credentials")
    assert PASSWORD not in str(info.value)


def test_the_issue_example_config_checks() -> None:
    opts = elasticsearch.Options(url="http://127.0.0.1:9200", index="tracer-drops")
    opts.check()
    assert elasticsearch.Options(url="http://127.0.0.1:9200").target == "tracer-drops"
    assert opts.transport().name == "elasticsearch http://127.0.0.1:9200 index tracer-drops"


@pytest.mark.parametrize(("kw", "message"), [
    ({}, "token: give token or token_file"),
    ({"token": "t", "token_file": "/etc/hostname"}, "token: give token or token_file"),
    ({"token": "bad token"}, "token: only printable ASCII"),
    ({"token": "t", "index": "Main"}, "index: 'Main': lower-case letters"),
    ({"token": "t", "index": "_internal"}, "index: '_internal'"),
    ({"token": "t", "sourcetype": ""}, "sourcetype: '' must be non-empty"),
    ({"token": "t", "host": "a\nb"}, "host: 'a\\\\nb' must be non-empty"),
    ({"token": "t", "indexed_fields": ("drop reason",)}, "indexed_fields: 'drop reason' is not a dotted"),
    ({"token": "t", "url": "splunk:8088"}, "url: 'splunk:8088': the scheme must be"),
    ({"token_file": "/nonexistent"}, "token_file: '/nonexistent' is not a file"),
    ({"token": "t", "max_batch": 10_001}, "max_batch: 10001 is not"),
])
def test_splunk_check_names_the_key(kw: dict[str, Any], message: str) -> None:
    kw.setdefault("url", "https://splunk:8088")
    with pytest.raises(ConfigError) as info:
        splunk.Options(**kw).check()
    assert str(info.value).startswith(message)


def test_secret_files(tmp_path: Path) -> None:
    f = tmp_path / "s"
    f.write_bytes(b"abc\n\n")
    assert read_secret("token_file", str(f)) == "abc\n"  # one trailing newline only
    f.write_bytes(b"\n")
    with pytest.raises(ConfigError, match=r"^token_file: '.*' is empty"):
        read_secret("token_file", str(f))
    f.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=r"^token_file: '.*' is not UTF-8"):
        read_secret("token_file", str(f))
    f.write_text("two words\n")
    with pytest.raises(ConfigError, match=r"^token_file: only printable ASCII"):
        splunk.Options(url="http://h:8088", token_file=str(f)).transport()


def test_url_defaults_the_port_from_the_scheme() -> None:
    assert str(check_url("url", "https://es.example.org")) == "https://es.example.org:443"
    assert str(check_url("url", "http://[2001:db8::1]:9200/p")) == "http://[2001:db8::1]:9200/p"


def test_hec_time_when_the_timestamp_is_not_the_first_key(hsrv: FakeSplunk) -> None:
    doc = event(5)
    reordered = {k: v for k, v in doc.items() if k != "@timestamp"} | {"@timestamp": doc["@timestamp"]}
    r = Record(orjson.dumps(reordered), "")
    assert not r.json.startswith(b'{"@timestamp"')
    no_time = Record(orjson.dumps({k: v for k, v in doc.items() if k != "@timestamp"}), "")
    assert hec_out(hsrv.url).send([r, no_time]) == SendResult()
    assert hsrv.stored[0]["time"] == 1795261800.000005
    assert "time" not in hsrv.stored[1]  # HEC then uses the time it received it
