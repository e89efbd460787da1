"""The drop-event schema accepts what the spec describes and rejects the usual mistakes.

The examples are the spec's own and the ones published in docs/drop-event.md,
so the documentation cannot drift from the schema without a test failing.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from jsonschema import Draft202012Validator

from tests import support
from tracer.event import schema

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "drop-event.md"

# The example of the spec (shared/specs/drop-event.md), verbatim.
SPEC_EXAMPLE: dict[str, Any] = {
    "@timestamp": "2026-11-21T11:50:00.123456Z",
    "ecs": {"version": "8.11.0"},
    "event": {
        "kind": "event",
        "category": ["network"],
        "type": ["connection", "denied"],
        "action": "dropped",
        "dataset": "tracer.drop",
        "count": 1,
    },
    "drop": {
        "reason": "NETFILTER_DROP",
        "location": "nft_do_chain+0x3e8",
        "stack": ["sk_skb_reason_drop+0x90", "nft_do_chain+0x3e8", "..."],
    },
    "netfilter": {
        "backend": "nftables",
        "family": "inet",
        "hook": "input",
        "table": "fw",
        "chain": "input",
        "base_chain": "input",
        "rule": {"handle": 4, "text": "tcp dport 443 drop", "comment": "legacy block"},
        "policy": False,
        "verdict": "drop",
        "attribution": "nftrace",
    },
    "conntrack": {
        "state": "new",
        "direction": "original",
        "status": ["confirmed"],
        "zone": 0,
        "mark": 0,
    },
    "source": {"ip": "198.18.0.1", "port": 40000},
    "destination": {"ip": "198.18.0.2", "port": 443},
    "network": {
        "transport": "tcp",
        "type": "ipv4",
        "iana_number": "6",
        "direction": "ingress",
        "community_id": "1:...",
    },
    "tcp": {"flags": ["SYN"]},
    "observer": {
        "hostname": "web-1",
        "type": "host",
        "ingress": {"interface": {"name": "veth0", "id": "5"}},
    },
    "netns": {"inode": 4026532211, "name": "lab-server"},
    "process": {"pid": 1234, "name": "curl"},
    "packet": {"length": 60, "mark": 0},
}

# The spec elides two values with "...": the Community ID of its 5-tuple
# (computed with the communityid package) and the rest of the stack.
SPEC_COMMUNITY_ID = "1:nzmqH0i9ojhj6zrI5caNuu9uoEk="


def spec_event() -> dict[str, Any]:
    """The spec's example with its two elisions filled in."""
    event = copy.deepcopy(SPEC_EXAMPLE)
    event["network"]["community_id"] = SPEC_COMMUNITY_ID
    event["drop"]["stack"][2] = "ip_local_deliver+0xd6"
    return event


def siem_event() -> dict[str, Any]:
    """The spec's example with the SIEM fields of issue 9 (`rule`, `related`, `host`, `observer.*`)."""
    event = spec_event()
    event["rule"] = {"id": "4", "name": "legacy block", "ruleset": "inet fw input",
                     "description": "tcp dport 443 drop"}
    event["related"] = {"ip": ["198.18.0.1", "198.18.0.2"]}
    event["host"] = {"name": "web-1", "hostname": "web-1"}
    event["observer"].update(vendor="tracer", product="tracer", version="0.1.0")
    return event


def doc_examples() -> list[dict[str, Any]]:
    """The drop events (and summaries) of docs/drop-event.md; notices have their own schema."""
    return support.doc_examples()


def paths(event: dict[str, Any]) -> set[str]:
    """The field paths `schema.errors` complains about."""
    return {line.split(":", 1)[0] for line in schema.errors(event)}


# -- the schema itself ------------------------------------------------------


def test_schema_is_valid_draft_2020_12() -> None:
    loaded = schema.load_schema()
    assert loaded["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(loaded)


def test_docs_schema_is_a_relative_symlink_to_the_packaged_copy() -> None:
    docs_copy = ROOT / "docs" / "drop-event.schema.json"
    assert docs_copy.is_symlink()
    assert not os.path.isabs(os.readlink(docs_copy))
    assert docs_copy.resolve() == (ROOT / "tracer" / "data" / "drop-event.schema.json").resolve()
    assert json.loads(docs_copy.read_text()) == schema.load_schema()


def test_load_schema_returns_a_private_copy() -> None:
    first = schema.load_schema()
    first["properties"].clear()
    assert schema.load_schema()["properties"]
    assert schema.validator() is schema.validator()


# -- what must validate -----------------------------------------------------


def test_spec_example_validates() -> None:
    schema.validate(spec_event())


def test_spec_example_with_siem_fields_validates() -> None:
    schema.validate(siem_event())


def test_a_reject_validates_with_its_verdict() -> None:
    event = siem_event()
    event["event"]["action"] = "rejected"
    event["netfilter"]["verdict"] = "reject"
    schema.validate(event)


def test_spec_example_verbatim_fails_only_on_its_elisions() -> None:
    # Proves the schema takes every other value of the spec's example as is.
    assert paths(SPEC_EXAMPLE) == {"network.community_id", "drop.stack[2]"}


def test_docs_publish_the_promised_examples() -> None:
    examples = doc_examples()
    assert len(examples) >= 4
    nf = [e.get("netfilter") for e in examples]
    assert any(n and n["rule"] is None and n["policy"] is True for n in nf), "policy-drop example"
    assert any(e["drop"]["reason"] == "NO_SOCKET" and "netfilter" not in e for e in examples)
    assert any(e["event"]["dataset"] == "tracer.drop.summary" for e in examples)


@pytest.mark.parametrize("index", range(len(doc_examples())))
def test_doc_examples_validate(index: int) -> None:
    schema.validate(doc_examples()[index])


def test_doc_notice_examples_validate() -> None:
    """The alert and loss report examples follow the notice schema, and each kind has one."""
    notices = support.doc_examples(notices=True)
    assert {e["event"]["dataset"] for e in notices} == {"tracer.conntrack", "tracer.loss"}
    for event in notices:
        schema.validate(event, schema.NOTICE_EVENT)


def no_socket_event() -> dict[str, Any]:
    """A drop outside netfilter: no `netfilter` object, no direction."""
    return {
        "@timestamp": "2026-11-21T11:53:44.250031Z",
        "ecs": {"version": "8.11.0"},
        "event": {
            "kind": "event",
            "category": ["network"],
            "type": ["connection", "denied"],
            "action": "dropped",
            "dataset": "tracer.drop",
            "count": 1,
        },
        "drop": {"reason": "NO_SOCKET", "location": "tcp_v4_rcv+0x1a5"},
        "source": {"ip": "198.51.100.23", "port": 51000},
        "destination": {"ip": "203.0.113.10", "port": 8080},
        "network": {"transport": "tcp", "type": "ipv4", "iana_number": "6"},
        "tcp": {"flags": ["SYN"]},
        "observer": {"hostname": "web-1", "type": "host"},
    }


def policy_event() -> dict[str, Any]:
    event = spec_event()
    event["netfilter"]["rule"] = None
    event["netfilter"]["policy"] = True
    return event


def test_no_socket_event_validates() -> None:
    schema.validate(no_socket_event())


def test_policy_drop_validates() -> None:
    schema.validate(policy_event())


def test_minimal_event_validates() -> None:
    event = {k: spec_event()[k] for k in ("@timestamp", "ecs", "event", "drop")}
    event["drop"] = {"reason": "NETFILTER_DROP"}
    schema.validate(event)


def test_summary_event_validates() -> None:
    event = spec_event()
    event["event"].update(
        dataset="tracer.drop.summary",
        count=250,
        start="2026-11-21T11:49:50.000001Z",
        end="2026-11-21T11:50:00.123456Z",
    )
    schema.validate(event)


def test_ipv6_event_validates() -> None:
    event = no_socket_event()
    event["source"]["ip"] = "2001:db8::1"
    event["destination"]["ip"] = "fe80::1ff:fe23:4567:890a"
    event["network"].update(type="ipv6")
    schema.validate(event)


def test_netfilter_attribution_none_validates_without_rule_fields() -> None:
    event = spec_event()
    event["netfilter"] = {"backend": "nftables", "hook": "input", "attribution": "none"}
    schema.validate(event)


def test_rule_with_only_iptables_form_and_module_location_validate() -> None:
    event = spec_event()
    event["netfilter"].update(backend="iptables-legacy", family="ip", table="filter", chain="INPUT")
    event["netfilter"]["rule"] = {"iptables": "-A INPUT -p tcp -m tcp --dport 443 -j DROP"}
    event["drop"]["location"] = "nft_do_chain+0x3e8 [nf_tables]"
    event["drop"]["stack"] = ["nft_do_chain+0x3e8 [nf_tables]", "0xffffffffc0a1b2c3"]
    schema.validate(event)


def test_probe_object_is_allowed() -> None:
    event = spec_event()
    event["probe"] = {"id": "p-1"}
    schema.validate(event)


def test_validate_line_reads_what_the_ndjson_sink_writes() -> None:
    line = orjson.dumps(spec_event()) + b"\n"
    assert schema.validate_line(line) == spec_event()
    with pytest.raises(schema.DropEventError, match="newline"):
        schema.validate_line(b'{"a": 1}\n{"b": 2}\n')


# -- typical mistakes ---------------------------------------------------------

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def apply(event: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = event
        for key in parents:
            node = node[key]
        node[leaf] = value

    return apply


def _delete(path: str) -> Mutation:
    def apply(event: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = event
        for key in parents:
            node = node[key]
        del node[leaf]

    return apply


def _all(*mutations: Mutation) -> Mutation:
    def apply(event: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(event)

    return apply


# (mutation, the path the error must name)
MISTAKES: dict[str, tuple[Mutation, str]] = {
    "rule null with policy false": (_set("netfilter.rule", None), "netfilter.policy"),
    "rule null without policy": (
        _all(_set("netfilter.rule", None), _delete("netfilter.policy")),
        "netfilter",
    ),
    "policy true with a rule": (_set("netfilter.policy", True), "netfilter.rule"),
    "port as string": (_set("destination.port", "443"), "destination.port"),
    "port out of range": (_set("source.port", 65536), "source.port"),
    "port null instead of absent": (_set("source.port", None), "source.port"),
    "unknown hook": (_set("netfilter.hook", "INPUT"), "netfilter.hook"),
    "unknown backend": (_set("netfilter.backend", "nft"), "netfilter.backend"),
    "unknown family": (_set("netfilter.family", "ipv4"), "netfilter.family"),
    "unknown attribution": (_set("netfilter.attribution", "guess"), "netfilter.attribution"),
    "missing @timestamp": (_delete("@timestamp"), "(top level)"),
    "timestamp without Z": (_set("@timestamp", "2026-11-21T11:50:00.123456"), "@timestamp"),
    "timestamp with offset": (_set("@timestamp", "2026-11-21T11:50:00.123456+00:00"), "@timestamp"),
    "timestamp in milliseconds": (_set("@timestamp", "2026-11-21T11:50:00.123Z"), "@timestamp"),
    "uppercase IPv6": (
        _all(_set("source.ip", "2001:DB8::1"), _set("network.type", "ipv6"),
             _set("destination.ip", "2001:db8::2")),
        "source.ip",
    ),
    "uncompressed IPv6": (
        _all(_set("source.ip", "2001:db8:0:0:0:0:0:1"), _set("network.type", "ipv6"),
             _set("destination.ip", "2001:db8::2")),
        "source.ip",
    ),
    "IPv6 with leading zeros": (
        _all(_set("source.ip", "2001:0db8::1"), _set("network.type", "ipv6"),
             _set("destination.ip", "2001:db8::2")),
        "source.ip",
    ),
    "IPv4 with leading zeros": (_set("source.ip", "198.018.0.1"), "source.ip"),
    "address of the other family": (_set("source.ip", "2001:db8::1"), "source.ip"),
    "address as integer": (_set("source.ip", 3323068417), "source.ip"),
    "missing ecs.version": (_delete("ecs.version"), "ecs"),
    "missing event.action": (_delete("event.action"), "event"),
    "missing drop.reason": (_delete("drop.reason"), "drop"),
    "unknown event.action": (_set("event.action", "drop"), "event.action"),
    "unknown dataset": (_set("event.dataset", "tracer"), "event.dataset"),
    "count zero": (_set("event.count", 0), "event.count"),
    "single event with count 3": (_set("event.count", 3), "event.count"),
    "summary without start/end": (_set("event.dataset", "tracer.drop.summary"), "event"),
    "drop reason with prefix": (_set("drop.reason", "SKB_DROP_REASON_NO_SOCKET"), "drop.reason"),
    "drop reason as number": (_set("drop.reason", 2), "drop.reason"),
    "location as raw address": (_set("drop.location", "0xffffffff81e3f980"), "drop.location"),
    "typo in a top-level key": (_set("destinaton", {"ip": "198.18.0.2"}), "(top level)"),
    "typo in a netfilter key": (_set("netfilter.chian", "input"), "netfilter"),
    "typo in a rule key": (_set("netfilter.rule.handel", 4), "netfilter.rule"),
    "unknown conntrack state": (_set("conntrack.state", "NEW"), "conntrack.state"),
    "unknown conntrack direction": (_set("conntrack.direction", "orig"), "conntrack.direction"),
    "status with IPS_ prefix": (_set("conntrack.status", ["IPS_CONFIRMED"]), "conntrack.status[0]"),
    "unknown network.type": (_set("network.type", "ip"), "network.type"),
    "unknown network.direction": (_set("network.direction", "inbound"), "network.direction"),
    "direction contradicting the hook": (_set("network.direction", "egress"), "network.direction"),
    "iana_number as integer": (_set("network.iana_number", 6), "network.iana_number"),
    "lowercase tcp flag": (_set("tcp.flags", ["syn"]), "tcp.flags[0]"),
    "tcp object on a udp packet": (_set("network.transport", "udp"), "network.transport"),
    "interface id as integer": (_set("observer.ingress.interface.id", 5), "observer.ingress.interface.id"),
    "empty netns name": (_set("netns.name", ""), "netns.name"),
    "attribution none with a table": (_set("netfilter.attribution", "none"), "netfilter.table"),
    "probe without id": (_set("probe", {}), "probe"),
    "event.kind alert": (_set("event.kind", "alert"), "event.kind"),
    "event.type without denied": (_set("event.type", ["connection"]), "event.type"),
    # issue 9: the verdict and the action agree, and the SIEM fields have their ECS types
    "unknown verdict": (_set("netfilter.verdict", "accept"), "netfilter.verdict"),
    "reject verdict on a dropped event": (_set("netfilter.verdict", "reject"), "event.action"),
    "rejected event with a drop verdict": (_set("event.action", "rejected"), "netfilter.verdict"),
    "rejected event outside netfilter": (_all(_set("event.action", "rejected"), _delete("netfilter"),
                                              _delete("rule")), "(top level)"),
    "rule.id as integer": (_set("rule.id", 4), "rule.id"),
    "empty rule object": (_set("rule", {}), "rule"),
    "typo in an ECS rule key": (_set("rule.rulset", "inet fw input"), "rule"),
    "rule without netfilter": (_delete("netfilter"), "(top level)"),
    "ruleset without its family": (_set("rule.ruleset", "fw input"), "rule.ruleset"),
    "related.ip not an address": (_set("related.ip", ["web-1"]), "related.ip[0]"),
    "related.ip twice the same": (_set("related.ip", ["198.18.0.1", "198.18.0.1"]), "related.ip"),
    "related.ip as a string": (_set("related.ip", "198.18.0.1"), "related.ip"),
    "host.name in upper case": (_set("host.name", "Web-1"), "host.name"),
    "host without hostname": (_delete("host.hostname"), "host"),
    "another observer.vendor": (_set("observer.vendor", "acme"), "observer.vendor"),
    "observer.version empty": (_set("observer.version", ""), "observer.version"),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_mistake_is_rejected(name: str) -> None:
    mutate, path = MISTAKES[name]
    event = siem_event()
    mutate(event)
    with pytest.raises(schema.DropEventError) as caught:
        schema.validate(event)
    assert path in {p.split(":", 1)[0] for p in caught.value.problems}, caught.value.problems


def test_error_message_names_field_and_rule() -> None:
    event = spec_event()
    event["netfilter"]["rule"] = None
    del event["@timestamp"]
    with pytest.raises(schema.DropEventError) as caught:
        schema.validate(event)
    text = str(caught.value)
    assert "'@timestamp' is a required property" in text
    assert "netfilter.policy: True was expected (rule null means the chain policy dropped the packet)" in text
    assert isinstance(caught.value, ValueError)


# -- notices: closed objects too ------------------------------------------------


def _notice(dataset: str) -> dict[str, Any]:
    return copy.deepcopy(next(e for e in support.doc_examples(notices=True) if e["event"]["dataset"] == dataset))


def test_an_output_loss_report_validates() -> None:
    """What the daemon reports when an output loses events for good (they are in no summary)."""
    event = _notice("tracer.loss")
    event["event"]["action"] = "output_events_lost"
    event["tracer"]["loss"] = {"spool_full": 12, "rejected": 1, "output": "elasticsearch-1", "total": 13,
                               "counted_in_summaries": False}
    schema.validate(event, schema.NOTICE_EVENT)


NOTICE_MISTAKES: dict[str, tuple[str, Mutation, str]] = {
    "typo in a conntrack alert key": ("tracer.conntrack", _set("conntrack.treshold", 0.9), "conntrack"),
    "table count as string": ("tracer.conntrack", _set("conntrack.table.count", "12"), "conntrack.table.count"),
    "unknown loss kind": ("tracer.loss", _set("tracer.loss.lost", 3), "tracer.loss"),
    "unknown tracer key": ("tracer.loss", _set("tracer.losses", {}), "tracer"),
    "timestamp without microseconds": ("tracer.loss", _set("event.start", "2026-12-01T13:01:16Z"), "event.start"),
    "unknown observer key": ("tracer.loss", _set("observer.name", "x"), "observer"),
    "host.name in upper case": ("tracer.loss", _set("host.name", "FW-1"), "host.name"),
}


@pytest.mark.parametrize("name", sorted(NOTICE_MISTAKES))
def test_notice_mistake_is_rejected(name: str) -> None:
    dataset, mutate, path = NOTICE_MISTAKES[name]
    event = _notice(dataset)
    mutate(event)
    problems = schema.errors(event, schema.NOTICE_EVENT)
    assert path in {p.split(":", 1)[0] for p in problems}, problems
