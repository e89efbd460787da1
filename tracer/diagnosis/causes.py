"""A drop's cause in a firewall troubleshooting guide's terms, and the fix in the owner's syntax.

The classifier reads a finished drop event (its reason, netfilter and
conntrack sections), the namespace's ruleset and a few of its sysctls, and
names at most one cause from `CAUSES`. The rules are tried from the most
specific to the most general: a packet that is an ICMP error, a reply, a
port-forward or locally sent says more about what broke than "a rule
dropped it". Rule order and "nothing would accept it" are decided by the
evaluator (tracer.diagnosis.evaluate); where it cannot decide, the
evidence says so and the cause stays the one the facts prove.

A cause is named only from facts; a drop no rule explains gets no diagnosis.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tracer.diagnosis import evaluate, fixes, host
from tracer.diagnosis.evaluate import Tri
from tracer.diagnosis.facts import PacketFacts
from tracer.diagnosis.fixes import ICMP_ERRORS, ND_TYPES, Place
from tracer.event.model import DropEvent
from tracer.event.sections import Diagnosis, Netfilter
from tracer.event.text import printable
from tracer.netfilter.nftables import Ruleset
from tracer.netfilter.xtables import XtTable, split_words
from tracer.netns import Netns

#: Every cause id, with what it means (docs/drop-event.md: diagnosis).
CAUSES: dict[str, str] = {
    "rule_blocks": "a rule drops or rejects this traffic on purpose, and nothing later would accept it",
    "rule_order": "a rule drops it while a later rule of the same evaluation would have accepted it",
    "default_policy": "the chain's policy dropped it and no rule accepts this traffic",
    "missing_established": "a reply or established packet died for want of an established,related accept",
    "egress_blocked": "a locally generated connection was dropped in output or postrouting",
    "nat_forward_missing": "a port-forwarded (DNAT) packet was dropped in forward: no forward accept matches it",
    "ip_forward_disabled": "the namespace does not forward: IP forwarding is off",
    "rp_filter": "reverse-path filtering dropped it: the reply route to its source leaves by another interface",
    "no_route": "there is no route for it (often a reply with no route back: masquerade missing or a wrong route)",
    "conntrack_full": "the conntrack table is full: new connections are dropped",
    "invalid_state": "conntrack found the packet invalid (out of window or with no connection) and it was dropped",
    "icmp_blocked": "an ICMP error was dropped: path MTU discovery or error reporting breaks",
    "neighbor_discovery_blocked": "neighbour discovery (IPv6 NS/NA or ARP) was dropped: the peer cannot be resolved",
    "closed_port": "nothing listens on this port: the kernel refused it (no socket)",
    "rejected": "a reject rule refused it: the firewall, not the service, answered",
    "firewalld_zone": "firewalld's zone does not allow this traffic",
}

_NO_ROUTE_REASONS = frozenset({"IP_OUTNOROUTES", "IP_INNOROUTES", "IPV6_NOROUTE", "IP_INNOROUTE"})
_NEIGH_REASONS = frozenset({"NEIGH_FAILED", "NEIGH_QUEUEFULL", "NEIGH_DEAD", "NEIGH_CREATEFAIL"})
_NO_SOCKET = frozenset({"NO_SOCKET"})


@dataclass
class Context:
    """What the classifier may look at besides the event; every part may be missing."""

    ruleset: Ruleset | None = None
    netns: Netns | None = None
    #: the fix of the latest neighbour-discovery drop per resolved address (for the NEIGH_FAILED that follows)
    nd_fixes: dict[str, Diagnosis] = field(default_factory=dict)
    firewalld: Callable[[Netfilter, PacketFacts, Netns | None, Ruleset | None], Diagnosis | None] | None = None
    #: iptables-nft: the table's `iptables -S` lines by chain (the xt matches nft cannot show)
    xt_lines: Mapping[str, list[str]] | None = None
    #: iptables-legacy: the namespace's table by (family, name), as xtrace lists it
    legacy_table: Callable[[str, str], XtTable | None] | None = None


def diagnose(event: DropEvent, ctx: Context) -> Diagnosis | None:
    """The event's cause and fix, or None when the facts name none."""
    facts = PacketFacts.from_event(event)
    nf = event.netfilter
    if nf is not None and nf.backend == "conntrack":
        return _conntrack_full(event, ctx)
    if nf is not None and nf.backend in ("nftables", "iptables-nft", "iptables-legacy") and nf.chain is not None:
        if facts is None:
            return None
        return _netfilter(event, nf, facts, ctx)
    return _kernel(event, facts, ctx)


# --- drops outside netfilter: the reason and the namespace's state -----------------------


def _kernel(event: DropEvent, facts: PacketFacts | None, ctx: Context) -> Diagnosis | None:
    reason = event.drop.reason
    ns = ctx.netns
    if reason == "IP_RPFILTER":
        return _rp_filter(event, facts, ns)
    if reason in ("IP_INADDRERRORS", "IP_INNOROUTES", "IPV6_NOT_FORWARDING") or (
            facts is not None and reason in _NO_ROUTE_REASONS):
        forwarding = _forwarding_off(event, facts, ns)
        if forwarding is not None:
            return forwarding
    if reason in _NO_ROUTE_REASONS and facts is not None and facts.dst is not None:
        return Diagnosis("no_route", f"no route to {facts.dst} in {host.where(ns)}",
                         (), (f"drop reason {reason}", *_route_evidence(ns, facts.dst)))
    if reason in _NO_SOCKET and facts is not None and facts.dport is not None:
        proto = "tcp" if facts.l4proto == 6 else "udp" if facts.l4proto == 17 else None
        if proto is None:
            return None
        bound = host.listeners(ns, proto, facts.dport)
        evidence = [f"drop reason {reason}: no socket owns {proto} port {facts.dport}"]
        if bound == ():
            evidence.append(f"no {proto} socket listens on port {facts.dport} in {host.where(ns)}")
        elif bound:
            # A listener on another address (127.0.0.1 only, one interface's address): the
            # classic "works locally, refused from outside".
            where = ", ".join(bound)
            return Diagnosis("closed_port", f"{proto} port {facts.dport} listens only on {where}, not on "
                             f"{facts.dst}: bind the service to {facts.dst} or to every address",
                             (), (*evidence, f"{proto} sockets on port {facts.dport} in {host.where(ns)}: {where}"))
        return Diagnosis("closed_port", f"nothing listens on {proto} port {facts.dport} at {facts.dst}: "
                         "start the service, or point the client at the port it listens on", (), tuple(evidence))
    if reason in _NEIGH_REASONS or (reason == "NOT_SPECIFIED" and "neigh" in (event.drop.location or "")):
        return _neighbour_failed(event, ctx)
    return None


def _forwarding_off(event: DropEvent, facts: PacketFacts | None, ns: Netns | None) -> Diagnosis | None:
    family = facts.family if facts is not None else 4
    iif = event.interfaces.ingress.name if event.interfaces and event.interfaces.ingress else None
    value = host.forwarding(ns, family)
    per_if = host.forwarding(ns, family, iif) if iif and family == 4 else None
    if value != 0 and per_if != 0:
        return None
    parts = ["net", "ipv6", "conf", "all", "forwarding"] if family == 6 else ["net", "ipv4", "ip_forward"]
    fix = [fixes.sysctl_command(ns, parts, 1)]
    if per_if == 0 and value != 0 and iif:
        fix = [fixes.sysctl_command(ns, ["net", "ipv4", "conf", iif, "forwarding"], 1)]
    key = ".".join(parts)
    evidence = [f"drop reason {event.drop.reason}", f"{key} = {value} in {host.where(ns)}"]
    if per_if is not None:
        evidence.append(f"net.ipv4.conf.{printable(iif)}.forwarding = {per_if}")
    dst = f" to {facts.dst}" if facts is not None else ""
    return Diagnosis("ip_forward_disabled", f"{host.where(ns)} received a packet{dst} to forward, "
                     f"but forwarding is off", tuple(c for c in fix if c), tuple(evidence))


def _rp_filter(event: DropEvent, facts: PacketFacts | None, ns: Netns | None) -> Diagnosis:
    iif = event.interfaces.ingress.name if event.interfaces and event.interfaces.ingress else None
    every, mine = host.rp_filter(ns, iif)
    evidence = ["drop reason IP_RPFILTER", f"net.ipv4.conf.all.rp_filter = {every}"]
    if iif:
        evidence.append(f"net.ipv4.conf.{printable(iif)}.rp_filter = {mine}")
    src = facts.src if facts is not None else "the source"
    if facts is not None and facts.src is not None:
        route = host.route_to(ns, facts.src)
        if isinstance(route, host.Route):
            evidence.append(f"the route back to {facts.src} leaves by {printable(route.device or '?')}, "
                            f"not {printable(iif or '?')}")
    fix: list[str] = []
    if iif:
        # The kernel uses the larger of conf/all and conf/<iif>: 2 (loose) on the interface is enough.
        cmd = fixes.sysctl_command(ns, ["net", "ipv4", "conf", iif, "rp_filter"], 2)
        if cmd:
            fix.append(cmd)
    return Diagnosis("rp_filter", f"reverse-path filter on {printable(iif or '?')} dropped a packet from {src}: "
                     "the route back to it uses another interface (asymmetric routing)", tuple(fix), tuple(evidence))


def _neighbour_failed(event: DropEvent, ctx: Context) -> Diagnosis | None:
    neighbor = getattr(event, "neighbor", None)
    hop = getattr(neighbor, "ip", None)
    if hop is None and event.packet is not None and event.packet.headers is not None:
        hop = event.packet.headers.dst
    if hop is None:
        return None
    known = ctx.nd_fixes.get(hop)
    if known is None:
        return None  # a peer that is down fails the same way: only a seen ND drop names the cause
    return Diagnosis("neighbor_discovery_blocked",
                     f"{hop} could not be resolved: its neighbour discovery is dropped ({known.summary})",
                     known.fix, (f"drop reason {event.drop.reason}", *known.evidence))


def _conntrack_full(event: DropEvent, ctx: Context) -> Diagnosis:
    ns = ctx.netns
    count = host.sysctl_int(ns, "net", "netfilter", "nf_conntrack_count")
    limit = host.sysctl_int(ns, "net", "netfilter", "nf_conntrack_max")
    evidence = [f"drop reason {event.drop.reason}: conntrack's table in {host.where(ns)} was full"]
    if count is not None and limit is not None:
        evidence.append(f"nf_conntrack_count = {count}, nf_conntrack_max = {limit}")
    fix: list[str] = []
    if limit:
        # nf_conntrack_max is global (read-only inside a namespace): the fix runs on the host.
        cmd = fixes.sysctl_command(None, ["net", "netfilter", "nf_conntrack_max"], limit * 2)
        if cmd:
            fix.append(cmd)
    return Diagnosis("conntrack_full", "the conntrack table is full, so new connections are dropped: "
                     "raise nf_conntrack_max (and look for what fills it)", tuple(fix), tuple(evidence))


# --- netfilter drops ---------------------------------------------------------------------


def _netfilter(event: DropEvent, nf: Netfilter, facts: PacketFacts, ctx: Context) -> Diagnosis | None:
    if ctx.firewalld is not None and ctx.ruleset is not None:
        found = ctx.firewalld(nf, facts, ctx.netns, ctx.ruleset)
        if found is not None:
            return found
    place = _place(nf, ctx.netns)
    if place is None:
        return None
    what = _traffic(facts)
    # `inet fw chain input policy drop`, `inet fw chain input rule 5 "tcp dport 443 drop": verdict drop`
    evidence = [nf.describe() if nf.policy else f"{nf.describe()}: verdict {nf.verdict or 'drop'}"]
    if event.conntrack is not None:
        evidence.append(f"conntrack state {event.conntrack.state}"
                        + (f" ({event.conntrack.direction})" if event.conntrack.direction else ""))
    if facts.ct_state == "invalid" and _mentions_invalid(nf, ctx.ruleset):
        return _invalid(nf, facts, ctx.netns, evidence)
    for special in (_icmp_blocked, _nd_blocked):
        d = special(facts, nf, place, evidence, ctx)
        if d is not None:
            return d
    if nf.hook == "forward" and facts.ct_status is not None and "dst_nat" in facts.ct_status:
        return _nat_forward(event, nf, facts, place, evidence)
    later = _later_accept(nf, facts, ctx) if not nf.policy else None
    accepted_later = later is not None and later.match is Tri.YES
    if _reply(facts) and not accepted_later:
        return Diagnosis(
            "missing_established",
            f"{what} belongs to an {facts.ct_state or 'existing'} connection, and {_short(nf)} has no "
            "ct state established,related accept before it",
            tuple(fixes.accept_commands(_first(place), fixes.ESTABLISHED_NFT, [fixes.ESTABLISHED_XT])),
            tuple(evidence))
    if nf.hook in ("output", "postrouting"):
        fix = fixes.accept_commands(place, fixes.nft_match(facts), fixes.xt_matches(facts))
        return Diagnosis("egress_blocked", f"this host's own {what} is blocked on the way out by {_short(nf)}",
                         tuple(fix), tuple(evidence + _later_evidence(later)))
    if later is not None and accepted_later:
        evidence.append(f"a later rule would accept it: {later.words}")
        own = fixes.nft_match(facts)
        nft = own
        if later.nft_match is not None and later.chain == nf.chain and own is not None:
            # The later rule's own match, as its owner wrote it (JSON: the packet's, which it matches).
            nft = fixes.NftMatch(later.nft_match, own.expr)
        xt = later.xt_match if later.chain == nf.chain else None
        fix = fixes.accept_commands(place, nft, [xt] if xt else fixes.xt_matches(facts))
        return Diagnosis("rule_order", f"{_short(nf)} drops {what} before a later rule that accepts it: "
                         "put the accept above the drop", tuple(fix), tuple(evidence))
    if nf.policy:
        fix = fixes.accept_commands(place, fixes.nft_match(facts), fixes.xt_matches(facts))
        return Diagnosis("default_policy", f"{_short(nf)} drops {what}: no rule accepts it",
                         tuple(fix), tuple(evidence))
    fix = fixes.accept_commands(place, fixes.nft_match(facts), fixes.xt_matches(facts))
    if event.action == "rejected" or nf.verdict == "reject":
        return Diagnosis("rejected", f"{_short(nf)} rejects {what}: the firewall refused the connection, "
                         "not the service", tuple(fix), tuple(evidence + _later_evidence(later)))
    return Diagnosis("rule_blocks", f"{_short(nf)} drops {what} on purpose, and no later rule accepts it",
                     tuple(fix + fixes.delete_rule(place)), tuple(evidence + _later_evidence(later)))


def _icmp_blocked(facts: PacketFacts, nf: Netfilter, place: Place, evidence: list[str],
                  ctx: Context) -> Diagnosis | None:
    if facts.l4proto not in (1, 58) or facts.icmp_type not in ICMP_ERRORS.get(facts.family, ()):
        return None
    frag = (facts.family == 4 and facts.icmp_type == 3 and facts.icmp_code == 4) or (
        facts.family == 6 and facts.icmp_type == 2)
    what = "path MTU discovery breaks (large packets vanish: a PMTU black hole)" if frag else \
        "errors no longer reach the sender (connections hang instead of failing)"
    fix = fixes.accept_commands(place, fixes.nft_match(facts), fixes.xt_matches(facts))
    name = _icmp_name(facts)
    return Diagnosis("icmp_blocked", f"{_short(nf)} drops ICMP {name} from {facts.src}: {what}",
                     tuple(fix), (*evidence, f"icmp type {facts.icmp_type} code {facts.icmp_code}"))


def _nd_blocked(facts: PacketFacts, nf: Netfilter, place: Place, evidence: list[str],
                ctx: Context) -> Diagnosis | None:
    if not (facts.l4proto == 58 and facts.icmp_type in ND_TYPES):
        return None
    fix = fixes.accept_commands(place, fixes.nft_match(facts), fixes.xt_matches(facts))
    d = Diagnosis("neighbor_discovery_blocked",
                  f"{_short(nf)} drops IPv6 neighbour discovery ({_icmp_name(facts)}) from {facts.src}: "
                  "the neighbours cannot resolve each other", tuple(fix), tuple(evidence))
    # The NEIGH_FAILED drop that follows on the other side names this fix; the peer that asked
    # resolves the NS's target, which is this packet's destination for unicast and the address
    # being asked for otherwise (not in the facts: both sides' addresses are kept).
    for address in (facts.dst, facts.src):
        if address is not None:
            ctx.nd_fixes[address] = d
    return d


def _nat_forward(event: DropEvent, nf: Netfilter, facts: PacketFacts, place: Place,
                 evidence: list[str]) -> Diagnosis:
    ct = event.conntrack
    original = ct.original.text() if ct is not None and ct.original is not None else None
    translated = f"{facts.dst}:{facts.dport}" if facts.dport is not None else facts.dst
    evidence.append("conntrack status dst_nat: the packet was port-forwarded (DNAT)")
    if original:
        evidence.append(f"original tuple {original}, translated to {translated}")
    fix = fixes.accept_commands(place, fixes.dnat_nft(facts), fixes.dnat_xt(facts))
    asked = f" (asked for {original})" if original else ""
    return Diagnosis("nat_forward_missing", f"the port-forward to {translated}{asked} is dropped by {_short(nf)}: "
                     "no forward rule accepts the DNATed traffic", tuple(fix), tuple(evidence))


def _invalid(nf: Netfilter, facts: PacketFacts, ns: Netns | None, evidence: list[str]) -> Diagnosis:
    evidence.append("conntrack marked the packet invalid")
    fix: list[str] = []
    if facts.l4proto == 6:
        loose = host.sysctl_int(ns, "net", "netfilter", "nf_conntrack_tcp_loose")
        if loose == 0:
            evidence.append("net.netfilter.nf_conntrack_tcp_loose = 0: conntrack does not pick up "
                            "connections it did not see start")
            cmd = fixes.sysctl_command(ns, ["net", "netfilter", "nf_conntrack_tcp_loose"], 1)
            if cmd:
                fix.append(cmd)
    return Diagnosis("invalid_state", f"{_short(nf)} drops {_traffic(facts)} that conntrack found invalid: "
                     "out of window, or of a connection it never saw start (asymmetric routing, a "
                     "flushed table)", tuple(fix), tuple(evidence))


# --- helpers ------------------------------------------------------------------------------


def _reply(facts: PacketFacts) -> bool:
    """Whether the packet belongs to a connection already under way (not the first of a new one).

    Conntrack says so when it runs in the namespace. A ruleset without any
    `ct` expression does not make conntrack run there, and then a TCP
    segment with ACK set (a SYN-ACK, an ACK) is the reply or the rest of a
    connection just the same: what a `ct state established,related accept`
    rule (which turns conntrack on) would let through.
    """
    if facts.ct_state is not None:
        return facts.ct_state in ("established", "related") or facts.ct_direction == "reply"
    return facts.l4proto == 6 and "ACK" in facts.tcp_flags


def _place(nf: Netfilter, ns: Netns | None) -> Place | None:
    if nf.family is None or nf.table is None or nf.chain is None:
        return None
    rule = nf.rule if not nf.policy else None
    if nf.backend in ("iptables-nft", "iptables-legacy"):
        number = rule.number if rule is not None else None
        if nf.backend == "iptables-legacy" and rule is not None and number is None:
            number = rule.handle  # the legacy TRACE rule number is its line
        return Place(nf.backend, nf.family, nf.table, nf.chain, ns, number=number)
    return Place("nftables", nf.family, nf.table, nf.chain, ns, handle=rule.handle if rule is not None else None)


def _first(place: Place) -> Place:
    return Place(place.backend, place.family, place.table, place.chain, place.ns, first=True)


def _traffic(facts: PacketFacts) -> str:
    """`tcp port 443 (198.18.0.1 > 198.18.0.2)`, or for a reply `the reply from tcp port 22 (...)`."""
    proto = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6", 132: "sctp"}.get(facts.l4proto, f"protocol {facts.l4proto}")
    flow = f"({facts.src} > {facts.dst})"
    if facts.dport is None:
        return f"{proto} {flow}"
    if _reply(facts) and facts.sport is not None:
        return f"the reply from {proto} port {facts.sport} {flow}"
    return f"{proto} port {facts.dport} {flow}"


def _icmp_name(facts: PacketFacts) -> str:
    table = fixes.ICMP_NFT if facts.family == 4 else fixes.ICMPV6_NFT
    name = table.get(facts.icmp_type or -1, f"type {facts.icmp_type}")
    if facts.family == 4 and facts.icmp_type == 3 and facts.icmp_code == 4:
        name = "fragmentation-needed"
    return name


def _short(nf: Netfilter) -> str:
    """`rule 5 of inet fw input`, `line 2 of ip filter INPUT`: for a summary (the line above shows
    the rule itself; the evidence has `Netfilter.describe`). Names escaped."""
    chain = " ".join(printable(x or "") for x in (nf.family, nf.table, nf.chain))
    if nf.policy:
        return f"the drop policy of {chain}"
    rule = nf.rule
    if rule is None:
        return f"a rule of {chain}"
    if nf.backend in ("iptables-nft", "iptables-legacy") and rule.number is not None:
        return f"line {rule.number} of {chain}"
    return f"rule {rule.handle} of {chain}"


@dataclass(frozen=True)
class Later:
    """The first later rule of the same evaluation that would accept the packet, in either backend."""

    chain: str
    words: str  # `rule 6 "tcp dport 443 accept" of chain input`, `line 5 of chain INPUT "-A ..."`: escaped
    match: Tri  # YES, or UNKNOWN when no later accept surely matches
    nft_match: str | None = None  # its match in nft syntax (an nftables rule in the text listing)
    xt_match: list[str] | None = None  # its match words from its -A line (the iptables backends)


def _later_accept(nf: Netfilter, facts: PacketFacts, ctx: Context) -> Later | None:
    """Whether a later rule of the drop's evaluation would accept it (None: none, or not known)."""
    if nf.rule is None or nf.family is None or nf.table is None or nf.chain is None:
        return None
    if nf.backend == "iptables-legacy":
        table = ctx.legacy_table(nf.family, nf.table) if ctx.legacy_table is not None else None
        number = nf.rule.number or nf.rule.handle
        found = evaluate.xt_later_accept(table, nf.chain, number, facts) if table is not None else None
        if found is None:
            return None
        xt_rule, match = found
        return Later(xt_rule.chain, f'line {xt_rule.number} of chain {printable(xt_rule.chain)} '
                     f'"{printable(xt_rule.line)}"', match, None, _accept_words(xt_rule.line))
    rs = ctx.ruleset
    if rs is None or rs.rule(nf.family, nf.table, nf.rule.handle) is None:
        return None
    got = evaluate.later_accept(rs, nf.family, nf.table, nf.chain, nf.rule.handle, facts, xt_lines=ctx.xt_lines)
    if got is None:
        return None
    rule, match = got
    text = f' "{printable(rule.text)}"' if rule.text else ""
    if nf.backend == "iptables-nft":
        lines = ctx.xt_lines.get(rule.chain) if ctx.xt_lines is not None else None
        line = lines[rule.position] if lines is not None and rule.position < len(lines) else None
        return Later(rule.chain, f"line {rule.position + 1} of chain {printable(rule.chain)}{text}", match,
                     None, _accept_words(line) if line else None)
    nft = rule.text[: -len(" accept")].strip() if rule.text and rule.text.endswith(" accept") else None
    return Later(rule.chain, f"rule {rule.handle}{text} of chain {printable(rule.chain)}", match, nft)


def _accept_words(line: str) -> list[str] | None:
    """An iptables rule's own match words, from its `-S` line (`-A INPUT <these> -j ACCEPT`)."""
    words = split_words(line)
    if len(words) < 4 or words[0] != "-A" or words[-2:] != ["-j", "ACCEPT"]:
        return None
    return words[2:-2]


def _later_evidence(later: Later | None) -> list[str]:
    if later is None or later.match is not Tri.UNKNOWN:
        return []
    return [f"undecided: a later rule may accept it ({later.words}); the evaluator cannot tell"]


def _mentions_invalid(nf: Netfilter, rs: Ruleset | None) -> bool:
    rule = nf.rule
    if rule is None or nf.policy:
        return False
    text = (rule.iptables or rule.text or "").lower()
    return "invalid" in text


def _route_evidence(ns: Netns | None, dst: str) -> list[str]:
    route = host.route_to(ns, dst)
    if route is False:
        return [f"`ip route get {dst}` finds no route in {host.where(ns)}"]
    return []


def firewalld_zone(nf: Netfilter, facts: PacketFacts, ns: Netns | None, rs: Ruleset | None) -> Diagnosis | None:
    """A drop inside firewalld's own table: the zone that refused it and the firewall-cmd fix."""
    from tracer.diagnosis import firewalld

    if rs is None or nf.table != "firewalld" or not firewalld.uses_firewalld(rs):
        return None
    zone = firewalld.zone_of_chain(nf.chain or "", rs)
    if zone is None and facts.iif is not None:
        zone = firewalld.zone_of_interface(rs, facts.iif)
    evidence = [f"dropped in firewalld's table: {nf.describe()}"]
    if zone is None:
        return None
    evidence.append(f"zone {printable(zone)}")
    proto = {6: "tcp", 17: "udp", 132: "sctp"}.get(facts.l4proto)
    fix: list[str] = []
    if proto is not None and facts.dport is not None:
        try:
            fix = firewalld.fix_commands(zone, proto, facts.dport, facts.family, prefix=fixes.shell_prefix(ns))
            evidence += [f"or, by service: {c}" for c in firewalld.service_fix_commands(
                zone, proto, facts.dport, facts.family, prefix=fixes.shell_prefix(ns))]
        except firewalld.FirewalldFixError as exc:
            evidence.append(f"no fix: {exc}")
    return Diagnosis("firewalld_zone", f"firewalld zone {printable(zone)} does not allow {_traffic(facts)}",
                     tuple(fix), tuple(evidence))
