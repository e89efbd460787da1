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


def describe_rule(nf: Netfilter) -> str:
    """`inet fw chain input rule 4 "tcp dport 443 drop" (legacy block)`, or the policy."""
    return nf.describe()


def one_line(event: DropEvent) -> str:
    """The human view of an event: time, packet, reason, place, rule, state.

    The place is the netfilter rule when netfilter dropped the packet, else
    the kernel's call site.
    """
    parts = [
        iso_time(event.timestamp_ns)[11:26],
        event.action.upper(),
        event.packet.text() if event.packet is not None else NO_FLOW,
        event.drop.reason,
    ]
    if event.netns is not None and (ns := event.netns.text()):
        parts.append(ns)
    parts.append(event.netfilter.text() if event.netfilter is not None else event.drop.text())
    tail = (event.conntrack, event.process, event.probe, event.summary)
    parts.extend(part for section in tail if section is not None and (part := section.text()))
    return "  ".join(parts)


def stack_lines(event: DropEvent) -> list[str]:
    """The kernel stack under the line (with --stack), one indented frame a line."""
    return [f"{STACK_INDENT}{frame}" for frame in event.drop.stack or ()]
