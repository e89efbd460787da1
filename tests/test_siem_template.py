"""The SIEM side of the contract: the Elasticsearch/OpenSearch index template and the rsyslog example.

docs/siem/elasticsearch-index-template.json must map every field the two
JSON Schemas (drop events, notices) allow, with a type that takes the
field's values (dates as dates, addresses as `ip`, integers in a numeric
type wide enough for the schema's range), and nothing the schemas do not
have. Then real events, built by the model and made by a watch in a lab,
are checked value by value against the mapping, as Elasticsearch would
coerce them. docs/siem/rsyslog.conf is run by a real rsyslogd that receives
events framed as the syslog output frames them.
"""

from __future__ import annotations

import copy
import ipaddress
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import support
from tests.support import rule_handles, to_port
from tracer.event import schema
from tracer.event.model import DropEvent
from tracer.event.notice import CONNTRACK_DATASET, LOSS_DATASET, Notice
from tracer.event.rendered import Rendered
from tracer.event.sections import Namespace

ROOT = Path(__file__).resolve().parent.parent
SIEM = ROOT / "docs" / "siem"
TEMPLATE = SIEM / "elasticsearch-index-template.json"
RSYSLOG_CONF = SIEM / "rsyslog.conf"

# -- what the schemas allow -------------------------------------------------------------


@dataclass
class Leaf:
    """One field the schemas allow, with what its values can be (merged over both schemas)."""

    path: str
    kinds: set[str] = field(default_factory=set)  # JSON types: string, integer, number, boolean, null
    array: bool = False
    date: bool = False
    ip: bool = False
    minimum: int | float | None = None
    maximum: int | float | None = None
    schemas: set[str] = field(default_factory=set)


_PY_KINDS = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}


def _resolve(root: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in node:
        ref = node["$ref"]
        assert ref.startswith("#/$defs/"), f"only local references are followed: {ref}"
        extra = {k: v for k, v in node.items() if k != "$ref"}
        node = {**root["$defs"][ref.removeprefix("#/$defs/")], **extra}
    return node


def _branches(root: dict[str, Any], node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`node` and, recursively, the alternatives it allows (anyOf, oneOf; not the if/then rules)."""
    node = _resolve(root, node)
    yield node
    for key in ("anyOf", "oneOf"):
        for branch in node.get(key, ()):
            yield from _branches(root, branch)


def _walk(root: dict[str, Any], node: dict[str, Any], path: str, name: str, out: dict[str, Leaf],
          array: bool = False) -> None:
    branches = list(_branches(root, node))
    props: dict[str, dict[str, Any]] = {}
    for b in branches:
        for key, sub in b.get("properties", {}).items():
            props.setdefault(key, sub)
    is_object = any(b.get("type") == "object" or "properties" in b for b in branches)
    if is_object:
        assert props, f"{path}: an open object, which no mapping can cover"
        assert all(b.get("additionalProperties") is False for b in branches if "properties" in b), \
            f"{path}: objects must be closed (additionalProperties false)"
        for key, sub in props.items():
            _walk(root, sub, f"{path}.{key}" if path else key, name, out)
        return
    items = [b["items"] for b in branches if b.get("type") == "array"]
    if items:
        assert len(items) == 1, f"{path}: several array forms"
        _walk(root, items[0], path, name, out, array=True)
        return
    leaf = out.setdefault(path, Leaf(path))
    leaf.array |= array
    leaf.schemas.add(name)
    for b in branches:
        types = b.get("type")
        if isinstance(types, str):
            leaf.kinds.add(types)
        elif isinstance(types, list):
            leaf.kinds.update(types)
        values = b.get("enum", []) + ([b["const"]] if "const" in b else [])
        leaf.kinds.update(_PY_KINDS[type(v)] for v in values)
        leaf.date |= b.get("format") == "date-time"
        leaf.ip |= b.get("format") in ("ipv4", "ipv6")
        if "minimum" in b:
            leaf.minimum = b["minimum"] if leaf.minimum is None else min(leaf.minimum, b["minimum"])
        if "maximum" in b:
            leaf.maximum = b["maximum"] if leaf.maximum is None else max(leaf.maximum, b["maximum"])
    assert leaf.kinds - {"null"}, f"{path}: no type the schema names"


def schema_leaves() -> dict[str, Leaf]:
    out: dict[str, Leaf] = {}
    for name in (schema.DROP_EVENT, schema.NOTICE_EVENT, schema.COUNTER_EVENT):
        root = schema.load_schema(name)
        _walk(root, root, "", name, out)
    return out


# -- what the template maps ---------------------------------------------------------------


def load_template() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(TEMPLATE.read_text(encoding="utf-8"))
    return loaded


def mapped_leaves(properties: dict[str, Any], prefix: str = "") -> dict[str, dict[str, Any]]:
    """path -> the field's mapping, for every leaf of a mapping's `properties`."""
    out: dict[str, dict[str, Any]] = {}
    for key, m in properties.items():
        path = f"{prefix}.{key}" if prefix else key
        if "properties" in m:
            assert m.get("type", "object") == "object", f"{path}: properties on a {m['type']}"
            out.update(mapped_leaves(m["properties"], path))
        else:
            assert "type" in m, f"{path}: a mapping without a type"
            out[path] = m
    return out


def template_fields() -> dict[str, dict[str, Any]]:
    return mapped_leaves(load_template()["template"]["mappings"]["properties"])


STRING_TYPES = {"keyword", "text", "constant_keyword", "wildcard", "match_only_text"}
DATE_TYPES = {"date", "date_nanos"}
#: The range each integer type holds.
INTEGER_RANGES = {
    "byte": (-(2**7), 2**7 - 1),
    "short": (-(2**15), 2**15 - 1),
    "integer": (-(2**31), 2**31 - 1),
    "long": (-(2**63), 2**63 - 1),
    "unsigned_long": (0, 2**64 - 1),
}
FLOAT_TYPES = {"float", "double", "half_float", "scaled_float"}


def compatibility_problem(leaf: Leaf, mapping: dict[str, Any]) -> str | None:
    """Why `mapping` cannot hold the values `leaf` allows, or None."""
    kinds = leaf.kinds - {"null"}
    mtype = mapping["type"]
    if leaf.date:
        return None if mtype in DATE_TYPES else f"a timestamp mapped as {mtype}"
    if leaf.ip:
        return None if mtype == "ip" else f"an address mapped as {mtype}"
    if mtype in DATE_TYPES | {"ip"}:
        return f"{sorted(kinds)} values mapped as {mtype}"
    if kinds == {"string"}:
        return None if mtype in STRING_TYPES else f"a string mapped as {mtype}"
    if kinds == {"boolean"}:
        return None if mtype == "boolean" else f"a boolean mapped as {mtype}"
    if kinds == {"integer"}:
        if mtype not in INTEGER_RANGES:
            return f"an integer mapped as {mtype}"
        low, high = INTEGER_RANGES[mtype]
        if leaf.minimum is None or leaf.maximum is None:
            return None if mtype in ("long", "unsigned_long") else f"an unbounded integer mapped as {mtype}"
        if not low <= leaf.minimum <= leaf.maximum <= high:
            return f"{leaf.minimum}..{leaf.maximum} does not fit {mtype}"
        return None
    if kinds <= {"integer", "number"}:
        return None if mtype in FLOAT_TYPES else f"a number mapped as {mtype}"
    return f"values of several kinds {sorted(kinds)}"


# -- the template against the schemas --------------------------------------------------------


def test_template_is_a_composable_index_template() -> None:
    t = load_template()
    assert set(t) <= {"index_patterns", "priority", "template", "_meta", "composed_of", "data_stream", "version"}
    assert t["index_patterns"] == ["tracer-*"]
    assert isinstance(t["priority"], int) and t["priority"] > 100  # above the built-in logs-*-* template
    mappings = t["template"]["mappings"]
    # A field the template does not know yet (a newer tracer) is kept in _source, never refused.
    assert mappings["dynamic"] is False


def test_every_schema_field_is_mapped() -> None:
    missing = sorted(set(schema_leaves()) - set(template_fields()))
    assert not missing, f"fields the schemas allow and the template does not map: {missing}"


def test_the_template_maps_nothing_the_schemas_lack() -> None:
    extra = sorted(set(template_fields()) - set(schema_leaves()))
    assert not extra, f"fields the template maps and no schema has: {extra}"


def test_each_field_is_mapped_to_a_type_that_holds_its_values() -> None:
    mapped = template_fields()
    problems = []
    for path, leaf in sorted(schema_leaves().items()):
        problem = compatibility_problem(leaf, mapped[path])
        if problem:
            problems.append(f"{path}: {problem}")
    assert not problems, "\n".join(problems)


def test_dates_keep_their_microseconds_and_addresses_are_ips() -> None:
    mapped, leaves = template_fields(), schema_leaves()
    dates = {p for p, leaf in leaves.items() if leaf.date}
    assert dates == {"@timestamp", "event.start", "event.end"}
    assert {mapped[p]["type"] for p in dates} == {"date_nanos"}
    ips = {p for p, leaf in leaves.items() if leaf.ip}
    assert ips == {"source.ip", "destination.ip", "related.ip", "neighbor.ip",
                   *(f"{part}.{side}.ip" for part in ("conntrack.original", "conntrack.reply", "drop.icmp.quoted")
                     for side in ("source", "destination"))}
    assert {mapped[p]["type"] for p in ips} == {"ip"}
    assert leaves["related.ip"].array and leaves["drop.stack"].array
    assert mapped["drop.stack"]["type"] == "keyword"
    assert mapped["event.count"]["type"] == "long"
    assert mapped["message"]["type"] == "text"


def test_the_walker_sees_a_mistake() -> None:
    """The checks above are not vacuous: a wrong type, a missing and an extra field are found."""
    mapped = copy.deepcopy(template_fields())
    leaves = schema_leaves()
    assert compatibility_problem(leaves["netns.inode"], {"type": "integer"})  # up to 2^32 - 1
    assert compatibility_problem(leaves["source.ip"], {"type": "keyword"})
    assert compatibility_problem(leaves["@timestamp"], {"type": "keyword"})
    assert compatibility_problem(leaves["rule.id"], {"type": "long"})
    assert compatibility_problem(leaves["conntrack.table.ratio"], {"type": "long"})
    assert compatibility_problem(leaves["conntrack.zone"], {"type": "short"})  # up to 65535
    assert compatibility_problem(leaves["conntrack.zone"], {"type": "integer"}) is None
    del mapped["rule.ruleset"]
    assert "rule.ruleset" in set(leaves) - set(mapped)


def test_the_data_stream_variant_docs_siem_describes() -> None:
    """docs/siem.md makes the data stream template with jq from this file: it must stay valid for one."""
    text = (ROOT / "docs" / "siem.md").read_text(encoding="utf-8")
    assert "elasticsearch-index-template.json" in text and "data_stream: {}" in text
    # A data stream needs @timestamp as a date.
    assert template_fields()["@timestamp"]["type"] in DATE_TYPES


# -- real values against the mapping ------------------------------------------------------


def coercion_problems(doc: Any, mapped: dict[str, dict[str, Any]], path: str = "") -> list[str]:
    """What Elasticsearch would refuse or silently not index in `doc`, field by field."""
    if isinstance(doc, dict):
        out = []
        for key, value in doc.items():
            out += coercion_problems(value, mapped, f"{path}.{key}" if path else key)
        return out
    if isinstance(doc, list):
        return [p for item in doc for p in coercion_problems(item, mapped, path)]
    if doc is None:
        return []  # not indexed, as documented (netfilter.rule of a policy drop)
    m = mapped.get(path)
    if m is None:
        return [f"{path}: not mapped (dynamic false: it would not be searchable)"]
    problem = _coerce(doc, m)
    return [f"{path}: {doc!r} {problem}"] if problem else []


def _coerce(value: Any, m: dict[str, Any]) -> str | None:
    mtype = m["type"]
    if mtype in STRING_TYPES:
        if not isinstance(value, str):
            return f"is not a string for {mtype}"
        if mtype == "keyword" and len(value) > m.get("ignore_above", 2**31):
            return f"is longer than ignore_above {m['ignore_above']} (kept, not indexed)"
        return None
    if mtype == "ip":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return "is no address"
        return None
    if mtype in DATE_TYPES:
        if not isinstance(value, str) or not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", value):
            return "is not strict_date_optional_time with microseconds"
        datetime.fromisoformat(value)
        return None
    if mtype in INTEGER_RANGES:
        low, high = INTEGER_RANGES[mtype]
        return None if type(value) is int and low <= value <= high else f"is not a {mtype}"
    if mtype in FLOAT_TYPES:
        return None if type(value) in (int, float) else f"is not a {mtype}"
    if mtype == "boolean":
        return None if isinstance(value, bool) else "is not a boolean"
    return f"has a mapping type the test does not know: {mtype}"


def model_events() -> list[dict[str, Any]]:
    """Documents the model makes: the documented examples read into it and rendered again, and notices."""
    docs = [DropEvent.from_ecs(d).to_ecs() for d in support.doc_examples()]
    docs += support.doc_examples(notices=True)
    docs.append(Notice(timestamp_ns=1_790_000_000_000_000_000, dataset=CONNTRACK_DATASET,
                       action="conntrack_table_filling", message="conntrack table at 91%", kind="alert",
                       severity=50, netns=Namespace(4026532211, "web"), section="conntrack",
                       details={"table": {"count": 910, "max": 1000, "ratio": 0.91},
                                "stats": {"drop": 0, "early_drop": 0, "insert_failed": 0, "invalid": 0},
                                "threshold": 0.9}).to_ecs())
    docs.append(Notice(timestamp_ns=1_790_000_000_000_000_000, dataset=LOSS_DATASET, action="events_lost",
                       message="3 drop(s) not shown one by one", severity=50,
                       details={"loss": {"ring_buffer": 3, "total": 3, "counted_in_summaries": True}},
                       start_ns=1_789_999_999_000_000_000, end_ns=1_790_000_000_000_000_000).to_ecs())
    return docs


@pytest.mark.parametrize("index", range(len(model_events())))
def test_model_events_fit_the_schema_and_the_template(index: int) -> None:
    doc = model_events()[index]
    schema.validate(doc)
    assert coercion_problems(doc, template_fields()) == []


def test_coercion_sees_a_mistake() -> None:
    doc = model_events()[0]
    doc["source"]["ip"] = "web-1"
    doc["event"]["count"] = "1"
    doc["@timestamp"] = "yesterday"
    doc["surprise"] = 1
    problems = {p.split(":", 1)[0] for p in coercion_problems(doc, template_fields())}
    assert problems == {"source.ip", "event.count", "@timestamp", "surprise"}


#: A server whose input chain drops, rejects and lets its policy drop, for real events of each kind.
SIEM_RULESET = """
table inet fw {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        tcp dport 7443 drop comment "siem block"
        tcp dport 7444 reject with tcp reset
        udp dport 53 jump checks
    }
    chain checks {
        udp dport 53 drop
    }
}
"""


@pytest.mark.root
@pytest.mark.bpf
def test_events_of_a_real_watch_fit_the_schema_and_the_template(lab, watch) -> None:
    """A watch in a lab: a rule drop with a comment, a reject, a user chain's rule, a policy drop, IPv6."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(server, SIEM_RULESET)
    handles = rule_handles(lab, server)
    v4, v6 = str(link.b_v4.ip), str(link.b_v6.ip)
    w = watch()
    lab.tcp_connect(client, v4, 7443)
    lab.tcp_connect(client, v6, 7443)
    lab.tcp_connect(client, v4, 7444)
    lab.udp_send(client, v4, 53)
    lab.tcp_connect(client, v4, 8080)
    by_port = {port: w.sink.wait_for(to_port(port), timeout=5.0) for port in (7443, 7444, 53, 8080)}
    w.sink.wait_for(to_port(7443, v6), timeout=5.0)

    def rule_of(port: int) -> dict[str, Any]:
        rule: dict[str, Any] = by_port[port]["rule"]
        return rule

    assert rule_of(7443) == {"id": str(handles["tcp dport 7443 drop"]), "name": "siem block",
                             "ruleset": "inet fw input", "description": "tcp dport 7443 drop"}
    reject = by_port[7444]
    assert (reject["event"]["action"], reject["netfilter"]["verdict"]) == ("rejected", "reject")
    assert rule_of(7444)["id"] == str(handles["tcp dport 7444 reject with tcp reset"])
    assert rule_of(53) == {"id": str(handles["udp dport 53 drop"]), "name": "udp dport 53 drop",
                           "ruleset": "inet fw checks", "description": "udp dport 53 drop"}
    assert rule_of(8080) == {"name": "policy drop", "ruleset": "inet fw input"}
    for ev in by_port.values():
        assert ev["related"]["ip"] == [str(link.a_v4.ip), v4]
        assert ev["host"]["hostname"] == socket.gethostname() == ev["observer"]["hostname"]
        assert ev["observer"]["product"] == "tracer"
    mapped = template_fields()
    assert w.sink.events, "no events"
    for ev in w.sink.events:  # every one was validated against the schema on arrival
        assert coercion_problems(ev, mapped) == [], ev


# -- the rsyslog example --------------------------------------------------------------------


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _rsyslogd() -> str:
    path = shutil.which("rsyslogd") or ("/usr/sbin/rsyslogd" if os.path.exists("/usr/sbin/rsyslogd") else None)
    if path is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("rsyslogd is missing (scripts/install-deps.sh installs rsyslog)", pytrace=False)
        pytest.skip("rsyslogd is not installed")
    return path


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    """docs/siem/rsyslog.conf run by its own rsyslogd: its UDP and TCP ports and its output file.

    Only the ports (free ones on 127.0.0.1), the output file and rsyslog's
    own working files are changed; the rest is the example as shipped.
    """
    udp, tcp = _free_port(socket.SOCK_DGRAM), _free_port(socket.SOCK_STREAM)
    out = tmp_path / "siem-drops.ndjson"
    conf = RSYSLOG_CONF.read_text(encoding="utf-8")
    for old, new in (('port="514"', f'port="{udp}"'), ('port="6514"', f'port="{tcp}"'),
                     ("/var/log/tracer/siem-drops.ndjson", str(out))):
        assert old in conf, f"docs/siem/rsyslog.conf no longer has {old}"
        conf = conf.replace(old, new)
    path = tmp_path / "rsyslog.conf"
    path.write_text(f'global(workDirectory="{tmp_path}")\n{conf}', encoding="utf-8")
    binary = _rsyslogd()
    check = subprocess.run([binary, "-N1", "-f", str(path)], capture_output=True, text=True, timeout=30,
                           check=False)
    assert check.returncode == 0, check.stderr
    proc = subprocess.Popen([binary, "-n", "-f", str(path), "-i", str(tmp_path / "rsyslogd.pid")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", tcp), timeout=0.5).close()
                break
            except OSError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else "rsyslogd exited"
                assert time.monotonic() < deadline, "rsyslogd never listened"
                time.sleep(0.1)
        yield udp, tcp, out
    finally:
        support.stop_process(proc, 15, 5)
        if proc.stderr is not None:
            proc.stderr.close()


def _rfc5424(app: str, msg: bytes) -> bytes:
    """A message as the syslog output frames one: RFC 5424 header, no structured data, the JSON as MSG."""
    return b"<134>1 2026-11-21T11:50:00.123456Z web-1 " + app.encode() + b" 4242 drop - " + msg


def test_the_rsyslog_example_writes_each_event_as_one_json_line(rsyslog) -> None:
    udp, tcp, out = rsyslog
    events = [json.loads(Rendered(DropEvent.from_ecs(d)).json()) for d in support.doc_examples()]
    big = copy.deepcopy(events[0])  # --stack events are several kB
    big["drop"]["stack"] = [f"frame_{i}+0x{i:x}" for i in range(600)]
    hostile = copy.deepcopy(events[0])
    hostile["netfilter"]["rule"]["comment"] = 'line\nbreak "quoted" \u202eevil é'
    events += [big, hostile]
    wire = [orjson.dumps(e) for e in events]
    assert len(wire[-2]) > 8192
    with socket.create_connection(("127.0.0.1", tcp)) as s:  # octet-counted framing (RFC 6587)
        for data in wire:
            frame = _rfc5424("tracer", data)
            s.sendall(str(len(frame)).encode() + b" " + frame)
        other = _rfc5424("sshd", b"Accepted publickey for root")
        s.sendall(str(len(other)).encode() + b" " + other)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        u.sendto(_rfc5424("tracer", wire[0]), ("127.0.0.1", udp))
    expected = [*wire, wire[0]]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = out.read_bytes().splitlines() if out.exists() else []
        if len(lines) >= len(expected):
            break
        time.sleep(0.1)
    assert sorted(lines) == sorted(expected)  # UDP and TCP may interleave; nothing else came through
    for line in lines:
        schema.validate_line(line)
    assert out.stat().st_mode & 0o777 == 0o600


# -- docs/siem.md against the outputs' keys ---------------------------------------------------


def _documented_outputs() -> list[tuple[str, set[str], set[str]]]:
    """(type, keys of its toml example, keys of the table that follows it), per output in docs/siem.md."""
    import tomllib

    text = (ROOT / "docs" / "siem.md").read_text(encoding="utf-8")
    found: list[tuple[str, set[str], set[str]]] = []
    for block in re.finditer(r"```toml\n(.*?)```(.*?)(?=```toml|\Z)", text, re.S):
        outputs = tomllib.loads(block.group(1)).get("output", [])
        assert len(outputs) == 1, f"one [[output]] per example: {block.group(1)}"
        example = dict(outputs[0])
        kind = example.pop("type")
        table: set[str] = set()
        for line in block.group(2).splitlines():
            if line.startswith("| `"):
                table.update(re.findall(r"`([a-z_]+)`", line.split("|")[1]))
            elif table and not line.startswith("|"):
                break  # the key table ended
        found.append((kind, set(example), table))
    return found


def test_siem_md_documents_every_key_of_each_output_and_no_other() -> None:
    from dataclasses import fields

    from tracer.outputs import registry

    documented = _documented_outputs()
    assert {kind for kind, _, _ in documented} == {"elasticsearch", "splunk_hec", "syslog", "journald"}
    common = {"name", "queue", "spool"}
    for kind, example, table in documented:
        keys = {f.name for f in fields(registry.options_class(kind))}
        assert example <= keys | common, f"{kind}: the example uses unknown keys {example - keys - common}"
        assert table == keys, f"{kind}: undocumented {sorted(keys - table)}, unknown {sorted(table - keys)}"
