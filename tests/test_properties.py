"""Hostile bytes for every decoder that reads the kernel or the wire (hypothesis).

Each decoder says in its docstring what bad input does to it; these
properties hold it to that:

| decoder | contract on bad input |
| --- | --- |
| `nlmsg.split_messages`, `attributes`, `nfgen_family` | never raise; a truncated message or attribute ends the run |
| `nft.parse_trace_message` | only `nlmsg.DecodeError` (a ValueError): a fixed-size attribute too short |
| `iptables.parse_packet_message`, `parse_trace_prefix`, `payload_fingerprint`, `parse_save` | never raise |
| `packet.decode`, `fingerprint` | never raise (None for what is not IPv4/IPv6) |
| `packet.ipv6_transport_offset` | ValueError for less than the 40-byte fixed header, else never raises |
| `kallsyms.parse` | only `KallsymsError`; `Kallsyms.format`/`lookup` never raise |
| `nftables.generation_of`, `table_of`, `change_of` | never raise |
| `nftables.parse_ruleset` (nft's JSON shape, any names, any text) | never raises; a rule's text is its own or None |
| `legacy_relay.FrameReader.feed`, `check_packet_message` | only `RelayError` |
| `drop.DropDecoder.decode` | ValueError for a record shorter than `struct drop_event`, else never raises |
| `probe_marker.recognise` | never raises |
| `nlmsg.NetlinkReader` | survives any handler error; hands over only what the kernel sent |

Random bytes alone rarely get past a length check, so most properties also
build well-formed input (by hand here, or with pyroute2's `nla_map` classes
for the round trips) and then mutate it: truncate it, rewrite a length
field, overwrite or insert bytes.

Run sizes (`max_examples` of each property; hypothesis stops earlier only
when a small input space is exhausted, as for the 40 cases of
`test_trace_fixed_size_attribute_too_short_is_refused`):

- 1000: netlink message framing (2 properties), packets from random bytes (2);
- 500: netlink attributes (1), nftrace messages (2), NFLOG messages (1) and
  prefixes (2), iptables-save text (2), nf_tables notifications (1), the
  nft JSON + text listings with hostile names (1), legacy relay frames (1),
  packets built and mutated (3), IPv6 extension chains (1), kallsyms text
  (1) and lookups (1), BPF drop records (3); round trips through pyroute2's
  `nft_trace_msg` / `nfulnl_packet_msg` and a hand-built NEWTABLE (3);
- 300: `_NetnsWatch._handle` of a live nft collector, and forged datagrams
  sent to a live `NetlinkReader` (root, real namespaces).

29 properties, about 15,600 examples in all; with the three plain tests
the file takes 45-60 s on the 2-core build machine (most of it hypothesis
generating input).
No example database is written (`database=None`): a failure prints the
falsifying example and a `@reproduce_failure` blob instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import sys
import textwrap
import time
from functools import cache
from pathlib import Path

import pytest
import structlog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracer.bpf.kallsyms import Kallsyms, KallsymsError, parse
from tracer.collectors import xtrace as ipt
from tracer.collectors.nftrace import (
    NftCollector,
    TraceMessage,
    nft_trace_msg,
    parse_trace_message,
)
from tracer.event import packet
from tracer.netfilter import xtables
from tracer.netfilter.constants import NFPROTO_FAMILIES
from tracer.netfilter.marking import MARK_TABLE
from tracer.nlmsg import (
    DecodeError,
    NetlinkReader,
    attributes,
    netfilter_socket,
    nfgen_family,
    split_messages,
)
from tracer.probe import marker as probe_marker

FRAMING, RANDOM, MUTATED, ROUND_TRIP, LIVE = 1000, 1000, 500, 500, 300


def runs(n: int, **kw) -> settings:
    """Settings for a property of `n` examples; no deadline (the first call warms caches)."""
    return settings(
        max_examples=n,
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **kw,
    )


# --- building netlink by hand ---------------------------------------------------------

NLA_F_NESTED = 0x8000
NFNL_SUBSYS_NFTABLES, NFT_MSG_TRACE, NFNL_SUBSYS_ULOG = 10, 17, 4
TRACE_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_TRACE
NEWGEN_TYPE = (NFNL_SUBSYS_NFTABLES << 8) | 15  # NFT_MSG_NEWGEN
NFLOG_PACKET_TYPE = NFNL_SUBSYS_ULOG << 8
NFNLGRP_NFTABLES, NFNLGRP_NFTRACE = 7, 9


def nla(atype: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes (the padding is not in its length)."""
    length = 4 + len(payload)
    return struct.pack("=HH", length, atype) + payload + bytes(-length % 4)


def nlmsg(mtype: int, body: bytes, seq: int = 0) -> bytes:
    length = 16 + len(body)
    return struct.pack("=IHHII", length, mtype, 0, seq, 0) + body + bytes(-length % 4)


def nfgen(family: int, attrs: bytes) -> bytes:
    """struct nfgenmsg (family, version 0, res_id 0) and the attributes."""
    return bytes([family, 0, 0, 0]) + attrs


_LENGTHS = st.sampled_from((0, 1, 3, 4, 5, 8, 0xFFFF)) | st.integers(0, 0xFFFF)


@st.composite
def mutations(draw: st.DrawFn, data: bytes) -> bytes:
    """`data` truncated, with a length field rewritten, bytes overwritten or inserted: a few of those."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(0, 3))):
        if not buf:
            break
        op = draw(st.sampled_from(("truncate", "length", "byte", "insert")))
        i = draw(st.integers(0, len(buf) - 1))
        if op == "truncate":
            del buf[i:]
        elif op == "length":  # netlink lengths sit at 4-byte boundaries
            i -= i % 4
            buf[i : i + 2] = struct.pack("=H", draw(_LENGTHS))
        elif op == "byte":
            buf[i] = draw(st.integers(0, 255))
        else:
            buf[i:i] = draw(st.binary(min_size=1, max_size=8))
    return bytes(buf)


@st.composite
def hostile(draw: st.DrawFn, wellformed: st.SearchStrategy[bytes]) -> bytes:
    """Random bytes, or well-formed input mutated."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=256))
    return draw(mutations(draw(wellformed)))


# --- netlink framing ------------------------------------------------------------------


@runs(FRAMING)
@given(st.binary(max_size=512) | st.lists(st.binary(max_size=40)).map(lambda bodies: b"".join(
    nlmsg(i, b) for i, b in enumerate(bodies))).flatmap(mutations))
def test_split_messages_never_raises_and_stays_inside(data: bytes) -> None:
    off = 0
    for _mtype, _seq, msg in split_messages(data):
        assert len(msg) >= 16
        at = data.find(msg, off)
        assert at == off, "messages are consecutive slices of the datagram"
        off += (len(msg) + 3) & ~3


@runs(FRAMING)
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 2**32 - 1), st.binary(max_size=64)), max_size=8),
       st.integers(0, 2000))
def test_split_messages_round_trip_and_truncation(messages: list[tuple[int, int, bytes]], cut: int) -> None:
    data = b"".join(nlmsg(t, body, seq) for t, seq, body in messages)
    got = [(t, seq, msg[16:]) for t, seq, msg in split_messages(data)]
    assert got == messages
    truncated = [(t, seq, msg[16:]) for t, seq, msg in split_messages(data[:cut])]
    assert truncated == messages[: len(truncated)]


@st.composite
def attribute_tree(draw: st.DrawFn, depth: int = 2) -> list[tuple[int, bytes | list]]:
    """Attributes, some of them nested, as (type, payload or children)."""
    items: list[tuple[int, bytes | list]] = []
    for _ in range(draw(st.integers(0, 5))):
        atype = draw(st.integers(0, 0x3FFF))
        if depth and draw(st.booleans()):
            items.append((atype, draw(attribute_tree(depth - 1))))
        else:
            items.append((atype, draw(st.binary(max_size=24))))
    return items


def encode_tree(items: list[tuple[int, bytes | list]]) -> bytes:
    return b"".join(
        nla(t | NLA_F_NESTED, encode_tree(p)) if isinstance(p, list) else nla(t, p) for t, p in items
    )


def decode_tree(buf: bytes, start: int, end: int, shape: list[tuple[int, bytes | list]]) -> list:
    """Reads `buf[start:end]` back with `attributes`, descending where `shape` says it is nested."""
    out: list[tuple[int, bytes | list]] = []
    for (atype, s, e), (_, want) in zip(attributes(buf, start, end), shape, strict=False):
        out.append((atype, decode_tree(buf, s, e, want) if isinstance(want, list) else buf[s:e]))
    return out


@runs(MUTATED)
@given(attribute_tree(), st.integers(-8, 600), st.integers(-8, 600), st.data())
def test_attributes_round_trip_and_never_raise(tree, start: int, end: int, data: st.DataObject) -> None:
    buf = encode_tree(tree)
    assert decode_tree(buf, 0, len(buf), tree) == tree
    assert decode_tree(buf, 0, None, tree) == tree
    hurt = data.draw(mutations(buf))
    for a, b in ((0, None), (start, end), (start, None)):
        for atype, s, e in attributes(hurt, a, b):
            assert 0 <= atype <= 0x3FFF
            assert 4 <= s <= e <= len(hurt)
    assert 0 <= nfgen_family(hurt) <= 255


# --- nftrace messages -------------------------------------------------------------------

_TRACE_KINDS = [kind for _, kind in nft_trace_msg.nla_map]
_TRACE_NAMES = {name for name, kind in nft_trace_msg.nla_map if kind != "none"}
_SIZES = {"uint8": 1, "be16": 2, "be32": 4, "be64": 8, "uint32": 4}
_VERDICT_CODE = 1  # NFTA_VERDICT_CODE in the verdict nest


@cache
def names() -> st.SearchStrategy[str]:
    """Names a namespace's owner may choose: any characters but NUL (the kernel cuts there)."""
    return st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"), max_size=40)


@cache
@st.composite
def ip_headers(draw: st.DrawFn) -> bytes:
    """An IPv4 header (any IHL, flags and fragment offset) or an IPv6 fixed header, often with transport bytes."""
    if draw(st.booleans()):
        ihl = draw(st.sampled_from((5, 5, 6, 15)) | st.integers(0, 15))
        hdr = struct.pack(
            "!BBHHHBBH4s4s",
            0x40 | ihl, 0, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)),
            draw(st.sampled_from((0, 0x4000, 0x2000, 0x00B9)) | st.integers(0, 0xFFFF)),
            64, draw(st.sampled_from((1, 6, 17, 132, 58)) | st.integers(0, 255)), 0,
            ipaddress.IPv4Address("198.18.0.1").packed, ipaddress.IPv4Address("198.18.0.2").packed,
        )
        hdr += draw(st.binary(min_size=max(0, ihl * 4 - 20), max_size=max(0, ihl * 4 - 20)))
    else:
        hdr = struct.pack(
            "!IHBB16s16s", 0x60000000 | draw(st.integers(0, 0xFFFFF)), draw(st.integers(0, 0xFFFF)),
            draw(st.sampled_from((6, 17, 58, 0, 43, 44, 60, 51)) | st.integers(0, 255)), 64,
            ipaddress.IPv6Address("2001:db8::1").packed, ipaddress.IPv6Address("2001:db8::2").packed,
        )
    return hdr + draw(st.binary(max_size=48))


@cache
@st.composite
def trace_attr(draw: st.DrawFn) -> bytes:
    """One NFTA_TRACE_* attribute: usually the right size for its type, sometimes not, sometimes unknown."""
    number = draw(st.integers(1, len(_TRACE_KINDS) + 2))
    kind = _TRACE_KINDS[number] if number < len(_TRACE_KINDS) else "cdata"
    size = _SIZES.get(kind)
    if kind == "verdict":
        codes = st.tuples(st.just(_VERDICT_CODE), st.sampled_from((0, 1, -1, -3, -5)).map(
            lambda c: struct.pack(">i", c)) | st.binary(max_size=6))
        inner = draw(st.lists(codes | st.tuples(st.integers(0, 4), st.binary(max_size=8)), max_size=3))
        return nla(number | NLA_F_NESTED, b"".join(nla(t, p) for t, p in inner))
    if size is not None:
        return nla(number, draw(st.binary(min_size=size, max_size=size) | st.binary(max_size=10)))
    if kind == "asciiz":
        return nla(number, draw(names()).encode(errors="surrogatepass") + b"\0")
    if number in (8, 9):  # NFTA_TRACE_NETWORK_HEADER, NFTA_TRACE_TRANSPORT_HEADER
        return nla(number, draw(ip_headers() | st.binary(max_size=40)))
    return nla(number, draw(st.binary(max_size=40)))


_TRACE_ATTRS = trace_attr()


def trace_messages(attrs: st.SearchStrategy[bytes] = _TRACE_ATTRS) -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda family, items: nlmsg(TRACE_TYPE, nfgen(family, b"".join(items))),
        st.sampled_from((1, 2, 10)) | st.integers(0, 255),
        st.lists(attrs, max_size=12),
    )


def check_trace_contract(msg: bytes) -> TraceMessage | None:
    """parse_trace_message's contract: a TraceMessage of known names and typed values, or DecodeError."""
    try:
        got = parse_trace_message(msg)
    except DecodeError:
        return None
    assert isinstance(got, TraceMessage) and 0 <= got.family <= 255
    assert set(got.attrs) <= _TRACE_NAMES
    kinds = dict(nft_trace_msg.nla_map)
    for name, value in got.attrs.items():
        kind = kinds[name]
        if kind == "verdict":
            assert value is None or -(2**31) <= value < 2**31, (name, value)
        else:
            assert isinstance(value, {"asciiz": str, "cdata": bytes, "hex": str}.get(kind, int)), (name, value)
    return got


@runs(MUTATED)
@given(hostile(trace_messages()))
def test_trace_message_raises_only_decode_error(msg: bytes) -> None:
    check_trace_contract(msg)


@runs(MUTATED)
@given(st.sampled_from(sorted(_SIZES.items())), st.integers(0, 7))
def test_trace_fixed_size_attribute_too_short_is_refused(kind_size: tuple[str, int], short: int) -> None:
    """A be32 of 2 bytes is not read from the next attribute's header: the message is refused."""
    kind, size = kind_size
    number = _TRACE_KINDS.index(kind)
    payload = bytes(min(short, size - 1))
    msg = nlmsg(TRACE_TYPE, nfgen(1, nla(number, payload) + nla(1, b"fw\0")))
    with pytest.raises(DecodeError):
        parse_trace_message(msg)
    nested = nlmsg(TRACE_TYPE, nfgen(1, nla(5 | NLA_F_NESTED, nla(_VERDICT_CODE, bytes(min(short, 3))))))
    with pytest.raises(DecodeError):
        parse_trace_message(nested)


_U = {"uint8": 8, "be16": 16, "be32": 32, "be64": 64, "uint32": 32}


@st.composite
def trace_values(draw: st.DrawFn) -> dict:
    """Attribute values as pyroute2 encodes them, for a round trip (NFTA_TRACE_PAD left out: pyroute2's hex)."""
    values: dict = {}
    for _number, (name, kind) in enumerate(nft_trace_msg.nla_map):
        if kind in ("none", "hex") or not draw(st.booleans()):
            continue
        if kind in _U:
            values[name] = draw(st.integers(0, 2 ** _U[kind] - 1))
        elif kind == "asciiz":
            values[name] = draw(names())
        elif kind == "cdata":
            values[name] = draw(ip_headers() | st.binary(max_size=60))
        elif kind == "verdict":
            values[name] = draw(st.integers(-(2**31), 2**31 - 1))
    return values


@runs(ROUND_TRIP)
@given(trace_values(), st.integers(0, 255))
def test_trace_round_trip_through_pyroute2(values: dict, family: int) -> None:
    msg = nft_trace_msg()
    msg["header"]["type"] = TRACE_TYPE
    msg["nfgen_family"] = family
    msg["attrs"] = [
        (name, {"attrs": [("NFTA_VERDICT_CODE", v)]} if name == "NFTA_TRACE_VERDICT" else v)
        for name, v in values.items()
    ]
    msg.encode()
    assert parse_trace_message(bytes(msg.data)) == TraceMessage(family, values)


# --- the nft collector's reader path, live ------------------------------------------------

RULESET = """\
table inet fw {
  chain input { type filter hook input priority 0; policy drop;
    iif lo accept
    tcp dport 443 drop comment "legacy block"
    jump checks
  }
  chain checks { udp dport 53 drop comment "no dns"; }
}
"""


@cache
@st.composite
def plausible_trace_attr(draw: st.DrawFn) -> bytes:
    """Attributes a trace of the lab's ruleset could carry: real table and chain names, small ids and handles."""
    choice = draw(st.integers(0, 7))
    if choice == 0:
        return nla(1, draw(st.sampled_from(("fw", MARK_TABLE, "nosuch"))).encode() + b"\0")
    if choice == 1:
        return nla(2, draw(st.sampled_from(("input", "checks", "prerouting"))).encode() + b"\0")
    if choice == 2:
        return nla(3, struct.pack(">Q", draw(st.integers(0, 12))))
    if choice == 3:
        return nla(4, struct.pack(">I", draw(st.integers(0, 4))))
    if choice == 4:
        code = draw(st.sampled_from((0, 0, 1, -1, -3, 0x10000)))
        return nla(5 | NLA_F_NESTED, nla(_VERDICT_CODE, struct.pack(">i", code)))
    if choice == 5:
        return nla(6, struct.pack(">I", draw(st.integers(0, 3))))
    if choice == 6:
        return nla(draw(st.sampled_from((8, 9))), draw(ip_headers()))
    return draw(trace_attr())


@pytest.mark.root
def test_nft_reader_path_survives_hostile_traces(lab) -> None:
    """`_NetnsWatch._handle` of a live collector: any trace raises at most DecodeError, and
    the collector still attributes a real drop afterwards."""
    from scapy.layers.inet import TCP

    from tests.support import datagram, send_and_wait
    from tracer.config import Scope

    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(server, RULESET)
    with NftCollector(Scope()) as col:
        col.start([client, server])
        watch = col._watches[server.inode]
        # Not a forged generation announcement: the reader refuses every message not sent by
        # the kernel (test_unprivileged_namespace_cannot_forge_a_verdict), and a bogus generation id
        # rightly makes every later rule text unprovable until the next real commit.
        mtypes = st.just(TRACE_TYPE) | st.integers(0, 0xFFFF).filter(lambda t: t != NEWGEN_TYPE)

        @runs(LIVE)
        @given(mtypes, hostile(trace_messages(plausible_trace_attr())))
        def handle(mtype: int, msg: bytes) -> None:
            with contextlib.suppress(DecodeError):
                watch._handle(mtype, msg)

        with structlog.testing.capture_logs():
            handle()
        v = send_and_wait(lab, col, client, server, datagram(link, TCP(sport=7, dport=443, flags="S"), ident=77))
        assert v is not None and (v.table, v.chain, v.text) == ("fw", "input", "tcp dport 443 drop")


# --- NetlinkReader: only the kernel is heard, and no handler error stops it ------------------


def _reader(sock: socket.socket, on_message, log) -> NetlinkReader:
    return NetlinkReader(sock, name="test-reader", on_message=on_message, on_lost=lambda exc: None,
                         on_drained=lambda t: None, log=log, event_prefix="test")


@pytest.mark.root
def test_reader_refuses_datagrams_a_process_sent(lab) -> None:
    """Anyone with CAP_NET_ADMIN over a namespace (its user namespace's root) can write to
    the tracer's sockets there, by port id or to its multicast groups: none of it is read."""
    from tests.support import wait_for

    ns = lab.add_ns("reader")
    groups = (1 << (NFNLGRP_NFTRACE - 1)) | (1 << (NFNLGRP_NFTABLES - 1))
    got: list[int] = []
    reader = _reader(netfilter_socket(ns, groups), lambda mtype, msg: got.append(mtype), structlog.get_logger())
    sender = netfilter_socket(ns)
    portid = reader.sock.getsockname()[0]
    reader.start()
    sent = [0]
    try:

        @runs(LIVE)
        @given(hostile(trace_messages()) | trace_messages(plausible_trace_attr()), st.booleans())
        def forge(data: bytes, multicast: bool) -> None:
            if not data:
                return  # the kernel refuses empty datagrams (ENODATA)
            sender.sendto(data, (0, 1 << (NFNLGRP_NFTRACE - 1)) if multicast else (portid, 0))
            sent[0] += 1

        forge()
        assert wait_for(lambda: reader.foreign == sent[0], timeout=5)
        assert got == []
        lab.nft(ns, "table inet probe { }")  # the kernel announces it: NEWTABLE, NEWGEN
        assert wait_for(lambda: len(got) >= 2)
        assert {mtype >> 8 for mtype in got} == {NFNL_SUBSYS_NFTABLES}
    finally:
        sender.close()
        reader.close()


@pytest.mark.root
def test_reader_survives_a_handler_that_always_raises(lab) -> None:
    from tests.support import wait_for

    ns = lab.add_ns("raising")
    seen: list[int] = []

    def on_message(mtype: int, msg: bytes) -> None:
        seen.append(mtype)
        raise RuntimeError("handler bug")

    with structlog.testing.capture_logs() as logs:
        reader = _reader(netfilter_socket(ns, 1 << (NFNLGRP_NFTABLES - 1)), on_message, structlog.get_logger())
        reader.start()
        try:
            for i in range(3):
                lab.nft(ns, f"table inet t{i} {{ }}")
                assert wait_for(lambda i=i: len(seen) >= 2 * (i + 1))
            assert reader.reading
        finally:
            reader.close()
    bad = [e for e in logs if e["event"] == "test.bad_message"]
    assert len(bad) == 1 and "handler bug" in bad[0]["error"]  # rate-limited: one line for the burst


#: The system's interpreter: the attacker runs as nobody, who need not be able to read the venv.
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else shutil.which("python3") or "python3"
ATTACKER = textwrap.dedent(
    """
    import socket, sys
    sys.stdout.write("ready\\n"); sys.stdout.flush()
    forged = bytes.fromhex(sys.stdin.readline().strip())
    own = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
    own.bind((0, 0))
    ports = [int(line.split()[2]) for line in open("/proc/net/netlink").read().splitlines()[1:]
             if line.split()[1] == "12" and int(line.split()[2]) not in (0, own.getsockname()[0])]
    for port in ports:
        own.sendto(forged, (port, 0))
    own.sendto(forged, (0, 1 << 8))  # NFNLGRP_NFTRACE
    print(len(ports), flush=True)
    sys.stdin.readline()
    """
)


@pytest.mark.root
def test_unprivileged_namespace_cannot_forge_a_verdict() -> None:
    """The attack, as a user would run it: nobody, root of its own user and network namespace,
    sends the root tracer a trace that names a rule dropping a packet. No verdict comes of it."""
    from tracer.config import Scope
    from tracer.netns import Netns

    attacker = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--",
         "unshare", "--user", "--map-root-user", "--net", "--", PYTHON, "-I", "-c", ATTACKER],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert attacker.stdout is not None and attacker.stdin is not None
        assert attacker.stdout.readline() == "ready\n"
        path = f"/proc/{attacker.pid}/ns/net"
        ns = Netns(os.stat(path).st_ino, path, None)
        assert ns.inode != os.stat("/proc/self/ns/net").st_ino
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 40, 42, 0, 64, 6, 0, bytes([198, 18, 0, 1]),
                             bytes([198, 18, 0, 2]))
        transport = struct.pack("!HHII", 4, 443, 0, 0)
        forged = nlmsg(TRACE_TYPE, nfgen(1, b"".join((
            nla(1, b"fw\0"), nla(2, b"input\0"), nla(3, struct.pack(">Q", 2)), nla(4, struct.pack(">I", 3)),
            nla(5 | NLA_F_NESTED, nla(_VERDICT_CODE, struct.pack(">i", 0))), nla(6, struct.pack(">I", 99)),
            nla(8, header), nla(9, transport),
        ))))
        with NftCollector(Scope()) as col:
            col.start([ns])
            watch = col._watches[ns.inode]
            attacker.stdin.write(forged.hex() + "\n")
            attacker.stdin.flush()
            assert int(attacker.stdout.readline()) >= 1  # it found the tracer's socket
            deadline = time.monotonic() + 5
            while watch._reader.foreign < 2 and time.monotonic() < deadline:
                time.sleep(0.05)
            assert watch._reader.foreign >= 2  # unicast and multicast, both refused
            assert col.wait_verdict(ns.inode, packet.fingerprint(header, transport), 0.5) is None
    finally:
        attacker.kill()
        attacker.wait()


# --- NFLOG (iptables-legacy TRACE) -------------------------------------------------------------

@cache
@st.composite
def nflog_attr(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 4))
    if choice == 0:
        return nla(1, draw(st.binary(min_size=4, max_size=4) | st.binary(max_size=6)))  # NFULA_PACKET_HDR
    if choice == 1:
        prefix = draw(trace_prefixes() | names())
        return nla(10, prefix.encode(errors="surrogatepass") + draw(st.sampled_from((b"\0", b"", b"\0junk"))))
    if choice == 2:
        return nla(9, draw(ip_headers() | st.binary(max_size=80)))  # NFULA_PAYLOAD
    return nla(draw(st.integers(0, 30)), draw(st.binary(max_size=16)))


def nflog_messages() -> st.SearchStrategy[bytes]:
    return st.builds(
        lambda family, items: nlmsg(NFLOG_PACKET_TYPE, nfgen(family, b"".join(items))),
        st.sampled_from((2, 10)) | st.integers(0, 255),
        st.lists(nflog_attr(), max_size=8),
    )


@runs(MUTATED)
@given(hostile(nflog_messages()))
def test_nflog_message_never_raises(msg: bytes) -> None:
    got = ipt.parse_packet_message(msg)
    assert 0 <= got.pf <= 255
    assert got.hook is None or 0 <= got.hook <= 255
    assert isinstance(got.prefix, str) and "\0" not in got.prefix
    assert isinstance(got.payload, bytes) and len(got.payload) <= len(msg)
    ipt.parse_trace_prefix(got.prefix)
    ipt.payload_fingerprint(got.payload)


@runs(ROUND_TRIP)
@given(st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF), names(), st.binary(max_size=120))
def test_nflog_round_trip_through_pyroute2(family: int, hook: int, hw: int, prefix: str, payload: bytes) -> None:
    msg = ipt.nfulnl_packet_msg()
    msg["header"]["type"] = NFLOG_PACKET_TYPE
    msg["nfgen_family"] = family
    msg["attrs"] = [
        ("NFULA_PACKET_HDR", {"hw_protocol": hw, "hook": hook, "_pad": 0}),
        ("NFULA_MARK", 7),
        ("NFULA_PREFIX", prefix),
        ("NFULA_PAYLOAD", payload),
    ]
    msg.encode()
    assert ipt.parse_packet_message(bytes(msg.data)) == ipt.LoggedPacket(family, hook, prefix, payload)


@cache
def trace_prefixes() -> st.SearchStrategy[str]:
    """`TRACE: table:chain:kind:number ` as ipt_do_table writes it, chains with colons included."""
    table = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0:"), min_size=1, max_size=12)
    return st.builds(
        lambda t, c, k, n, pad: f"TRACE: {t}:{c}:{k}:{n}{pad}",
        table, names(), st.sampled_from(("rule", "return", "policy")), st.integers(0, 10**6), st.sampled_from(("", " "))
    )


@cache
def odd_numbers() -> st.SearchStrategy[str]:
    """What `str.isdigit` calls digits but `int` may refuse: superscripts, other scripts' digits."""
    return st.text(st.characters(whitelist_categories=("Nd", "No")), min_size=1, max_size=4) | st.just("1" * 5000)


@runs(MUTATED)
@given(st.text(max_size=80) | trace_prefixes() | trace_prefixes().map(lambda p: p[: len(p) // 2])
       | st.builds(lambda n: f"TRACE: filter:INPUT:rule:{n} ", odd_numbers()))
def test_trace_prefix_never_raises(prefix: str) -> None:
    got = ipt.parse_trace_prefix(prefix)
    assert got is None or (got.kind in ("rule", "return", "policy") and got.number >= 0)


@runs(MUTATED)
@given(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\0:"), min_size=1, max_size=12),
       names(), st.sampled_from(("rule", "return", "policy")), st.integers(0, 10**6))
def test_trace_prefix_round_trip(table: str, chain: str, kind: str, number: int) -> None:
    got = ipt.parse_trace_prefix(f"TRACE: {table}:{chain}:{kind}:{number} ")
    # The line is stripped as a whole: only white space leading the table name is lost.
    assert got == ipt.TracePoint(table.lstrip(), chain, kind, number)


@st.composite
def save_text(draw: st.DrawFn) -> tuple[str, dict[str, dict[str, tuple[str | None, list[str]]]]]:
    """iptables-legacy-save output and what it says: table -> chain -> (policy, rule lines)."""
    word = st.text(st.characters(blacklist_categories=("Cs", "Zs", "Cc", "Zl", "Zp"), blacklist_characters="*:"),
                   min_size=1, max_size=10)
    tables: dict[str, dict[str, tuple[str | None, list[str]]]] = {}
    lines = ["# Generated by iptables-save"]
    for table in draw(st.lists(word, max_size=3, unique=True)):
        chains = {c: (draw(st.sampled_from(("ACCEPT", "DROP", None))), []) for c in draw(
            st.lists(word, min_size=1, max_size=4, unique=True))}
        lines.append(f"*{table}")
        lines += [f":{c} {p or '-'} [0:0]" for c, (p, _) in chains.items()]
        for _ in range(draw(st.integers(0, 6))):
            chain = draw(st.sampled_from(sorted(chains)))
            # What iptables-save prints: quotes balanced (none here), one line per rule.
            text = draw(st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp"),
                                              blacklist_characters="\"'\\"), max_size=30))
            rule = f"-A {chain} {text}"
            chains[chain][1].append(rule)
            lines.append(rule)
        lines.append("COMMIT")
        tables[table] = chains
    return "\n".join(lines) + "\n", tables


@runs(MUTATED)
@given(save_text())
def test_parse_save_round_trip(case) -> None:
    text, tables = case
    got = xtables.parse_save(text, "ip")
    assert set(got) == set(tables)
    for name, chains in tables.items():
        assert {c: (x.policy, list(x.rules)) for c, x in got[name].chains.items()} == chains
        got[name].can_drop  # walks every jump; must not raise either


@runs(MUTATED)
@given(st.text(max_size=300) | save_text().map(lambda c: c[0]).flatmap(
    lambda t: st.integers(0, len(t)).map(lambda i: t[:i])) | save_text().map(lambda c: c[0].replace("\n", "\r")))
def test_parse_save_never_raises(text: str) -> None:
    for table in xtables.parse_save(text, "ip6").values():
        table.can_drop
        for chain in table.chains.values():
            for line in chain.rules:
                table.verdict_of(line)
                xtables.rule_comment(line)


# --- nftables: netlink notifications and the two listings ------------------------------------

NFT_SUBS = (0, 2, 3, 5, 6, 8, 15)  # NEWTABLE, DELTABLE, NEWCHAIN, DELCHAIN, NEWRULE, DELRULE, NEWGEN


_NOTIFICATION_ATTR = st.one_of(
    st.builds(lambda n: nla(1, n.encode() + b"\0"), names()),  # NFTA_{TABLE_NAME,CHAIN_TABLE,RULE_TABLE}
    st.builds(nla, st.just(2), st.binary(min_size=4, max_size=4) | st.binary(max_size=6)),  # TABLE_FLAGS
    st.builds(nla, st.sampled_from((3, 4)), st.binary(min_size=8, max_size=8) | st.binary(max_size=9)),  # handles
    st.builds(nla, st.integers(0, 20), st.binary(max_size=12)),
)


@st.composite
def nft_notification(draw: st.DrawFn) -> tuple[int, bytes]:
    """(subtype, message) of an nf_tables notification: table name, flags, handles, generation."""
    sub = draw(st.sampled_from(NFT_SUBS) | st.integers(0, 255))
    attrs = draw(st.lists(_NOTIFICATION_ATTR, max_size=6))
    family = draw(st.sampled_from((1, 2, 10, 5, 7, 3)) | st.integers(0, 255))
    msg = nlmsg((NFNL_SUBSYS_NFTABLES << 8) | sub, nfgen(family, b"".join(attrs)))
    return sub, draw(mutations(msg)) if draw(st.booleans()) else msg


@runs(MUTATED)
@given(nft_notification())
def test_nft_notifications_never_raise(case: tuple[int, bytes]) -> None:
    from tracer.netfilter import nftables

    sub, msg = case
    gen = nftables.generation_of(msg)
    assert gen is None or 0 <= gen < 2**32
    table = nftables.table_of(msg)
    assert table is None or (isinstance(table[1], str) and 0 <= table[2] < 2**32 and 0 <= table[3] < 2**64)
    change = nftables.change_of(sub, msg)
    assert change is None or (change[0] in ("table", "chain", "rule") and change[1] in NFPROTO_FAMILIES.values())


@runs(ROUND_TRIP)
@given(names(), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1), st.sampled_from((1, 2, 10, 5, 7, 3)))
def test_nft_table_message_round_trip(name: str, flags: int, handle: int, family: int) -> None:
    from tracer.netfilter import nftables

    attrs = nla(1, name.encode() + b"\0") + nla(2, struct.pack(">I", flags)) + nla(4, struct.pack(">Q", handle))
    msg = nlmsg(NFNL_SUBSYS_NFTABLES << 8, nfgen(family, attrs))
    assert nftables.table_of(msg) == (family, name, flags, handle)
    assert nftables.change_of(0, msg) == ("table", NFPROTO_FAMILIES[family], name, None)


@cache
def hostile_names() -> st.SearchStrategy[str]:
    """Names and comments a namespace's owner may choose, with what breaks line-based readers."""
    tokens = st.sampled_from(("\n", "\r", "\x1b[31m", '"', "'", "\\", " # handle 3", " comment ", "\t\t", "}", "{",
                              ";", "-Z", "x", "é", "\u2028"))
    return st.lists(tokens | st.characters(blacklist_categories=("Cs",), blacklist_characters="\0"),
                    max_size=6).map("".join)


@st.composite
def listed_ruleset(draw: st.DrawFn) -> tuple[list[dict], str, dict[tuple[str, str, int], tuple[str, str | None]]]:
    """The JSON and the text listing nft would give of one ruleset, names printed raw as nft does,
    and each rule's statements and comment."""
    doc: list[dict] = [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}}]
    lines: list[str] = []
    rules: dict[tuple[str, str, int], tuple[str, str | None]] = {}
    handle = 1
    for table in draw(st.lists(hostile_names(), min_size=1, max_size=2, unique=True)):
        doc.append({"table": {"family": "inet", "name": table, "handle": handle}})
        lines.append(f"table inet {table} {{")
        for chain in draw(st.lists(hostile_names(), min_size=1, max_size=2, unique=True)):
            handle += 1
            doc.append({"chain": {"family": "inet", "table": table, "name": chain, "handle": handle}})
            lines.append(f"\tchain {chain} {{")
            for _ in range(draw(st.integers(0, 3))):
                handle += 1
                dev = draw(hostile_names())
                comment = draw(st.none() | hostile_names())
                stmts = f'iifname "{dev}" drop'
                expr = [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": dev}}, {"drop": None}]
                rule = {"family": "inet", "table": table, "chain": chain, "handle": handle, "expr": expr}
                if comment is not None:
                    rule["comment"] = comment
                doc.append({"rule": rule})
                tail = f' comment "{comment}"' if comment is not None else ""
                lines.append(f"\t\t{stmts}{tail} # handle {handle}")
                rules[("inet", table, handle)] = (stmts, comment)
            lines.append("\t}")
        lines.append("}")
    return doc, "\n".join(lines) + "\n", rules


@runs(MUTATED)
@given(listed_ruleset(), st.integers(0, 3000))
def test_parse_ruleset_with_hostile_names(case, cut: int) -> None:
    """Whatever the names, every rule is indexed with its exact comment, and its text is its own
    or None, never a neighbour's; a truncated text listing costs texts, nothing else."""
    from tracer.netfilter.nftables import parse_ruleset

    doc, text, rules = case
    for listing in (text, text[:cut]):
        rs = parse_ruleset(doc, listing)
        assert set(rs.rules) == set(rules)
        for key, (stmts, comment) in rules.items():
            got = rs.rules[key]
            assert got.comment == comment
            assert got.text in (stmts, None), (got.text, stmts)


# --- the legacy relay (tracer to tracer, over a unix socket) -------------------------------------


@runs(MUTATED)
@given(st.lists(st.tuples(st.sampled_from((1, 2, 3)), st.binary(max_size=300)), max_size=6),
       st.lists(st.integers(1, 400), max_size=10), st.binary(max_size=40))
def test_relay_frames_survive_any_chunking_and_garbage(frames, cuts, garbage: bytes) -> None:
    from tracer.collectors.xtrace_relay import (
        FrameReader,
        RelayError,
        check_packet_message,
        frame,
    )

    stream = b"".join(frame(kind, payload) for kind, payload in frames)
    reader = FrameReader({1: 300, 2: 300, 3: 300})
    got: list[tuple[int, bytes]] = []
    off = 0
    for n in [*cuts, len(stream)]:
        got += reader.feed(stream[off : off + n])
        off += n
    assert got == frames
    try:
        for kind, payload in FrameReader({1: 64}).feed(garbage):
            assert kind == 1 and len(payload) <= 64
    except RelayError:
        pass
    for _, payload in frames:
        with contextlib.suppress(RelayError):
            check_packet_message(payload)


# --- packets --------------------------------------------------------------------------------

@st.composite
def ext_chain(draw: st.DrawFn) -> tuple[bytes, int, int | None, int]:
    """An IPv6 packet with a chain of extension headers: (packet, next header, transport offset, count).

    `count` is how many extension headers the walk must cross to know where
    it stands. The offset is None for a non-first fragment: its payload has
    no transport header (and the next header is the fragment header's).
    """
    kinds = draw(st.lists(st.sampled_from((0, 43, 60, 44, 51)), max_size=packet.IPV6_MAX_EXT_HEADERS + 3))
    final = draw(st.sampled_from((6, 17, 58, 59, 132)) | st.integers(0, 255).filter(
        lambda n: n not in (0, 43, 44, 51, 60)))
    body = b""
    for i, kind in enumerate(kinds):
        nxt = kinds[i + 1] if i + 1 < len(kinds) else final
        if kind == 44:
            frag = draw(st.integers(0, 0x1FFF))
            body += struct.pack("!BBHI", nxt, 0, (frag << 3) | draw(st.integers(0, 1)), 1)
            if frag:
                return _v6(kinds[0], body + draw(st.binary(max_size=20))), nxt, None, i + 1
        elif kind == 51:  # the walk reads only next header and length: the rest may be zeros
            n = draw(st.integers(0, 6))
            body += bytes([nxt, n]) + bytes((n + 2) * 4 - 2)
        else:
            n = draw(st.integers(0, 4))
            body += bytes([nxt, n]) + bytes((n + 1) * 8 - 2)
    first = kinds[0] if kinds else final
    return _v6(first, body + draw(st.binary(max_size=20))), final, 40 + len(body), len(kinds)


def _v6(nexthdr: int, rest: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(rest), nexthdr, 64, bytes(16), bytes(16)) + rest


@runs(MUTATED)
@given(ext_chain(), st.integers(0, 400))
def test_ipv6_extension_chain_is_walked(case, cut: int) -> None:
    pkt, final, offset, count = case
    got = packet.ipv6_transport_offset(pkt[:40], pkt[40:])
    if count <= packet.IPV6_MAX_EXT_HEADERS:  # as many as the BPF walk follows
        assert got == (final, offset)
    else:
        assert got[1] is None
    nexthdr, off = packet.ipv6_transport_offset(pkt[:40], pkt[40:cut])  # truncated chains
    assert 0 <= nexthdr <= 255 and (off is None or off >= 40)


@runs(RANDOM)
@given(st.binary(max_size=80), st.binary(max_size=40), st.none() | st.integers(0, 255))
def test_decode_and_fingerprint_never_raise(l3: bytes, l4: bytes, protocol: int | None) -> None:
    check_decoded(l3, l4, protocol)


@runs(RANDOM)
@given(st.binary(max_size=60), st.binary(max_size=60))
def test_ipv6_transport_offset_contract(l3: bytes, extra: bytes) -> None:
    if len(l3) < 40:
        with pytest.raises(ValueError):
            packet.ipv6_transport_offset(l3, extra)
        return
    nexthdr, off = packet.ipv6_transport_offset(l3, extra)
    assert 0 <= nexthdr <= 255 and (off is None or off >= 40)


def check_decoded(l3: bytes, l4: bytes, protocol: int | None) -> packet.PacketHeaders | None:
    got = packet.decode(l3, l4, protocol)
    fp = packet.fingerprint(l3, l4)
    assert fp is None or isinstance(fp, bytes)
    if got is None:
        return None
    assert fp is not None
    assert got.version in (4, 6) and got.l4 in (l4, b"")  # none for a non-first IPv4 fragment
    ipaddress.ip_address(got.src), ipaddress.ip_address(got.dst)
    if got.sport is not None:
        assert got.protocol in packet.PORT_PROTOCOLS and len(l4) >= 4
    if got.icmp_type is not None:
        assert got.protocol in packet.ICMP_PROTOCOLS
    assert set(got.tcp_flags) <= {"CWR", "ECE", "URG", "ACK", "PSH", "RST", "SYN", "FIN"}
    got.transport
    probe_marker.recognise(got)
    return got


@runs(MUTATED)
@given(ip_headers().flatmap(mutations), st.binary(max_size=24), st.none() | st.sampled_from((6, 17, 1, 58, 132)))
def test_built_headers_decode_within_contract(l3: bytes, l4: bytes, protocol: int | None) -> None:
    check_decoded(l3[:40], l4[:20], protocol)


@runs(MUTATED)
@given(ip_headers() | ext_chain().map(lambda c: c[0]), st.integers(0, 200))
def test_payload_fingerprint_matches_what_bpf_reads(payload: bytes, cut: int) -> None:
    """NFLOG copies the packet from its network header; the drop record has the header and up to
    20 transport bytes (none for a non-first fragment). Both must give the same join key."""
    got = ipt.payload_fingerprint(payload)
    assert ipt.payload_fingerprint(payload[:cut]) is None or len(payload[:cut]) >= 20
    if payload[0] >> 4 == 4:
        ihl = (payload[0] & 0x0F) * 4
        first = not struct.unpack_from("!H", payload, 6)[0] & 0x1FFF
        l4 = payload[ihl : ihl + 20] if first and ihl >= 20 else b""
    else:
        _, off = packet.ipv6_transport_offset(payload[:40], payload[40:])
        l4 = payload[off : off + 20] if off is not None else b""
    if ihl_ok(payload):
        assert got == packet.fingerprint(payload[:40], l4 if len(l4) >= 4 else b"")
    else:
        assert got is None or isinstance(got, bytes)


def ihl_ok(payload: bytes) -> bool:
    return payload[0] >> 4 != 4 or (payload[0] & 0x0F) >= 5


@runs(MUTATED)
@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.sampled_from(("S", "SA", "R", "F", "PA", "")),
       st.integers(0, 0xFFFF), st.integers(1, 255), st.booleans())
def test_scapy_packets_decode_to_what_was_built(sport: int, dport: int, flags: str, ident: int, ttl: int,
                                                v6: bool) -> None:
    from scapy.layers.inet import IP, TCP
    from scapy.layers.inet6 import IPv6

    l3 = (IPv6(src="2001:db8::1", dst="2001:db8::2", fl=ident, hlim=ttl) if v6 else
          IP(src="198.18.0.1", dst="198.18.0.2", id=ident, ttl=ttl))
    raw = bytes(l3 / TCP(sport=sport, dport=dport, flags=flags))
    hlen = 40 if v6 else 20
    got = packet.decode(raw[:hlen], raw[hlen : hlen + 20])
    assert got is not None
    assert (got.sport, got.dport, got.ttl, got.length, got.protocol) == (sport, dport, ttl, len(raw), 6)
    assert got.ip_id == (None if v6 else ident)
    assert set(got.tcp_flags) == {{"S": "SYN", "A": "ACK", "R": "RST", "F": "FIN", "P": "PSH"}[f] for f in flags}


# --- kallsyms ---------------------------------------------------------------------------------

@st.composite
def kallsyms_text(draw: st.DrawFn) -> str:
    lines = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.integers(0, 5))
        if kind <= 3:
            addr = draw(st.integers(0xFFFFFFFF81000000, 0xFFFFFFFF81100000) | st.integers(0, 2**64 - 1))
            sym = draw(st.sampled_from("TtWwDdbBr"))
            name = draw(st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=1, max_size=20))
            module = draw(st.sampled_from(("", "\t[nf_tables]", "\t[bpf]", "\t[", "\t[]")))
            lines.append(f"{addr:016x} {sym} {name}{module}")
        elif kind == 4:
            lines.append(draw(st.text(max_size=40)))
        else:
            lines.append(f"{draw(st.text(max_size=16))} T name")
    return "\n".join(lines)


@runs(MUTATED)
@given(kallsyms_text() | st.text(max_size=200))
def test_kallsyms_parse_raises_only_its_own_error(text: str) -> None:
    try:
        table = parse(text)
    except KallsymsError:
        return
    assert table.addrs == sorted(set(table.addrs))
    assert len(table.addrs) == len(table.names) == len(table.modules)


@pytest.fixture(scope="module")
def kallsyms_file(tmp_path_factory) -> str:
    text = "\n".join(
        f"{0xFFFFFFFF81000000 + 0x100 * i:016x} T fn{i}" for i in range(200)
    ) + "\nffffffffc0100000 t nft_do_chain\t[nf_tables]\nffffffffc0200000 t bpf_prog_x\t[bpf]\n"
    path = tmp_path_factory.mktemp("kallsyms") / "kallsyms"
    path.write_text(text)
    return str(path)


@runs(MUTATED)
@given(st.integers(0, 2**64 - 1) | st.integers(0xFFFFFFFF80FF0000, 0xFFFFFFFFC0300000))
def test_kallsyms_lookups_never_raise(kallsyms_file: str, addr: int) -> None:
    k = Kallsyms(kallsyms_file, refresh_interval=3600)
    text = k.format(addr)
    sym = k.lookup(addr)
    if sym is None:
        assert text == f"{addr:#x}"
    else:
        assert text == str(sym) and 0 <= sym.offset <= k.max_offset


# --- BPF drop records -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def drop_decoder():
    """The real decoder: the object's BTF layout, this kernel's drop reasons, its kallsyms."""
    from tracer.bpf.layout import object_structs
    from tracer.bpf.loader import default_object_path
    from tracer.sources.drop import DropDecoder, DropReasons

    event_type = object_structs(str(default_object_path()))["drop_event"]
    ksyms = Kallsyms(refresh_interval=60)
    real = [a for a in (ksyms.address(n) for n in (
        "sk_skb_reason_drop", "kfree_skb_reason", "nft_do_chain", "nf_hook_slow", "ip_local_deliver",
        "ip_rcv", "__ip_local_out", "do_syscall_64", "handle_softirqs", "bpf_trace_run3")) if a]
    return DropDecoder(event_type, DropReasons(), ksyms), event_type, real


@st.composite
def drop_records(draw: st.DrawFn, event_type, real_addrs: list[int]) -> bytes:
    """A struct drop_event: random bytes, then fields set to values that reach the decoders below."""
    size = ctypes.sizeof(event_type)
    rec = event_type.from_buffer_copy(draw(st.binary(min_size=size, max_size=size)))
    if draw(st.booleans()):
        rec.l3proto = draw(st.sampled_from((0x0800, 0x86DD, 0x0806)))
        rec.l3_off_valid = draw(st.sampled_from((0, 1, 1, 1)))
        l3 = draw(ip_headers())[:40].ljust(40, b"\0")
        ctypes.memmove(ctypes.addressof(rec) + event_type.l3.offset, l3, 40)
        rec.l4proto = draw(st.sampled_from((6, 17, 1, 58, 132)) | st.integers(0, 255))
        rec.l4_len = draw(st.integers(0, 24) | st.integers(0, 0xFFFF))
    if draw(st.booleans()):
        frames = draw(st.lists(st.sampled_from(real_addrs).flatmap(lambda a: st.integers(a, a + 0x200))
                               | st.integers(0, 2**64 - 1), max_size=32)) if real_addrs else []
        for i, addr in enumerate(frames):
            rec.stack[i] = addr
        rec.stack_bytes = draw(st.just(8 * len(frames)) | st.integers(0, 0xFFFF))
        rec.location = draw(st.sampled_from([*real_addrs, 0]) if real_addrs else st.just(0))
    rec.reason = draw(st.integers(0, 130) | st.integers(0, 2**32 - 1))
    rec.ct_info = draw(st.integers(0, 8) | st.just(0xFF) | st.integers(0, 255))
    rec.nf.source = draw(st.integers(0, 3))
    rec.nf.verdict = draw(st.integers(-(2**31), 2**31 - 1))
    return bytes(rec)


def check_drop(decoder, raw: bytes) -> None:
    from tracer.sources.drop import KernelDrop

    drop = decoder.decode(raw)
    assert isinstance(drop, KernelDrop)
    assert isinstance(drop.reason, str) and drop.reason
    assert all(isinstance(f, str) for f in drop.stack) and isinstance(drop.location, str)
    assert isinstance(drop.dev_name, str)
    assert (drop.packet is None) == (drop.fingerprint is None)
    if drop.packet is not None:
        assert len(drop.packet.l4) <= 20
        probe_marker.recognise(drop.packet)


@pytest.mark.root
@runs(MUTATED)
@given(st.data())
def test_drop_record_any_bytes_decode(drop_decoder, data: st.DataObject) -> None:
    decoder, event_type, _ = drop_decoder
    size = ctypes.sizeof(event_type)
    check_drop(decoder, data.draw(st.binary(min_size=size, max_size=size + 16)))


@pytest.mark.root
@runs(MUTATED)
@given(st.data())
def test_drop_record_fields_out_of_range_decode(drop_decoder, data: st.DataObject) -> None:
    decoder, event_type, real = drop_decoder
    check_drop(decoder, data.draw(drop_records(event_type, real)))


@pytest.mark.root
@runs(MUTATED)
@given(st.data())
def test_drop_record_truncated_raises_value_error(drop_decoder, data: st.DataObject) -> None:
    decoder, event_type, _ = drop_decoder
    raw = data.draw(st.binary(max_size=ctypes.sizeof(event_type) - 1))
    with pytest.raises(ValueError):
        decoder.decode(raw)


def test_run_sizes_are_what_the_docstring_says() -> None:
    """The module docstring is where the issue's closing note takes the run sizes from."""
    doc = sys.modules[__name__].__doc__ or ""
    for n in {FRAMING, RANDOM, MUTATED, ROUND_TRIP, LIVE}:
        assert f"- {n}:" in doc
    assert f"{len([n for n in dir(sys.modules[__name__]) if n.startswith('test_')]) - 3} properties" in doc
    assert Path(__file__).name == "test_properties.py"
