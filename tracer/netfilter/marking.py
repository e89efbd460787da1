"""Every change tracer makes to the host, how a crash is undone, and in which order.

Getting the kernel to trace packets takes two changes per namespace:
- nftables: a table of our own, `inet tracer_mark`, whose chains set
  `meta nftrace` on the packets the scope selects that may be dropped, not
  on those of flows being accepted (`mark_commands` says which), within a
  per-flow and a per-namespace budget. It holds sets of flows the tracer saw
  dropped (`FlowKey`, filled through the nftables collector's
  `trace_flow`), whose later packets are traced too. It is created with
  the `owner` flag, so the kernel deletes it when the netlink socket that
  made it closes, whatever ends the tracer; a marking table without the
  flag (left by an older tracer) is removed when a namespace is first
  watched.
- iptables-legacy: the same nf_trace bit makes ip_tables log a TRACE line
  for every rule a marked packet meets, to the namespace's nf_log logger
  (the kernel log unless someone bound another). nfnetlink_log is bound
  there so that tracer reads them instead. That binding outlives a crash,
  so it is journalled under /run/tracer before it changes (BindingJournal),
  put back on stop by the last tracer using it, and put back at start by a
  tracer that finds a dead one's journal (restore_stale_bindings).

The two changes depend on each other, and `MarkingCoordinator` is the one
place that knows how: which namespaces are marked, that nf_log is bound
before a namespace is marked, and that marking is removed before nf_log is
put back. The collectors take a coordinator instead of each other.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import itertools
import json
import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, Protocol

import structlog

from tracer import netns as netns_mod
from tracer.config import PROTO_NAMES, Scope
from tracer.netfilter.nftables import NftContext, NftError, Ruleset, Table
from tracer.netfilter.xtables import loaded_tables
from tracer.netns import Netns

#: Where journals (and the legacy relay's sockets) live: root-only, gone at reboot like
#: the bindings they describe.
STATE_DIR = Path("/run/tracer")


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive flock on `path`, between processes and between threads alike.

    Each call opens the file anew, and flock locks belong to the open file:
    two collectors in one process exclude each other too. Not reentrant.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# --- the scope as nft matches -------------------------------------------------------------

#: The hooks the marking table has a chain on: every packet enters by one of them.
MarkHook = Literal["prerouting", "output"]
MARK_HOOKS: tuple[MarkHook, ...] = ("prerouting", "output")


def _set(items: Iterable[str]) -> str:
    values = list(items)
    return values[0] if len(values) == 1 else "{ " + ", ".join(values) + " }"


def _proto_clause(f: Scope) -> str | None:
    if f.proto is None:
        return "meta l4proto { tcp, udp, sctp, udplite, dccp }" if f.ports else None
    if f.ports:
        return None  # `tcp dport` carries its own protocol check
    return f"meta l4proto {PROTO_NAMES.get(f.proto, f.proto)}"


def _port_clauses(f: Scope) -> list[str | None]:
    if not f.ports:
        return [None]
    ports = _set(str(p) for p in f.ports)
    # Without a protocol, `th` reads the ports of any port protocol and the
    # l4proto clause guards it.
    header = f.proto or "th"
    return [f"{header} sport {ports}", f"{header} dport {ports}"]


def _host_clauses(f: Scope) -> list[str | None]:
    if not f.hosts:
        return [None]
    clauses: list[str | None] = []
    for version, keyword in ((4, "ip"), (6, "ip6")):
        if (f.proto == "icmp" and version == 6) or (f.proto == "icmpv6" and version == 4):
            continue
        nets = [str(h) for h in f.hosts if h.version == version]
        if nets:
            clauses += [f"{keyword} saddr {_set(nets)}", f"{keyword} daddr {_set(nets)}"]
    return clauses


def nft_match_rules(f: Scope, hook: MarkHook = "prerouting") -> list[str]:
    """nft match expressions, one per marking rule; a packet matching any is traced.

    Marking only what the scope selects keeps the trace volume, and so the
    cost of tracing, proportional to what the user wants to see. nft has no
    "saddr or daddr" match, so each either/or of the filter becomes separate
    rules: (saddr, daddr) x (sport, dport) per address family. Several ports
    or hosts go in one anonymous set. The interface is matched as `iifname`
    on prerouting and `oifname` on output. An empty filter gives one empty
    expression: a rule that matches every packet.
    """
    iface = None
    if f.iface is not None:
        iface = f'{"iifname" if hook == "prerouting" else "oifname"} "{f.iface}"'
    proto = _proto_clause(f)
    rules: list[str] = []
    for host, port in itertools.product(_host_clauses(f), _port_clauses(f)):
        parts = [p for p in (iface, host, proto, port) if p]
        rule = " ".join(parts)
        if rule not in rules:
            rules.append(rule)
    return rules


def marking_rules(f: Scope, hook: MarkHook = "prerouting") -> list[str]:
    """What the marking chains match: the scope's own rules, then the related packets.

    The kernel filter also selects packets related to the watched ones
    (ICMP errors quoting a watched packet; neighbour discovery for a watched
    host), and their drops need a rule too: they are traced widely here
    (`icmp type {...}`), and the filter keeps only the related ones.
    """
    rules = nft_match_rules(f, hook)
    if not (f.ports or f.hosts or f.proto):
        return rules  # everything is traced already
    iface = None
    if f.iface is not None:
        iface = f'{"iifname" if hook == "prerouting" else "oifname"} "{f.iface}"'
    related = [*_RELATED_ERRORS, _RELATED_ND] if f.hosts else list(_RELATED_ERRORS)
    return rules + [" ".join(p for p in (iface, r) if p) for r in related]


#: ICMP and ICMPv6 errors, which quote the packet they are about.
_RELATED_ERRORS = (
    "icmp type { destination-unreachable, source-quench, redirect, time-exceeded, parameter-problem }",
    "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem }",
)
#: IPv6 neighbour discovery, whose drop leaves a watched host unresolved.
_RELATED_ND = ("icmpv6 type { nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, "
               "nd-redirect }")


# --- the marking table ----------------------------------------------------------------------

MARK_TABLE = "tracer_mark"
#: Before raw (-300) and conntrack (-200): the trace then covers both.
MARK_PRIORITY = -350
#: Right after conntrack (-200) gave the packet its state, before mangle (-150), dstnat
#: (-100) and filter (0): where "is this packet part of an accepted flow" can be asked.
CT_MARK_PRIORITY = -199
MARK_COMMENT = "tracer: sets nftrace on watched packets; removed when tracer stops"

#: The base chains at CT_MARK_PRIORITY, by hook (those at MARK_PRIORITY are named after it).
CT_CHAINS: dict[MarkHook, str] = {"prerouting": "prerouting_new", "output": "output_new"}

#: Protocols whose first four transport bytes are source and destination port (nft's `th`):
#: tcp, udp, dccp, sctp, udplite. Flows of other protocols are keyed by addresses alone.
PORT_PROTOCOLS = frozenset({6, 17, 33, 132, 136})
_PORTED = "{ tcp, udp, sctp, udplite, dccp }"

#: Flows the tracer fills (`trace_flow`): kept this long after the last add (seconds),
#: at most this many per set.
FLOW_TIMEOUT = 30
FLOW_SET_SIZE = 4096
#: The per-flow budget: every flow's first FLOW_BURST packets can be traced, then
#: FLOW_RATE a second (or the namespace's rate / FLOW_SHARE, if more: a raised
#: --trace-rate raises it too), so that one flooding flow cannot spend the namespace's budget.
FLOW_RATE = 2
FLOW_SHARE = 50
FLOW_BURST = 5
#: A flow's budget is forgotten after this long without packets; at most this many flows
#: have one at a time (a spoofed flood fills it: new flows then go untraced, see docs).
RATE_TIMEOUT = 10
RATE_SET_SIZE = 16384
#: Known flows (trace_flow) get at most this share of the namespace's budget, so a flood
#: of them leaves the rest to new flows.
KNOWN_SHARE = 10


@dataclass(frozen=True, slots=True)
class _Family:
    """What the marking rules of one IP version are made of."""

    version: int
    saddr: str  # nft expressions
    daddr: str
    addr_type: str  # nft set key type
    later_fragment: str  # matches fragments after the first: they carry no ports


_FAMILIES = (
    _Family(4, "ip saddr", "ip daddr", "ipv4_addr", "ip frag-off & 0x1fff != 0"),
    _Family(6, "ip6 saddr", "ip6 daddr", "ipv6_addr", "frag frag-off != 0"),
)


def _keys(fam: _Family) -> tuple[str, str]:
    """The flow keys of one IP version: (with ports, addresses only)."""
    hosts = f"{fam.saddr} . {fam.daddr} . meta l4proto"
    return f"{hosts} . th sport . th dport", hosts


def _key_types(fam: _Family) -> tuple[str, str]:
    hosts = f"{fam.addr_type} . {fam.addr_type} . inet_proto"
    return f"{hosts} . inet_service . inet_service", hosts


def flow_set(version: int, ported: bool) -> str:
    """The name of the set of known flows (filled by trace_flow) for one IP version."""
    return f"{'flows' if ported else 'peers'}{version}"


def _known_lookups(fam: _Family, verdict: str) -> list[str]:
    ports_key, hosts_key = _keys(fam)
    v = fam.version
    return [f"{ports_key} @{flow_set(v, True)} {verdict}", f"{hosts_key} @{flow_set(v, False)} {verdict}"]


def _early_rules(stateful: bool) -> list[str]:
    """The `early` chain (at MARK_PRIORITY): known flows, TCP SYNs and, where the namespace
    tracks no connections, every packet that is not a later TCP segment.

    Before conntrack nothing says whether a packet belongs to an accepted
    flow, except a SYN (a connection being opened, or its answer) and the
    tracer's own list of flows it saw dropped. Marking those here lets their
    drops in raw chains be traced too.
    """
    known = [r for fam in _FAMILIES for r in _known_lookups(fam, "goto known")]
    if stateful:
        return [*known, "tcp flags syn goto pick"]
    # Without conntrack a stateless ruleset decides per packet: a TCP flow's first
    # packet is its SYN, other protocols have no such sign, so they are marked at
    # the per-flow rate (and later fragments, which carry no flags). Those tests come
    # first: a flood of them then skips the known-flow lookups (only later TCP
    # segments need those here).
    return ["tcp flags syn goto pick", "meta l4proto != tcp goto pick",
            *[f"{fam.later_fragment} goto pick" for fam in _FAMILIES], *known]


def _late_rules() -> list[str]:
    """The `late` chain (at CT_MARK_PRIORITY, stateful namespaces only), for packets that
    are not of an assured established connection: those `early` saw are left alone."""
    rules = ["tcp flags syn return"]
    rules += [r for fam in _FAMILIES for r in _known_lookups(fam, "return")]
    return [*rules, "goto pick"]


def _ct_chain_rules(f: Scope, hook: MarkHook) -> list[str]:
    """The base chain at CT_MARK_PRIORITY: an assured established connection's packets
    (the bulk of accepted traffic) leave at the first rule."""
    rules = ["ct state established ct status assured return"]
    return rules + [f"{match} goto late".strip() for match in marking_rules(f, hook)]


def _mark_rules(fam: _Family, flow_rate: int) -> dict[str, list[str]]:
    """pick<v>, ports<v>, hosts<v>: the per-flow budget, then the namespace's, then the mark.

    A dynamic set holds one `limit` per flow. When the flow is over its limit
    the `update` statement ends the rule, so the namespace's budget is not
    spent on it. Later fragments have no ports: they are keyed by addresses.
    """
    v = fam.version
    ports_key, hosts_key = _keys(fam)
    per_flow = f"limit rate {int(flow_rate)}/second burst {FLOW_BURST} packets"
    mark = 'limit name "budget" meta nftrace set 1'
    return {
        f"pick{v}": [f"{fam.later_fragment} goto hosts{v}", f"meta l4proto {_PORTED} goto ports{v}", f"goto hosts{v}"],
        f"ports{v}": [f"update @rate{v} {{ {ports_key} {per_flow} }} {mark}"],
        f"hosts{v}": [f"update @hrate{v} {{ {hosts_key} {per_flow} }} {mark}"],
    }


def _rules_commands(table: str, chain: str, rules: Iterable[str]) -> list[str]:
    return [f"add rule inet {table} {chain} {rule}".replace("  ", " ") for rule in rules]


def mark_commands(
    table: str, f: Scope, rate: int, burst: int, *, stateful: bool = False, flow_timeout: int = FLOW_TIMEOUT
) -> str:
    """nft commands that create the marking table (one atomic batch).

    What gets marked (docs/architecture.md, "Which drops come without a
    rule", says what this leaves out):
    - at MARK_PRIORITY, for packets the scope selects (`early`): flows the
      tracer saw dropped (sets `flows4/6`, `peers4/6`, filled by
      `trace_flow`), TCP SYNs, and in a namespace without conntrack every
      packet but later TCP segments;
    - at CT_MARK_PRIORITY, in a namespace whose ruleset uses conntrack
      (`stateful`), every selected packet that is not of an assured
      established connection (`late`): new, invalid, untracked, related,
      and the first replies.
    Each marked packet passes a per-flow budget and then the namespace's
    (`limit budget`, `rate`/`burst`); known flows also pass `limit known`,
    a tenth of it. The scope's matches dispatch with `goto`, so a packet
    matching several is counted once. Without conntrack in the ruleset no
    `ct` expression is added: one would turn conntrack (and defragmentation)
    on in the namespace and change what its rules see.
    """
    known_rate, known_burst = max(1, rate // KNOWN_SHARE), max(1, burst // KNOWN_SHARE)
    lines = [
        f'add table inet {table} {{ flags owner; comment "{MARK_COMMENT}"; }}',
        f"add limit inet {table} budget {{ rate {rate}/second burst {burst} packets; }}",
        f"add limit inet {table} known {{ rate {known_rate}/second burst {known_burst} packets; }}",
    ]
    for fam in _FAMILIES:
        ports_type, hosts_type = _key_types(fam)
        v = fam.version
        for name, key_type in ((flow_set(v, True), ports_type), (flow_set(v, False), hosts_type)):
            lines.append(f"add set inet {table} {name} {{ type {key_type}; flags timeout; "
                         f"timeout {int(flow_timeout)}s; size {FLOW_SET_SIZE}; }}")
        for name, key_type in ((f"rate{v}", ports_type), (f"hrate{v}", hosts_type)):
            lines.append(f"add set inet {table} {name} {{ type {key_type}; flags dynamic,timeout; "
                         f"timeout {RATE_TIMEOUT}s; size {RATE_SET_SIZE}; }}")
    chains: dict[str, list[str]] = {}
    for fam in _FAMILIES:
        chains.update(_mark_rules(fam, max(FLOW_RATE, rate // FLOW_SHARE)))
    chains["pick"] = ["meta nfproto vmap { ipv4 : goto pick4, ipv6 : goto pick6 }"]
    chains["known"] = ['limit name "known" goto pick']
    chains["late"] = _late_rules()
    chains["early"] = _early_rules(stateful)
    lines += [f"add chain inet {table} {name}" for name in chains]  # a rule can only name existing chains
    for name, rules in chains.items():
        lines += _rules_commands(table, name, rules)
    for hook in MARK_HOOKS:
        lines.append(
            f"add chain inet {table} {hook} {{ type filter hook {hook} priority {MARK_PRIORITY}; policy accept; }}"
        )
        lines += _rules_commands(table, hook, (f"{match} goto early".strip() for match in marking_rules(f, hook)))
        lines.append(
            f"add chain inet {table} {CT_CHAINS[hook]} {{ type filter hook {hook} priority {CT_MARK_PRIORITY}; "
            "policy accept; }"
        )
        if stateful:
            lines += _rules_commands(table, CT_CHAINS[hook], _ct_chain_rules(f, hook))
    return "\n".join(lines) + "\n"


def scope_commands(table: str, f: Scope, *, stateful: bool) -> str:
    """nft commands (one atomic batch) that give an existing marking table a new scope
    (`tracer run` reloaded its filters): the hook chains' matches are replaced, the
    sets of known flows and the budgets stay, and no packet meets a half-changed table."""
    lines = []
    for hook in MARK_HOOKS:
        lines.append(f"flush chain inet {table} {hook}")
        lines += _rules_commands(table, hook, (f"{match} goto early".strip() for match in marking_rules(f, hook)))
        lines.append(f"flush chain inet {table} {CT_CHAINS[hook]}")
        if stateful:
            lines += _rules_commands(table, CT_CHAINS[hook], _ct_chain_rules(f, hook))
    return "\n".join(lines) + "\n"


def mode_commands(table: str, f: Scope, *, stateful: bool) -> str:
    """nft commands (one atomic batch) that switch an existing marking table between the
    stateful and the stateless rules, keeping its sets (the flows the tracer added)."""
    lines = [f"flush chain inet {table} early", *_rules_commands(table, "early", _early_rules(stateful))]
    for hook in MARK_HOOKS:
        lines.append(f"flush chain inet {table} {CT_CHAINS[hook]}")
        if stateful:
            lines += _rules_commands(table, CT_CHAINS[hook], _ct_chain_rules(f, hook))
    return "\n".join(lines) + "\n"


# --- which namespaces track connections ------------------------------------------------------

#: JSON expression and statement keys whose kernel objects take conntrack into use.
_CT_KEYS = frozenset({"ct", "ct count", "ct helper", "ct timeout", "ct expectation", "snat", "dnat",
                      "masquerade", "redirect", "synproxy", "flow"})
#: xtables extensions (iptables-nft's untranslated matches and targets) that do the same.
_CT_XT = frozenset({"conntrack", "state", "connmark", "connlimit", "connbytes", "connlabel", "helper",
                    "cluster", "CT", "CONNMARK", "CONNSECMARK", "MASQUERADE", "SNAT", "DNAT", "REDIRECT",
                    "NETMAP"})


def _uses_ct(node: Any) -> bool:
    if isinstance(node, list):
        return any(_uses_ct(n) for n in node)
    if not isinstance(node, dict):
        return False
    for key, value in node.items():
        if key in _CT_KEYS:
            return True
        if key == "xt" and isinstance(value, dict) and value.get("name") in _CT_XT:
            return True
        if _uses_ct(value):
            return True
    return False


def ruleset_uses_conntrack(rs: Ruleset) -> bool:
    """Whether the namespace's nftables rules (ours left out) use conntrack: a `ct`
    expression, NAT, synproxy, a flowtable, or a nat chain."""
    for item in rs.json:
        rule, chain = item.get("rule"), item.get("chain")
        if isinstance(chain, dict) and chain.get("type") == "nat" and not str(chain.get("table", "")).startswith(
            MARK_TABLE
        ):
            return True
        if isinstance(rule, dict) and not str(rule.get("table", "")).startswith(MARK_TABLE) and _uses_ct(
            rule.get("expr", [])
        ):
            return True
    return False


def conntrack_in_use(ns: Netns, rs: Ruleset) -> bool:
    """Whether `ns` tracks connections already, as far as its rulesets tell: its nftables
    rules, or an iptables-legacy nat table. Other users (legacy `-m state` rules, Open
    vSwitch, tc) are not seen: such a namespace is marked as a stateless one, which is
    correct, only less selective."""
    if ruleset_uses_conntrack(rs):
        return True
    try:
        return any("nat" in tables for tables in loaded_tables(ns).values())
    except OSError:
        return False


# --- flows the tracer asks to trace ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FlowKey:
    """One direction of a flow, as a drop showed it: addresses as text, ports 0 when the
    protocol has none (for such protocols ports are not part of the key and are ignored)."""

    version: int
    saddr: str
    daddr: str
    l4proto: int
    sport: int
    dport: int


#: (set name, key values) of one FlowKey, ready for a libnftables JSON element.
FlowElement = tuple[str, tuple[str | int, ...]]


def _int_in(value: Any, low: int, high: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{what} must be an integer {low}-{high}, not {value!r}")
    return value


def _address(value: Any, version: int, what: str) -> str:
    """The address in canonical text, rebuilt from its bytes: nothing of the caller's
    text (a zone, spaces, a hostname) can reach nft, which would try to resolve a name."""
    if not isinstance(value, str) or len(value) > 64:
        raise ValueError(f"{what} must be an IPv{version} address as text, not {value!r}")
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not an IP address") from None
    if addr.version != version:
        raise ValueError(f"{what} {value!r} is not an IPv{version} address")
    if getattr(addr, "scope_id", None) is not None:
        raise ValueError(f"{what} {value!r} has a zone: flow keys have none")
    return str(ipaddress.ip_address(addr.packed))


def flow_element(flow: FlowKey) -> FlowElement:
    """The set and key values for `flow`, every value checked; raises ValueError otherwise."""
    if not isinstance(flow, FlowKey):
        raise ValueError(f"not a FlowKey: {type(flow).__name__}")
    version = _int_in(flow.version, 4, 6, "version")
    if version not in (4, 6):
        raise ValueError(f"version must be 4 or 6, not {version}")
    saddr = _address(flow.saddr, version, "saddr")
    daddr = _address(flow.daddr, version, "daddr")
    l4proto = _int_in(flow.l4proto, 0, 255, "l4proto")
    sport = _int_in(flow.sport, 0, 65535, "sport")
    dport = _int_in(flow.dport, 0, 65535, "dport")
    if l4proto in PORT_PROTOCOLS:
        return flow_set(version, True), (saddr, daddr, l4proto, sport, dport)
    return flow_set(version, False), (saddr, daddr, l4proto)


def add_flows_command(table: str, elements: Iterable[FlowElement], timeout: int) -> str:
    """A libnftables JSON batch adding (or, on kernels that can, refreshing) known flows.

    JSON, not nft syntax: the values are checked addresses and numbers, and
    as JSON strings they cannot become another command whatever they held.
    """
    by_set: dict[str, list[dict[str, Any]]] = {}
    for name, values in elements:
        elem = {"elem": {"val": {"concat": list(values)}, "timeout": int(timeout), "expires": int(timeout)}}
        by_set.setdefault(name, []).append(elem)
    commands = [
        {"add": {"element": {"family": "inet", "table": table, "name": name, "elem": elems}}}
        for name, elems in by_set.items()
    ]
    return json.dumps({"nftables": commands})


def stale_marking_tables(rs: Ruleset) -> list[tuple[str, str]]:
    """Marking tables without the owner flag: left by a crashed older tracer."""
    return [(t.family, t.name) for t in _stale_tables(rs)]


def _stale_tables(rs: Ruleset) -> list[Table]:
    return [t for t in rs.tables.values() if t.name.startswith(MARK_TABLE) and not t.owned and t.handle is not None]


def _remove_stale(ctx: NftContext, rs: Ruleset, log: Any) -> int:
    """Deletes stale marking tables by handle: a table's name is chosen by whoever made it
    (`tracer_mark; flush ruleset` is a valid name), so it never goes into a command."""
    removed = 0
    for table in _stale_tables(rs):
        family, name = table.family, table.name
        try:
            ctx.cmd(f"delete table {family} handle {int(table.handle or 0)}")
            removed += 1
            log.info("nft.stale_marking_table_removed", family=family, table=name)
        except NftError as exc:
            log.warning("nft.stale_marking_table_not_removed", family=family, table=name, error=exc.stderr)
    return removed


def remove_stale_marking_tables(namespaces: Iterable[Netns], log: Any = None) -> int:
    """Deletes un-owned `tracer_mark*` tables (from a crashed earlier tracer) in each namespace.

    Owned marking tables belong to a running tracer and are left alone (the
    kernel would refuse anyway). Returns how many tables were removed.
    """
    log = log or structlog.get_logger("tracer.nft")
    removed = 0
    for ns in namespaces:
        try:
            with netns_mod.entered(ns):
                ctx = NftContext()
            with ctx:
                removed += _remove_stale(ctx, ctx.ruleset(), log.bind(netns=ns.label))
        except (OSError, NftError) as exc:
            log.warning("nft.stale_check_failed", netns=ns.label, error=str(exc))
    return removed


def _warn_legacy_trace(ns: Netns, log: Any) -> None:
    """Warns that iptables-legacy treats our nftrace mark like its own TRACE target, when no
    legacy collector binds nf_log to read those lines."""
    try:
        names = [name for tables in loaded_tables(ns).values() for name in tables]
    except OSError:
        return
    if names:
        log.warning(
            "nft.legacy_iptables_present",
            tables=names,
            note="iptables-legacy logs a TRACE line per rule for marked packets to the kernel log "
            "(initial namespace, or all with net.netfilter.nf_log_all_netns=1)",
        )


# --- nf_log bindings --------------------------------------------------------------------------

NF_LOGGER = "nfnetlink_log"


def _nf_log_path(pf: int) -> str:
    return f"/proc/sys/net/netfilter/nf_log/{pf}"


def read_nf_log(ns: Netns, pf: int) -> str:
    """The logger bound for a protocol family in the namespace (`NONE` when none)."""
    with netns_mod.entered(ns), open(_nf_log_path(pf)) as fh:  # /proc/sys/net follows the thread's netns
        return fh.read().strip()


def write_nf_log(ns: Netns, pf: int, logger: str) -> None:
    with netns_mod.entered(ns), open(_nf_log_path(pf), "w") as fh:
        fh.write(logger)


# --- the journal of nf_log bindings we changed ---------------------------------------------


def _start_time(pid: int) -> int | None:
    """Process start time in clock ticks: tells a live tracer from a reused PID."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


NF_LOG_LOCK = "nf_log.lock"


class BindingJournal:
    """`/run/tracer/nf_log.<pid>.<id>.json`: the nf_log bindings this collector uses.

    Written before each change, so that after a crash the next tracer knows
    what to put back. One file per collector: several may run at once, in
    one process or several, and the binding is one per namespace and
    family. So each entry says what was bound when this collector came
    (`previous`: nfnetlink_log when another tracer had bound it already),
    and every collector watching a namespace has an entry for it: it is a
    live user of the binding while its process runs.

    The rules, each applied under one lock file (`nf_log.lock`):
    - bind: read the binding, journal it, then bind nfnetlink_log.
    - release with other live users: put nothing back. A collector that
      knows the original binding leaves it in a handover journal
      (`nf_log.handover.<id>.json`, owned by no process).
    - release as the last live user: put back what we changed, then what
      any handover or dead tracer's journal says for that binding.
    Only a binding that still reads nfnetlink_log is ever put back: one an
    admin changed meanwhile is theirs.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / f"nf_log.{os.getpid()}.{secrets.token_hex(4)}.json"
        self._entries: dict[tuple[int, int], dict[str, Any]] = {}
        self._lock = threading.Lock()

    def check_writable(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(self.directory, os.W_OK):
            raise PermissionError(errno.EACCES, f"{self.directory} is not writable")

    def bind(self, ns: Netns, pf: int) -> str:
        """Binds nfnetlink_log for `pf` in `ns`, journalled first; returns what was bound before."""
        self.check_writable()
        with file_lock(self.directory / NF_LOG_LOCK):
            previous = read_nf_log(ns, pf)
            self.add(ns, pf, previous)
            if previous != NF_LOGGER:
                try:
                    write_nf_log(ns, pf, NF_LOGGER)
                except OSError:
                    self.remove(ns.inode, pf)
                    raise
            return previous

    def release(self, ns: Netns, pf: int, previous: str, *, gone: bool, log: Any) -> None:
        """Stops using the binding; puts it back only when no other live tracer uses it.

        Raises OSError when it could not be put back: the entry stays
        journalled, and the next tracer to start tries again.
        """
        key = (ns.inode, pf)
        with file_lock(self.directory / NF_LOG_LOCK):
            users = _live_users(self.directory, key, exclude=self.path)
            if users:
                with self._lock:
                    entry = self._entries.get(key)
                if previous != NF_LOGGER and entry is not None:
                    _write_handover(self.directory, entry)
                log.info("legacy.nf_log_left_bound", pf=pf, still_used_by_pids=sorted(users))
                self.remove(*key)
                return
            if not gone:
                restore_binding(ns, pf, previous, log)
            self.remove(*key)
            _restore_stale_locked(self.directory, log, only=key)

    def add(self, ns: Netns, pf: int, previous: str) -> None:
        with self._lock:
            self._entries[(ns.inode, pf)] = {
                "netns_inode": ns.inode,
                "path": ns.path,
                "name": ns.name,
                "pf": pf,
                "previous": previous,
            }
            self._write()

    def remove(self, inode: int, pf: int) -> None:
        with self._lock:
            if self._entries.pop((inode, pf), None) is not None:
                self._write()

    def _write(self) -> None:
        if not self._entries:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return
        doc = {"pid": os.getpid(), "start_time": _start_time(os.getpid()), "bindings": list(self._entries.values())}
        _write_journal(self.path, doc)


def _write_journal(path: Path, doc: dict[str, Any]) -> None:
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    os.replace(tmp, path)


def _write_handover(directory: Path, entry: dict[str, Any]) -> None:
    """A journal no process owns: the original binding, for the last user to put back."""
    _write_journal(directory / f"nf_log.handover.{secrets.token_hex(4)}.json", {"handover": True, "bindings": [entry]})


def _read_journals(directory: Path, log: Any) -> list[tuple[Path, dict[str, Any], bool]]:
    """(path, document, live) of every journal; live: its tracer's process still runs."""
    found = []
    try:
        paths = sorted(directory.glob("nf_log.*.json"))
    except OSError:
        return []
    for path in paths:
        try:
            doc = json.loads(path.read_text())
            if not isinstance(doc, dict) or not isinstance(doc.get("bindings", []), list):
                raise ValueError("not a journal")
            live = False
            if not doc.get("handover"):
                pid, started = int(doc["pid"]), doc.get("start_time")
                live = _start_time(pid) is not None and _start_time(pid) == started
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError) as exc:
            if log is not None:
                log.warning("legacy.journal_unreadable", path=str(path), error=str(exc))
            continue
        found.append((path, doc, live))
    return found


def _entry_key(entry: Any) -> tuple[int, int] | None:
    try:
        return int(entry["netns_inode"]), int(entry["pf"])
    except (KeyError, TypeError, ValueError):
        return None


def _live_users(directory: Path, key: tuple[int, int], exclude: Path | None = None) -> set[int]:
    """PIDs of running tracers (other than the journal `exclude`) that use this binding."""
    return {
        int(doc["pid"])
        for path, doc, live in _read_journals(directory, None)
        if live and path != exclude and any(_entry_key(e) == key for e in doc.get("bindings", []))
    }


def _find_netns(entry: dict[str, Any]) -> Netns | None:
    """The journalled namespace if it still exists, by its path or else by inode."""
    ns = Netns(inode=int(entry["netns_inode"]), path=str(entry["path"]), name=entry.get("name"))
    if netns_mod.exists(ns):
        return ns
    try:
        return netns_mod.discover().get(ns.inode)
    except OSError:
        return None


def restore_binding(ns: Netns, pf: int, previous: str, log: Any) -> bool:
    """Puts `previous` back if the binding is still ours; True if it was changed."""
    current = read_nf_log(ns, pf)
    if current != NF_LOGGER:
        if current != previous:
            log.info("legacy.nf_log_changed_by_others", netns=ns.label, pf=pf, current=current, left=True)
        return False
    if previous == NF_LOGGER:
        return False
    write_nf_log(ns, pf, previous)
    log.info("legacy.nf_log_restored", netns=ns.label, pf=pf, binding=previous)
    return True


def restore_stale_bindings(directory: Path = STATE_DIR, log: Any = None) -> int:
    """Undoes the nf_log bindings of tracers that died without restoring them.

    A journal whose process is gone (or whose PID now belongs to another
    process) is stale, and so is a handover. Its bindings are put back
    unless a running tracer still uses them; namespaces that vanished
    since need nothing. Returns how many bindings were put back.
    """
    log = log or structlog.get_logger("tracer.iptables")
    if not directory.is_dir():
        return 0
    try:
        with file_lock(directory / NF_LOG_LOCK):
            return _restore_stale_locked(directory, log)
    except OSError as exc:
        log.warning("legacy.stale_journals_unreadable", error=str(exc))
        return 0


def _restore_stale_locked(directory: Path, log: Any, only: tuple[int, int] | None = None) -> int:
    """restore_stale_bindings with the lock held; `only`: just entries for this binding."""
    restored = 0
    journals = _read_journals(directory, log)
    in_use = {
        _entry_key(e) for _, doc, live in journals if live for e in doc.get("bindings", [])
    }
    for path, doc, live in journals:
        if live:
            continue
        left: list[Any] = []
        for entry in doc.get("bindings", []):
            key = _entry_key(entry)
            if key is None:
                continue
            if key in in_use or (only is not None and key != only):
                left.append(entry)  # a running tracer needs it bound still, or not asked about
                continue
            try:
                ns = _find_netns(entry)
                if ns is None:
                    log.info("legacy.journalled_netns_gone", netns_inode=entry.get("netns_inode"))
                    continue
                restored += restore_binding(ns, key[1], str(entry["previous"]), log)
            except (OSError, KeyError, TypeError, ValueError) as exc:
                log.warning("legacy.nf_log_restore_failed", netns_inode=key[0], error=str(exc))
                left.append(entry)
        try:
            if left:
                if left != doc.get("bindings"):
                    _write_journal(path, {**doc, "bindings": left})
                continue  # kept for a later try
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        except OSError as exc:
            log.warning("legacy.journal_update_failed", path=str(path), error=str(exc))
            continue
        log.info("legacy.stale_journal_done", path=str(path), crashed_pid=doc.get("pid"))
    return restored


# --- the coordinator ------------------------------------------------------------------------------


class NftMarker(Protocol):
    """What the coordinator drives in the nftables collector (tracer.collectors.nftrace)."""

    def start(self, namespaces: Iterable[Netns]) -> None: ...

    def update_namespaces(self, namespaces: Iterable[Netns]) -> None: ...

    def recheck_marking(self) -> None:
        """Marks the watched namespaces not marked yet that should be marked now."""
        ...

    def stop(self) -> None: ...


class LegacyTracer(Protocol):
    """What the coordinator drives in the iptables-legacy collector (tracer.collectors.xtrace)."""

    def start(self, namespaces: Iterable[Netns]) -> None: ...

    def update_namespaces(self, namespaces: Iterable[Netns]) -> None: ...

    def wants_marking(self, ns: Netns) -> bool:
        """Whether legacy tables it traces in `ns` can drop packets (so marking pays off)."""
        ...

    def before_marking(self, ns: Netns) -> None:
        """Binds nfnetlink_log in `ns`, if it has legacy tables, before `ns` is marked."""
        ...

    def stop(self) -> None: ...


class MarkingCoordinator:
    """The host changes of one watch (marking tables, nf_log bindings) and their order.

    One nftables collector and one iptables-legacy collector attach
    themselves to it; either may be missing. They never call each other.
    What ties them, and why:

    - Which namespaces are marked (`mark`): those with nftables base chains
      of their own, else nothing there could drop a packet; and those whose
      legacy tables can drop one, since ip_tables traces the same nf_trace
      bit (the legacy collector says, `wants_marking`).
    - nf_log is bound before a namespace is marked (`before_marking`):
      otherwise the TRACE lines of the first marked packets would go to the
      namespace's current logger, the kernel log in the initial namespace.
    - Legacy tables announce no changes: the legacy collector polls, and
      when it finds a namespace newly worth tracing it says so
      (`legacy_ready`); the nftables collector then looks again at the
      namespaces it left unmarked.
    - Start (`start`): legacy first, so nf_log is bound (and crashed
      tracers' bindings put back) before anything is marked.
    - Stop (`stop`), and namespaces leaving the watch (`update_namespaces`):
      nftables first. A marking table still in place when nf_log is put back
      would send a TRACE line per rule of every marked packet to the kernel
      log (or to whatever logger was bound before), for as long as the
      packets keep coming.

    Crash undo stays where each change is first made: stale marking tables
    are removed when nftables starts watching a namespace
    (`remove_stale_tables`), dead tracers' nf_log journals are replayed when
    the legacy collector starts (`restore_stale_bindings`), and the
    journal's handover rules let several tracers share one binding.
    """

    def __init__(self, *, state_dir: Path = STATE_DIR, log: Any = None) -> None:
        self.state_dir = state_dir
        self.log = log or structlog.get_logger("tracer.marking")
        self.journal = BindingJournal(state_dir)
        self._nft: NftMarker | None = None
        self._legacy: LegacyTracer | None = None

    # --- who takes part -------------------------------------------------------------------

    def attach_nft(self, nft: NftMarker) -> None:
        """Called by the nftables collector it was given to; one per coordinator."""
        if self._nft is not None and self._nft is not nft:
            raise ValueError("this marking coordinator serves an nftables collector already")
        self._nft = nft

    def attach_legacy(self, legacy: LegacyTracer) -> None:
        """Called by the iptables-legacy collector it was given to; one per coordinator."""
        if self._legacy is not None and self._legacy is not legacy:
            raise ValueError("this marking coordinator serves an iptables-legacy collector already")
        self._legacy = legacy

    @property
    def legacy_attached(self) -> bool:
        """Whether a legacy collector takes part: then unmarked namespaces are checked again
        at every namespace update, since its tables may have become worth marking."""
        return self._legacy is not None

    # --- lifecycle, in the order the changes need -------------------------------------------

    def start(self, namespaces: Iterable[Netns]) -> None:
        """Starts both collectors on `namespaces`: legacy first, so nf_log is bound before
        nftables marks (and so traces) anything."""
        namespaces = list(namespaces)
        if self._legacy is not None:
            self._legacy.start(namespaces)
        if self._nft is not None:
            self._nft.start(namespaces)

    def update_namespaces(self, namespaces: Iterable[Netns]) -> None:
        """Follows namespaces coming and going: nftables first, so a namespace leaving the
        watch is unmarked before its nf_log binding is put back."""
        namespaces = list(namespaces)
        if self._nft is not None:
            self._nft.update_namespaces(namespaces)
        if self._legacy is not None:
            self._legacy.update_namespaces(namespaces)

    def stop(self) -> None:
        """Removes every marking table, then puts nf_log bindings back; safe to call twice.

        In this order because a namespace still marked once nf_log is put back
        logs a TRACE line per rule of each marked packet to the kernel log.
        The legacy collector stops even when stopping nftables failed: its
        bindings are host state that must not be left behind.
        """
        try:
            if self._nft is not None:
                self._nft.stop()
        finally:
            if self._legacy is not None:
                self._legacy.stop()

    def __enter__(self) -> MarkingCoordinator:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- marking tables (the nftables collector's calls, per namespace) -----------------------

    def remove_stale_tables(self, ctx: NftContext, rs: Ruleset, log: Any) -> int:
        """Crash undo when a namespace is first watched: deletes marking tables without the
        owner flag (an older tracer's); returns how many."""
        return _remove_stale(ctx, rs, log)

    def wants_marking(self, ns: Netns, rs: Ruleset) -> bool:
        """Whether `ns` should be marked: base chains of its own (ours left out), or legacy
        tables that the legacy collector traces and that can drop packets."""
        if rs.base_chains(skip_prefix=MARK_TABLE):
            return True
        legacy = self._legacy
        return legacy is not None and legacy.wants_marking(ns)

    def mark(self, ctx: NftContext, ns: Netns, rs: Ruleset, *, scope: Scope, rate: int, burst: int,
             log: Any, stateful: bool = False, flow_timeout: int = FLOW_TIMEOUT) -> str | None:  # fmt: skip
        """Adds the marking table to `ns` if it should have one (through `ctx`, whose socket
        then owns it), nf_log bound first; returns its name, or None when not marked.

        `rs` is the namespace's current ruleset. The table is `tracer_mark`,
        or `tracer_mark_<pid>` when another tracer's has that name.
        `stateful`: the namespace tracks connections (`conntrack_in_use`), so
        the rules may ask conntrack which packets belong to accepted flows.
        """
        if not self.wants_marking(ns, rs):
            return None
        legacy = self._legacy
        if legacy is not None:
            legacy.before_marking(ns)
        taken = {t.name for t in rs.tables.values() if t.family == "inet"}
        name = MARK_TABLE if MARK_TABLE not in taken else f"{MARK_TABLE}_{os.getpid()}"
        try:
            ctx.cmd(mark_commands(name, scope, rate, burst, stateful=stateful, flow_timeout=flow_timeout))
        except NftError as exc:
            log.warning("nft.marking_failed", table=name, error=exc.stderr)
            return None
        if legacy is None:
            _warn_legacy_trace(ns, log)
        log.info("nft.marking_table_added", table=name, rate=rate, burst=burst, stateful=stateful)
        return name

    def switch_mode(self, ctx: NftContext, table: str, *, scope: Scope, stateful: bool, log: Any) -> bool:
        """Moves our marking table `table` to the stateful or the stateless rules (the
        namespace's ruleset started or stopped using conntrack); True if it worked. The
        known flows stay."""
        try:
            ctx.cmd(mode_commands(table, scope, stateful=stateful))
        except NftError as exc:
            log.warning("nft.marking_mode_failed", table=table, stateful=stateful, error=exc.stderr)
            return False
        log.info("nft.marking_mode_changed", table=table, stateful=stateful)
        return True

    def change_scope(self, ctx: NftContext, table: str, *, scope: Scope, stateful: bool, log: Any) -> bool:
        """Gives our marking table `table` the matches of a new scope; True if it worked."""
        try:
            ctx.cmd(scope_commands(table, scope, stateful=stateful))
        except NftError as exc:
            log.warning("nft.marking_scope_failed", table=table, error=exc.stderr)
            return False
        log.info("nft.marking_scope_changed", table=table)
        return True

    def unmark(self, ctx: NftContext, table: str, log: Any) -> None:
        """Deletes our marking table `table` (closing `ctx` would too, the owner flag says so:
        this is the orderly way, which also says whether it worked)."""
        try:
            ctx.cmd(f"delete table inet {table}")
            log.info("nft.marking_table_removed", table=table)
        except NftError as exc:
            log.warning("nft.marking_table_remove_failed", table=table, error=exc.stderr)

    # --- nf_log (the legacy collector's calls) -------------------------------------------------

    def restore_stale_bindings(self, log: Any = None) -> int:
        """Crash undo at the legacy collector's start: puts back the bindings of tracers
        that died without doing so (see the module function)."""
        return restore_stale_bindings(self.state_dir, log)

    def legacy_ready(self) -> None:
        """The legacy collector found a namespace newly worth marking (its tables can drop
        packets now, or a lost group-0 holder was replaced): nftables looks again at the
        namespaces it has not marked. Call it outside the legacy collector's locks."""
        nft = self._nft
        if nft is None:
            return
        try:
            nft.recheck_marking()
        except Exception as exc:
            self.log.warning("legacy.on_ready_failed", error=repr(exc))
