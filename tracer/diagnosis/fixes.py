"""Fix commands in the syntax of the tool that owns the rule: nft, iptables, firewall-cmd, sysctl.

A fix is a whole command a root shell can run as printed: the namespace
prefix (`ip netns exec NAME`, or `nsenter --net=PATH --` for a namespace
without a name), then the tool and its words, each shell-quoted. Names come
from the namespace's owner and may be hostile, so a name that the tool's own
syntax cannot hold safely (a quote or a newline in an nft name, a leading
dash in an iptables chain) gives no command at all rather than one that does
something else.

The match of an accept rule is built from the packet (`PacketFacts`): its
protocol and destination port, or its ICMP type, which is what a person
writing the rule by hand would choose; never its source port or address.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
from dataclasses import dataclass
from functools import cache
from typing import Any

import orjson

from tracer.diagnosis import host
from tracer.diagnosis.facts import PacketFacts
from tracer.netns import Netns

_NFT_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")

#: ICMP types by number, as nft and iptables name them (errors and neighbour discovery only).
ICMP_NFT = {3: "destination-unreachable", 4: "source-quench", 5: "redirect", 11: "time-exceeded",
            12: "parameter-problem", 0: "echo-reply", 8: "echo-request"}
ICMPV6_NFT = {1: "destination-unreachable", 2: "packet-too-big", 3: "time-exceeded", 4: "parameter-problem",
              128: "echo-request", 129: "echo-reply", 133: "nd-router-solicit", 134: "nd-router-advert",
              135: "nd-neighbor-solicit", 136: "nd-neighbor-advert", 137: "nd-redirect"}
ICMPV6_XT = {1: "destination-unreachable", 2: "packet-too-big", 3: "time-exceeded", 4: "parameter-problem",
             128: "echo-request", 129: "echo-reply", 133: "router-solicitation", 134: "router-advertisement",
             135: "neighbour-solicitation", 136: "neighbour-advertisement", 137: "redirect"}
ICMP_ERRORS = {4: frozenset({3, 4, 5, 11, 12}), 6: frozenset({1, 2, 3, 4})}
ND_TYPES = frozenset({133, 134, 135, 136, 137})
_PORTED = {6: "tcp", 17: "udp", 132: "sctp", 136: "udplite", 33: "dccp"}


def shell_prefix(ns: Netns | None) -> list[str]:
    """The words that run a command in `ns` from the host: none for the tracer's own namespace."""
    if ns is None or host.own(ns):
        return []
    if ns.name is not None:
        return ["ip", "netns", "exec", ns.name]
    return ["nsenter", f"--net={ns.path}", "--"]


def command(ns: Netns | None, words: list[str]) -> str:
    """One fix line: every word shell-quoted, so pasting it runs exactly these words."""
    return shlex.join([*shell_prefix(ns), *words])


def nft_name(name: str) -> str | None:
    """A table or chain name as nft's text syntax takes it, None when it cannot.

    nft's parser takes table and chain names only as plain identifiers (a
    quoted string is a syntax error there), so any other name, which
    netlink or a JSON ruleset allows, needs the JSON form of the command.
    """
    return name if _NFT_PLAIN.match(name) else None


def nft_string(value: str) -> str | None:
    """A string (an interface name) as nft's parser takes it: always double-quoted."""
    if '"' in value or "\n" in value or "\\" in value:
        return None
    return f'"{value}"'


def xt_name(name: str) -> str | None:
    """An iptables chain or table name as a word iptables takes; None if it would read as an option."""
    return None if not name or name.startswith("-") or "\n" in name else name


@cache
def _system_iptables_is_legacy() -> bool:
    path = shutil.which("iptables")
    return path is not None and "legacy" in os.path.realpath(path)


def iptables_tool(backend: str, family: str) -> str:
    """`iptables`/`ip6tables` when that is the system's variant for this backend, else the explicit one."""
    base = "ip6tables" if family == "ip6" else "iptables"
    legacy = backend == "iptables-legacy"
    if legacy == _system_iptables_is_legacy():
        return base
    return f"{base}-legacy" if legacy else f"{base}-nft"


# --- what to accept ---------------------------------------------------------------------


@dataclass(frozen=True)
class NftMatch:
    """One accept rule's match, in nft's text syntax and, when known, as libnftables JSON.

    The JSON form is what a command uses when the table or chain has a name
    the text syntax cannot hold; a match known only as text (a later rule's
    own text) is then replaced by the packet's own match.
    """

    text: str
    expr: tuple[dict[str, Any], ...] | None = None


def _eq(left: dict[str, Any], right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def nft_match(facts: PacketFacts) -> NftMatch | None:
    """The nft match of this packet's traffic: `tcp dport 8443`, `icmpv6 type packet-too-big`."""
    proto = _PORTED.get(facts.l4proto)
    if proto is not None and facts.dport is not None:
        return NftMatch(f"{proto} dport {facts.dport}", (_eq(_payload(proto, "dport"), facts.dport),))
    if facts.l4proto == 1 and facts.icmp_type is not None:
        name = ICMP_NFT.get(facts.icmp_type, facts.icmp_type)
        return NftMatch(f"icmp type {name}", (_eq(_payload("icmp", "type"), name),))
    if facts.l4proto == 58 and facts.icmp_type is not None:
        if facts.icmp_type in ND_TYPES:
            nd = ["nd-neighbor-solicit", "nd-neighbor-advert"]
            return NftMatch("icmpv6 type { nd-neighbor-solicit, nd-neighbor-advert }",
                            (_eq(_payload("icmpv6", "type"), {"set": nd}),))
        name6 = ICMPV6_NFT.get(facts.icmp_type, facts.icmp_type)
        return NftMatch(f"icmpv6 type {name6}", (_eq(_payload("icmpv6", "type"), name6),))
    if facts.l4proto:
        return NftMatch(f"meta l4proto {facts.l4proto}", (_eq({"meta": {"key": "l4proto"}}, facts.l4proto),))
    return None


def xt_matches(facts: PacketFacts) -> list[list[str]]:
    """The iptables words of this packet's traffic; ND takes two rules (iptables has no sets inline)."""
    proto = _PORTED.get(facts.l4proto)
    if proto is not None and facts.dport is not None:
        return [["-p", proto, "--dport", str(facts.dport)]]
    if facts.l4proto == 1 and facts.icmp_type is not None:
        return [["-p", "icmp", "--icmp-type", ICMP_NFT.get(facts.icmp_type, str(facts.icmp_type))]]
    if facts.l4proto == 58 and facts.icmp_type is not None:
        if facts.icmp_type in ND_TYPES:
            return [["-p", "icmpv6", "--icmpv6-type", t] for t in ("neighbour-advertisement",
                                                                   "neighbour-solicitation")]
        return [["-p", "icmpv6", "--icmpv6-type", ICMPV6_XT.get(facts.icmp_type, str(facts.icmp_type))]]
    if facts.l4proto:
        return [["-p", str(facts.l4proto)]]
    return []


ESTABLISHED_NFT = NftMatch("ct state established,related",
                           (_eq({"ct": {"key": "state"}}, ["established", "related"], "in"),))
ESTABLISHED_XT = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED"]


def dnat_nft(facts: PacketFacts) -> NftMatch | None:
    """A forward accept for a port-forward's translated destination, limited to DNATed flows."""
    base = nft_match(facts)
    if base is None or base.expr is None or facts.dst is None:
        return None
    ip = "ip6" if facts.family == 6 else "ip"
    return NftMatch(f"{ip} daddr {facts.dst} {base.text} ct status dnat",
                    (_eq(_payload(ip, "daddr"), facts.dst), *base.expr,
                     _eq({"ct": {"key": "status"}}, "dnat", "in")))


def dnat_xt(facts: PacketFacts) -> list[list[str]]:
    if facts.dst is None:
        return []
    return [["-d", facts.dst, *m, "-m", "conntrack", "--ctstate", "DNAT"] for m in xt_matches(facts)]


# --- where to put it --------------------------------------------------------------------


@dataclass(frozen=True)
class Place:
    """The chain a fix goes into, in its owner's terms, and the rule it must come before.

    `handle` is the nft handle of that rule, `number` its iptables line;
    neither: append at the end (before the policy), `first`: at the top.
    """

    backend: str  # nftables, iptables-nft, iptables-legacy
    family: str
    table: str
    chain: str
    ns: Netns | None
    handle: int | None = None
    number: int | None = None
    first: bool = False


def accept_commands(place: Place, nft: NftMatch | None, xt: list[list[str]]) -> list[str]:
    """The commands that accept this traffic in `place`: above the rule, at the top, or appended."""
    if place.backend == "nftables":
        return [] if nft is None else _nft_accept(place, nft)
    return _xt_accept(place, xt)


def _nft_accept(place: Place, match: NftMatch) -> list[str]:
    family, table, chain = place.family, nft_name(place.table), nft_name(place.chain)
    if table is None or chain is None:
        return _nft_json_accept(place, match)
    if place.first:
        verb = f"insert rule {family} {table} {chain}"
    elif place.handle is not None:
        verb = f"insert rule {family} {table} {chain} position {place.handle}"
    else:
        verb = f"add rule {family} {table} {chain}"
    return [command(place.ns, ["nft", f"{verb} {match.text} accept"])]


def _nft_json_accept(place: Place, match: NftMatch) -> list[str]:
    """The same command as libnftables JSON, which holds any name the kernel holds."""
    if match.expr is None:
        return []
    rule: dict[str, Any] = {"family": place.family, "table": place.table, "chain": place.chain,
                            "expr": [*match.expr, {"accept": None}]}
    verb = "add"
    if place.first:
        verb = "insert"
    elif place.handle is not None:
        verb, rule["handle"] = "insert", place.handle
    doc = {"nftables": [{verb: {"rule": rule}}]}
    return [command(place.ns, ["nft", "-j", orjson.dumps(doc).decode()])]


def _xt_accept(place: Place, matches: list[list[str]]) -> list[str]:
    chain, table = xt_name(place.chain), xt_name(place.table)
    if chain is None or table is None or not matches:
        return []
    tool = iptables_tool(place.backend, place.family)
    head = [tool] if table == "filter" else [tool, "-t", table]
    out = []
    for m in matches:
        if place.first:
            where = ["-I", chain, "1"]
        elif place.number is not None:
            where = ["-I", chain, str(place.number)]
        else:
            where = ["-A", chain]
        out.append(command(place.ns, [*head, *where, *m, "-j", "ACCEPT"]))
    return out


def delete_rule(place: Place) -> list[str]:
    """Deleting the rule at `place` (the drop), by handle or line number."""
    if place.backend == "nftables":
        if place.handle is None:
            return []
        table, chain = nft_name(place.table), nft_name(place.chain)
        if table is None or chain is None:
            rule = {"family": place.family, "table": place.table, "chain": place.chain, "handle": place.handle}
            return [command(place.ns, ["nft", "-j", orjson.dumps({"nftables": [{"delete": {"rule": rule}}]})
                                       .decode()])]
        return [command(place.ns, ["nft", f"delete rule {place.family} {table} {chain} handle {place.handle}"])]
    chain, table = xt_name(place.chain), xt_name(place.table)
    if chain is None or table is None or place.number is None:
        return []
    tool = iptables_tool(place.backend, place.family)
    head = [tool] if table == "filter" else [tool, "-t", table]
    return [command(place.ns, [*head, "-D", chain, str(place.number)])]


def sysctl_command(ns: Netns | None, parts: list[str], value: int) -> str | None:
    """`sysctl -w net.ipv4.ip_forward=1`; the slash form when a part (an interface) holds a dot."""
    if any(not p or "/" in p or "=" in p for p in parts):
        return None
    key = "/".join(parts) if any("." in p for p in parts) else ".".join(parts)
    return command(ns, ["sysctl", "-w", f"{key}={value}"])
