"""Decoders from kernel facts to event fields: stacks, conntrack, ECS, text."""

import ctypes
import re
from pathlib import Path

import pytest

from tracer.bpf.kallsyms import Kallsyms
from tracer.bpf.layout import TRACER_ENUMS, Constants, LayoutError, object_constants, object_structs
from tracer.bpf.loader import counter_indices, default_object_path
from tracer.collectors import conntrack as ct
from tracer.event.model import (
    Drop,
    DropEvent,
    Interface,
    Interfaces,
    Namespace,
    Netfilter,
    Packet,
    Rule,
    community_id,
    iso_time,
)
from tracer.event.packet import IPV6_MAX_EXT_HEADERS, decode
from tracer.event.text import one_line
from tracer.sources.drop import (
    DropDecoder,
    DropReasons,
    check_shared_constants,
    hook_from_stack,
    process_of,
    subsystem_from_stack,
)
from tracer.sources.skb import hook_name, nf_context

INPUT_STACK = ["sk_skb_reason_drop", "nft_do_chain", "nft_do_chain_inet", "nf_hook_slow",
               "ip_local_deliver", "ip_rcv", "__netif_receive_skb_one_core"]
OUTPUT_STACK = ["sk_skb_reason_drop", "nft_do_chain", "nft_do_chain_inet", "nf_hook_slow",
                "__ip_local_out", "ip_local_out", "__ip_queue_xmit", "__tcp_transmit_skb",
                "tcp_connect", "tcp_v4_connect", "__sys_connect", "do_syscall_64",
                "entry_SYSCALL_64_after_hwframe"]


def test_hook_from_the_caller_of_nf_hook_slow():
    assert hook_from_stack(INPUT_STACK) == "input"
    assert hook_from_stack(OUTPUT_STACK) == "output"
    assert hook_from_stack(["nf_hook_slow", "ip_forward"]) == "forward"
    assert hook_from_stack(["nf_hook_slow", "ipv6_rcv"]) == "prerouting"
    assert hook_from_stack(["nf_hook_slow", "ip6_output"]) == "postrouting"
    assert hook_from_stack(["tcp_v4_rcv", "ip_local_deliver_finish"]) is None


def test_subsystem():
    assert subsystem_from_stack(INPUT_STACK, "nft_do_chain+0x3e8", "NETFILTER_DROP") == "nftables"
    assert subsystem_from_stack(["nf_hook_slow", "ip_local_deliver"], "nf_hook_slow+0x9c",
                                "NETFILTER_DROP") == "netfilter"
    assert subsystem_from_stack(["__udp4_lib_rcv"], "__udp4_lib_rcv+0x4bc", "NO_SOCKET") == "socket"
    assert subsystem_from_stack(["ip_route_input_slow"], "ip_route_input_slow+0x10", "IP_NOROUTE") == "routing"
    # A reject rule's RST dies as NO_SOCKET in the local stack, called from inside nft_do_chain:
    # the socket layer dropped it, not nftables.
    rst = ["sk_skb_reason_drop", "tcp_v4_rcv", "ip_local_deliver_finish", "__netif_receive_skb",
           "process_backlog", "nf_send_reset", "nft_reject_inet_eval", "nft_do_chain", "nf_hook_slow",
           "__ip_local_out"]
    assert subsystem_from_stack(rst, "tcp_v4_rcv+0x91", "NO_SOCKET") == "socket"


def test_process_only_in_its_own_system_call():
    assert process_of(OUTPUT_STACK, 42, "curl", "output") == (42, "curl")
    softirq = [*OUTPUT_STACK[:5], "handle_softirqs", *OUTPUT_STACK[5:]]
    assert process_of(softirq, 42, "curl", "output") is None
    assert process_of(INPUT_STACK, 42, "curl", "input") is None
    assert process_of(OUTPUT_STACK, 0, "swapper", "output") is None


def test_conntrack_from_nfct_bits():
    assert ct.from_record(ct.CT_INFO_NONE, 0, 0, 0) is None
    assert ct.from_record(7, 0, 0, 0).state == "untracked"
    new = ct.from_record(2, 0, 0, 0)
    assert (new.state, new.direction, new.status) == ("new", "original", ())
    rep = ct.from_record(3, 0b1010, 5, 9)  # IP_CT_ESTABLISHED_REPLY, seen_reply|confirmed
    assert (rep.state, rep.direction, rep.status, rep.zone, rep.mark) == (
        "established", "reply", ("seen_reply", "confirmed"), 5, 9)
    assert ct.from_record(4, 0, 0, 0).state == "related"


def test_conntrack_from_trace_attributes():
    assert ct.from_trace(None, None, None) is None
    assert ct.from_trace(1, None, None).state == "invalid"
    est = ct.from_trace(2, 1, 0b1000)
    assert (est.state, est.direction, est.status) == ("established", "reply", ("confirmed",))


def test_hook_numbers():
    assert hook_name(2, 1) == "input"
    assert hook_name(10, 3) == "output"
    assert hook_name(5, 0) == "ingress"
    assert hook_name(2, 9) is None


def test_nf_context_from_record():
    nf = object_structs(str(default_object_path()))["nf_info"]()
    assert nf_context(nf) is None
    consts = type(nf).constants
    nf.source = consts.value("nf_source", "NF_SRC_FENTRY")
    nf.backend = consts.value("nf_backend", "NF_BACKEND_NFT")
    nf.pf, nf.hook, nf.family, nf.verdict = 2, 1, 1, 0
    nf.table = b"fw"
    nf.chain = b"input"
    got = nf_context(nf)
    assert (got.source, got.backend, got.hook, got.family, got.table, got.chain, got.verdict) == (
        "fexit", "nftables", "input", "inet", "fw", "input", 0)


def test_event_struct_matches_btf():
    structs = object_structs(str(default_object_path()))
    ev = structs["drop_event"]
    assert ctypes.sizeof(ev) % 8 == 0
    assert {"reason", "l3", "l4", "stack", "nf"} <= {f[0] for f in ev._fields_}


TRACER_H = Path(__file__).resolve().parent.parent / "bpf" / "tracer.h"


def test_every_constant_of_tracer_h_is_an_enum_read_from_btf():
    """tracer.h has no #define (BTF would not carry it), and each of its enums reaches Python whole."""
    text = TRACER_H.read_text()
    defines = [line for line in text.splitlines() if line.lstrip().startswith("#define") and "TRACER_H" not in line]
    assert defines == []
    bodies = dict(re.findall(r"^enum (\w+) \{(.*?)^\};", text, re.M | re.S))
    assert set(bodies) == set(TRACER_ENUMS)
    consts = object_constants(str(default_object_path()))
    for name, body in bodies.items():
        assert list(consts.members(name)) == re.findall(r"^\s*([A-Z][A-Z0-9_]*) = ", body, re.M), name


def test_btf_constants_agree_with_the_btf_layout():
    """The enum reader and the struct reader see the same header: the limits size the arrays."""
    structs = object_structs(str(default_object_path()))
    limits = structs["drop_event"].constants.members("tracer_limits")
    ev, cfg, nf = structs["drop_event"], structs["filter_cfg"], structs["nf_info"]
    assert ev.stack.size // 8 == limits["TRACER_STACK_DEPTH"]
    assert (ev.l3.size, ev.l4.size) == (limits["TRACER_L3_BYTES"], limits["TRACER_L4_BYTES"])
    assert nf.table.size == nf.chain.size == limits["TRACER_NAME_LEN"]
    assert cfg.ports.size // 2 == limits["TRACER_MAX_PORTS"]
    assert len(cfg().nets) == limits["TRACER_MAX_NETS"]
    assert cfg.reasons.size // 8 == limits["TRACER_REASON_WORDS"]
    assert type(ev().nf).constants is structs["filter_cfg"].constants  # one object, one set


def test_filter_bits_counters_and_sentinels_from_btf():
    consts = object_constants(str(default_object_path()))
    bits = list(consts.members("filter_flags").values())
    assert len(set(bits)) == len(bits) == 9 and all(b > 0 and b & (b - 1) == 0 for b in bits)
    assert consts.value("filter_reason", "FILTER_NO_REASON") == 0xFFFF_FFFF  # read unsigned
    counters = counter_indices(consts)
    assert list(counters) == ["seen", "filtered", "emitted", "lost", "repeat", "coarse", "overflow"]
    assert sorted(counters.values()) == list(range(consts.value("drop_counter", "STAT_MAX")))
    with pytest.raises(LayoutError, match="enum filter_flags has no member FILTER_NOPE"):
        consts.value("filter_flags", "FILTER_NOPE")


def test_decoder_refuses_an_object_whose_shared_numbers_differ():
    consts = object_constants(str(default_object_path()))
    check_shared_constants(consts)  # the built object agrees with the Python decoders
    enums = {name: dict(members) for name, members in consts.enums.items()}
    enums["tracer_limits"]["TRACER_IPV6_MAX_EXT"] = IPV6_MAX_EXT_HEADERS + 1
    with pytest.raises(LayoutError, match=f"TRACER_IPV6_MAX_EXT is {IPV6_MAX_EXT_HEADERS + 1} but "
                                          f"tracer.event.packet.IPV6_MAX_EXT_HEADERS is {IPV6_MAX_EXT_HEADERS}"):
        check_shared_constants(Constants(enums))
    enums = {name: dict(members) for name, members in consts.enums.items()}
    enums["tracer_ct_info"]["TRACER_CT_INFO_NONE"] = 0xFE
    with pytest.raises(LayoutError, match="TRACER_CT_INFO_NONE is 254"):
        check_shared_constants(Constants(enums))


def _event(**kw) -> DropEvent:
    from scapy.layers.inet import IP, TCP

    raw = bytes(IP(src="198.18.0.1", dst="198.18.0.2") / TCP(sport=40000, dport=443, flags="S"))
    base = {"timestamp_ns": 1_790_000_000_123_456_789,
            "drop": Drop("NETFILTER_DROP", "nft_do_chain+0x3e8", hook="input"),
            "packet": Packet(decode(raw[:20], raw[20:40]), 60, 0),
            "interfaces": Interfaces(Interface(5, "veth0b")),
            "netns": Namespace(4026532211, "lab-server")}
    base.update(kw)
    return DropEvent(**base)


def test_ecs_rule_drop():
    nf = Netfilter(backend="nftables", attribution="nftrace", family="inet", hook="input",
                   table="fw", chain="input", base_chain="input",
                   rule=Rule(4, "tcp dport 443 drop", "legacy block"), policy=False, verdict="drop")
    event = _event(netfilter=nf, conntrack=ct.from_record(2, 0, 0, 0))
    doc = event.to_ecs()
    assert doc["@timestamp"] == iso_time(1_790_000_000_123_456_789)
    assert doc["@timestamp"].endswith(".123456Z")
    assert doc["netfilter"]["rule"] == {"handle": 4, "text": "tcp dport 443 drop", "comment": "legacy block"}
    assert doc["netfilter"]["policy"] is False
    assert doc["network"]["direction"] == "ingress"
    assert doc["network"]["community_id"].startswith("1:")
    assert doc["source"] == {"ip": "198.18.0.1", "port": 40000}
    assert doc["tcp"] == {"flags": ["SYN"]}
    assert doc["conntrack"]["state"] == "new"
    assert "stack" not in doc["drop"]
    line = one_line(event)
    assert 'rule 4 "tcp dport 443 drop" (legacy block)' in line
    assert "198.18.0.1:40000 > 198.18.0.2:443 [SYN]" in line


def test_ecs_policy_drop_has_null_rule():
    nf = Netfilter(backend="nftables", attribution="nftrace", family="inet", hook="input",
                   table="fw", chain="input", base_chain="input", policy=True, verdict="drop")
    event = _event(netfilter=nf)
    doc = event.to_ecs()
    assert doc["netfilter"]["rule"] is None and doc["netfilter"]["policy"] is True
    assert "policy drop" in one_line(event)


def test_ecs_leaves_out_the_unknown():
    doc = _event(drop=Drop("NO_SOCKET"), netns=Namespace(4026532211)).to_ecs()
    assert "netfilter" not in doc and "conntrack" not in doc and "process" not in doc
    assert "name" not in doc["netns"]
    assert "location" not in doc["drop"]
    assert "direction" not in doc["network"]


def test_conntrack_activity_and_invalid_inference():
    assert ct.tracking_active(["ct state established accept"], ["filter"])
    assert ct.tracking_active(["tcp dport 80 accept"], ["nat"])
    assert not ct.tracking_active(["tcp dport 80 reject with tcp reset"], ["filter"])
    assert ct.invalid_if_tracked(True, "input", 0).state == "invalid"
    assert ct.invalid_if_tracked(True, "prerouting", -300) is None
    assert ct.invalid_if_tracked(True, "prerouting", 0).state == "invalid"
    assert ct.invalid_if_tracked(False, "input", 0) is None


def test_bpf_filter_fields_reach_the_struct():
    from tracer.bpf import filter as bpf_filter
    from tracer.config import Scope, host_networks

    cfg = object_structs(str(default_object_path()))["filter_cfg"]()
    f = Scope(ports=(443, 53), hosts=host_networks(["198.18.0.0/15", "2001:db8::1"]),
                    proto="tcp", iface="veth0b")
    bpf_filter.build(cfg, f, reasons=[3, 12], netns_inode=4026532211, consumed_reason=None)
    bits = bpf_filter.FilterFlags.of(type(cfg).constants)
    assert cfg.flags == (bits.ports | bits.proto | bits.nets
                         | bits.netns | bits.iface | bits.reasons
                         | bits.ip_only)
    assert sorted(cfg.ports[:cfg.nports]) == [53, 443] and cfg.l4proto == 6
    assert cfg.iface == b"veth0b"
    assert (cfg.nets[0].family, cfg.nets[0].prefixlen, bytes(cfg.nets[0].addr[:4])) == (4, 15, bytes([198, 18, 0, 0]))
    assert (cfg.nets[1].family, cfg.nets[1].prefixlen) == (6, 128)
    assert cfg.reasons[0] == (1 << 3) | (1 << 12)
    assert cfg.netns_ino == 4026532211 and cfg.ignore_reason == bits.no_reason


def test_community_id_is_cached_per_flow_not_per_packet():
    import communityid
    from scapy.layers.inet import IP, UDP

    from tracer.event.ecs import _flow_community_id

    first = bytes(IP(src="198.18.0.1", dst="198.18.0.2", id=1, ttl=64) / UDP(sport=5000, dport=53) / b"a")
    second = bytes(IP(src="198.18.0.1", dst="198.18.0.2", id=2, ttl=63) / UDP(sport=5000, dport=53) / b"bb")
    other = bytes(IP(src="198.18.0.1", dst="198.18.0.2", id=3) / UDP(sport=5001, dport=53))
    p1, p2, p3 = (decode(raw[:20], raw[20:28]) for raw in (first, second, other))
    assert p1 != p2  # per-packet fields differ...
    _flow_community_id.cache_clear()
    expected = communityid.CommunityID().calc(communityid.FlowTuple.make_udp("198.18.0.1", "198.18.0.2", 5000, 53))
    assert community_id(p1) == community_id(p2) == expected
    assert _flow_community_id.cache_info().hits == 1  # ...the flow is the same
    assert community_id(p3) != community_id(p1)


# --- the drop decoder's stack cache --------------------------------------------------------

KSYMS = """\
ffffffff81000000 T _stext
ffffffff81000100 T sk_skb_reason_drop
ffffffff81000200 T nf_hook_slow
ffffffff81000300 T ip_local_deliver
ffffffff81000400 T ip_rcv
ffffffff81000500 T bpf_trace_run3
ffffffffc0100000 t nft_do_chain\t[nf_tables]
ffffffffc0100400 t nft_do_chain_inet\t[nf_tables]
ffffffffc0100800 t nft_trace_notify\t[nf_tables]
ffffffffc0200000 t bpf_prog_0123456789abcdef_kfree_skb_btf\t[bpf]
"""
# innermost first, as bpf_get_stack writes them: our program, the tracepoint, then the drop
BPF_FRAME, TRACEPOINT = 0xFFFFFFFFC0200040, 0xFFFFFFFF81000510
DROP_STACK = [BPF_FRAME, TRACEPOINT, 0xFFFFFFFF81000110, 0xFFFFFFFFC01003E8, 0xFFFFFFFFC0100420,
              0xFFFFFFFF81000220, 0xFFFFFFFF81000330, 0xFFFFFFFF81000440]


class CountingKallsyms(Kallsyms):
    """Kallsyms that counts the addresses it is asked to name."""

    formatted = 0

    def format(self, addr: int) -> str:
        self.formatted += 1
        return super().format(addr)


def _record(event_type, stack: list[int], location: int) -> bytes:
    rec = event_type()
    for i, addr in enumerate(stack):
        rec.stack[i] = addr
    rec.stack_bytes = 8 * len(stack)
    rec.location = location
    return bytes(rec)


def test_stack_symbols_are_cached_per_stack_and_call_site(tmp_path: Path):
    path = tmp_path / "kallsyms"
    path.write_text(KSYMS)
    ksyms = CountingKallsyms(str(path), refresh_interval=3600)
    event_type = object_structs(str(default_object_path()))["drop_event"]
    decoder = DropDecoder(event_type, DropReasons(), ksyms)
    raw = _record(event_type, DROP_STACK, 0xFFFFFFFFC01003E8)
    first = decoder.decode(raw)
    assert first.stack == ["sk_skb_reason_drop+0x10", "nft_do_chain+0x3e8 [nf_tables]",
                           "nft_do_chain_inet+0x20 [nf_tables]", "nf_hook_slow+0x20",
                           "ip_local_deliver+0x30", "ip_rcv+0x40"]  # tracing frames cut
    assert (first.location, first.hook, first.subsystem) == ("nft_do_chain+0x3e8 [nf_tables]", "input", "nftables")
    named = ksyms.formatted
    again = decoder.decode(raw)
    assert ksyms.formatted == named  # nothing named twice
    assert (again.stack, again.location, again.hook, again.subsystem) == (
        first.stack, first.location, first.hook, first.subsystem)
    again.stack.append("x")
    assert decoder.decode(raw).stack == first.stack  # each drop gets a list of its own

    other_site = decoder.decode(_record(event_type, DROP_STACK, 0xFFFFFFFF81000110))
    assert other_site.location == "sk_skb_reason_drop+0x10" and ksyms.formatted == named + 1 + len(DROP_STACK)

    # A table that changed under the cache: names are taken again.
    path.write_text(KSYMS.replace("ip_rcv", "ip_rcv_core"))
    assert ksyms.refresh()
    assert decoder.decode(raw).stack[-1] == "ip_rcv_core+0x40"


def test_a_stack_with_a_doubtful_frame_is_not_cached(tmp_path: Path):
    """nft_trace_notify is the last [nf_tables] symbol: a frame past it may belong to a
    module loaded since, which the next due re-read of the table names."""
    path = tmp_path / "kallsyms"
    path.write_text(KSYMS)
    ksyms = CountingKallsyms(str(path), refresh_interval=3600)
    event_type = object_structs(str(default_object_path()))["drop_event"]
    decoder = DropDecoder(event_type, DropReasons(), ksyms)
    stack = [*DROP_STACK[:4], 0xFFFFFFFFC0100980, *DROP_STACK[5:]]
    raw = _record(event_type, stack, 0)
    assert decoder.decode(raw).stack[2] == "nft_trace_notify+0x180 [nf_tables]"
    named = ksyms.formatted
    decoder.decode(raw)
    assert ksyms.formatted == 2 * named
    path.write_text(KSYMS + "ffffffffc0100900 t nfnl_fn\t[nfnetlink]\n")
    ksyms.refresh()
    assert decoder.decode(raw).stack[2] == "nfnl_fn+0x80 [nfnetlink]"


def test_full_queue_losses_are_counted_not_logged_one_by_one(monkeypatch):
    """A flood past a full queue: one warning a second at most, carrying the count."""
    import queue

    import structlog

    from tracer.config import Config
    from tracer.pipeline.engine import Engine

    engine = Engine(Config(), sink=None)
    engine.source._decoder = type("Stub", (), {"decode": staticmethod(lambda raw: raw)})()
    engine.source._deliver = engine._deliver  # as source.start() wires it
    engine._queue = queue.Queue(maxsize=1)
    now = [1000.0]
    monkeypatch.setattr("tracer.pipeline.engine.time.monotonic", lambda: now[0])
    with structlog.testing.capture_logs() as logs:
        for _ in range(500):
            engine.source._on_record(b"x")
        now[0] += 0.5
        for _ in range(300):
            engine.source._on_record(b"x")
        now[0] += 0.6
        engine.source._on_record(b"x")
        engine.source._on_record(b"x")
        engine._warn_queue_lost(final=True)  # as close() does once the ring reader stopped
    warned = [e["lost"] for e in logs if e["event"] == "event queue full, drop event lost"]
    assert warned == [1, 799, 1]
    assert sum(warned) == 801  # the first record went into the queue
