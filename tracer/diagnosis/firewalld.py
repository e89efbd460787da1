"""firewalld's nftables layout read back: which zone a chain or an interface belongs to, and the fix.

firewalld (nftables backend, 1.x) keeps everything in one table, `inet
firewalld`. Base chains (`filter_INPUT`, `filter_FORWARD`, ...) dispatch
through `<table>_<HOOK>_ZONES` chains, whose rules are `iifname "X" goto
filter_IN_<zone>` for bound interfaces (`"eth*"` for firewalld's `eth+`),
`ip saddr P goto ...` for bound sources, and a last bare `goto` to the
default zone. Each active zone has a main chain `<table>_<DIR>_<zone>`
(filter_IN_public) that jumps to its `_pre`, `_log`, `_deny`, `_allow` and
`_post` parts and ends with the zone's target: `reject with icmpx
admin-prohibited` for the default target (public, block), `drop` for the
drop zone. Policies use the same shape with `policy_<name>` in place of the
zone. So a drop by the main chain's last rule is "the zone does not allow
this", and the fix is firewall-cmd's, not nft's: a rule added by hand to
firewalld's table is lost on the next reload.

Chain names come from the kernel and may be made by anyone with
CAP_NET_ADMIN in the namespace: a name is only taken as a zone when the
part recovered from it is a name firewalld itself accepts (letters, digits,
`_`, `-`, at most one inner `/`, at most 17 characters before it). Every
word of a fix command is shell-quoted.
"""

from __future__ import annotations

import os
import re
import shlex
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from tracer.netfilter.nftables import Ruleset

FAMILY, TABLE = "inet", "firewalld"
#: Where firewalld's service definitions live; /etc overrides /usr/lib by file name.
SERVICE_DIRS = ("/usr/lib/firewalld/services", "/etc/firewalld/services")
#: Protocols `--add-port` takes.
PORT_PROTOCOLS = frozenset({"tcp", "udp", "sctp", "dccp"})
#: `max_zone_name_len()` of firewalld: 28 (iptables' chain name limit) - len("POST_") - len("_allow").
MAX_ZONE_NAME = 17
#: The parts a zone's (or policy's) main chain jumps to, in firewalld's order.
PARTS = ("pre", "log", "deny", "allow", "post")
#: Hooks of the dispatch chains that bind interfaces to zones, and their chains.
ZONE_DISPATCH = {
    "input": "filter_INPUT_ZONES",
    "forward": "filter_FORWARD_ZONES",
    "prerouting": "mangle_PREROUTING_ZONES",
}
_CHAIN = re.compile(r"(filter|nat|mangle|raw)_(IN|FWD|OUT|PRE|POST)_(.+)\Z", re.S)
_POLICY_PREFIX = "policy_"
_SERVICE_FILE_LIMIT = 1 << 16


class FirewalldFixError(ValueError):
    """A fix was asked for with a zone, protocol, port or family firewalld would not take."""


@dataclass(frozen=True)
class FirewalldChain:
    """What one chain of `inet firewalld` is, as firewalld names it.

    `kind` is "zone" or "policy"; `name` the zone's or policy's name; `table`
    firewalld's table prefix (filter, nat, mangle, raw); `direction` its short
    hook (IN, FWD, OUT, PRE, POST); `part` None for the main chain (whose last
    rule is the zone's target), else one of PARTS.
    """

    kind: str
    name: str
    table: str
    direction: str
    part: str | None

    @property
    def main_chain(self) -> str:
        prefix = _POLICY_PREFIX if self.kind == "policy" else ""
        return f"{self.table}_{self.direction}_{prefix}{self.name}"


def uses_firewalld(ruleset: Ruleset) -> bool:
    """Whether firewalld (nftables backend) manages this namespace: its `inet firewalld` table is there."""
    return (FAMILY, TABLE) in ruleset.tables


def valid_zone_name(name: str) -> bool:
    """Whether firewalld would accept `name` as a zone (or policy) name (core/io/zone.py's check_name)."""
    if not name or name.startswith("/") or name.endswith("/") or name.count("/") > 1:
        return False
    if not all(ch.isalnum() or ch in "_-/" for ch in name):
        return False
    return len(name.split("/", 1)[0]) <= MAX_ZONE_NAME


def parse_chain(chain: str, ruleset: Ruleset | None = None) -> FirewalldChain | None:
    """The zone or policy a firewalld chain belongs to; None for dispatch chains and foreign names.

    Zone names may themselves end in `_allow` or start with `policy_`, so a
    name alone can read two ways. Without a ruleset the reading that follows
    firewalld's own layout wins (filter_IN_public_allow is zone public's
    allow part). With the ruleset the reading must match what is there: the
    main chain exists in `inet firewalld` and jumps to this part, and a main
    chain that a `*_ZONES` dispatch chain goes to is a zone, not a policy.
    """
    m = _CHAIN.match(chain)
    if m is None:
        return None
    table, direction, rest = m.groups()
    for candidate in _readings(table, direction, rest, ruleset):
        if ruleset is None or _present(candidate, chain, ruleset):
            return candidate
    return None


def _readings(table: str, direction: str, rest: str, ruleset: Ruleset | None) -> Iterator[FirewalldChain]:
    """The ways `rest` can split into a zone/policy name and a part, firewalld's layout first."""
    splits: list[tuple[str, str | None]] = [(rest[: -len(p) - 1], p) for p in PARTS if rest.endswith("_" + p)]
    splits.append((rest, None))
    for base, part in splits:
        kinds: list[tuple[str, str]] = []
        if base.startswith(_POLICY_PREFIX):
            policy = ("policy", base[len(_POLICY_PREFIX):])
            zone_first = ruleset is not None and _dispatched(f"{table}_{direction}_{base}", ruleset)
            kinds = [("zone", base), policy] if zone_first else [policy, ("zone", base)]
        else:
            kinds = [("zone", base)]
        for kind, name in kinds:
            if valid_zone_name(name):
                yield FirewalldChain(kind, name, table, direction, part)


def _present(candidate: FirewalldChain, chain: str, ruleset: Ruleset) -> bool:
    main = ruleset.chain(FAMILY, TABLE, candidate.main_chain)
    if main is None:
        return False
    return candidate.part is None or chain in main.jumps


def _dispatched(chain: str, ruleset: Ruleset) -> bool:
    """Whether a `*_ZONES` dispatch chain goes to `chain` (what makes it a zone's)."""
    return any(
        c.family == FAMILY and c.table == TABLE and c.name.endswith("_ZONES") and chain in c.jumps
        for c in ruleset.chains.values()
    )


def zone_of_chain(chain: str, ruleset: Ruleset | None = None) -> str | None:
    """The zone whose chain this is (filter_IN_public, filter_IN_public_allow, nat_PRE_dmz, ...), else None.

    Policy chains (filter_IN_policy_allow-host-ipv6) and dispatch chains
    (filter_INPUT, filter_INPUT_ZONES) belong to no zone. Pass the ruleset to
    resolve names that read two ways (see parse_chain).
    """
    parsed = parse_chain(chain, ruleset)
    return parsed.name if parsed is not None and parsed.kind == "zone" else None


def zone_of_interface(ruleset: Ruleset, ifname: str, hook: str = "input") -> str | None:
    """The zone firewalld puts traffic arriving on `ifname` in, from the dispatch chain's rules.

    Rules are read in order as the kernel runs them: `iifname "X" goto`
    (exact, or `"X*"` firewalld's wildcard) then the default zone's bare
    `goto`. Source-bound zones (`ip saddr ... goto`) depend on the packet's
    address, not the interface, and are passed over as firewall-cmd
    --get-zone-of-interface does. Any other rule shape means this reading
    cannot be sure, and gives None rather than a guess; so does a namespace
    without firewalld's table.
    """
    chain_name = ZONE_DISPATCH.get(hook)
    if chain_name is None:
        raise ValueError(f"no zone dispatch for hook {hook!r}; one of {', '.join(ZONE_DISPATCH)}")
    if ruleset.chain(FAMILY, TABLE, chain_name) is None:
        return None
    for expr in _chain_exprs(ruleset, chain_name):
        target = _goto(expr)
        if target is None:
            return None
        matches = expr[:-1]
        if not matches:
            return zone_of_chain(target, ruleset)
        if len(matches) != 1 or not isinstance(matches[0], dict) or not isinstance(matches[0].get("match"), dict):
            return None
        match = matches[0]["match"]
        left, right = match.get("left"), match.get("right")
        if match.get("op") != "==":
            return None
        if isinstance(left, dict) and isinstance(left.get("payload"), dict) and left["payload"].get("field") in (
                "saddr", "daddr"):
            continue  # a source-bound zone
        if left != {"meta": {"key": "iifname"}} or not isinstance(right, str):
            return None
        if _ifname_matches(right, ifname):
            return zone_of_chain(target, ruleset)
    return None


def _chain_exprs(ruleset: Ruleset, chain: str) -> Iterator[list[Any]]:
    """The JSON expressions of a firewalld chain's rules, in the kernel's order."""
    for item in ruleset.json:
        rule = item.get("rule")
        if isinstance(rule, dict) and (rule.get("family"), rule.get("table"), rule.get("chain")) == (
                FAMILY, TABLE, chain):
            expr = rule.get("expr")
            yield expr if isinstance(expr, list) else []


def _goto(expr: list[Any]) -> str | None:
    """The target of a rule whose last statement is a goto, else None."""
    if not expr or not isinstance(expr[-1], dict):
        return None
    goto = expr[-1].get("goto")
    target = goto.get("target") if isinstance(goto, dict) else None
    return target if isinstance(target, str) else None


def _ifname_matches(pattern: str, ifname: str) -> bool:
    """nft's interface name match: a trailing `*` is a prefix wildcard; nft's JSON writes a literal one as `\\*`."""
    if pattern.endswith("\\*"):
        return ifname == pattern[:-2] + "*"
    if pattern.endswith("*"):
        return ifname.startswith(pattern[:-1])
    return ifname == pattern


# --- the fix ---------------------------------------------------------------------------


def _check_fix(zone: str, proto: str, port: int, family: int) -> None:
    if not valid_zone_name(zone):
        raise FirewalldFixError(f"{zone!r} is not a firewalld zone name")
    if proto not in PORT_PROTOCOLS:
        raise FirewalldFixError(f"firewall-cmd --add-port takes {', '.join(sorted(PORT_PROTOCOLS))}, not {proto!r}")
    if type(port) is not int or not 1 <= port <= 65535:  # bool is an int subclass: refused too
        raise FirewalldFixError(f"port must be 1-65535, not {port!r}")
    if family not in (4, 6):
        raise FirewalldFixError(f"family must be 4 or 6, not {family!r}")


def _pair(prefix: Sequence[str], zone: str, option: str) -> list[str]:
    """The runtime command (works now) and the --permanent one (survives a reload or reboot)."""
    runtime = [*prefix, "firewall-cmd", f"--zone={zone}", option]
    permanent = [*prefix, "firewall-cmd", "--permanent", f"--zone={zone}", option]
    return [shlex.join(runtime), shlex.join(permanent)]


def fix_commands(zone: str, proto: str, port: int, family: int, prefix: Sequence[str] = ()) -> list[str]:
    """`firewall-cmd --zone=Z --add-port=P/proto`, then its `--permanent` twin, each shell-quoted.

    `--add-port` opens the port for IPv4 and IPv6 alike (firewalld's ports
    have no family); `family` is checked, not used. `prefix` goes in front
    of both (`ip netns exec NAME` from tracer.diagnosis.fixes.shell_prefix).
    Raises FirewalldFixError for values firewalld would refuse.
    """
    _check_fix(zone, proto, port, family)
    return _pair(prefix, zone, f"--add-port={port}/{proto}")


def service_fix_commands(
    zone: str, proto: str, port: int, family: int, prefix: Sequence[str] = (),
    dirs: Sequence[str] = SERVICE_DIRS,
) -> list[str]:
    """The `--add-service=S` alternative (runtime, permanent), or [] when no single service fits.

    A service fits when it opens exactly this port/proto and nothing else
    (no other ports, protocols, helpers, includes, and no destination that
    would limit it to some addresses). When two services fit (9090/tcp is
    both cockpit and prometheus) none is offered: the name would be a guess.
    """
    _check_fix(zone, proto, port, family)
    services = services_for_port(proto, port, dirs)
    if len(services) != 1:
        return []
    return _pair(prefix, zone, f"--add-service={services[0]}")


def services_for_port(proto: str, port: int, dirs: Sequence[str] = SERVICE_DIRS) -> list[str]:
    """Names of the services that open exactly `port/proto` and nothing else, sorted."""
    wanted = ((str(port), proto),)
    return sorted(name for name, ports in _service_ports(dirs).items() if ports == wanted and valid_service(name))


def valid_service(name: str) -> bool:
    """Whether firewalld would accept `name` as a service name (letters, digits, `_`, `-`)."""
    return bool(name) and all(ch.isalnum() or ch in "_-" for ch in name)


def _service_ports(dirs: Iterable[str]) -> dict[str, tuple[tuple[str, str], ...] | None]:
    """Service name -> its ports, None for a service that does more than open ports.

    A later directory overrides an earlier one file by file, as firewalld
    lets /etc/firewalld/services override /usr/lib/firewalld/services. An
    unreadable or malformed file counts as a service that does more.
    """
    found: dict[str, tuple[tuple[str, str], ...] | None] = {}
    for directory in dirs:
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for fname in names:
            if fname.endswith(".xml") and len(fname) > 4:
                found[fname[:-4]] = _ports_of(os.path.join(directory, fname))
    return found


def _ports_of(path: str) -> tuple[tuple[str, str], ...] | None:
    try:
        with open(path, "rb") as f:
            data = f.read(_SERVICE_FILE_LIMIT + 1)
        if len(data) > _SERVICE_FILE_LIMIT or b"<!DOCTYPE" in data or b"<!ENTITY" in data:
            return None  # not a service definition as firewalld ships them: no DTD, so no entity expansion
        root = ET.fromstring(data)  # noqa: S314 (root-owned files, DTDs refused above)
    except (OSError, ET.ParseError):
        return None
    if root.tag != "service":
        return None
    ports: list[tuple[str, str]] = []
    for child in root:
        if child.tag in ("short", "description"):
            continue
        if child.tag != "port":
            return None
        ports.append((child.get("port", ""), child.get("protocol", "")))
    return tuple(ports)
