"""The text view: one line per drop, for people, made from the event model.

Each section writes its own part (`text()`); `one_line` puts them in their
order. Nothing here reads the ECS dict, so the line cannot drift from what
the tracer knows, and names go through `printable` on their way in.

This module needs nothing from the sections at import time (they import
`printable` from it), only the timestamp format shared with the JSON.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING

from tracer.event.ecs import iso_time

if TYPE_CHECKING:
    from tracer.event.model import DropEvent
    from tracer.event.sections import Netfilter

#: The packet part when the drop carries no IP header (ARP, a truncated record).
NO_FLOW = "? > ?"
#: How --stack indents the frames under the line.
STACK_INDENT = " " * 8
#: How the diagnosis (cause, first fix) is indented under the line.
DETAIL_INDENT = " " * 4

_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t", "\\": "\\\\", '"': '\\"'}


def printable(text: object) -> str:
    """A name or comment as the text view may print it: no byte can act on the terminal.

    Tables, chains, comments, interfaces and process names are chosen by
    whoever owns a namespace, so they may hold newlines (a fake second
    event), escape sequences (terminal control), bidirectional overrides (text
    that reads differently than it is) or quotes that close the quoting
    around them. Those are written as escapes, and so are backslashes, so an
    escape can never be faked by a literal one. The JSON carries the bytes.
    """
    s = str(text)
    if s.isprintable() and "\\" not in s and '"' not in s:
        return s
    out = []
    for ch in s:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif not ch.isprintable() or unicodedata.category(ch) == "Cf":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


def shown(text: str) -> str:
    """Text the tracer wrote itself (names in it already escaped, commands shell-quoted), for a
    terminal: as it is, unless a byte in it could act on the terminal; then all of it escaped."""
    return text if text.isprintable() else printable(text)


#: ICMP type names (RFC 792 and successors), as nft spells most of them.
_ICMP_TYPES = {
    0: "echo-reply", 3: "dest-unreachable", 4: "source-quench", 5: "redirect", 8: "echo-request",
    9: "router-advert", 10: "router-solicit", 11: "time-exceeded", 12: "parameter-problem",
    13: "timestamp-request", 14: "timestamp-reply",
}
#: Destination-unreachable (type 3) and time-exceeded (11) codes: the code is what says why.
_ICMP_CODES = {
    (3, 0): "net-unreachable", (3, 1): "host-unreachable", (3, 2): "prot-unreachable",
    (3, 3): "port-unreachable", (3, 4): "frag-needed", (3, 5): "source-route-failed",
    (3, 6): "net-unknown", (3, 7): "host-unknown", (3, 9): "net-prohibited", (3, 10): "host-prohibited",
    (3, 13): "admin-prohibited", (11, 0): "ttl-exceeded", (11, 1): "reassembly-timeout",
    (5, 0): "net-redirect", (5, 1): "host-redirect",
}
_ICMPV6_TYPES = {
    1: "dest-unreachable", 2: "packet-too-big", 3: "time-exceeded", 4: "parameter-problem",
    128: "echo-request", 129: "echo-reply", 130: "mld-query", 131: "mld-report", 132: "mld-done",
    133: "router-solicit", 134: "router-advert", 135: "neighbor-solicit", 136: "neighbor-advert",
    137: "redirect", 143: "mld2-report",
}
_ICMPV6_CODES = {
    (1, 0): "no-route", (1, 1): "admin-prohibited", (1, 2): "beyond-scope", (1, 3): "addr-unreachable",
    (1, 4): "port-unreachable", (1, 5): "policy-fail", (1, 6): "reject-route",
    (3, 0): "hop-limit-exceeded", (3, 1): "reassembly-timeout",
}


def icmp_name(version: int, icmp_type: int, code: int | None) -> str | None:
    """`frag-needed`, `packet-too-big`, `neighbor-solicit`: the code's name where the code says
    why (unreachable, time exceeded), else the type's; None for a type without a name."""
    types, codes = (_ICMP_TYPES, _ICMP_CODES) if version == 4 else (_ICMPV6_TYPES, _ICMPV6_CODES)
    if code is not None and (icmp_type, code) in codes:
        return codes[icmp_type, code]
    return types.get(icmp_type)


def describe_rule(nf: Netfilter) -> str:
    """`inet fw chain input rule 4 "tcp dport 443 drop" (legacy block)`, or the policy."""
    return nf.describe()


def one_line(event: DropEvent) -> str:
    """The human view of an event: time, packet, reason, place, rule, state.

    The packet part carries what people debug with (ICMP type/code and name,
    length); then the namespace and the interfaces; the place is the
    netfilter rule when netfilter dropped the packet, else the kernel's call
    site, and the next hop when it was the neighbour that failed; conntrack
    shows the NAT original tuple when NAT changed the flow.
    """
    parts = [
        iso_time(event.timestamp_ns)[11:26],
        event.action.upper(),
        event.packet.text() if event.packet is not None else NO_FLOW,
        event.drop.reason,
    ]
    middle = (event.netns, event.interfaces)
    parts.extend(part for section in middle if section is not None and (part := section.text()))
    parts.append(event.netfilter.text() if event.netfilter is not None else event.drop.text())
    tail = (event.neighbor, event.conntrack, event.process, event.probe, event.summary)
    parts.extend(part for section in tail if section is not None and (part := section.text()))
    return "  ".join(parts)


def diagnosis_lines(event: DropEvent) -> list[str]:
    """The cause and the first fix under the line, indented, when the event has a diagnosis."""
    return [] if event.diagnosis is None else [f"{DETAIL_INDENT}{event.diagnosis.text()}"]


def stack_lines(event: DropEvent) -> list[str]:
    """The kernel stack under the line (with --stack), one indented frame a line."""
    return [f"{STACK_INDENT}{frame}" for frame in event.drop.stack or ()]


def text_lines(event: DropEvent, stack: bool = False) -> list[str]:
    """What a terminal shows for a drop: the line, its diagnosis, and (with --stack) the stack.

    `one_line` stays one line on its own, for outputs whose records are one line (syslog, the
    journal's MESSAGE); the lines under it are for people at a terminal.
    """
    lines = [one_line(event), *diagnosis_lines(event)]
    if stack:
        lines += stack_lines(event)
    return lines
