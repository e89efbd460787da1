"""A small ctypes binding to the system's libnftables.

Why not the `nft` command: a marking table created with the `owner` flag
lives only as long as the netlink socket that created it, so the tracer
must hold that socket itself. libnftables opens its socket in `nft_ctx_new`
and keeps it until `nft_ctx_free`; a context created inside a namespace
therefore keeps talking to that namespace from any thread.
Why not Debian's python3-nftables: it only imports under /usr/bin/python3.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

import orjson

from tracer.netfilter.constants import NFPROTO_FAMILIES
from tracer.nlmsg import (
    NFGEN_ATTRS,
    NLMSG_HEADER,
    above_select_limit,
    attributes,
    nfgen_family,
    split_messages,
)

LIBNFTABLES = "libnftables.so.1"


class Output(IntFlag):
    """NFT_CTX_OUTPUT_* flags from <nftables/libnftables.h>."""

    REVERSEDNS = 1 << 0
    SERVICE = 1 << 1
    STATELESS = 1 << 2
    HANDLE = 1 << 3
    JSON = 1 << 4
    ECHO = 1 << 5
    GUID = 1 << 6
    NUMERIC_PROTO = 1 << 7
    NUMERIC_PRIO = 1 << 8
    NUMERIC_SYMBOL = 1 << 9
    NUMERIC_TIME = 1 << 10
    TERSE = 1 << 11


NO_FLAGS = Output(0)


class NftError(RuntimeError):
    """libnftables refused a command; `stderr` is its error text."""

    def __init__(self, command: str, stderr: str) -> None:
        self.command = command
        self.stderr = stderr.strip()
        super().__init__(f"nft {command!r} failed: {self.stderr or 'no error text'}")


_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
#: libnftables keeps process-wide state (its JSON printer and symbol tables among it): two
#: contexts run from two threads at once corrupted the heap (truncated JSON listings, then
#: "corrupted double-linked list" aborts). One command at a time in the whole process.
_call_lock = threading.Lock()


def _library() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(LIBNFTABLES, use_errno=True)
            lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
            lib.nft_ctx_new.restype = ctypes.c_void_p
            lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_free.restype = None
            lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
            lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
            lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
            lib.nft_ctx_output_set_flags.restype = None
            for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
                getattr(lib, name).argtypes = [ctypes.c_void_p]
                getattr(lib, name).restype = ctypes.c_int
            for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
                getattr(lib, name).argtypes = [ctypes.c_void_p]
                getattr(lib, name).restype = ctypes.c_char_p
            lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
            lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
            _lib = lib
        return _lib


def _close_on_exec_inheritable_sockets() -> None:
    """Marks close-on-exec every socket that is not: the ones libnftables opened.

    Python opens all its descriptors close-on-exec (PEP 446); libnftables
    does not, and a child we exec would keep our owned tables alive after we
    die. Asking each descriptor whether it is inheritable is one fcntl, and
    only the inheritable ones (few) have their link read, so this stays cheap
    with thousands of descriptors open. Not a before/after diff of numbers:
    another thread may close a socket meanwhile and libnftables get its number.
    """
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError, ValueError):  # closed meanwhile, or listdir's own
            fd = int(name)
            if fd > 2 and os.get_inheritable(fd) and os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                os.set_inheritable(fd, False)


@dataclass(frozen=True)
class Result:
    rc: int
    output: str
    error: str


class NftContext:
    """One libnftables context: one netlink socket in the namespace it was made in.

    Create it inside `netns.entered(ns)` to work on that namespace. Calls are
    serialised with a lock because a context is not thread-safe.
    """

    def __init__(self) -> None:
        self._lib = _library()
        with _lib_lock:
            ptr = self._lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT: opens the netlink socket now
            if ptr:
                _close_on_exec_inheritable_sockets()
        if not ptr:
            raise OSError(ctypes.get_errno(), "nft_ctx_new failed")
        self._ctx: int | None = ptr
        self._lock = threading.Lock()
        self._lib.nft_ctx_buffer_output(ptr)
        self._lib.nft_ctx_buffer_error(ptr)
        try:
            self._nl: _NftNetlink | None = _NftNetlink()  # made here, so in the same namespace
        except OSError:
            self._lib.nft_ctx_free(ptr)
            raise

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def run(self, command: str, flags: Output = NO_FLAGS) -> Result:
        """Runs nft commands (one or more lines) with the given output flags."""
        with self._lock, _call_lock:
            if self._ctx is None:
                raise ValueError("NftContext is closed")
            self._lib.nft_ctx_output_set_flags(self._ctx, int(flags))
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
            out = self._lib.nft_ctx_get_output_buffer(self._ctx) or b""
            err = self._lib.nft_ctx_get_error_buffer(self._ctx) or b""
        return Result(rc=rc, output=out.decode(errors="replace"), error=err.decode(errors="replace"))

    def cmd(self, command: str, flags: Output = NO_FLAGS) -> str:
        """Runs commands and returns their output; raises NftError on failure."""
        res = self.run(command, flags)
        if res.rc != 0:
            raise NftError(command, res.error)
        return res.output

    def generation(self) -> int | None:
        """The namespace's nftables generation id now (NFT_MSG_GETGEN)."""
        with self._lock:
            if self._nl is None:
                raise ValueError("NftContext is closed")
            return self._nl.generation()

    def ruleset(self) -> Ruleset:
        """The namespace's ruleset, parsed: JSON for the structure, text for the rules' text,
        netlink for table flags.

        The generation id is read before and after the listings; when both
        agree nothing was committed in between, the three views are of that
        one generation, and the snapshot says so (`Ruleset.generation`, else
        None).
        """
        before = self.generation()
        with self._lock:
            if self._nl is None:
                raise ValueError("NftContext is closed")
            tables = self._nl.tables()
        try:
            items = self._json_tables(tables)
            text = self.cmd("list ruleset", _LIST_FLAGS)
            after = self.generation()
            return parse_ruleset(items, text, before if before == after else None, tables)
        except (orjson.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as exc:
            # A listing cut short (the ruleset changed under libnftables) or a layout this
            # code does not know: a failed listing, which callers retry or report.
            raise NftError("list ruleset", f"unusable JSON listing: {exc}") from exc

    def _json_tables(self, tables: dict[tuple[str, str], tuple[tuple[str, ...], int]]) -> list[dict[str, Any]]:
        """The JSON listing, table by table, leaving out owner-flagged tables' contents.

        nft 1.0.6 prints an owner table's flags in JSON by indexing past the end
        of its flag-name array: garbage in the listing, a truncated document, or
        an abort of the whole process. Its text printer is right, and the
        tables that carry the flag here are the tracers' own marking tables;
        their entry comes from netlink alone. Each table is asked for in a JSON
        command, so its name, whatever bytes it holds, is never nft syntax.
        """
        items: list[dict[str, Any]] = []
        for (family, name), (flags, handle) in tables.items():
            if "owner" in flags:
                items.append({"table": {"family": family, "name": name, "handle": handle, "flags": list(flags)}})
                continue
            command = orjson.dumps({"nftables": [{"list": {"table": {"family": family, "name": name}}}]}).decode()
            out = self.cmd(command, Output.JSON | _LIST_FLAGS)
            if out.strip():
                items += [i for i in orjson.loads(out).get("nftables", []) if "metainfo" not in i]
        return items

    def close(self) -> None:
        """Frees the context, closing its socket (and so deleting tables it owns)."""
        with self._lock, _call_lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None
            if self._nl is not None:
                self._nl.close()
                self._nl = None

    def __enter__(self) -> NftContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone
            self.close()


# --- what a listed ruleset says ---------------------------------------------------------

#: Tables iptables-nft creates, and the base chain names it gives each hook.
IPTABLES_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
IPTABLES_FAMILIES = {"ip": "iptables-nft", "ip6": "ip6tables-nft"}

#: What `NftContext.ruleset()` asks for: handles to find rules, no counter values.
_LIST_FLAGS = Output.HANDLE | Output.STATELESS | Output.NUMERIC_PRIO


@dataclass(frozen=True)
class Rule:
    """One rule; `position` is its index in the chain (iptables -S order).

    Names, handle and comment come from the JSON listing, byte for byte as
    the kernel holds them. `text` is the rule in `nft list ruleset` syntax
    without its comment, or None when the text listing could not be matched
    to the rule with certainty (names with newlines can make it ambiguous):
    a rule is then still found by its handle, only its text is missing.
    """

    family: str
    table: str
    chain: str
    handle: int
    text: str | None
    comment: str | None
    position: int
    reject: bool = False  # the rule ends in a reject statement (or iptables' REJECT target)


@dataclass(frozen=True)
class Chain:
    """A chain; base chains have a hook, a priority and a policy."""

    family: str
    table: str
    name: str
    type: str | None = None
    hook: str | None = None
    priority: int | None = None
    policy: str | None = None
    device: str | None = None
    rules: tuple[int, ...] = ()
    jumps: tuple[str, ...] = ()

    @property
    def base(self) -> bool:
        return self.hook is not None


@dataclass(frozen=True)
class Table:
    family: str
    name: str
    flags: tuple[str, ...] = ()
    handle: int | None = None

    @property
    def owned(self) -> bool:
        """Owned tables vanish with the netlink socket that created them."""
        return "owner" in self.flags


@dataclass(frozen=True, eq=False)
class Ruleset:
    """A snapshot of one namespace's ruleset, indexed for trace lookups.

    `generation` is the nftables generation id the snapshot was taken in,
    when the caller could prove it (see tracer.collectors.nftrace), else None.
    """

    tables: dict[tuple[str, str], Table]
    chains: dict[tuple[str, str, str], Chain]
    rules: dict[tuple[str, str, int], Rule]
    text: str = ""
    json: tuple[dict[str, Any], ...] = ()
    generation: int | None = None

    def rule(self, family: str, table: str, handle: int) -> Rule | None:
        return self.rules.get((family, table, handle))

    def chain(self, family: str, table: str, name: str) -> Chain | None:
        return self.chains.get((family, table, name))

    def base_chains(self, skip_prefix: str | None = None) -> list[Chain]:
        """Hooked chains, leaving out tables whose name starts with skip_prefix."""
        return [c for c in self.chains.values() if c.base and not (skip_prefix and c.table.startswith(skip_prefix))]

    def is_iptables_nft(self, family: str, table: str) -> bool:
        """Whether iptables-nft made this table.

        iptables-nft keeps the iptables layout: ip/ip6 tables named after the
        iptables tables whose base chains are named after their hook in
        upper case (INPUT, FORWARD, ...). Hand-written nft rulesets rarely
        copy that naming exactly.
        """
        if family not in IPTABLES_FAMILIES or table not in IPTABLES_TABLES:
            return False
        bases = [c for c in self.chains.values() if c.family == family and c.table == table and c.base]
        return bool(bases) and all(c.hook is not None and c.name == c.hook.upper() for c in bases)

    def backend(self, family: str, table: str) -> str:
        """`iptables-nft` or `nftables`: which tool manages the table."""
        return "iptables-nft" if self.is_iptables_nft(family, table) else "nftables"

    backend_of = backend  # the name the engine's RulesetView protocol uses

    def same_rule(self, other: Ruleset, family: str, table: str, handle: int) -> bool:
        """Whether a handle names the same rule (chain, text, comment) in both snapshots."""
        a, b = self.rule(family, table, handle), other.rule(family, table, handle)
        if a is None or b is None:
            return a is b
        return (a.chain, a.text, a.comment, a.position) == (b.chain, b.text, b.comment, b.position)

    def base_chains_reaching(self, family: str, table: str, chain: str) -> list[Chain]:
        """Base chains of the table from which jumps/gotos lead to `chain`."""
        seen = {chain}
        todo = [chain]
        while todo:
            target = todo.pop()
            for c in self.chains.values():
                if c.family == family and c.table == table and target in c.jumps and c.name not in seen:
                    seen.add(c.name)
                    todo.append(c.name)
        return [
            c for c in self.chains.values() if c.family == family and c.table == table and c.base and c.name in seen
        ]


def _strings(node: Any) -> Iterator[str]:
    """Every string value in a JSON expression tree (keys left out)."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from _strings(value)
    elif isinstance(node, list):
        for value in node:
            yield from _strings(value)


def _jump_targets(node: Any) -> Iterator[str]:
    """Chains a rule's expressions jump or go to, verdict maps included, in order."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("jump", "goto") and isinstance(value, dict) and isinstance(value.get("target"), str):
                yield value["target"]
            else:
                yield from _jump_targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _jump_targets(value)


def _ends_in_reject(expr: list[Any]) -> bool:
    """A top-level reject statement, or the REJECT target of an iptables-nft rule."""
    for stmt in expr:
        if isinstance(stmt, dict):
            if "reject" in stmt:
                return True
            xt = stmt.get("xt")
            if isinstance(xt, dict) and xt.get("type") == "target" and xt.get("name") == "REJECT":
                return True
    return False


def _rule_texts(text: str, rules: list[dict[str, Any]]) -> dict[tuple[str, str, int], str]:
    """The text of each JSON-listed rule, cut out of the text listing of the same ruleset.

    nft prints a rule as `\t\t<statements>[ comment "<comment>"] # handle <N>`
    and writes names, strings and comments raw, so a newline in any of them
    splits the rule over several lines. The JSON listing knows each rule's
    exact comment and how many newlines its statements hold, and both
    listings keep the same order; so each rule is found by its exact ending,
    searched for after the previous rule, and its start is the line that
    many newlines above. A candidate that does not start a rule line (`\t\t`
    at a line start) is passed over. A rule that fits nowhere gets no text
    rather than a neighbour's.
    """
    texts: dict[tuple[str, str, int], str] = {}
    cursor = 0
    for r in rules:
        comment = r.get("comment")
        suffix = (f' comment "{comment}"' if isinstance(comment, str) else "") + f" # handle {r['handle']}\n"
        newlines = sum(s.count("\n") for s in _strings(r.get("expr", [])))
        search = cursor
        while (end := text.find(suffix, search)) >= 0:
            start = _line_start(text, end, newlines, cursor)
            if start is not None and text.startswith("\t\t", start):
                texts[(r["family"], r["table"], int(r["handle"]))] = text[start + 2 : end]
                cursor = end + len(suffix) - 1  # the newline that ends this rule starts the next line
                break
            search = end + 1
    return texts


def _line_start(text: str, end: int, newlines: int, floor: int) -> int | None:
    """Where the line starts that lies `newlines` line breaks above `end`, found at or after `floor`."""
    start = end
    for _ in range(newlines + 1):
        start = text.rfind("\n", floor, start)
        if start < 0:
            return None
    return start + 1


def _priority(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


#: A device-bound base chain's hook line in the text listing (nft 1.0.6's JSON leaves `dev` out).
_DEVICE_LINE = re.compile(r'^\t\ttype \S+ hook (?:ingress|egress) device "?([^";\n]+?)"? priority ', re.M)


def _device(chain: dict[str, Any]) -> str | None:
    dev = chain.get("dev")
    if isinstance(dev, list):
        return None  # several devices: no single name to report
    return dev if isinstance(dev, str) else None


def _text_devices(text: str, chains: list[dict[str, Any]]) -> dict[int, str]:
    """Devices of single-device ingress/egress chains (by index in `chains`) from the text listing.

    Both listings keep the chains' order, so the n-th device line belongs to
    the n-th such chain; when the counts differ (a name or comment that
    imitates a hook line), no device is taken from the text at all.
    """
    wanted = [i for i, c in enumerate(chains) if c.get("hook") in ("ingress", "egress") and "dev" not in c]
    found = _DEVICE_LINE.findall(text)
    if len(found) != len(wanted):
        return {}
    return dict(zip(wanted, found, strict=True))


def _flags(table: dict[str, Any]) -> tuple[str, ...]:
    """Table flags from JSON, where netlink's are not at hand (nft 1.0.6 can print a wrong word)."""
    flags = table.get("flags", ())
    words = (flags,) if isinstance(flags, str) else tuple(f for f in flags if isinstance(f, str))
    return tuple(w for w in words if w in TABLE_FLAG_NAMES.values())


def parse_ruleset(
    doc: Iterable[dict[str, Any]],
    text: str = "",
    generation: int | None = None,
    tables_netlink: dict[tuple[str, str], tuple[tuple[str, ...], int]] | None = None,
) -> Ruleset:
    """Indexes a ruleset from `nft -j -a -s list ruleset` (structure) and `nft -a -s -y list ruleset`
    (rule text, see `_rule_texts`).

    The JSON listing is the source of every name, handle, comment, hook
    and policy: it carries them exactly, whatever bytes a namespace's
    owner chose, where the text listing prints them raw and a newline or a
    quote in a name would break a line-based reader. Both listings must
    come from the same generation (the caller's job).
    """
    items = tuple(doc)
    tables: dict[tuple[str, str], Table] = {}
    chain_items: dict[tuple[str, str, str], dict[str, Any]] = {}
    rule_items: list[dict[str, Any]] = []
    for item in items:
        if "table" in item:
            t = item["table"]
            key = (t["family"], t["name"])
            flags, handle = (tables_netlink or {}).get(key, (_flags(t), t.get("handle")))
            tables[key] = Table(t["family"], t["name"], flags, handle)
        elif "chain" in item:
            c = item["chain"]
            chain_items[(c["family"], c["table"], c["name"])] = c
        elif "rule" in item:
            rule_items.append(item["rule"])
    texts = _rule_texts(text, rule_items)
    devices = _text_devices(text, list(chain_items.values()))
    rules: dict[tuple[str, str, int], Rule] = {}
    members: dict[tuple[str, str, str], list[int]] = {key: [] for key in chain_items}
    jumps: dict[tuple[str, str, str], list[str]] = {key: [] for key in chain_items}
    for r in rule_items:
        ckey = (r["family"], r["table"], r["chain"])
        handle = int(r["handle"])
        in_chain = members.setdefault(ckey, [])
        expr = r.get("expr", [])
        rules[(r["family"], r["table"], handle)] = Rule(
            family=r["family"],
            table=r["table"],
            chain=r["chain"],
            handle=handle,
            text=texts.get((r["family"], r["table"], handle)),
            comment=r["comment"] if isinstance(r.get("comment"), str) else None,
            position=len(in_chain),
            reject=_ends_in_reject(expr),
        )
        in_chain.append(handle)
        targets = jumps.setdefault(ckey, [])
        targets += [j for j in _jump_targets(expr) if j not in targets]
    chains = {
        key: Chain(
            family=key[0],
            table=key[1],
            name=key[2],
            type=c.get("type"),
            hook=c.get("hook"),
            priority=_priority(c.get("prio")),
            policy=c.get("policy"),
            device=_device(c) or devices.get(index),
            rules=tuple(members.get(key, ())),
            jumps=tuple(jumps.get(key, ())),
        )
        for index, (key, c) in enumerate(chain_items.items())
    }
    return Ruleset(tables=tables, chains=chains, rules=rules, text=text, json=items, generation=generation)


# --- what only netlink says exactly -------------------------------------------------------

NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWTABLE, NFT_MSG_GETTABLE = 0, 1
NFT_MSG_NEWGEN, NFT_MSG_GETGEN = 15, 16
NFTA_TABLE_NAME, NFTA_TABLE_FLAGS, NFTA_TABLE_HANDLE = 1, 2, 4
NFTA_GEN_ID = 1
#: enum nft_table_flags (uapi nf_tables.h).
TABLE_FLAG_NAMES = {1: "dormant", 2: "owner", 4: "persist"}
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NETLINK_NETFILTER = 12


def nft_request(msg_type: int, seq: int, flags: int = _NLM_F_REQUEST) -> bytes:
    """An nf_tables request with no attributes (struct nfgenmsg: AF_UNSPEC, version 0)."""
    body = bytes(4)
    mtype = (NFNL_SUBSYS_NFTABLES << 8) | msg_type
    return NLMSG_HEADER.pack(NLMSG_HEADER.size + len(body), mtype, flags, seq, 0) + body


def generation_request(seq: int) -> bytes:
    """NFT_MSG_GETGEN: asks for the namespace's current nftables generation id."""
    return nft_request(NFT_MSG_GETGEN, seq)


def generation_of(msg: bytes) -> int | None:
    """NFTA_GEN_ID of an NFT_MSG_NEWGEN message (netlink header included), None if absent."""
    for atype, start, end in attributes(msg, NFGEN_ATTRS):
        if atype == NFTA_GEN_ID and end - start >= 4:
            return int.from_bytes(msg[start : start + 4], "big")
    return None


def table_of(msg: bytes) -> tuple[int, str, int, int] | None:
    """(family number, name, flags, handle) of an NFT_MSG_NEWTABLE message."""
    name, flags, handle = None, 0, 0
    for atype, start, end in attributes(msg, NFGEN_ATTRS):
        if atype == NFTA_TABLE_NAME:
            name = msg[start:end].split(b"\0", 1)[0].decode(errors="surrogateescape")
        elif atype == NFTA_TABLE_FLAGS and end - start >= 4:
            flags = int.from_bytes(msg[start : start + 4], "big")
        elif atype == NFTA_TABLE_HANDLE and end - start >= 8:
            handle = int.from_bytes(msg[start : start + 8], "big")
    return None if name is None else (nfgen_family(msg), name, flags, handle)


class _NftNetlink:
    """A plain nf_tables netlink socket for the two facts libnftables does not hand out:
    the generation id, and table flags (nft 1.0.6's JSON prints the owner flag wrongly)."""

    def __init__(self) -> None:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_NETFILTER)
        sock.bind((0, 0))
        # Above FD_SETSIZE where the limit allows: libnftables select()s on its own
        # descriptors, which glibc aborts on at 1024 or more; ours need not take low numbers.
        self.sock = above_select_limit(sock)
        self.sock.settimeout(5.0)
        self._seq = 0

    def _exchange(self, request: Callable[[int], bytes], dump: bool) -> list[bytes]:
        self._seq += 1
        seq = self._seq
        self.sock.send(request(seq))
        replies: list[bytes] = []
        while True:
            data, (sender, _groups) = self.sock.recvfrom(1 << 16)
            if sender != 0:
                continue  # only the kernel answers; a namespace's owner can send here too
            for mtype, mseq, msg in split_messages(data):
                if mseq != seq:
                    continue  # a late answer to an earlier request that timed out
                if mtype == _NLMSG_ERROR:
                    code = struct.unpack_from("=i", msg, NLMSG_HEADER.size)[0] if len(msg) >= 20 else -1
                    raise OSError(-code or errno.EIO, f"nf_tables: {os.strerror(-code or errno.EIO)}")
                if mtype == _NLMSG_DONE:
                    return replies
                replies.append(msg)
                if not dump:
                    return replies

    def generation(self) -> int | None:
        replies = self._exchange(generation_request, dump=False)
        return generation_of(replies[0]) if replies else None

    def tables(self) -> dict[tuple[str, str], tuple[tuple[str, ...], int]]:
        """(family, name) -> (flag names, handle) of every table."""
        found: dict[tuple[str, str], tuple[tuple[str, ...], int]] = {}
        for msg in self._exchange(lambda seq: nft_request(NFT_MSG_GETTABLE, seq, _NLM_F_REQUEST | _NLM_F_DUMP), True):
            t = table_of(msg)
            if t is not None and t[0] in NFPROTO_FAMILIES:
                names = tuple(name for bit, name in TABLE_FLAG_NAMES.items() if t[2] & bit)
                found[(NFPROTO_FAMILIES[t[0]], t[1])] = (names, t[3])
        return found

    def close(self) -> None:
        self.sock.close()


#: Notification types that change what a rule's text or place can be (sets and their
#: elements do not: a rule shows a named set by name).
NFT_MSG_DELTABLE, NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN, NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 2, 3, 5, 6, 8
_NAME_ATTR = {NFT_MSG_NEWTABLE: 1, NFT_MSG_DELTABLE: 1, NFT_MSG_NEWCHAIN: 1, NFT_MSG_DELCHAIN: 1,
              NFT_MSG_NEWRULE: 1, NFT_MSG_DELRULE: 1}  # NFTA_{TABLE_NAME,CHAIN_TABLE,RULE_TABLE}
NFTA_RULE_HANDLE = 3


def change_of(sub: int, msg: bytes) -> tuple[str, str, str, int | None] | None:
    """What one ruleset notification touches: (kind, family, table, rule handle).

    kind is `table` for a table created or deleted, `chain` for a chain
    created, renamed or deleted (a rename changes the text of rules that
    jump to it), `rule` for a rule added, replaced or deleted. None for
    messages that change no rule's text.
    """
    if sub not in _NAME_ATTR or nfgen_family(msg) not in NFPROTO_FAMILIES:
        return None
    table, handle = None, None
    for atype, start, end in attributes(msg, NFGEN_ATTRS):
        if atype == _NAME_ATTR[sub]:
            table = msg[start:end].split(b"\0", 1)[0].decode(errors="surrogateescape")
        elif sub in (NFT_MSG_NEWRULE, NFT_MSG_DELRULE) and atype == NFTA_RULE_HANDLE and end - start >= 8:
            handle = int.from_bytes(msg[start : start + 8], "big")
    if table is None:
        return None
    kind = "table" if sub in (NFT_MSG_NEWTABLE, NFT_MSG_DELTABLE) else "chain" if sub in (
        NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN) else "rule"
    return kind, NFPROTO_FAMILIES[nfgen_family(msg)], table, handle
