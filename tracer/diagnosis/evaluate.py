"""Does a rule match a packet? A three-valued evaluator of nftables and iptables rules.

The diagnosis needs two answers the kernel's trace does not give: whether a
later rule of the same evaluation would have accepted a dropped packet
(`rule_order` against `rule_blocks`), and whether any rule accepts the
traffic at all (`default_policy`). Both come from evaluating rules against
the packet's facts (tracer.diagnosis.facts) the way the kernel would.

The answer is YES, NO or UNKNOWN, never a guess: an expression this module
does not model (fib, socket, limit, xt matches without their iptables line,
raw payload offsets...) or a fact nobody learnt (an interface name, the
conntrack state) makes the expression UNKNOWN, and three-valued logic
carries that through a rule (all its matches) and a set (any element).

nftables rules are read from the JSON listing the Ruleset keeps
(`Ruleset.json`), sets and maps included; iptables-legacy rules (and the
`xt` matches iptables-nft leaves untranslated) from their `iptables -S`
lines. Both go through one walker that follows jump, goto and return the
way the kernel's chain stack does.
"""

from __future__ import annotations

import ipaddress
import socket
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Generic, TypeVar

from tracer.diagnosis.facts import PacketFacts
from tracer.netfilter import nftables
from tracer.netfilter.constants import CT_STATUS_BITS
from tracer.netfilter.nftables import Ruleset
from tracer.netfilter.xtables import NON_DROPPING_TARGETS, XtTable, rule_target, split_words

#: The kernel's chain stack (NFT_JUMP_STACK_SIZE): deeper jumps are not followed.
MAX_DEPTH = 16


class Tri(Enum):
    """Kleene's three-valued truth: YES, NO, or UNKNOWN when the facts cannot decide."""

    YES = "yes"
    NO = "no"
    UNKNOWN = "unknown"

    @staticmethod
    def of(value: bool) -> Tri:
        return Tri.YES if value else Tri.NO

    def and_(self, other: Tri) -> Tri:
        if self is Tri.NO or other is Tri.NO:
            return Tri.NO
        if self is Tri.YES and other is Tri.YES:
            return Tri.YES
        return Tri.UNKNOWN

    def or_(self, other: Tri) -> Tri:
        """Kleene's or, by De Morgan from `and_`: YES if either is, NO only if both are."""
        return self.not_().and_(other.not_()).not_()

    def not_(self) -> Tri:
        return {Tri.YES: Tri.NO, Tri.NO: Tri.YES, Tri.UNKNOWN: Tri.UNKNOWN}[self]

    __and__ = and_
    __or__ = or_
    __invert__ = not_

    @staticmethod
    def all_(values: Iterable[Tri]) -> Tri:
        result = Tri.YES
        for v in values:
            result = result & v
            if result is Tri.NO:
                return result
        return result

    @staticmethod
    def any_(values: Iterable[Tri]) -> Tri:
        result = Tri.NO
        for v in values:
            result = result | v
            if result is Tri.YES:
                return result
        return result


# --- names the listings use ---------------------------------------------------------------

PROTOCOLS: dict[str, int] = {
    "hopopt": 0, "icmp": 1, "igmp": 2, "ipencap": 4, "ipip": 4, "tcp": 6, "egp": 8, "udp": 17,
    "ipv6": 41, "ipv6-route": 43, "ipv6-frag": 44, "rsvp": 46, "gre": 47, "esp": 50, "ah": 51,
    "ipv6-icmp": 58, "icmpv6": 58, "ipv6-nonxt": 59, "ipv6-opts": 60, "ospf": 89, "pim": 103,
    "vrrp": 112, "l2tp": 115, "sctp": 132, "dccp": 33, "udplite": 136, "mh": 135, "comp": 108,
}  # fmt: skip
PORT_PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132, "dccp": 33, "udplite": 136}
_PORTED = frozenset(PORT_PROTOCOLS.values())

ICMP_TYPES: dict[str, int] = {
    "echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5, "echo-request": 8,
    "router-advertisement": 9, "router-solicitation": 10, "time-exceeded": 11, "parameter-problem": 12,
    "timestamp-request": 13, "timestamp-reply": 14, "info-request": 15, "info-reply": 16,
    "address-mask-request": 17, "address-mask-reply": 18,
}  # fmt: skip
ICMP_CODES: dict[str, int] = {
    "net-unreachable": 0, "host-unreachable": 1, "prot-unreachable": 2, "port-unreachable": 3,
    "frag-needed": 4, "net-prohibited": 9, "host-prohibited": 10, "admin-prohibited": 13,
}  # fmt: skip
ICMPV6_TYPES: dict[str, int] = {
    "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3, "parameter-problem": 4,
    "echo-request": 128, "echo-reply": 129, "mld-listener-query": 130, "mld-listener-report": 131,
    "mld-listener-done": 132, "mld-listener-reduction": 132, "nd-router-solicit": 133, "nd-router-advert": 134,
    "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136, "nd-redirect": 137, "router-renumbering": 138,
    "ind-neighbor-solicit": 141, "ind-neighbor-advert": 142, "mld2-listener-report": 143,
}  # fmt: skip
ICMPV6_CODES: dict[str, int] = {
    "no-route": 0, "admin-prohibited": 1, "addr-unreachable": 3, "port-unreachable": 4, "policy-fail": 5,
    "reject-route": 6,
}  # fmt: skip
TCP_FLAGS: dict[str, int] = {
    "fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20, "ecn": 0x40, "ece": 0x40,
    "cwr": 0x80,
}  # fmt: skip
CT_STATES: dict[str, int] = {"invalid": 1, "established": 2, "related": 4, "new": 8, "untracked": 64}
#: nft's ct status names -> the IPS_* bit (tracer.netfilter.constants.CT_STATUS_BITS order).
CT_STATUSES: dict[str, int] = {
    "expected": 1 << 0, "seen-reply": 1 << 1, "assured": 1 << 2, "confirmed": 1 << 3, "snat": 1 << 4,
    "dnat": 1 << 5, "dying": 1 << 9,
}  # fmt: skip
CT_DIRECTIONS: dict[str, int] = {"original": 0, "reply": 1}
NFPROTOS: dict[str, int] = {"ipv4": 2, "ipv6": 10}
ETHERTYPES: dict[str, int] = {"ip": 0x0800, "arp": 0x0806, "vlan": 0x8100, "8021ad": 0x88A8, "ip6": 0x86DD}

_SYMBOLS: dict[str, dict[str, int]] = {
    "proto": PROTOCOLS, "icmp_type": ICMP_TYPES, "icmp_code": ICMP_CODES, "icmpv6_type": ICMPV6_TYPES,
    "icmpv6_code": ICMPV6_CODES, "tcp_flags": TCP_FLAGS, "ct_state": CT_STATES, "ct_status": CT_STATUSES,
    "ct_dir": CT_DIRECTIONS, "nfproto": NFPROTOS, "ethertype": ETHERTYPES,
}  # fmt: skip
#: Kinds whose implicit match (`ct state established,related`) tests bits, not equality.
_BITMASKS = frozenset({"tcp_flags", "ct_state", "ct_status"})
_ADDRESSES = {"ipv4": 4, "ipv6": 6}
_NAMES = frozenset({"ifname", "iface"})


class _Unknown(Exception):
    """The expression cannot be decided from the facts."""


class _Absent(Exception):
    """The packet lacks the header or state the expression reads: nft's dependency fails, no match."""


@dataclass(frozen=True)
class _Val:
    """A left-hand value: its kind (how right-hand literals read) and the packet's value, None unknown."""

    kind: str
    value: int | str | None


def protocol_number(name: str | int) -> int:
    """An IPPROTO number from a name (nft and iptables spellings) or a number; ValueError otherwise."""
    if isinstance(name, int):
        return name
    key = name.lower()
    if key in PROTOCOLS:
        return PROTOCOLS[key]
    if key.isdigit():
        return int(key)
    try:
        return socket.getprotobyname(key)
    except OSError as exc:
        raise ValueError(f"unknown protocol {name!r}") from exc


def service_port(name: str | int) -> int:
    """A port from a number or a service name (`ssh`, `https`); ValueError otherwise."""
    if isinstance(name, int):
        return name
    if name.isdigit():
        return int(name)
    for proto in ("tcp", "udp"):
        try:
            return socket.getservbyname(name, proto)
        except OSError:
            continue
    raise ValueError(f"unknown service {name!r}")


def _address(text: str, version: int) -> int:
    try:
        addr = ipaddress.ip_address(text)
    except ValueError as exc:
        raise _Unknown(text) from exc
    if addr.version != version:
        raise _Unknown(text)
    return int(addr)


def _literal(kind: str, node: Any) -> int | str:
    """A right-hand constant read as a value of the left side's kind."""
    if isinstance(node, dict):
        for op in ("|", "&", "^"):
            if op in node and isinstance(node[op], list):
                parts = [_literal(kind, p) for p in node[op]]
                if not all(isinstance(p, int) for p in parts):
                    raise _Unknown(op)
                acc = int(parts[0])
                for p in parts[1:]:
                    acc = acc | int(p) if op == "|" else acc & int(p) if op == "&" else acc ^ int(p)
                return acc
        raise _Unknown(str(node))
    if isinstance(node, list):  # flags written as a list: their union
        if kind not in _BITMASKS:
            raise _Unknown(str(node))
        acc = 0
        for part in node:
            value = _literal(kind, part)
            if not isinstance(value, int):
                raise _Unknown(str(part))
            acc |= value
        return acc
    if isinstance(node, bool):
        raise _Unknown(str(node))
    if kind in _ADDRESSES:
        if not isinstance(node, str):
            raise _Unknown(str(node))
        return _address(node, _ADDRESSES[kind])
    if kind in _NAMES:
        if not isinstance(node, str):
            raise _Unknown(str(node))  # an interface index that no longer has a name
        return node
    if isinstance(node, int):
        return node
    if not isinstance(node, str):
        raise _Unknown(str(node))
    table = _SYMBOLS.get(kind)
    if table is not None and node in table:
        return table[node]
    try:
        if kind == "port":
            return service_port(node)
        if kind == "proto":
            return protocol_number(node)
        return int(node, 0)
    except ValueError as exc:
        raise _Unknown(node) from exc


def _ifname_matches(value: str, pattern: str) -> bool:
    """nft's `eth*` and iptables' `eth+` are prefix matches; `\\*` is a literal star."""
    if pattern.endswith("*") and not pattern.endswith("\\*"):
        return value.startswith(pattern[:-1].replace("\\*", "*"))
    return value == pattern.replace("\\*", "*")


# --- nftables: left-hand sides ------------------------------------------------------------


def _iif(facts: PacketFacts) -> str | None:
    """The input device's name: "" in output, where the kernel has none; None unknown."""
    if facts.iif is not None:
        return facts.iif
    return "" if facts.hook == "output" else None


def _oif(facts: PacketFacts) -> str | None:
    """The output device's name: "" before routing (prerouting, input); None unknown."""
    if facts.oif is not None:
        return facts.oif
    return "" if facts.hook in ("prerouting", "input") else None


def _tcp_flag_bits(facts: PacketFacts) -> int | None:
    if not facts.tcp_flags:
        return None  # a TCP header cut short; a packet with no flag at all is read the same way
    bits = 0
    for name in facts.tcp_flags:
        bit = TCP_FLAGS.get(name.lower())
        if bit is None:
            return None
        bits |= bit
    return bits


def _ct_status_bits(facts: PacketFacts) -> int | None:
    if facts.ct_status is None:
        return None
    bits = 0
    for name in facts.ct_status:
        if name not in CT_STATUS_BITS:
            return None
        bits |= 1 << CT_STATUS_BITS.index(name)
    return bits


def _payload(node: dict[str, Any], facts: PacketFacts) -> _Val:
    proto, fieldname = node.get("protocol"), node.get("field")
    if proto is None or fieldname is None:
        raise _Unknown("raw payload")
    if proto in ("ip", "ip6"):
        version = 4 if proto == "ip" else 6
        if facts.family != version:
            raise _Absent(proto)
        kind = "ipv4" if version == 4 else "ipv6"
        if fieldname in ("saddr", "daddr"):
            addr = facts.src if fieldname == "saddr" else facts.dst
            return _Val(kind, None if addr is None else int(ipaddress.ip_address(addr)))
        if fieldname in ("protocol", "nexthdr"):
            # ip6 nexthdr is the first header after the fixed one: the transport header unless
            # extension headers come first, which the facts would not show.
            return _Val("proto", facts.l4proto)
        raise _Unknown(f"{proto} {fieldname}")
    if proto in PORT_PROTOCOLS or proto == "th":
        if proto != "th" and facts.l4proto != PORT_PROTOCOLS[proto]:
            raise _Absent(proto)
        if proto == "th" and facts.l4proto not in _PORTED:
            raise _Unknown("th on a protocol without ports")
        if fieldname == "sport":
            return _Val("port", facts.sport)
        if fieldname == "dport":
            return _Val("port", facts.dport)
        if proto == "tcp" and fieldname == "flags":
            return _Val("tcp_flags", _tcp_flag_bits(facts))
        raise _Unknown(f"{proto} {fieldname}")
    if proto in ("icmp", "icmpv6"):
        if facts.l4proto != (1 if proto == "icmp" else 58):
            raise _Absent(proto)
        if fieldname == "type":
            return _Val(f"{proto}_type", facts.icmp_type)
        if fieldname == "code":
            return _Val(f"{proto}_code", facts.icmp_code)
        raise _Unknown(f"{proto} {fieldname}")
    raise _Unknown(f"{proto} {fieldname}")


def _meta(key: str, facts: PacketFacts) -> _Val:
    if key == "l4proto":
        return _Val("proto", facts.l4proto)
    if key == "nfproto":
        return _Val("nfproto", 2 if facts.family == 4 else 10)
    if key == "protocol":
        return _Val("ethertype", 0x0800 if facts.family == 4 else 0x86DD)
    if key in ("iifname", "iif"):
        return _Val("ifname" if key == "iifname" else "iface", _iif(facts))
    if key in ("oifname", "oif"):
        return _Val("ifname" if key == "oifname" else "iface", _oif(facts))
    if key == "mark":
        return _Val("int", facts.mark)
    if key == "length":
        return _Val("int", facts.length)
    raise _Unknown(f"meta {key}")


def _ct(node: dict[str, Any], facts: PacketFacts) -> _Val:
    key = node.get("key")
    if "dir" in node:
        raise _Unknown(f"ct {node.get('dir')} {key}")
    if key == "state":
        return _Val("ct_state", None if facts.ct_state is None else CT_STATES.get(facts.ct_state))
    if key not in ("status", "direction", "mark"):
        raise _Unknown(f"ct {key}")
    if facts.ct_state in ("invalid", "untracked"):
        raise _Absent("no conntrack entry")  # nft_ct_get_eval breaks without an entry
    if key == "status":
        return _Val("ct_status", _ct_status_bits(facts))
    if key == "direction":
        return _Val("ct_dir", None if facts.ct_direction is None else CT_DIRECTIONS.get(facts.ct_direction))
    return _Val("int", facts.ct_mark)


def _left(node: Any, facts: PacketFacts) -> _Val:
    if not isinstance(node, dict):
        raise _Unknown(str(node))
    if "payload" in node:
        return _payload(node["payload"], facts)
    if "meta" in node:
        return _meta(node["meta"].get("key", ""), facts)
    if "ct" in node:
        return _ct(node["ct"], facts)
    for op in ("&", "|", "^"):
        if op in node and isinstance(node[op], list) and len(node[op]) == 2:
            inner = _left(node[op][0], facts)
            mask = _literal(inner.kind, node[op][1])
            if not isinstance(mask, int) or (inner.value is not None and not isinstance(inner.value, int)):
                raise _Unknown(op)
            if inner.value is None:
                return inner
            value = int(inner.value)
            return _Val(inner.kind, value & mask if op == "&" else value | mask if op == "|" else value ^ mask)
    raise _Unknown(next(iter(node), "?"))  # fib, socket, numgen, osf, raw payload...


# --- nftables: right-hand sides -----------------------------------------------------------


@dataclass(frozen=True)
class _Set:
    kind: tuple[str, ...] | str
    elements: tuple[Any, ...]
    verdict_map: bool


@dataclass
class _Index:
    exprs: dict[tuple[str, str, int], list[Any]] = field(default_factory=dict)
    sets: dict[tuple[str, str, str], _Set] = field(default_factory=dict)


_indexes: weakref.WeakKeyDictionary[Ruleset, _Index] = weakref.WeakKeyDictionary()


def _index(ruleset: Ruleset) -> _Index:
    """Rule expressions and set elements of a ruleset's JSON listing, by handle and name."""
    found = _indexes.get(ruleset)
    if found is not None:
        return found
    idx = _Index()
    for item in ruleset.json:
        if "rule" in item:
            r = item["rule"]
            idx.exprs[(r["family"], r["table"], int(r["handle"]))] = list(r.get("expr", []))
        for key in ("set", "map"):
            if key in item:
                s = item[key]
                elems = s.get("elem", [])
                kind = s.get("type", "")
                idx.sets[(s["family"], s["table"], s["name"])] = _Set(
                    tuple(kind) if isinstance(kind, list) else kind,
                    tuple(elems) if isinstance(elems, list) else (),
                    key == "map" and s.get("map") == "verdict",
                )
    _indexes[ruleset] = idx
    return idx


def _unwrap(element: Any) -> Any:
    """A set element without its timeout/comment wrapper (`{"elem": {"val": ...}}`)."""
    if isinstance(element, dict) and "elem" in element and isinstance(element["elem"], dict):
        return element["elem"].get("val")
    return element


def _atom(val: _Val, element: Any) -> Tri:
    """Whether one value lies in one element: a constant, a prefix, a range or a wildcard name."""
    element = _unwrap(element)
    try:
        if isinstance(element, dict) and "prefix" in element:
            if val.kind not in _ADDRESSES:
                return Tri.UNKNOWN
            prefix = element["prefix"]
            net = ipaddress.ip_network(f"{prefix['addr']}/{prefix['len']}", strict=False)
            if net.version != _ADDRESSES[val.kind]:
                return Tri.UNKNOWN
            if val.value is None:
                return Tri.UNKNOWN
            return Tri.of(int(net.network_address) <= int(val.value) <= int(net.broadcast_address))
        if isinstance(element, dict) and "range" in element:
            lo, hi = (_literal(val.kind, b) for b in element["range"])
            if val.value is None:
                return Tri.UNKNOWN
            if not isinstance(lo, int) or not isinstance(hi, int) or not isinstance(val.value, int):
                return Tri.UNKNOWN
            return Tri.of(lo <= val.value <= hi)
        constant = _literal(val.kind, element)
    except (_Unknown, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return Tri.UNKNOWN
    if val.value is None:
        return Tri.UNKNOWN
    if val.kind in _NAMES and isinstance(val.value, str) and isinstance(constant, str):
        return Tri.of(_ifname_matches(val.value, constant) if val.kind == "ifname" else val.value == constant)
    return Tri.of(val.value == constant)


def _element(vals: Sequence[_Val], element: Any) -> Tri:
    """Whether the values (one, or a concatenation's parts) lie in one element."""
    element = _unwrap(element)
    if len(vals) == 1:
        return _atom(vals[0], element)
    if not (isinstance(element, dict) and isinstance(element.get("concat"), list)):
        return Tri.UNKNOWN
    parts = element["concat"]
    if len(parts) != len(vals):
        return Tri.UNKNOWN
    return Tri.all_([_atom(v, p) for v, p in zip(vals, parts, strict=True)])


def _set_elements(idx: _Index, family: str, table: str, right: Any) -> tuple[Any, ...] | None:
    """The elements of an anonymous set or a named one (`@name`), None when `right` is neither."""
    if isinstance(right, dict) and isinstance(right.get("set"), list):
        return tuple(right["set"])
    if isinstance(right, str) and right.startswith("@"):
        found = idx.sets.get((family, table, right[1:]))
        if found is None:
            raise _Unknown(right)
        return found.elements
    return None


def _lefts(node: Any, facts: PacketFacts) -> list[_Val]:
    if isinstance(node, dict) and isinstance(node.get("concat"), list):
        return [_left(part, facts) for part in node["concat"]]
    return [_left(node, facts)]


def _relation(idx: _Index, family: str, table: str, match: dict[str, Any], facts: PacketFacts) -> Tri:
    op = match.get("op", "==")
    vals = _lefts(match.get("left"), facts)
    right = match.get("right")
    elements = _set_elements(idx, family, table, right)
    if elements is None and (len(vals) > 1 or (isinstance(right, dict) and ("prefix" in right or "range" in right))):
        elements = (right,)
    if elements is not None:
        inside = Tri.any_(_element(vals, e) for e in elements)
        if op in ("==", "in"):
            return inside
        if op == "!=":
            return ~inside
        raise _Unknown(op)
    val = vals[0]
    constant = _literal(val.kind, right)
    if val.value is None:
        return Tri.UNKNOWN
    value = val.value
    if isinstance(value, str) or isinstance(constant, str):
        if not (isinstance(value, str) and isinstance(constant, str)) or op not in ("==", "!=", "in"):
            raise _Unknown(op)
        same = _ifname_matches(value, constant) if val.kind == "ifname" else value == constant
        return Tri.of(same) if op != "!=" else Tri.of(not same)
    if op == "in":
        return Tri.of(value & constant != 0) if val.kind in _BITMASKS else Tri.of(value == constant)
    if op == "!":
        return Tri.of(value & constant == 0)
    compare: dict[str, Callable[[int, int], bool]] = {
        "==": lambda a, b: a == b,
        "!=": lambda a, b: a != b,
        "<": lambda a, b: a < b,
        ">": lambda a, b: a > b,
        "<=": lambda a, b: a <= b,
        ">=": lambda a, b: a >= b,
    }
    if op not in compare:
        raise _Unknown(op)
    return Tri.of(compare[op](value, constant))


# --- nftables: statements and verdicts ----------------------------------------------------

#: Statements that never stop a rule from matching (side effects, or the verdict itself).
_STATEMENTS = frozenset({
    "counter", "log", "mangle", "notrack", "dup", "set", "map", "ct helper", "ct timeout", "ct expectation",
    "secmark", "last", "flow", "accept", "drop", "continue", "return", "jump", "goto", "reject", "queue",
    "dnat", "snat", "masquerade", "redirect", "tproxy", "fwd", "synproxy",
})  # fmt: skip
_VERDICTS = ("accept", "drop", "continue", "return")
_NAT = ("dnat", "snat", "masquerade", "redirect")


def _verdict_of(node: Any) -> str:
    """A verdict object (`{"accept": null}`, `{"jump": {"target": "x"}}`) as this module names it."""
    if isinstance(node, dict):
        for key in _VERDICTS:
            if key in node:
                return key
        for key in ("jump", "goto"):
            if key in node and isinstance(node[key], dict) and isinstance(node[key].get("target"), str):
                return f"{key}:{node[key]['target']}"
    return "unknown"


def _vmap_outcomes(idx: _Index, family: str, table: str, vmap: dict[str, Any], facts: PacketFacts) -> list[
        tuple[str, Tri]]:
    """(verdict, whether the key selects it) for each element of a verdict map not surely missed."""
    try:
        vals = _lefts(vmap.get("key"), facts)
    except _Absent:
        return []
    except (_Unknown, ValueError, KeyError, TypeError, AttributeError, IndexError):
        vals = []
    data = vmap.get("data")
    elements: tuple[Any, ...] | None
    if isinstance(data, dict) and isinstance(data.get("set"), list):
        elements = tuple(data["set"])
    elif isinstance(data, str) and data.startswith("@"):
        found = idx.sets.get((family, table, data[1:]))
        elements = found.elements if found is not None else None
    else:
        elements = None
    if elements is None:
        return [("unknown", Tri.UNKNOWN)]
    out: list[tuple[str, Tri]] = []
    for element in elements:
        pair = element if isinstance(element, list) else _unwrap(element)
        if not (isinstance(pair, list) and len(pair) == 2):
            out.append(("unknown", Tri.UNKNOWN))
            continue
        selected = _element(vals, pair[0]) if vals else Tri.UNKNOWN
        if selected is not Tri.NO:
            out.append((_verdict_of(pair[1]), selected))
    return out


def _xt_target(name: Any) -> str | None:
    if name in ("ACCEPT", "DROP", "RETURN"):
        return str(name).lower()
    if name == "REJECT":
        return "reject"
    if name in ("QUEUE", "NFQUEUE"):
        return "queue"
    if name in ("DNAT", "SNAT", "MASQUERADE", "REDIRECT", "NETMAP"):
        return "nat"
    if name in NON_DROPPING_TARGETS:
        return None
    return "unknown"


def _outcomes(idx: _Index, family: str, table: str, exprs: list[Any], facts: PacketFacts) -> list[tuple[str, Tri]]:
    """The rule's terminal verdicts, each with the condition (beyond its matches) that selects it.

    Empty for a rule that only counts or logs; one (verdict, YES) for a plain
    verdict; one per element a verdict map may select.
    """
    for stmt in exprs:
        if not isinstance(stmt, dict):
            continue
        verdict = _verdict_of(stmt)
        if verdict != "unknown":
            return [(verdict, Tri.YES)]
        if "reject" in stmt:
            return [("reject", Tri.YES)]
        if "queue" in stmt:
            return [("queue", Tri.YES)]
        if any(k in stmt for k in _NAT):
            return [("nat", Tri.YES)]
        if "vmap" in stmt and isinstance(stmt["vmap"], dict):
            return _vmap_outcomes(idx, family, table, stmt["vmap"], facts)
        if "fwd" in stmt or "synproxy" in stmt or "tproxy" in stmt:
            return [("unknown", Tri.YES)]
        xt = stmt.get("xt")
        if isinstance(xt, dict) and xt.get("type") == "target":
            target = _xt_target(xt.get("name"))
            if target is not None:
                return [(target, Tri.YES)]
    return []


def _statement(idx: _Index, family: str, table: str, stmt: Any, facts: PacketFacts) -> Tri:
    """What one statement says of the rule matching: YES for statements that do not filter."""
    if not isinstance(stmt, dict):
        return Tri.UNKNOWN
    try:
        if "match" in stmt and isinstance(stmt["match"], dict):
            return _relation(idx, family, table, stmt["match"], facts)
        if "vmap" in stmt and isinstance(stmt["vmap"], dict):
            outcomes = _vmap_outcomes(idx, family, table, stmt["vmap"], facts)
            return Tri.any_([t for _, t in outcomes])  # a key in no element: the lookup fails
        xt = stmt.get("xt")
        if isinstance(xt, dict):
            return Tri.UNKNOWN if xt.get("type") != "target" else Tri.YES
        if len(stmt) == 1 and next(iter(stmt)) in _STATEMENTS:
            return Tri.YES
    except _Absent:
        return Tri.NO
    except (_Unknown, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return Tri.UNKNOWN  # a shape of expression this module does not know
    return Tri.UNKNOWN  # limit, quota, ct count, meter, anything new: it may stop the rule


def _exprs(ruleset: Ruleset, rule: nftables.Rule) -> list[Any] | None:
    return _index(ruleset).exprs.get((rule.family, rule.table, rule.handle))


def rule_matches(
    ruleset: Ruleset, rule: nftables.Rule, facts: PacketFacts, *, iptables_line: str | None = None
) -> Tri:
    """Whether all the rule's matches hold for the packet (YES), one surely fails (NO), or neither.

    `iptables_line`: the rule's `iptables -S` line, for an iptables-nft rule
    whose listing keeps `xt` matches nft cannot show (multiport, state,
    conntrack, icmp...): the line decides them (xt_rule_matches), together
    with the translated matches.
    """
    exprs = _exprs(ruleset, rule)
    if exprs is None:
        return Tri.UNKNOWN
    idx = _index(ruleset)
    has_xt = any(isinstance(s, dict) and isinstance(s.get("xt"), dict) and s["xt"].get("type") != "target"
                 for s in exprs)
    result = Tri.all_(
        _statement(idx, rule.family, rule.table, s, facts)
        for s in exprs
        if not (has_xt and iptables_line is not None and isinstance(s, dict) and "xt" in s)
    )
    if has_xt and iptables_line is not None and result is not Tri.NO:
        result = result & xt_rule_matches(iptables_line, facts, chain=rule.chain)
    return result


def rule_verdict(ruleset: Ruleset, rule: nftables.Rule, facts: PacketFacts) -> str | None:
    """The rule's terminal action, if it matches.

    "accept", "drop", "reject", "queue", "jump:<chain>", "goto:<chain>",
    "return", "continue", "nat" (dnat/snat/masquerade/redirect); None for
    a rule that only counts or logs, or a verdict map the packet's key
    surely misses; "unknown" for a verdict map the facts cannot resolve or a
    statement this module does not model.
    """
    exprs = _exprs(ruleset, rule)
    if exprs is None:
        return "unknown"
    outcomes = _outcomes(_index(ruleset), rule.family, rule.table, exprs, facts)
    if not outcomes:
        return None
    for verdict, selected in outcomes:
        if selected is Tri.YES:
            return verdict
    return "unknown"


# --- the walker, for both backends --------------------------------------------------------

R = TypeVar("R")


@dataclass(frozen=True)
class XtRule:
    """One iptables rule: its chain, its 1-based line number (`iptables -L --line-numbers`), its -A line."""

    chain: str
    number: int
    line: str


@dataclass(frozen=True)
class Walk(Generic[R]):
    """Where the evaluation of a packet ends.

    `verdict`: accept/drop/reject/queue/nat, "continue" (a user chain run
    out, when the walk started in one) or "unknown". `rule`: the rule that
    surely matched with that verdict, None for a policy. `policy`: the base
    chain's policy decided. `undecided`: rules on the way whose match (or
    verdict map) the facts could not decide, taken as not matching; any of
    them, or an unknown verdict, makes `certain` False.
    """

    verdict: str
    rule: R | None
    policy: bool
    certain: bool
    undecided: tuple[R, ...] = ()


class _Program(Generic[R]):
    """What the walker needs to know of a table: its chains, and rules' matches and verdicts."""

    def rules(self, chain: str) -> Sequence[R] | None:
        raise NotImplementedError

    def base(self, chain: str) -> bool:
        raise NotImplementedError

    def policy(self, chain: str) -> str:
        raise NotImplementedError

    def trusted(self, chain: str) -> bool:
        return True

    def matches(self, rule: R) -> Tri:
        raise NotImplementedError

    def outcomes(self, rule: R) -> list[tuple[str, Tri]]:
        raise NotImplementedError

    def chains(self) -> Sequence[str]:
        raise NotImplementedError


class _Nft(_Program[nftables.Rule]):
    def __init__(self, ruleset: Ruleset, family: str, table: str, facts: PacketFacts,
                 xt_lines: Mapping[str, Sequence[str]] | None) -> None:
        self.rs, self.family, self.table, self.facts, self.xt_lines = ruleset, family, table, facts, xt_lines
        self.idx = _index(ruleset)

    def rules(self, chain: str) -> Sequence[nftables.Rule] | None:
        c = self.rs.chain(self.family, self.table, chain)
        if c is None:
            return None
        found = [self.rs.rule(self.family, self.table, h) for h in c.rules]
        return [r for r in found if r is not None]

    def base(self, chain: str) -> bool:
        c = self.rs.chain(self.family, self.table, chain)
        return c is not None and c.base

    def policy(self, chain: str) -> str:
        c = self.rs.chain(self.family, self.table, chain)
        return (c.policy if c is not None else None) or "accept"

    def _line(self, rule: nftables.Rule) -> str | None:
        if self.xt_lines is None:
            return None
        lines = self.xt_lines.get(rule.chain)
        c = self.rs.chain(self.family, self.table, rule.chain)
        if lines is None or c is None or len(lines) != len(c.rules) or rule.position >= len(lines):
            return None
        return lines[rule.position]

    def matches(self, rule: nftables.Rule) -> Tri:
        return rule_matches(self.rs, rule, self.facts, iptables_line=self._line(rule))

    def outcomes(self, rule: nftables.Rule) -> list[tuple[str, Tri]]:
        exprs = _exprs(self.rs, rule)
        if exprs is None:
            return [("unknown", Tri.UNKNOWN)]
        return _outcomes(self.idx, rule.family, rule.table, exprs, self.facts)

    def chains(self) -> Sequence[str]:
        return [c.name for c in self.rs.chains.values() if c.family == self.family and c.table == self.table]


def _start(rules: Sequence[R], key: Callable[[R], int], after: int | None) -> int | None:
    """The index of the rule after the one keyed `after` (0 with None); None if it is not there."""
    if after is None:
        return 0
    for i, r in enumerate(rules):
        if key(r) == after:
            return i + 1
    return None


def _walk(prog: _Program[R], chain: str, index: int) -> Walk[R]:
    undecided: list[R] = []
    stack: list[tuple[str, int]] = []
    start_base = prog.base(chain)
    entered: set[tuple[str, tuple[tuple[str, int], ...]]] = set()
    current = chain
    trusted = True

    def end(verdict: str, rule: R | None = None, policy: bool = False) -> Walk[R]:
        certain = not undecided and trusted and verdict != "unknown"
        return Walk(verdict, rule, policy, certain, tuple(undecided))

    while True:
        rules = prog.rules(current)
        if rules is None:
            return end("unknown")
        trusted = trusted and prog.trusted(current)
        returned = False
        while index < len(rules):
            rule = rules[index]
            index += 1
            outcomes = prog.outcomes(rule)
            if not outcomes:
                continue
            matched = prog.matches(rule)
            if matched is Tri.NO:
                continue
            chosen = next((v for v, t in outcomes if (matched & t) is Tri.YES), None)
            if chosen is None:
                if any((matched & t) is not Tri.NO for _, t in outcomes):
                    undecided.append(rule)
                continue
            if chosen == "continue":
                continue
            if chosen == "return":
                returned = True
                break
            if chosen.startswith(("jump:", "goto:")):
                target = chosen.split(":", 1)[1]
                if chosen.startswith("jump:"):
                    if len(stack) >= MAX_DEPTH:
                        return end("unknown", rule)
                    stack.append((current, index))
                state = (target, tuple(stack))
                if state in entered:
                    return end("unknown", rule)  # a loop: the kernel refuses these at load time
                entered.add(state)
                current, index = target, 0
                break
            return end(chosen, rule)
        else:
            returned = True
        if not returned:
            continue  # went into another chain
        if stack:
            current, index = stack.pop()
            continue
        if start_base:
            return end(prog.policy(chain), None, True)
        return end("continue")


def _accepts(prog: _Program[R], chain: str, index: int, reach: Tri, path: frozenset[str]) -> Iterator[
        tuple[R, Tri]]:
    """Accepting rules from `index` of `chain` on, in evaluation order, with whether the packet
    reaches and matches each (NO left out); the chains rules jump or go to are entered where they are."""
    rules = prog.rules(chain)
    if rules is None:
        return
    if not prog.trusted(chain):
        reach = reach & Tri.UNKNOWN
    for rule in rules[index:]:
        outcomes = prog.outcomes(rule)
        if not outcomes:
            continue
        matched = reach & prog.matches(rule)
        if matched is Tri.NO:
            continue
        accept = Tri.any_([matched & t for v, t in outcomes if v == "accept"])
        if accept is not Tri.NO:
            yield rule, accept
        targets: dict[str, Tri] = {}
        for verdict, t in outcomes:
            if verdict.startswith(("jump:", "goto:")):
                target = verdict.split(":", 1)[1]
                targets[target] = targets.get(target, Tri.NO) | (matched & t)
        for target, via in targets.items():
            if via is not Tri.NO and target not in path and len(path) <= MAX_DEPTH:
                yield from _accepts(prog, target, 0, via, path | {target})


def _callers(prog: _Program[R], chain: str) -> list[tuple[str, int, bool, Tri]]:
    """(chain, index after the rule, goto?, whether the rule sends this packet) of rules that
    jump or go to `chain`."""
    found: list[tuple[str, int, bool, Tri]] = []
    for parent in prog.chains():
        for i, rule in enumerate(prog.rules(parent) or ()):
            for verdict, t in prog.outcomes(rule):
                if verdict in (f"jump:{chain}", f"goto:{chain}"):
                    via = t & prog.matches(rule)
                    if via is not Tri.NO:
                        found.append((parent, i + 1, verdict.startswith("goto:"), via))
    return found


def _continuations(prog: _Program[R], chain: str, path: frozenset[str]) -> Iterator[tuple[R, Tri]]:
    """Accepting rules after the user chain `chain` returns: in the chains that jump to it, after
    the jump (for a goto, after the jump that led to the chain that went there)."""
    callers = _callers(prog, chain)
    certain = len(callers) == 1
    for parent, index, goto, via in callers:
        if parent in path or len(path) > MAX_DEPTH:
            continue
        reach = via if certain else via & Tri.UNKNOWN
        if not goto:
            yield from _accepts(prog, parent, index, reach, path | {parent})
        if not prog.base(parent):
            # the rest of a parent that went here never runs; after a jump it runs, then returns
            yield from ((r, t & reach) for r, t in _continuations(prog, parent, path | {parent}))


def _first(candidates: Iterator[tuple[R, Tri]]) -> tuple[R, Tri] | None:
    maybe: tuple[R, Tri] | None = None
    for rule, t in candidates:
        if t is Tri.YES:
            return rule, t
        if maybe is None and t is Tri.UNKNOWN:
            maybe = rule, t
    return maybe


def _later(prog: _Program[R], chain: str, index: int) -> tuple[R, Tri] | None:
    def candidates() -> Iterator[tuple[R, Tri]]:
        yield from _accepts(prog, chain, index, Tri.YES, frozenset({chain}))
        if not prog.base(chain):
            yield from _continuations(prog, chain, frozenset({chain}))

    return _first(candidates())


def _dedupe(found: Iterator[tuple[R, Tri]]) -> list[tuple[R, Tri]]:
    """One entry per rule (a verdict map can accept through several elements): their conditions or'ed."""
    out: dict[R, Tri] = {}
    for rule, t in found:
        out[rule] = out[rule] | t if rule in out else t
    return list(out.items())


# --- nftables entry points ----------------------------------------------------------------


def walk_chain(
    ruleset: Ruleset,
    family: str,
    table: str,
    chain: str,
    facts: PacketFacts,
    *,
    after_handle: int | None = None,
    xt_lines: Mapping[str, Sequence[str]] | None = None,
) -> Walk[nftables.Rule]:
    """Evaluates the packet through `chain` as the kernel would, from the rule after `after_handle`.

    Follows jump (with a return stack of MAX_DEPTH), goto and return; a
    base chain that runs out applies its policy, a user chain that runs
    out (with nothing on the stack) gives "continue". `xt_lines`: chain ->
    `iptables -S` lines of an iptables-nft table (split_iptables_rules), to
    decide its `xt` matches.
    """
    prog = _Nft(ruleset, family, table, facts, xt_lines)
    rules = prog.rules(chain)
    if rules is None:
        return Walk("unknown", None, False, False)
    index = _start(rules, lambda r: r.handle, after_handle)
    if index is None:
        return Walk("unknown", None, False, False)
    return _walk(prog, chain, index)


def later_accept(
    ruleset: Ruleset,
    family: str,
    table: str,
    chain: str,
    handle: int,
    facts: PacketFacts,
    *,
    xt_lines: Mapping[str, Sequence[str]] | None = None,
) -> tuple[nftables.Rule, Tri] | None:
    """The first rule after `handle` in the same evaluation that would accept the packet.

    Looks at the rest of `chain`, the chains its later rules jump or go to,
    and, for a user chain, the rest of the chains that jump to it. The first
    whose match is YES; failing that the first UNKNOWN; None when every
    later rule surely does not accept. Rules in between are not asked to
    let the packet through: moving the accept above the drop is the fix
    either way.
    """
    prog = _Nft(ruleset, family, table, facts, xt_lines)
    rules = prog.rules(chain)
    if rules is None:
        return None
    index = _start(rules, lambda r: r.handle, handle)
    return None if index is None else _later(prog, chain, index)


def accepting_rules(
    ruleset: Ruleset,
    family: str,
    table: str,
    chain: str,
    facts: PacketFacts,
    *,
    xt_lines: Mapping[str, Sequence[str]] | None = None,
) -> list[tuple[nftables.Rule, Tri]]:
    """Every accept rule the evaluation from `chain` reaches whose match is YES or UNKNOWN."""
    prog = _Nft(ruleset, family, table, facts, xt_lines)
    return _dedupe(_accepts(prog, chain, 0, Tri.YES, frozenset({chain})))


# --- iptables: -S lines -------------------------------------------------------------------

XT_ICMP: dict[str, tuple[int, int | None]] = {
    "any": (-1, None), "echo-reply": (0, None), "pong": (0, None), "destination-unreachable": (3, None),
    "network-unreachable": (3, 0), "host-unreachable": (3, 1), "protocol-unreachable": (3, 2),
    "port-unreachable": (3, 3), "fragmentation-needed": (3, 4), "source-route-failed": (3, 5),
    "network-unknown": (3, 6), "host-unknown": (3, 7), "network-prohibited": (3, 9), "host-prohibited": (3, 10),
    "TOS-network-unreachable": (3, 11), "TOS-host-unreachable": (3, 12), "communication-prohibited": (3, 13),
    "host-precedence-violation": (3, 14), "precedence-cutoff": (3, 15), "source-quench": (4, None),
    "redirect": (5, None), "echo-request": (8, None), "ping": (8, None), "router-advertisement": (9, None),
    "router-solicitation": (10, None), "time-exceeded": (11, None), "ttl-exceeded": (11, None),
    "ttl-zero-during-transit": (11, 0), "ttl-zero-during-reassembly": (11, 1), "parameter-problem": (12, None),
    "timestamp-request": (13, None), "timestamp-reply": (14, None), "address-mask-request": (17, None),
    "address-mask-reply": (18, None),
}  # fmt: skip
XT_ICMPV6: dict[str, tuple[int, int | None]] = {
    "destination-unreachable": (1, None), "no-route": (1, 0), "communication-prohibited": (1, 1),
    "beyond-scope": (1, 2), "address-unreachable": (1, 3), "port-unreachable": (1, 4), "failed-policy": (1, 5),
    "reject-route": (1, 6), "packet-too-big": (2, None), "time-exceeded": (3, None), "ttl-exceeded": (3, None),
    "ttl-zero-during-transit": (3, 0), "ttl-zero-during-reassembly": (3, 1), "parameter-problem": (4, None),
    "echo-request": (128, None), "ping": (128, None), "echo-reply": (129, None), "pong": (129, None),
    "router-solicitation": (133, None), "router-advertisement": (134, None),
    "neighbour-solicitation": (135, None), "neighbor-solicitation": (135, None),
    "neighbour-advertisement": (136, None), "neighbor-advertisement": (136, None), "redirect": (137, None),
}  # fmt: skip
XT_TCP_FLAGS = {"FIN": 0x01, "SYN": 0x02, "RST": 0x04, "PSH": 0x08, "ACK": 0x10, "URG": 0x20, "ALL": 0x3F,
                "NONE": 0}
XT_CT_STATUS = {"NONE": None, "EXPECTED": "expected", "SEEN_REPLY": "seen_reply", "ASSURED": "assured",
                "CONFIRMED": "confirmed"}
#: Match modules whose options this evaluator reads (others make their rule UNKNOWN).
_XT_MODULES = frozenset({"tcp", "udp", "udplite", "sctp", "dccp", "icmp", "icmp6", "icmpv6", "multiport", "state",
                         "conntrack", "comment", "mark", "connmark"})
_TARGET_OPTIONS = frozenset({"-j", "--jump", "-g", "--goto"})


def _port_range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition(":")
    if not sep:
        port = service_port(lo)
        return port, port
    return (service_port(lo) if lo else 0), (service_port(hi) if hi else 65535)


def _in_ports(port: int | None, spec: str) -> Tri:
    if port is None:
        return Tri.UNKNOWN
    ranges = [_port_range(p) for p in spec.split(",")]
    return Tri.of(any(lo <= port <= hi for lo, hi in ranges))


def _xt_icmp(facts: PacketFacts, spec: str, v6: bool) -> Tri:
    if facts.l4proto != (58 if v6 else 1):
        return Tri.NO
    names = XT_ICMPV6 if v6 else XT_ICMP
    if spec in names:
        want_type, want_code = names[spec]
        if want_type < 0:
            return Tri.YES
    else:
        t, _, c = spec.partition("/")
        want_type, want_code = int(t), (int(c) if c else None)
    if facts.icmp_type is None or (want_code is not None and facts.icmp_code is None):
        return Tri.UNKNOWN
    return Tri.of(facts.icmp_type == want_type and (want_code is None or facts.icmp_code == want_code))


def _xt_states(facts: PacketFacts, spec: str) -> Tri:
    results = []
    for word in spec.split(","):
        name = word.upper()
        if name in ("SNAT", "DNAT"):
            if facts.ct_state in ("invalid", "untracked"):
                results.append(Tri.NO)
            elif facts.ct_status is None:
                results.append(Tri.UNKNOWN)
            else:
                results.append(Tri.of(("src_nat" if name == "SNAT" else "dst_nat") in facts.ct_status))
        elif name.lower() in CT_STATES:
            results.append(Tri.UNKNOWN if facts.ct_state is None else Tri.of(facts.ct_state == name.lower()))
        else:
            results.append(Tri.UNKNOWN)
    return Tri.any_(results)


def _xt_ctstatus(facts: PacketFacts, spec: str) -> Tri:
    if facts.ct_state in ("invalid", "untracked"):
        return Tri.NO
    if facts.ct_status is None:
        return Tri.UNKNOWN
    results = []
    for word in spec.split(","):
        name = word.upper()
        if name not in XT_CT_STATUS:
            results.append(Tri.UNKNOWN)
            continue
        status = XT_CT_STATUS[name]
        relevant = [s for s in facts.ct_status if s in XT_CT_STATUS.values()]
        results.append(Tri.of(not relevant) if status is None else Tri.of(status in facts.ct_status))
    return Tri.any_(results)


def _xt_flags(text: str) -> int:
    bits = 0
    for name in text.split(","):
        bits |= XT_TCP_FLAGS[name.upper()]
    return bits


def _xt_tcp_flags(facts: PacketFacts, mask: str, comp: str) -> Tri:
    if facts.l4proto != 6:
        return Tri.NO
    bits = _tcp_flag_bits(facts)
    if bits is None:
        return Tri.UNKNOWN
    m = _xt_flags(mask)
    return Tri.of(bits & m == _xt_flags(comp))


def _xt_mark(value: int | None, spec: str) -> Tri:
    v, _, m = spec.partition("/")
    if value is None:
        return Tri.UNKNOWN
    mask = int(m, 0) if m else 0xFFFFFFFF
    return Tri.of(value & mask == int(v, 0))


def _xt_address(addr: str | None, spec: str) -> Tri:
    nets = [ipaddress.ip_network(s, strict=False) for s in spec.split(",")]
    if addr is None:
        return Tri.UNKNOWN
    ip = ipaddress.ip_address(addr)
    return Tri.of(any(n.version == ip.version and ip in n for n in nets))


def _xt_ifname(name: str | None, spec: str) -> Tri:
    if name is None:
        return Tri.UNKNOWN
    return Tri.of(name.startswith(spec[:-1]) if spec.endswith("+") else name == spec)


def _xt_option(facts: PacketFacts, opt: str, args: list[str], module: str | None) -> tuple[Tri, int]:
    """One option's verdict and how many argument words it took (UNKNOWN for options not modelled)."""
    arg = args[0] if args else ""
    if opt in ("-p", "--protocol"):
        if arg.lower() == "all" or arg == "0":
            return Tri.YES, 1
        return Tri.of(facts.l4proto == protocol_number(arg)), 1
    if opt in ("-s", "--source", "--src"):
        return _xt_address(facts.src, arg), 1
    if opt in ("-d", "--destination", "--dst"):
        return _xt_address(facts.dst, arg), 1
    if opt in ("-i", "--in-interface"):
        return _xt_ifname(_iif(facts), arg), 1
    if opt in ("-o", "--out-interface"):
        return _xt_ifname(_oif(facts), arg), 1
    if opt in ("--dport", "--destination-port", "--sport", "--source-port"):
        proto = PORT_PROTOCOLS.get(module or "")
        if proto is not None and facts.l4proto != proto:
            return Tri.NO, 1
        if proto is None and facts.l4proto not in _PORTED:
            return Tri.NO, 1
        port = facts.dport if opt in ("--dport", "--destination-port") else facts.sport
        return _in_ports(port, arg), 1
    if opt in ("--dports", "--destination-ports", "--sports", "--source-ports", "--ports"):
        if facts.l4proto not in _PORTED:
            return Tri.NO, 1
        if opt == "--ports":
            return _in_ports(facts.sport, arg) | _in_ports(facts.dport, arg), 1
        return _in_ports(facts.dport if opt in ("--dports", "--destination-ports") else facts.sport, arg), 1
    if opt in ("--state", "--ctstate"):
        return _xt_states(facts, arg), 1
    if opt == "--ctstatus":
        return _xt_ctstatus(facts, arg), 1
    if opt == "--ctdir":
        if facts.ct_state in ("invalid", "untracked"):
            return Tri.NO, 1
        if facts.ct_direction is None:
            return Tri.UNKNOWN, 1
        return Tri.of(facts.ct_direction == arg.lower()), 1
    if opt == "--icmp-type":
        return _xt_icmp(facts, arg, v6=False), 1
    if opt == "--icmpv6-type":
        return _xt_icmp(facts, arg, v6=True), 1
    if opt == "--tcp-flags":
        return _xt_tcp_flags(facts, arg, args[1] if len(args) > 1 else ""), 2
    if opt == "--syn":
        return _xt_tcp_flags(facts, "SYN,RST,ACK,FIN", "SYN"), 0
    if opt == "--mark":
        return _xt_mark(facts.ct_mark if module == "connmark" else facts.mark, arg), 1
    if opt == "--comment":
        return Tri.YES, 1
    taken = 0
    while taken < len(args) and not args[taken].startswith("-") and args[taken] != "!":
        taken += 1
    return Tri.UNKNOWN, taken


def xt_rule_matches(line: str, facts: PacketFacts, *, chain: str | None = None, spaced: Sequence[str] = ()) -> Tri:
    """Whether an `iptables -S` line's matches hold for the packet.

    Reads -p, -s, -d, -i, -o (with `+`), -m tcp/udp/sctp --sport/--dport
    (ranges a:b), -m multiport, -m state, -m conntrack (--ctstate,
    --ctstatus, --ctdir), -m icmp/icmp6, --tcp-flags/--syn, -m mark,
    -m connmark --mark, `!` negations; -m comment is ignored. Any other
    module or option makes the answer UNKNOWN at best. `chain`: the rule's
    chain, whose name iptables prints raw after -A (it may hold spaces or
    look like options); else `spaced`, chain names with spaces
    (XtTable.spaced), lets the chain word split right.
    """
    if chain is not None and line.startswith(f"-A {chain} "):
        words = split_words(line[len(chain) + 4 :], spaced)
    else:
        words = split_words(line, spaced)
        if len(words) >= 2 and words[0] in ("-A", "-I"):
            words = words[2:]
    results: list[Tri] = []
    module: str | None = None
    negate = False
    i = 0
    while i < len(words):
        word = words[i]
        if word == "!":
            negate = True
            i += 1
            continue
        if word in _TARGET_OPTIONS:
            break
        if word in ("-m", "--match"):
            module = words[i + 1] if i + 1 < len(words) else None
            if module not in _XT_MODULES:
                results.append(Tri.UNKNOWN)
            i += 2
            continue
        if not word.startswith("-"):
            results.append(Tri.UNKNOWN)  # a word this reader lost track of
            i += 1
            continue
        try:
            tri, taken = _xt_option(facts, word, words[i + 1 :], module)
        except (ValueError, KeyError, IndexError):
            tri, taken = Tri.UNKNOWN, 1
        results.append(~tri if negate else tri)
        negate = False
        i += 1 + taken
    return Tri.all_(results)


def xt_rule_verdict(table: XtTable, line: str) -> str | None:
    """An -A line's terminal action, named as rule_verdict names them (None: LOG, MARK, no target...)."""
    target, goto = rule_target(line, table.spaced)
    if target is None:
        return None
    if target in table.chains:
        return f"{'goto' if goto else 'jump'}:{target}"
    return _xt_target(target)


class _Xt(_Program[XtRule]):
    def __init__(self, table: XtTable, facts: PacketFacts) -> None:
        self.table, self.facts = table, facts

    def rules(self, chain: str) -> Sequence[XtRule] | None:
        c = self.table.chains.get(chain)
        if c is None:
            return None
        return [XtRule(chain, n, line) for n, line in enumerate(c.rules, start=1)]

    def base(self, chain: str) -> bool:
        c = self.table.chains.get(chain)
        return c is not None and c.policy is not None

    def policy(self, chain: str) -> str:
        c = self.table.chains.get(chain)
        return (c.policy if c is not None and c.policy else "ACCEPT").lower()

    def trusted(self, chain: str) -> bool:
        c = self.table.chains.get(chain)
        return c is not None and c.trusted

    def matches(self, rule: XtRule) -> Tri:
        tri = xt_rule_matches(rule.line, self.facts, chain=rule.chain, spaced=self.table.spaced)
        return tri if self.trusted(rule.chain) else tri & Tri.UNKNOWN

    def outcomes(self, rule: XtRule) -> list[tuple[str, Tri]]:
        verdict = xt_rule_verdict(self.table, rule.line)
        return [] if verdict is None else [(verdict, Tri.YES)]

    def chains(self) -> Sequence[str]:
        return list(self.table.chains)


def xt_walk_chain(table: XtTable, chain: str, facts: PacketFacts, *, after: int | None = None) -> Walk[XtRule]:
    """walk_chain for an iptables(-legacy) table, from the rule after line `after` (1-based) or the first."""
    prog = _Xt(table, facts)
    rules = prog.rules(chain)
    if rules is None or (after is not None and not 0 <= after <= len(rules)):
        return Walk("unknown", None, False, False)
    return _walk(prog, chain, after or 0)


def xt_later_accept(table: XtTable, chain: str, number: int, facts: PacketFacts) -> tuple[XtRule, Tri] | None:
    """later_accept for an iptables table: after rule `number` (1-based) of `chain`."""
    prog = _Xt(table, facts)
    rules = prog.rules(chain)
    if rules is None or not 1 <= number <= len(rules):
        return None
    return _later(prog, chain, number)


def xt_accepting_rules(table: XtTable, chain: str, facts: PacketFacts) -> list[tuple[XtRule, Tri]]:
    """accepting_rules for an iptables table."""
    return _dedupe(_accepts(_Xt(table, facts), chain, 0, Tri.YES, frozenset({chain})))
