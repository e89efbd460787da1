"""Where drop events go: NDJSON for machines, one line per drop for people."""

from __future__ import annotations

import sys
from typing import BinaryIO, Protocol, TextIO

import orjson


class Sink(Protocol):
    def write(self, event: dict) -> None: ...
    def flush(self) -> None: ...


class NdjsonSink:
    """One ECS JSON object per line. Flushed per event: a SIEM pipe or a
    person running `| jq` should see a drop when it happens, not when a
    buffer fills."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self.stream = stream or sys.stdout.buffer

    def write(self, event: dict) -> None:
        self.stream.write(orjson.dumps(event) + b"\n")
        self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def _endpoint(side: dict | None) -> str:
    if not side:
        return "?"
    ip = side.get("ip", "?")
    if ":" in ip and "port" in side:
        ip = f"[{ip}]"
    return f"{ip}:{side['port']}" if "port" in side else ip


def describe_rule(nf: dict) -> str:
    """`inet fw input rule 4 "tcp dport 443 drop" (legacy block)` or the policy."""
    where = " ".join(x for x in (nf.get("family"), nf.get("table")) if x)
    chain = nf.get("chain") or nf.get("base_chain")
    if chain:
        where = f"{where} chain {chain}" if where else f"chain {chain}"
    if nf.get("policy"):
        return f"{where} policy {nf.get('verdict', 'drop')}".strip()
    rule = nf.get("rule")
    if rule:
        text = f'{where} rule {rule["handle"]} "{rule["text"]}"'
        if rule.get("comment"):
            text += f" ({rule['comment']})"
        return text
    return where


def one_line(event: dict) -> str:
    """The human view of an event: time, packet, reason, place, rule, state."""
    ts = event["@timestamp"][11:26]
    net = event.get("network", {})
    proto = net.get("transport", "")
    flags = ",".join(event.get("tcp", {}).get("flags", []))
    packet = f"{proto} {_endpoint(event.get('source'))} > {_endpoint(event.get('destination'))}"
    if flags:
        packet += f" [{flags}]"
    parts = [ts, event["event"]["action"].upper(), packet.strip(), event["drop"]["reason"]]
    ns = event.get("netns", {})
    if ns:
        parts.append(f"netns {ns.get('name') or ns['inode']}")
    nf = event.get("netfilter")
    if nf:
        hook = nf.get("hook")
        parts.append(f"{nf['backend']}{'/' + hook if hook else ''} {describe_rule(nf)}".strip())
    else:
        parts.append(f"at {event['drop'].get('location', '?')}")
    ct = event.get("conntrack")
    if ct:
        parts.append(f"ct {ct['state']}" + (f"/{ct['direction']}" if ct.get("direction") else ""))
    proc = event.get("process")
    if proc:
        parts.append(f"by {proc['name']}[{proc['pid']}]")
    if event.get("probe"):
        parts.append(f"probe {event['probe']['id']}")
    if event["event"]["count"] > 1:
        parts.append(f"x{event['event']['count']}")
    return "  ".join(parts)


class TerminalSink:
    def __init__(self, stream: TextIO | None = None, *, stack: bool = False) -> None:
        self.stream = stream or sys.stdout
        self.stack = stack

    def write(self, event: dict) -> None:
        self.stream.write(one_line(event) + "\n")
        if self.stack and event["drop"].get("stack"):
            for frame in event["drop"]["stack"]:
                self.stream.write(f"        {frame}\n")
        self.stream.flush()

    def flush(self) -> None:
        self.stream.flush()


def choose(json: bool, stack: bool = False) -> Sink:
    if json or not sys.stdout.isatty():
        return NdjsonSink()
    return TerminalSink(stack=stack)
