"""The sections of a drop event: one group of facts each, each rendering itself.

As in retis, every source of knowledge fills one optional section of the
event (the kernel's drop record the `Drop` and `Packet` sections, the
netfilter attribution `Netfilter`, conntrack `ConntrackInfo`, the link
names `Interfaces`...) and the model knows none of them. Each section is a
frozen dataclass that renders its own part of the ECS document
(docs/drop-event.md: `to_ecs`), reads it back (`from_ecs`) and writes its
own part of the text line (`text`), so a fact's JSON and its text live
next to each other.

Unknown means absent: a field left None is left out of both forms, never
filled with a guess. Names chosen by a namespace's owner reach the text
line only through `printable`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any

from tracer.event.ecs import (
    OBSERVER_PRODUCT,
    OBSERVER_VENDOR,
    community_id,
    iso_time,
    local_hostname,
    parse_iso_time,
    tracer_version,
)
from tracer.event.packet import TRANSPORT_NAMES, PacketHeaders, protocol_of_transport
from tracer.event.text import NO_FLOW, icmp_name, printable, shown

#: An ECS object as `to_ecs` builds it and `from_ecs` reads it.
Doc = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Drop:
    """Why and where the kernel freed the packet (ECS `drop`); every event has one."""

    reason: str  # enum skb_drop_reason name, without SKB_DROP_REASON_
    location: str | None = None  # call site, `symbol+0xoff [module]`
    stack: tuple[str, ...] | None = None  # innermost frame first; None unless --stack asked for it
    subsystem: str | None = None  # nftables, iptables-legacy, conntrack, routing, socket, other
    hook: str | None = None  # the netfilter hook the kernel stack shows; only feeds network.direction

    def to_ecs(self) -> Doc:
        out: Doc = {"reason": self.reason}
        if self.location:
            out["location"] = self.location
        if self.subsystem:
            out["subsystem"] = self.subsystem
        if self.stack is not None:
            out["stack"] = list(self.stack)
        return out

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> Drop:
        """The kernel's hook is not in the JSON (only the direction it implies): it stays None."""
        stack = d.get("stack")
        return cls(d["reason"], d.get("location"), None if stack is None else tuple(stack), d.get("subsystem"))

    def text(self) -> str:
        """The place, when no netfilter section names a rule: the call site."""
        return f"at {self.location or '?'}"


def _endpoint(ip: str, port: int | None, has_port: bool) -> str:
    if not has_port:
        return ip
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


@dataclass(frozen=True, slots=True)
class Packet:
    """The dropped packet: its IP and transport headers, and the skb's length and mark.

    The headers render as ECS `source`, `destination`, `tcp`, `network` (and
    `drop.icmp`, ECS having no ICMP fields); length and mark as `packet`.
    """

    headers: PacketHeaders | None = None  # None: not an IP packet, or no header was readable
    length: int | None = None  # skb->len at the drop
    mark: int | None = None  # skb->mark

    def add_flow_ecs(self, doc: Doc, direction: str | None) -> None:
        """Adds the flow's objects to `doc`; `direction` (from the hooks) goes into `network`."""
        p = self.headers
        network: Doc = {}
        if p is not None:
            src: Doc = {"ip": p.src}
            dst: Doc = {"ip": p.dst}
            if p.sport is not None:
                src["port"] = p.sport
                dst["port"] = p.dport
            doc["source"], doc["destination"] = src, dst
            network = {"transport": p.transport, "type": f"ipv{p.version}", "iana_number": str(p.protocol)}
            if p.tcp_flags:
                doc["tcp"] = {"flags": list(p.tcp_flags)}
            if p.icmp_type is not None:
                # ECS has no ICMP fields; the spec puts such facts under `drop`.
                doc["drop"]["icmp"] = {"type": p.icmp_type, "code": p.icmp_code}
                if p.quoted is not None:
                    doc["drop"]["icmp"]["quoted"] = _quoted_ecs(p.quoted)
        if direction:
            network["direction"] = direction
        if p is not None:
            cid = community_id(p)
            if cid:
                network["community_id"] = cid
        if network:
            doc["network"] = network
        if p is not None:
            # ECS `related.ip`: every address of the event, once (both are canonical text, so
            # equal strings are equal addresses); what SIEM content searches "any address" in.
            doc["related"] = {"ip": [p.src] if p.src == p.dst else [p.src, p.dst]}

    def to_ecs(self) -> Doc | None:
        """ECS `packet` (length, mark), None when neither is known."""
        out: Doc = {}
        if self.length is not None:
            out["length"] = self.length
        if self.mark is not None:
            out["mark"] = self.mark
        return out or None

    @classmethod
    def from_ecs(cls, doc: Mapping[str, Any]) -> Packet | None:
        """From a whole event (the section spans several of its objects); None if it has none of them."""
        meta = doc.get("packet", {})
        headers = _headers_from_ecs(doc)
        if headers is None and not meta:
            return None
        return cls(headers, meta.get("length"), meta.get("mark"))

    def text(self) -> str:
        """`tcp 198.18.0.1:40000 > 198.18.0.2:443 [SYN] len 60`, `icmp 198.18.0.3 > 198.18.0.1 3/4
        frag-needed len 576`: brackets round IPv6 addresses with a port, ICMP's type/code and its
        name (ICMPv6 is written `icmpv6`, as people and `--proto` say it), the skb's length."""
        p = self.headers
        length = f" len {self.length}" if self.length is not None else ""
        if p is None:
            return NO_FLOW + length
        ports = p.sport is not None
        transport = "icmpv6" if p.protocol == 58 else p.transport
        out = f"{transport} {_endpoint(p.src, p.sport, ports)} > {_endpoint(p.dst, p.dport, ports)}"
        if p.tcp_flags:
            out += f" [{','.join(p.tcp_flags)}]"
        if p.icmp_type is not None:
            code = "?" if p.icmp_code is None else p.icmp_code
            out += f" {p.icmp_type}/{code}"
            name = icmp_name(p.version, p.icmp_type, p.icmp_code)
            if name:
                out += f" {name}"
        return out + length


def _quoted_ecs(q: PacketHeaders) -> Doc:
    """`drop.icmp.quoted`: the packet an ICMP error quotes, as ECS `source`/`destination`."""
    src: Doc = {"ip": q.src}
    dst: Doc = {"ip": q.dst}
    if q.sport is not None:
        src["port"] = q.sport
        dst["port"] = q.dport
    return {"source": src, "destination": dst, "transport": q.transport}


def _quoted_from_ecs(d: Mapping[str, Any]) -> PacketHeaders:
    src, dst = d["source"], d["destination"]
    return PacketHeaders(version=6 if ":" in src["ip"] else 4, src=src["ip"], dst=dst["ip"],
                         protocol=protocol_of_transport(d["transport"]), sport=src.get("port"),
                         dport=dst.get("port"))


def _headers_from_ecs(doc: Mapping[str, Any]) -> PacketHeaders | None:
    """The header facts the JSON keeps (not the IP id, TTL or raw transport bytes)."""
    src, dst, net = doc.get("source"), doc.get("destination"), doc.get("network", {})
    if src is None or dst is None or "iana_number" not in net:
        return None
    icmp = doc["drop"].get("icmp") or {}
    protocol = int(net["iana_number"])
    if TRANSPORT_NAMES.get(protocol, str(protocol)) != net["transport"]:
        raise ValueError(f"network.transport {net['transport']!r} is not protocol {protocol}")
    return PacketHeaders(
        version=int(net["type"].removeprefix("ipv")),
        src=src["ip"],
        dst=dst["ip"],
        protocol=protocol,
        sport=src.get("port"),
        dport=dst.get("port"),
        tcp_flags=tuple(doc.get("tcp", {}).get("flags", ())),
        icmp_type=icmp.get("type"),
        icmp_code=icmp.get("code"),
        quoted=_quoted_from_ecs(icmp["quoted"]) if "quoted" in icmp else None,
    )


@dataclass(frozen=True, slots=True)
class Interface:
    index: int
    name: str | None = None

    def to_ecs(self) -> Doc:
        out: Doc = {"id": str(self.index)}
        if self.name:
            out["name"] = self.name
        return out

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> Interface:
        return cls(int(d["id"]), d.get("name"))


@dataclass(frozen=True, slots=True)
class Interfaces:
    """The devices the packet came in on and was leaving by (ECS `observer.ingress/egress`)."""

    ingress: Interface | None = None
    egress: Interface | None = None

    def add_ecs(self, observer: Doc) -> None:
        if self.ingress is not None:
            observer["ingress"] = {"interface": self.ingress.to_ecs()}
        if self.egress is not None:
            observer["egress"] = {"interface": self.egress.to_ecs()}

    @classmethod
    def from_ecs(cls, observer: Mapping[str, Any]) -> Interfaces | None:
        ingress, egress = observer.get("ingress"), observer.get("egress")
        if ingress is None and egress is None:
            return None
        return cls(None if ingress is None else Interface.from_ecs(ingress["interface"]),
                   None if egress is None else Interface.from_ecs(egress["interface"]))

    def text(self) -> str | None:
        """`in veth0 out eth1` (an interface whose name is unknown by its index: `in if7`)."""
        parts = [f"{word} {printable(i.name) if i.name else f'if{i.index}'}"
                 for word, i in (("in", self.ingress), ("out", self.egress)) if i is not None]
        return " ".join(parts) or None


@dataclass(frozen=True, slots=True)
class Observer:
    """The host that saw the drop (ECS `host`) and the tracer that reported it (ECS `observer`).

    Events carry both because SIEM content looks for the host in
    `host.name` and for the sensor in `observer.*`. `host.name` is the
    hostname in lower case: ECS recommends the lower-case FQDN, but Elastic
    Agent and Beats default to the lower-case hostname, and matching them
    joins a drop to the host's other data; finding an FQDN would also ask
    the resolver, which can hang at boot. `host.hostname` and
    `observer.hostname` are the hostname as `hostname` prints it.
    """

    hostname: str
    name: str | None = None  # host.name; None: the hostname in lower case
    version: str | None = None  # observer.version, the tracer's; None: unknown (not installed)

    def add_ecs(self, doc: Doc) -> Doc:
        """Adds `host` and `observer` to `doc`; returns `observer`, for the interfaces to join."""
        doc["host"] = {"name": self.name or self.hostname.lower(), "hostname": self.hostname}
        observer: Doc = {"hostname": self.hostname, "type": "host", "vendor": OBSERVER_VENDOR,
                         "product": OBSERVER_PRODUCT}
        if self.version:
            observer["version"] = self.version
        doc["observer"] = observer
        return observer

    @classmethod
    def from_ecs(cls, doc: Mapping[str, Any]) -> Observer:
        """From a whole event: the section spans `host` and `observer`."""
        observer = doc["observer"]
        return cls(observer["hostname"], doc.get("host", {}).get("name"), observer.get("version"))


@cache
def this_observer() -> Observer:
    """This host and this tracer: the `Observer` of every event the tracer makes itself."""
    return Observer(local_hostname(), None, tracer_version())


@dataclass(frozen=True, slots=True)
class Namespace:
    """The network namespace of the drop (ECS `netns`): its inode, and its `ip netns` name if any."""

    inode: int  # 0: unknown, and then the section renders nothing
    name: str | None = None

    def to_ecs(self) -> Doc | None:
        if not self.inode:
            return None
        out: Doc = {"inode": self.inode}
        if self.name:
            out["name"] = self.name
        return out

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> Namespace:
        return cls(d["inode"], d.get("name"))

    def text(self) -> str | None:
        return f"netns {printable(self.name or self.inode)}" if self.inode else None


@dataclass(frozen=True, slots=True)
class Rule:
    handle: int
    text: str | None  # None when the rule's text could not be known for certain
    comment: str | None = None
    iptables: str | None = None  # the `iptables -S` (-A) line, for the iptables backends
    #: The rule's line in `iptables -L --line-numbers` (1-based position in its chain), for the
    #: iptables backends: what `iptables -D CHAIN N` and `-I CHAIN N` take. The nft handle is not.
    number: int | None = None

    def to_ecs(self) -> Doc:
        out: Doc = {"handle": self.handle}
        if self.text is not None:
            out["text"] = self.text
        if self.comment is not None:
            out["comment"] = self.comment
        if self.iptables is not None:
            out["iptables"] = self.iptables
        if self.number is not None:
            out["number"] = self.number
        return out

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> Rule:
        return cls(d["handle"], d.get("text"), d.get("comment"), d.get("iptables"), d.get("number"))


@dataclass(frozen=True, slots=True)
class Netfilter:
    """Where in netfilter the packet was dropped and by what."""

    backend: str
    attribution: str
    family: str | None = None
    hook: str | None = None
    table: str | None = None
    chain: str | None = None
    base_chain: str | None = None
    rule: Rule | None = None
    policy: bool | None = None
    verdict: str | None = None

    def to_ecs(self) -> Doc:
        out: Doc = {"backend": self.backend}
        for key in ("family", "hook", "table", "chain", "base_chain"):
            value = getattr(self, key)
            if value is not None:
                out[key] = value
        if self.policy is True:
            out["rule"] = None
            out["policy"] = True
        elif self.rule is not None:
            out["rule"] = self.rule.to_ecs()
            out["policy"] = False
        if self.verdict is not None:
            out["verdict"] = self.verdict
        out["attribution"] = self.attribution
        return out

    @property
    def ruleset(self) -> str | None:
        """ECS `rule.ruleset`: `family table chain` (`inet fw input`), as `nft list chain` takes them.

        The chain is the one whose rule or policy decided (a user chain
        reached by jump included), since that is where the rule lives. None
        unless all three are known: a partial name would group unrelated drops.
        """
        chain = self.chain or self.base_chain
        if self.family is None or self.table is None or chain is None:
            return None
        return f"{self.family} {self.table} {chain}"

    def rule_ecs(self) -> Doc | None:
        """ECS `rule`: the rule, or the chain policy, that gave the verdict; None when neither is known.

        SIEM content keys on these fields rather than on tracer's own
        `netfilter.rule`. `rule.id` is the handle (the iptables-legacy rule
        number), as text because ECS types it keyword; it is unique within
        `rule.ruleset`'s table only. `rule.name` is the comment, else the rule
        as its owner wrote it (the `iptables -S` line for the iptables
        backends, the nft text otherwise), which `rule.description` always
        is. A policy has no handle and no text: its name is `policy drop`.
        """
        rule = None if self.policy is True else self.rule
        if rule is None and self.policy is not True:
            return None
        written = None if rule is None else rule.iptables or rule.text
        out: Doc = {}
        if rule is None:
            out["name"] = f"policy {self.verdict or 'drop'}"
        else:
            out["id"] = str(rule.handle)
            if rule.comment or written:
                out["name"] = rule.comment or written
        ruleset = self.ruleset
        if ruleset is not None:
            out["ruleset"] = ruleset
        if written:
            out["description"] = written
        return out

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> Netfilter:
        rule = d.get("rule")
        return cls(d["backend"], d["attribution"], d.get("family"), d.get("hook"), d.get("table"),
                   d.get("chain"), d.get("base_chain"), None if rule is None else Rule.from_ecs(rule),
                   d.get("policy"), d.get("verdict"))

    def describe(self) -> str:
        """`inet fw chain input rule 4 "tcp dport 443 drop" (legacy block)`, or the policy.

        An iptables rule (iptables-nft, iptables-legacy) is shown as its owner wrote it, its
        `-A` line, and by its line in `iptables -L --line-numbers` (`line 2 "-A INPUT ..."`),
        the number `iptables -D INPUT 2` takes: the nft handle of an iptables-nft rule is a
        different number, and shown as `handle N` only when the line is not known.
        """
        where = " ".join(printable(x) for x in (self.family, self.table) if x)
        chain = self.chain or self.base_chain
        if chain:
            where = f"{where} chain {printable(chain)}" if where else f"chain {printable(chain)}"
        if self.policy is True:
            return f"{where} policy {'drop' if self.verdict is None else self.verdict}".strip()
        rule = self.rule
        if rule is not None and self.backend in ("iptables-nft", "iptables-legacy"):
            if rule.iptables is not None:
                number = f" line {rule.number}" if rule.number is not None else ""
                return f'{where}{number} "{printable(rule.iptables)}"'.strip()
            if self.backend == "iptables-nft":
                out = f"{where} handle {rule.handle}"
                if rule.text is not None:
                    out += f' "{printable(rule.text)}"'
                if rule.comment:
                    out += f" ({printable(rule.comment)})"
                return out
        if rule is not None:
            out = f"{where} rule {rule.handle}"
            if rule.text is not None:
                out += f' "{printable(rule.text)}"'
            if rule.comment:
                out += f" ({printable(rule.comment)})"
            return out
        return where

    def text(self) -> str:
        """`nftables/input inet fw chain input rule 4 ...`: backend, hook, then the rule."""
        hook = f"/{self.hook}" if self.hook else ""
        return f"{self.backend}{hook} {self.describe()}".strip()


@dataclass(frozen=True, slots=True)
class CtTuple:
    """One direction of a conntrack entry: addresses and ports as conntrack keys them.

    Ports are None for protocols without them (ICMP keys on type and id instead).
    """

    src: str
    dst: str
    sport: int | None = None
    dport: int | None = None

    def to_ecs(self) -> Doc:
        src: Doc = {"ip": self.src}
        dst: Doc = {"ip": self.dst}
        if self.sport is not None:
            src["port"] = self.sport
        if self.dport is not None:
            dst["port"] = self.dport
        return {"source": src, "destination": dst}

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> CtTuple:
        return cls(d["source"]["ip"], d["destination"]["ip"], d["source"].get("port"), d["destination"].get("port"))

    def text(self) -> str:
        ports = self.sport is not None and self.dport is not None
        return f"{_endpoint(self.src, self.sport, ports)} > {_endpoint(self.dst, self.dport, ports)}"


@dataclass(frozen=True, slots=True)
class ConntrackInfo:
    """The packet's connection-tracking state (ECS `conntrack`).

    `original` and `reply` are the entry's two tuples, kept only when NAT
    changed the flow (the reply is not the original reversed): then the
    original tuple is what the client asked for (the pre-DNAT port a user
    filters on) and the reply tuple names the translated destination.
    """

    state: str  # new, established, related, invalid, untracked
    direction: str | None = None  # original, reply
    status: tuple[str, ...] = ()
    zone: int | None = None
    mark: int | None = None
    original: CtTuple | None = None
    reply: CtTuple | None = None

    def to_ecs(self) -> Doc:
        out: Doc = {"state": self.state}
        if self.direction:
            out["direction"] = self.direction
        if self.state not in ("invalid", "untracked"):
            out["status"] = list(self.status)
            if self.zone is not None:
                out["zone"] = self.zone
            if self.mark is not None:
                out["mark"] = self.mark
            if self.original is not None:
                out["original"] = self.original.to_ecs()
            if self.reply is not None:
                out["reply"] = self.reply.to_ecs()
        return out

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> ConntrackInfo:
        original, reply = d.get("original"), d.get("reply")
        return cls(d["state"], d.get("direction"), tuple(d.get("status", ())), d.get("zone"), d.get("mark"),
                   None if original is None else CtTuple.from_ecs(original),
                   None if reply is None else CtTuple.from_ecs(reply))

    @property
    def nat(self) -> bool:
        """Whether NAT changed this flow (conntrack's src_nat/dst_nat status, or tuples that differ)."""
        return bool({"src_nat", "dst_nat"} & set(self.status)) or self.original is not None

    def text(self) -> str:
        out = f"ct {self.state}" + (f"/{self.direction}" if self.direction else "")
        if self.original is not None:
            out += f" nat from {self.original.text()}"
        return out


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """Why the packet died, in a firewall troubleshooting guide's terms, and what to change.

    `cause` is one id of tracer.diagnosis.causes.CAUSES; `fix` holds whole
    commands in the syntax of the tool that owns the rule (nft, iptables,
    firewall-cmd, sysctl, ip), each ready to paste into a root shell: every
    name in them is shell-quoted. `evidence` lists the facts the cause rests on.
    A drop whose cause cannot be named has no Diagnosis: unknown is absent.
    """

    cause: str
    summary: str
    fix: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()

    def to_ecs(self) -> Doc:
        return {"cause": self.cause, "summary": self.summary, "fix": list(self.fix),
                "evidence": list(self.evidence)}

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> Diagnosis:
        return cls(d["cause"], d["summary"], tuple(d.get("fix", ())), tuple(d.get("evidence", ())))

    def text(self) -> str:
        """The second, indented line of the text view: the cause and the first fix.

        The summary's names were escaped when it was written, and a fix is shell-quoted: both
        are shown as they are unless they hold a byte that could act on the terminal.
        """
        out = f"cause {self.cause}: {shown(self.summary)}"
        if self.fix:
            out += f"  fix: {shown(self.fix[0])}"
        return out


@dataclass(frozen=True, slots=True)
class Process:
    """The local process that sent the packet (ECS `process`), for drops in its own system call."""

    pid: int
    name: str  # comm: chosen by whoever runs the process

    def to_ecs(self) -> Doc:
        return {"pid": self.pid, "name": self.name}

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> Process:
        return cls(d["pid"], d["name"])

    def text(self) -> str:
        return f"by {printable(self.name)}[{self.pid}]"


@dataclass(frozen=True, slots=True)
class Probe:
    """The tracer probe a packet belongs to (ECS `probe`): how `tracer probe --explain` finds its drops."""

    id: str

    def to_ecs(self) -> Doc | None:
        return {"id": self.id} if self.id else None

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> Probe:
        return cls(d["id"])

    def text(self) -> str | None:
        return f"probe {self.id}" if self.id else None


#: U+00D7 MULTIPLICATION SIGN, as people write a count of repeats (a plain x reads as a word).
TIMES = "\u00d7"


@dataclass(frozen=True, slots=True)
class Summary:
    """Many alike drops folded into one event: how many, first and last (docs: Summary events).

    An event with this section is a `tracer.drop.summary`; without it, one
    packet. A missing start or end is the event's own timestamp.
    """

    count: int
    start_ns: int | None = None
    end_ns: int | None = None

    def add_ecs(self, event: Doc, timestamp_ns: int) -> None:
        """Adds `start` and `end` to ECS `event` (dataset and count are the event's to set)."""
        event["start"] = iso_time(self.start_ns or timestamp_ns)
        event["end"] = iso_time(self.end_ns or timestamp_ns)

    @classmethod
    def from_ecs(cls, event: Mapping[str, Any]) -> Summary:
        return cls(event["count"], parse_iso_time(event["start"]), parse_iso_time(event["end"]))

    def text(self) -> str | None:
        """`\u00d71234 in 10 s` (a multiplication sign): how many, over how long (first to last drop)."""
        if self.start_ns is None or self.end_ns is None:
            return f"{TIMES}{self.count}"
        seconds = max(0, self.end_ns - self.start_ns) / 1e9
        span = f"{seconds:.0f}" if seconds >= 10 else f"{seconds:.1f}"
        return f"{TIMES}{self.count} in {span} s"


@dataclass(frozen=True, slots=True)
class Neighbor:
    """The next hop of a packet that died waiting for it to resolve (ECS `neighbor`).

    A NEIGH_FAILED drop (or NOT_SPECIFIED at neigh_invalidate) names no
    address: the packet's destination may be far away, and what failed is
    the gateway (or the destination itself, on-link) that ARP or neighbour
    discovery could not find. `state` is the neighbour entry's NUD state as
    `ip neigh` prints it (FAILED, INCOMPLETE, ...), None when no entry was
    left; `interface` the device the route sends it by.
    """

    ip: str
    state: str | None = None
    interface: str | None = None

    def to_ecs(self) -> Doc:
        out: Doc = {"ip": self.ip}
        if self.state is not None:
            out["state"] = self.state
        if self.interface is not None:
            out["interface"] = self.interface
        return out

    @classmethod
    def from_ecs(cls, d: Mapping[str, Any]) -> Neighbor:
        return cls(d["ip"], d.get("state"), d.get("interface"))

    def text(self) -> str:
        """`next hop 198.18.0.1 dev veth0 FAILED`."""
        out = f"next hop {self.ip}"
        if self.interface is not None:
            out += f" dev {printable(self.interface)}"
        if self.state is not None:
            out += f" {printable(self.state)}"
        return out
