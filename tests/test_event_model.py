"""The event model: typed sections, their ECS and text forms, rendered once.

No kernel needed: events are built from sections here, as the pipeline
builds them, and checked against the wire form (key order included) and
the text line that people read.
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests import support
from tracer.event.ecs import iso_time, parse_iso_time
from tracer.event.model import (
    ConntrackInfo,
    Drop,
    DropEvent,
    Interface,
    Interfaces,
    Namespace,
    Netfilter,
    Observer,
    Packet,
    Probe,
    Process,
    Rule,
    Summary,
)
from tracer.event.packet import PacketHeaders
from tracer.event.rendered import Rendered
from tracer.event.schema import validate
from tracer.event.text import describe_rule, one_line, printable, stack_lines

ROOT = Path(__file__).resolve().parent.parent

SYN = PacketHeaders(4, "198.18.0.1", "198.18.0.2", 6, 40000, 443, ("SYN",))
WEB_1 = Observer("web-1", None, "0.1.0")
RULE_DROP = Netfilter("nftables", "nftrace", "inet", "input", "fw", "web", "input",
                      Rule(4, "tcp dport 443 drop", "legacy block"), False, "drop")


def full_event(**changes: Any) -> DropEvent:
    """The complete event of docs/drop-event.md, built from sections."""
    sections: dict[str, Any] = {
        "timestamp_ns": parse_iso_time("2026-11-21T11:50:00.123456Z") + 789,
        "drop": Drop("NETFILTER_DROP", "nf_hook_slow+0xa1", ("nf_hook_slow+0xa1", "ip_local_deliver+0xd6"),
                     "nftables", "input"),
        "packet": Packet(SYN, 60, 0),
        "interfaces": Interfaces(Interface(5, "veth0")),
        "netns": Namespace(4026532211, "lab-server"),
        "netfilter": RULE_DROP,
        "conntrack": ConntrackInfo("new", "original", ("confirmed",), 0, 0),
        "observer": WEB_1,
    }
    sections.update(changes)
    return DropEvent(**sections)


#: The wire form of this event, byte for byte: what tracer wrote before the model had
#: sections, plus the SIEM fields of issue 9 (`rule`, `related`, `host`, `observer.vendor`...).
FULL_EVENT_JSON = (
    b'{"@timestamp":"2026-11-21T11:50:00.123456Z","ecs":{"version":"8.11.0"},"event":{"kind":"event",'
    b'"category":["network"],"type":["connection","denied"],"action":"dropped","dataset":"tracer.drop",'
    b'"count":1},"drop":{"reason":"NETFILTER_DROP","location":"nf_hook_slow+0xa1","subsystem":"nftables",'
    b'"stack":["nf_hook_slow+0xa1","ip_local_deliver+0xd6"]},"netfilter":{"backend":"nftables",'
    b'"family":"inet","hook":"input","table":"fw","chain":"web","base_chain":"input","rule":{"handle":4,'
    b'"text":"tcp dport 443 drop","comment":"legacy block"},"policy":false,"verdict":"drop",'
    b'"attribution":"nftrace"},"rule":{"id":"4","name":"legacy block","ruleset":"inet fw web",'
    b'"description":"tcp dport 443 drop"},"conntrack":{"state":"new","direction":"original",'
    b'"status":["confirmed"],"zone":0,"mark":0},"source":{"ip":"198.18.0.1","port":40000},'
    b'"destination":{"ip":"198.18.0.2","port":443},"tcp":{"flags":["SYN"]},"network":{"transport":"tcp",'
    b'"type":"ipv4","iana_number":"6","direction":"ingress","community_id":"1:nzmqH0i9ojhj6zrI5caNuu9uoEk="},'
    b'"related":{"ip":["198.18.0.1","198.18.0.2"]},"host":{"name":"web-1","hostname":"web-1"},'
    b'"observer":{"hostname":"web-1","type":"host","vendor":"tracer","product":"tracer","version":"0.1.0",'
    b'"ingress":{"interface":{"id":"5","name":"veth0"}}},"netns":{"inode":4026532211,"name":"lab-server"},'
    b'"packet":{"length":60,"mark":0}}\n'
)


def doc_examples() -> list[dict[str, Any]]:
    """The drop events (and summaries) of docs/drop-event.md; notices have their own schema."""
    return support.doc_examples()


# ------------------------------------------------------------ the package


def test_the_event_package_imports_nothing_else_from_tracer() -> None:
    """Importing every tracer.event module in a fresh interpreter loads no other tracer module."""
    code = (
        "import pkgutil, importlib, sys\n"
        "import tracer.event\n"
        "for m in pkgutil.iter_modules(tracer.event.__path__):\n"
        "    importlib.import_module('tracer.event.' + m.name)\n"
        "print('\\n'.join(sorted(n for n in sys.modules if n.startswith('tracer'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = set(out.stdout.split())
    assert {"tracer.event.model", "tracer.event.sections", "tracer.event.text", "tracer.event.rendered"} <= loaded
    assert {n for n in loaded if n != "tracer" and not n.startswith("tracer.event")} == set()


def test_conntrack_collector_uses_the_event_section() -> None:
    from tracer.collectors import conntrack as ct

    assert ct.ConntrackInfo is ConntrackInfo
    assert ct.from_record(2, 0, 0, 0) == ConntrackInfo("new", "original", (), 0, 0)


# ------------------------------------------------------------ ECS


def test_sections_render_the_wire_form_byte_for_byte() -> None:
    event = full_event()
    assert Rendered(event).json() == FULL_EVENT_JSON
    validate(event.to_ecs())


def test_only_the_drop_section_is_required() -> None:
    doc = DropEvent(timestamp_ns=1_790_000_000_000_000_000, drop=Drop("NO_SOCKET")).to_ecs()
    assert set(doc) == {"@timestamp", "ecs", "event", "drop", "host", "observer"}
    assert doc["drop"] == {"reason": "NO_SOCKET"}
    validate(doc)


def test_direction_comes_from_the_netfilter_hook_else_the_stack() -> None:
    output = Netfilter("nftables", "nftrace", hook="output")
    assert full_event(netfilter=output).to_ecs()["network"]["direction"] == "egress"
    assert full_event(netfilter=None).to_ecs()["network"]["direction"] == "ingress"  # Drop.hook
    no_hook = full_event(netfilter=None, drop=Drop("NO_SOCKET"))
    assert "direction" not in no_hook.to_ecs()["network"]
    # A non-IP drop still says which way it went.
    arp = DropEvent(timestamp_ns=1, drop=Drop("NETFILTER_DROP", hook="input"), packet=Packet(None, 28))
    assert arp.to_ecs()["network"] == {"direction": "ingress"}


def test_summary_section() -> None:
    first, last = parse_iso_time("2026-11-21T11:51:00.000388Z"), parse_iso_time("2026-11-21T11:51:10.000412Z")
    event = DropEvent(timestamp_ns=last, drop=Drop("SOCKET_RCVBUFF"), summary=Summary(1873, first, last))
    ev = event.to_ecs()["event"]
    assert (ev["dataset"], ev["count"], ev["start"], ev["end"]) == (
        "tracer.drop.summary", 1873, "2026-11-21T11:51:00.000388Z", "2026-11-21T11:51:10.000412Z")
    assert one_line(event).endswith("  ×1873 in 10 s")  # issue 8: the count and its span
    validate(event.to_ecs())


def test_unknown_sections_are_absent_never_empty() -> None:
    event = full_event(netns=Namespace(0), probe=Probe(""), packet=Packet(SYN))
    doc = event.to_ecs()
    assert "netns" not in doc and "probe" not in doc and "packet" not in doc
    assert "netns" not in one_line(event) and "probe" not in one_line(event)


@pytest.mark.parametrize("index", range(len(doc_examples())))
def test_the_documented_examples_read_back_into_the_model(index: int) -> None:
    """Every example of docs/drop-event.md: JSON -> model -> the same JSON."""
    doc = doc_examples()[index]
    event = DropEvent.from_ecs(doc)
    assert event.to_ecs() == doc
    assert DropEvent.from_ecs(event.to_ecs()) == event


def test_timestamps_read_back_to_the_microsecond() -> None:
    assert parse_iso_time(iso_time(1_790_000_000_123_456_789)) == 1_790_000_000_123_456_000
    for bad in ("2026-11-21T11:50:00Z", "2026-11-21T11:50:00.123456+00:00", "x" * 27):
        with pytest.raises(ValueError, match="timestamp"):
            parse_iso_time(bad)


# ------------------------------------------------------------ text


def test_text_line_from_the_model() -> None:
    line = one_line(full_event(process=Process(48213, "curl"), probe=Probe("p0042")))
    assert line == ('11:50:00.123456  DROPPED  tcp 198.18.0.1:40000 > 198.18.0.2:443 [SYN] len 60  NETFILTER_DROP  '
                    'netns lab-server  in veth0  nftables/input inet fw chain web rule 4 "tcp dport 443 drop" '
                    '(legacy block)  ct new/original  by curl[48213]  probe p0042')
    assert stack_lines(full_event()) == ["        nf_hook_slow+0xa1", "        ip_local_deliver+0xd6"]


def test_text_line_outside_netfilter_and_without_headers() -> None:
    v6 = PacketHeaders(6, "2001:db8::1", "2001:db8::2", 17, 5353, 53)
    line = one_line(DropEvent(timestamp_ns=0, drop=Drop("NO_SOCKET", "__udp6_lib_rcv+0x4bc"), packet=Packet(v6),
                              action="rejected"))
    assert line == ("00:00:00.000000  REJECTED  udp [2001:db8::1]:5353 > [2001:db8::2]:53  NO_SOCKET  "
                    "at __udp6_lib_rcv+0x4bc")
    assert one_line(DropEvent(timestamp_ns=0, drop=Drop("OTHER"))) == "00:00:00.000000  DROPPED  ? > ?  OTHER  at ?"


def test_policy_and_rule_descriptions() -> None:
    policy = Netfilter("nftables", "nftrace", "inet", "input", "filter", "input", "input", policy=True, verdict="drop")
    assert describe_rule(policy) == "inet filter chain input policy drop"
    assert describe_rule(Netfilter("iptables-legacy", "stack", hook="input")) == ""
    assert one_line(full_event(netfilter=Netfilter("iptables-legacy", "stack", hook="input"))).split("  ")[6] == \
        "iptables-legacy/input"


def test_hostile_names_are_escaped_in_the_text_and_kept_in_the_json() -> None:
    nasty = 'line one\nline two\r\x1b[31mred\x1b[0m\t"quoted" \\ \u202eevil'
    event = full_event(
        netns=Namespace(4026532211, nasty),
        netfilter=Netfilter("nftables", "nftrace", "inet", "input", nasty, nasty, nasty, Rule(1, nasty, nasty)),
        process=Process(1, nasty),
    )
    line = one_line(event)
    assert not any(ord(c) < 0x20 or c == "\x7f" or c == "\u202e" for c in line), repr(line)
    assert line.count(printable(nasty)) == 6  # netns, table, chain, rule text, comment, process
    assert printable(nasty) == 'line one\\nline two\\r\\x1b[31mred\\x1b[0m\\t\\"quoted\\" \\\\ \\u202eevil'
    doc = event.to_ecs()
    assert doc["netfilter"]["rule"]["comment"] == nasty and doc["netns"]["name"] == nasty


# ------------------------------------------------------------ rendered once


class CountingEvent(DropEvent):
    """An event that counts its renderings (and says in which threads they ran)."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.renders: list[str] = []

    def to_ecs(self) -> dict[str, Any]:
        self.renders.append(threading.current_thread().name)
        return super().to_ecs()


def counting_event() -> CountingEvent:
    base = full_event()
    return CountingEvent(timestamp_ns=base.timestamp_ns, drop=base.drop, packet=base.packet,
                         netfilter=base.netfilter, observer=WEB_1)


def test_each_form_is_computed_at_most_once(monkeypatch: pytest.MonkeyPatch) -> None:
    lines: list[str] = []

    def counted_one_line(event: DropEvent) -> str:
        lines.append(threading.current_thread().name)
        return one_line(event)

    monkeypatch.setattr("tracer.event.rendered.one_line", counted_one_line)
    event = counting_event()
    rendered = Rendered(event)
    assert event.renders == [] and lines == []  # nothing until a form is asked for
    start = threading.Barrier(8)

    def ask() -> None:
        start.wait()
        rendered.json()
        rendered.ecs()
        rendered.text()

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(event.renders) == 1 and len(lines) == 1
    assert rendered.json() == orjson.dumps(rendered.ecs()) + b"\n"
    assert rendered.ecs() is rendered.ecs() and rendered.json() is rendered.json()
    assert rendered.text() == one_line(event)


# ------------------------------------------------------------ SIEM fields (issue 9)


def _rule_of(nf: Netfilter | None, **changes: Any) -> dict[str, Any] | None:
    doc = full_event(netfilter=nf, **changes).to_ecs()
    validate(doc)
    return doc.get("rule")


def test_ecs_rule_of_an_nftables_rule() -> None:
    assert _rule_of(RULE_DROP) == {"id": "4", "name": "legacy block", "ruleset": "inet fw web",
                                   "description": "tcp dport 443 drop"}
    no_comment = Netfilter("nftables", "nftrace", "inet", "input", "fw", "input", "input",
                           Rule(9, "udp dport 53 drop"), False, "drop")
    assert _rule_of(no_comment) == {"id": "9", "name": "udp dport 53 drop", "ruleset": "inet fw input",
                                    "description": "udp dport 53 drop"}
    # The text could not be known for certain: the handle and the ruleset still say which rule.
    unknown_text = Netfilter("nftables", "nftrace", "inet", "input", "fw", "input", "input", Rule(9, None), False,
                             "drop")
    assert _rule_of(unknown_text) == {"id": "9", "ruleset": "inet fw input"}


def test_ecs_rule_of_iptables_rules_is_the_line_their_owner_wrote() -> None:
    line = "-A OUTPUT -p tcp -m tcp --dport 23 -j REJECT --reject-with tcp-reset"
    nft = Netfilter("iptables-nft", "nftrace", "ip", "output", "filter", "OUTPUT", "OUTPUT",
                    Rule(7, "meta l4proto tcp tcp dport 23 counter reject with tcp reset", None, line), False,
                    "reject")
    assert _rule_of(nft, action="rejected", interfaces=None) == {
        "id": "7", "name": line, "ruleset": "ip filter OUTPUT", "description": line}
    legacy_line = "-A INPUT -p tcp -m tcp --dport 443 -j DROP"
    legacy = Netfilter("iptables-legacy", "nftrace", "ip", "input", "filter", "INPUT", "INPUT",
                       Rule(3, legacy_line, "old", legacy_line), False, "drop")
    assert _rule_of(legacy) == {"id": "3", "name": "old", "ruleset": "ip filter INPUT", "description": legacy_line}


def test_ecs_rule_of_a_policy_and_of_no_rule() -> None:
    policy = Netfilter("nftables", "nftrace", "inet", "input", "filter", "input", "input", policy=True,
                       verdict="drop")
    assert _rule_of(policy) == {"name": "policy drop", "ruleset": "inet filter input"}
    # A legacy policy traced without a family is still a policy; only the ruleset needs all three names.
    assert _rule_of(Netfilter("iptables-legacy", "nftrace", None, "input", "filter", "INPUT", "INPUT",
                              policy=True, verdict="drop")) == {"name": "policy drop"}
    # Table and base chain from the probes, or the hook from the stack: no rule is known, so no `rule`.
    assert _rule_of(Netfilter("nftables", "fexit", "inet", "input", "fw", base_chain="input", verdict="drop")) is None
    assert _rule_of(Netfilter("conntrack", "stack", hook="prerouting", verdict="drop")) is None
    assert _rule_of(None) is None


def test_related_ip_lists_each_address_once() -> None:
    assert full_event().to_ecs()["related"] == {"ip": ["198.18.0.1", "198.18.0.2"]}
    loop = PacketHeaders(6, "2001:db8::1", "2001:db8::1", 17, 5000, 53)
    assert full_event(packet=Packet(loop), netfilter=None).to_ecs()["related"] == {"ip": ["2001:db8::1"]}
    assert "related" not in full_event(packet=Packet(None, 28)).to_ecs()


def test_host_and_observer_name_this_host_and_this_tracer() -> None:
    import socket

    import tracer
    from tracer.event.ecs import tracer_version

    assert tracer_version() == tracer.__version__  # pyproject.toml's version is the package's
    doc = DropEvent(timestamp_ns=1, drop=Drop("NO_SOCKET")).to_ecs()
    hostname = socket.gethostname()
    assert doc["host"] == {"name": hostname.lower(), "hostname": hostname}
    assert doc["observer"] == {"hostname": hostname, "type": "host", "vendor": "tracer", "product": "tracer",
                               "version": tracer.__version__}
    # ECS host.name is lower case; host.hostname is as `hostname` prints it.
    mixed = full_event(observer=Observer("Web-1.Example", None, None)).to_ecs()
    assert mixed["host"] == {"name": "web-1.example", "hostname": "Web-1.Example"}
    assert "version" not in mixed["observer"]
    validate(mixed)


def test_notices_carry_host_and_observer() -> None:
    from tracer.event.notice import LOSS_DATASET, Notice

    notice = Notice(timestamp_ns=1, dataset=LOSS_DATASET, action="events_lost", message="1 drop(s) not shown",
                    details={"loss": {"queue": 1, "total": 1, "counted_in_summaries": True}}, observer=WEB_1)
    doc = notice.to_ecs()
    assert doc["host"] == {"name": "web-1", "hostname": "web-1"}
    assert doc["observer"] == {"hostname": "web-1", "type": "host", "vendor": "tracer", "product": "tracer",
                               "version": "0.1.0"}
    assert "rule" not in doc and "related" not in doc
    validate(doc)


def test_siem_fields_are_made_not_read_back() -> None:
    """`rule` and `related` come from netfilter and the addresses: a replay cannot make them disagree."""
    doc = full_event().to_ecs()
    doc["rule"] = {"id": "999", "name": "something else"}
    doc["related"] = {"ip": ["198.18.0.9"]}
    assert DropEvent.from_ecs(doc).to_ecs() == full_event().to_ecs()
