"""The JSON Schemas of what tracer prints, and validation against them.

`drop-event` (the default) is the drop event; `notice-event` the alerts
and loss reports, `counter-event` the counter rises (tracer.counter,
docs/counter-event.md); `probe-result` and `pmtu-result` are what
`tracer probe --json` and `tracer pmtu --json` print.

The schema ships inside the package (tracer/data/drop-event.schema.json;
docs/drop-event.schema.json is a symlink to it) so that an installed tracer
and its tests check events against exactly the contract users read, whether
installed editable or from a wheel.

jsonschema is a test/development dependency, not a runtime one: it is
imported only when a validator is built, so `load_schema` works without it.
"""

from __future__ import annotations

import functools
import importlib
import ipaddress
import json
from importlib import resources
from typing import Any

# jsonschema ships no type information (its stubs are a separate package, not
# a dependency): its validator and errors are `Any` here.
Validator = Any
ValidationError = Any

DROP_EVENT = "drop-event"
NOTICE_EVENT = "notice-event"
COUNTER_EVENT = "counter-event"
DIAGNOSE_REPORT = "diagnose-report"
SCHEMAS = (DROP_EVENT, NOTICE_EVENT, COUNTER_EVENT, "probe-result", "pmtu-result", DIAGNOSE_REPORT)
#: `event.dataset` values of notices (tracer.event.notice): they follow the notice schema.
NOTICE_DATASETS = ("tracer.conntrack", "tracer.loss")
#: `event.dataset` of counter events (tracer.event.counter): they follow the counter schema.
COUNTER_DATASET = "tracer.counter"
#: Where each schema's fields are described, for error messages.
_DOCS = {DROP_EVENT: "docs/drop-event.md", NOTICE_EVENT: "docs/drop-event.md",
         COUNTER_EVENT: "docs/counter-event.md", DIAGNOSE_REPORT: "docs/diagnose-report.md"}


def schema_of(event: dict[str, Any]) -> str:
    """Which schema an event printed by `tracer watch` follows: notices and counter events have their own."""
    ev = event.get("event")
    dataset = ev.get("dataset") if isinstance(ev, dict) else None
    if dataset == COUNTER_DATASET:
        return COUNTER_EVENT
    return NOTICE_EVENT if dataset in NOTICE_DATASETS else DROP_EVENT

#: How many problems one error message lists; the rest are counted.
_MAX_REPORTED = 10


class DropEventError(ValueError):
    """An event breaks the drop-event schema; `problems` has one line per violation."""

    def __init__(self, problems: list[str], name: str = DROP_EVENT) -> None:
        self.problems = problems
        shown = problems[:_MAX_REPORTED]
        more = len(problems) - len(shown)
        doc = _DOCS.get(name, "docs/probe.md")
        text = f"{name} does not match {doc}:\n  " + "\n  ".join(shown)
        if more:
            text += f"\n  ... and {more} more"
        super().__init__(text)


@functools.cache
def _schema_text(name: str) -> str:
    if name not in SCHEMAS:
        raise ValueError(f"no schema {name!r}; there are {', '.join(SCHEMAS)}")
    return resources.files("tracer").joinpath(f"data/{name}.schema.json").read_text(encoding="utf-8")


def load_schema(name: str = DROP_EVENT) -> dict[str, Any]:
    """A fresh copy of a schema, so callers may modify it without affecting `validator()`."""
    loaded: dict[str, Any] = json.loads(_schema_text(name))
    return loaded


def _is_canonical_ipv4(value: object) -> bool:
    """Dotted quad exactly as `ipaddress` prints it (no leading zeros, no spaces)."""
    if not isinstance(value, str):
        return True  # type is checked by "type", not by "format"
    return str(ipaddress.IPv4Address(value)) == value


def _is_canonical_ipv6(value: object) -> bool:
    """The spec's "IPv6 compressed, lower case": what `ipaddress` prints (RFC 5952).

    The schema's pattern alone cannot tell `1:0:0:0:0:0:0:1` from `1::1`;
    comparing with Python's own rendering catches every non-canonical form,
    and it is the rendering the emitter uses, so the two cannot disagree.
    """
    if not isinstance(value, str):
        return True
    return ipaddress.IPv6Address(value).compressed == value


def _jsonschema() -> Any:
    """The jsonschema module, imported when a validator is first built (not a runtime dependency)."""
    return importlib.import_module("jsonschema")


def _format_checker() -> Any:
    checker = _jsonschema().FormatChecker()  # every format jsonschema knows, on a private copy
    checker.checks("ipv4", raises=ValueError)(_is_canonical_ipv4)
    checker.checks("ipv6", raises=ValueError)(_is_canonical_ipv6)
    return checker


@functools.cache
def validator(name: str = DROP_EVENT) -> Validator:
    """The compiled validator, built once: checking the schema itself costs more than an event."""
    draft = _jsonschema().Draft202012Validator
    schema = load_schema(name)
    draft.check_schema(schema)
    return draft(schema, format_checker=_format_checker())


def _rule_for(error: ValidationError, name: str) -> str | None:
    """The description of the if/then rule an error came from, if any.

    "True was expected" at netfilter.policy means little until it is
    followed by "rule null means the chain policy dropped the packet".
    """
    node: Any = validator(name).schema
    rule = None
    for key in error.absolute_schema_path:
        if isinstance(node, dict) and "if" in node and "description" in node:
            rule = node["description"].rstrip(".")
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):  # a $ref: the path continues elsewhere
            break
    return rule


def _describe(error: ValidationError, name: str) -> str:
    """One `path: message` line; the field's description replaces unreadable regexes."""
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)
    message = error.message
    described = isinstance(error.schema, dict) and error.schema.get("description")
    if error.validator in ("pattern", "oneOf", "anyOf", "not") and described:
        message = f"{error.instance!r} is not valid: {described}"
    rule = _rule_for(error, name)
    if rule:
        message = f"{message} ({rule})"
    return f"{path.lstrip('.') or '(top level)'}: {message}"


def errors(event: dict[str, Any], name: str = DROP_EVENT) -> list[str]:
    """Every violation in `event`, as `path: message` lines; empty when it is valid."""
    found = validator(name).iter_errors(event)
    ordered = sorted(found, key=lambda e: ([str(p) for p in e.absolute_path], e.message))
    return [_describe(e, name) for e in ordered]


def validate(event: dict[str, Any], name: str | None = None) -> None:
    """Raises DropEventError listing every violation, so one test run shows them all.

    Without `name`, the schema is the one the event's dataset calls for (`schema_of`).
    """
    name = name or schema_of(event)
    problems = errors(event, name)
    if problems:
        raise DropEventError(problems, name)


def validate_line(line: str | bytes) -> dict[str, Any]:
    """Parses one NDJSON line and validates it: what a consumer reading our output sees."""
    import orjson

    text = line.encode() if isinstance(line, str) else line
    text = text.removesuffix(b"\n")
    if b"\n" in text:
        raise DropEventError(["(line): an NDJSON record must not contain a newline"])
    event = orjson.loads(text)
    if not isinstance(event, dict):
        raise DropEventError([f"(line): expected a JSON object, got {type(event).__name__}"])
    validate(event)
    return event
