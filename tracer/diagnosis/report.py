"""`tracer diagnose`: the troubleshooting guide as one report.

The report has three parts, in the order a person reads a guide: the causes
found (each with how often it was seen, its evidence and its fix), the
local checks (rulesets, conntrack fill, forwarding, rp_filter, listening
sockets, firewalld zones) and what they ruled out. Causes come from two
places: the drops watched during the run (each event's diagnosis), and
the checks, which can name a cause before any packet is sent (a policy that
drops the port with no accept). docs/diagnose-report.md is the JSON form.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tracer import netns as netnsmod
from tracer.diagnosis import evaluate, fixes, host
from tracer.diagnosis.evaluate import Tri
from tracer.diagnosis.facts import PacketFacts
from tracer.event.text import printable, shown
from tracer.netns import Netns

PROTO_NUMBERS = {"tcp": 6, "udp": 17, "sctp": 132}
SCHEMA_ID = "urn:tracer:schema:diagnose-report:1"


@dataclass(frozen=True)
class Target:
    """What the user asked about: a port (and protocol), maybe a host, from a namespace."""

    port: int
    proto: str = "tcp"
    host: str | None = None
    netns: str | None = None

    @property
    def families(self) -> tuple[int, ...]:
        if self.host is None:
            return (4, 6)
        return (ipaddress.ip_address(self.host).version,)

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "proto": self.proto, "netns": self.netns}


@dataclass
class Finding:
    """One cause: from the drops (with how many) or from a check."""

    cause: str
    summary: str
    fix: tuple[str, ...]
    evidence: tuple[str, ...]
    netns: str | None
    source: str  # drops, check, counters
    count: int = 1

    def key(self) -> tuple[str, str | None, tuple[str, ...]]:
        return (self.cause, self.netns, self.fix)

    def to_json(self) -> dict[str, Any]:
        return {"cause": self.cause, "summary": self.summary, "count": self.count, "source": self.source,
                "netns": self.netns, "fix": list(self.fix), "evidence": list(self.evidence)}


@dataclass(frozen=True)
class Check:
    """One local check: `ok` True (ruled out), False (a problem: a finding says which), None (unknown)."""

    name: str  # ruleset, conntrack, forwarding, rp_filter, listening, firewalld, probe, counters
    netns: str | None
    ok: bool | None
    detail: str

    def to_json(self) -> dict[str, Any]:
        return {"check": self.name, "netns": self.netns,
                "result": {True: "ok", False: "problem", None: "unknown"}[self.ok], "detail": self.detail}


@dataclass
class Report:
    target: Target
    duration: float
    findings: list[Finding] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    probe: dict[str, Any] | None = None
    drops: int = 0
    counters: list[dict[str, Any]] = field(default_factory=list)

    def add(self, finding: Finding) -> None:
        """Adds a finding, or merges it into the one with the same cause, namespace and fix.

        A check and the drops that prove it are one cause: it is then the drops' (what was
        seen counts), with the check's evidence too.
        """
        for f in self.findings:
            if f.key() == finding.key():
                if f.source == finding.source:
                    f.count += finding.count  # the same cause again: its first evidence speaks for all
                    return
                if finding.source == "drops":
                    f.source, f.count = "drops", finding.count
                f.evidence += tuple(e for e in finding.evidence if e not in f.evidence)
                return
        self.findings.append(finding)

    @property
    def exit_code(self) -> int:
        return 1 if self.findings else 0

    def to_json(self) -> dict[str, Any]:
        return {
            "$schema": SCHEMA_ID,
            "target": self.target.to_json(),
            "duration": self.duration,
            "result": "causes_found" if self.findings else "nothing_wrong",
            "causes": [f.to_json() for f in self.findings],
            "checks": [c.to_json() for c in self.checks],
            "ruled_out": [c.detail for c in self.checks if c.ok is True],
            "probe": self.probe,
            "drops": self.drops,
            "counters": self.counters,
        }

    def text(self) -> str:
        t = self.target
        head = f"tracer diagnose: {t.proto} port {t.port}" + (f" on {t.host}" if t.host else "")
        lines = [head, f"watched {self.drops} drop(s) in {self.duration:g} s"]
        if self.probe is not None:
            lines.append(f"probe: {printable(str(self.probe.get('verdict', '?')).upper())}"
                         f" - {printable(str(self.probe.get('detail', '')))}")
        if not self.findings:
            lines.append("no cause found: nothing on this host drops this traffic")
        for i, f in enumerate(self.findings, 1):
            where = f" [netns {printable(f.netns)}]" if f.netns else ""
            times = f" ({f.count}x)" if f.source == "drops" else f" ({f.source})"
            lines.append(f"{i}. {f.cause}{where}{times}: {shown(f.summary)}")
            lines += [f"     evidence: {shown(e)}" for e in f.evidence]
            lines += [f"     fix: {shown(c)}" for c in f.fix]
        for title, ok in (("ruled out:", True), ("could not check:", None)):
            chosen = [c for c in self.checks if c.ok is ok]
            if chosen:
                lines.append(title)
                lines += _grouped(chosen)
        return "\n".join(lines)


#: Checks of one kind listed one by one in the text report; more are counted (the JSON has them all).
_LISTED = 4


def _grouped(checks: list[Check]) -> list[str]:
    by_name: dict[str, list[Check]] = {}
    for c in checks:
        by_name.setdefault(c.name, []).append(c)
    out = []
    for same in by_name.values():
        out += [f"  - {shown(c.detail)}" for c in same[:_LISTED]]
        if len(same) > _LISTED:
            out.append(f"  - ... and {len(same) - _LISTED} more {same[0].name} checks like these (see --json)")
    return out


# --- the local checks ---------------------------------------------------------------------



def _probe_facts(target: Target, family: int, hook: str) -> PacketFacts:
    """The first packet of a new connection to the target, as far as it is known before sending it."""
    return PacketFacts(family=family, src=None, dst=target.host, l4proto=PROTO_NUMBERS.get(target.proto, 6),
                       sport=None, dport=target.port, ct_state="new", ct_status=(), ct_direction="original",
                       hook=hook)


def ruleset_checks(report: Report, namespaces: Iterable[Netns]) -> None:
    """Each namespace's input (and forward) base chains whose drop policy no rule lifts for the port."""
    from tracer.netfilter.nftables import NftContext

    for ns in namespaces:
        label = host.label_of(ns)
        try:
            with netnsmod.entered(ns), NftContext() as ctx:
                rs = ctx.ruleset()
        except (OSError, RuntimeError) as exc:
            report.checks.append(Check("ruleset", label, None, f"ruleset of {printable(ns.label)}: {exc}"))
            continue
        problems = firewalld_check(report, ns, rs)
        hooks = _hooks_that_see(report.target, ns, rs)
        for chain in rs.base_chains(skip_prefix="tracer_"):
            if chain.hook not in hooks or chain.type not in (None, "filter"):
                continue
            if chain.policy != "drop" or chain.table == "firewalld":
                continue  # firewalld's zones end in a rule, not a policy: firewalld_check reads them
            for family in report.target.families:
                if (chain.family == "ip" and family == 6) or (chain.family == "ip6" and family == 4):
                    continue
                facts = _probe_facts(report.target, family, chain.hook)
                found = evaluate.accepting_rules(rs, chain.family, chain.table, chain.name, facts)
                if any(m in (Tri.YES, Tri.UNKNOWN) for _, m in found):
                    continue
                problems += 1
                report.add(_policy_finding(rs, chain.family, chain.table, chain.name, chain.hook, facts, ns, label))
                break
        if problems == 0:
            report.checks.append(Check("ruleset", label, True,
                                       f"no base chain in {host.where(ns)} drops {report.target.proto} port "
                                       f"{report.target.port} by policy with no accept"))


def firewalld_check(report: Report, ns: Netns, rs: Any) -> int:
    """firewalld's verdict for a new connection to the port on each interface that takes it.

    The walk starts at firewalld's input dispatch chain with the interface
    known, so it passes the zone's own chains (its allow rules, then the
    zone's reject); a verdict the evaluator cannot be sure of (a source-bound
    zone, a rich rule it cannot read) is reported as not checked. Returns the
    number of problems found.
    """
    from tracer.diagnosis import firewalld

    if not firewalld.uses_firewalld(rs):
        return 0
    t, label = report.target, host.label_of(ns)
    local = {str(ipaddress.ip_address(a)): dev for a, _, dev in host.addresses(ns)}
    if t.host is not None and t.host not in local:
        return 0
    devices = sorted({dev for dev in local.values() if dev and dev != "lo"}) if t.host is None else [local[t.host]]
    problems = 0
    for dev in devices:
        if dev is None:
            continue
        zone = firewalld.zone_of_interface(rs, dev)
        family = t.families[0]  # firewalld opens a port for both families at once
        facts = _probe_facts(t, family, "input").with_(iif=dev)
        walk = evaluate.walk_chain(rs, firewalld.FAMILY, firewalld.TABLE, "filter_INPUT", facts)
        what = f"firewalld zone {printable(zone or '?')} on {printable(dev)} ({host.where(ns)})"
        if walk.certain and walk.verdict in ("drop", "reject") and zone is not None:
            problems += 1
            try:
                fix = firewalld.fix_commands(zone, t.proto, t.port, family, prefix=fixes.shell_prefix(ns))
            except firewalld.FirewalldFixError:
                fix = []
            report.add(Finding("firewalld_zone", f"{what} does not allow {t.proto} port {t.port}",
                               tuple(fix), (f"firewalld's verdict for a new connection: {walk.verdict}",),
                               label, "check"))
        elif walk.certain and walk.verdict == "accept":
            report.checks.append(Check("firewalld", label, True, f"{what} allows {t.proto} port {t.port}"))
        else:
            report.checks.append(Check("firewalld", label, None, f"{what}: its verdict for {t.proto} port "
                                       f"{t.port} depends on what the evaluator cannot know"))
    return problems


def _hooks_that_see(target: Target, ns: Netns, rs: Any) -> tuple[str, ...]:
    """The hooks in `ns` that a new connection to the target crosses with its port unchanged.

    Input where the target is one of the namespace's addresses (or no target
    was named); forward where the namespace forwards, the target is not its
    own, and no NAT chain in prerouting may change the port on the way (the
    forward chain would then see another port: only the watched drops can tell).
    """
    if target.host is None:
        return ("input",)
    local = {str(ipaddress.ip_address(a)) for a, _, _ in host.addresses(ns)}
    if target.host in local:
        return ("input",)
    family = ipaddress.ip_address(target.host).version
    nat = any(c.type == "nat" and c.hook == "prerouting" for c in rs.base_chains())
    if host.forwarding(ns, family) and not nat:
        return ("forward",)
    return ()


def _policy_finding(rs: Any, family: str, table: str, chain: str, hook: str, facts: PacketFacts, ns: Netns,
                    label: str | None) -> Finding:
    backend = rs.backend(family, table)
    place = fixes.Place(backend, family, table, chain, ns)
    fix = fixes.accept_commands(place, fixes.nft_match(facts), fixes.xt_matches(facts))
    cause = "default_policy"
    summary = (f"chain {printable(family)} {printable(table)} {printable(chain)} ({hook}) has policy drop "
               f"and no rule accepts {facts.dport and f'port {facts.dport}'}")
    if table == "firewalld":
        cause = "firewalld_zone"
    return Finding(cause, summary, tuple(fix), (f"{backend} chain {printable(chain)} policy drop",), label, "check")



def conntrack_checks(report: Report, namespaces: Iterable[Netns]) -> None:
    for ns in namespaces:
        count = host.sysctl_int(ns, "net", "netfilter", "nf_conntrack_count")
        limit = host.sysctl_int(ns, "net", "netfilter", "nf_conntrack_max")
        if count is None or not limit:
            continue  # conntrack not loaded there: nothing to fill
        label = host.label_of(ns)
        if count >= limit * 0.95:
            cmd = fixes.sysctl_command(None, ["net", "netfilter", "nf_conntrack_max"], limit * 2)
            report.add(Finding("conntrack_full", f"the conntrack table of {host.where(ns)} is full "
                               f"({count} of {limit})", (cmd,) if cmd else (),
                               (f"nf_conntrack_count = {count}", f"nf_conntrack_max = {limit}"), label, "check"))
        else:
            report.checks.append(Check("conntrack", label, True,
                                       f"conntrack in {host.where(ns)} is {100 * count // limit}% full "
                                       f"({count} of {limit})"))


def forwarding_checks(report: Report, namespaces: Iterable[Netns]) -> None:
    """Forwarding and rp_filter where a namespace could route (two interfaces or more), as facts:
    only a drop makes them a cause."""
    for ns in namespaces:
        if len({dev for _, _, dev in host.addresses(ns) if dev != "lo"}) < 2:
            continue  # one interface: nothing to forward between, no other way back
        label = host.label_of(ns)
        v4 = host.forwarding(ns, 4)
        if v4 is not None:
            report.checks.append(Check(
                "forwarding", label, True if v4 else None,
                f"net.ipv4.ip_forward = {v4} in {host.where(ns)}" + ("" if v4 else
                ": it does not route between its interfaces (a cause only if traffic should pass through it)")))
        every, _ = host.rp_filter(ns, None)
        if every is not None:
            report.checks.append(Check(
                "rp_filter", label, True if every != 1 else None,
                f"net.ipv4.conf.all.rp_filter = {every} in {host.where(ns)}" + ("" if every != 1 else
                ": strict reverse-path filtering drops asymmetric traffic (IP_RPFILTER drops would show it)")))


def listening_checks(report: Report, namespaces: Iterable[Netns]) -> None:
    t = report.target
    if t.proto not in ("tcp", "udp"):
        return
    where = [host.where(ns) for ns in namespaces if host.listening(ns, t.proto, t.port)]
    if where:
        report.checks.append(Check("listening", None, True,
                                   f"a {t.proto} socket listens on port {t.port} in " + ", ".join(where)))
    else:
        report.checks.append(Check("listening", None, None,
                                   f"no {t.proto} socket listens on port {t.port} in any watched namespace"))


def local_checks(report: Report, namespaces: list[Netns]) -> None:
    ruleset_checks(report, namespaces)
    conntrack_checks(report, namespaces)
    forwarding_checks(report, namespaces)
    listening_checks(report, namespaces)


def return_path_fixes(server: Netns, client_addr: str, target: str, namespaces: list[Netns]) -> list[str]:
    """Fixes for a reply with no route back from `server` to `client_addr`: commands, then one
    alternative as a sentence (the last item, starting with "or").

    The router is the namespace that forwards and has both a route to the
    client and an address on a network of the server's: masquerade on its
    interface towards the target, or a return route on the server through it.
    """
    family = ipaddress.ip_address(client_addr).version
    mine = [(ipaddress.ip_interface(f"{a}/{p}").network, dev) for a, p, dev in host.addresses(server)
            if ipaddress.ip_address(a).version == family and dev != "lo"
            and not ipaddress.ip_address(a).is_loopback and not ipaddress.ip_address(a).is_link_local]
    out: list[str] = []
    for ns in namespaces:
        if ns.inode == server.inode or not host.forwarding(ns, family):
            continue
        to_client, to_target = host.route_to(ns, client_addr), host.route_to(ns, target)
        if not isinstance(to_client, host.Route) or not isinstance(to_target, host.Route):
            continue
        via = [a for a, _, _ in host.addresses(ns) if any(ipaddress.ip_address(a) in net for net, _ in mine)]
        if not via or to_target.device is None:
            continue
        name = fixes.nft_string(to_target.device)
        fam = "ip6" if family == 6 else "ip"
        if name is not None:
            out += [fixes.command(ns, ["nft", f"add table {fam} nat"]),
                    fixes.command(ns, ["nft", (f"add chain {fam} nat postrouting "
                                               "{ type nat hook postrouting priority srcnat; }")]),
                    fixes.command(ns, ["nft", f"add rule {fam} nat postrouting oifname {name} masquerade"])]
        out.append("or, instead, a return route on the server: "
                   + fixes.command(server, ["ip", "route", "add", client_addr, "via", via[0]]))
        break
    return out
