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
import os
import re
import threading
from dataclasses import dataclass
from enum import IntFlag
from typing import Any

import orjson

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


def _socket_fds() -> set[int]:
    fds: set[int] = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}").startswith("socket:"):
                fds.add(int(name))
        except OSError:
            continue  # closed meanwhile, or listdir's own descriptor
    return fds


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
            before = _socket_fds()
            ptr = self._lib.nft_ctx_new(0)  # NFT_CTX_DEFAULT: opens the netlink socket now
            if ptr:
                # libnftables opens it without SOCK_CLOEXEC: a child we exec
                # would otherwise keep our owned tables alive after we die.
                for fd in _socket_fds() - before:
                    os.set_inheritable(fd, False)
        if not ptr:
            raise OSError(ctypes.get_errno(), "nft_ctx_new failed")
        self._ctx: int | None = ptr
        self._lock = threading.Lock()
        self._lib.nft_ctx_buffer_output(ptr)
        self._lib.nft_ctx_buffer_error(ptr)

    @property
    def closed(self) -> bool:
        return self._ctx is None

    def run(self, command: str, flags: Output = NO_FLAGS) -> Result:
        """Runs nft commands (one or more lines) with the given output flags."""
        with self._lock:
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

    def list_ruleset_text(self) -> str:
        """`nft -a -s list ruleset`: handles to find rules, no counter values."""
        return self.cmd("list ruleset", Output.HANDLE | Output.STATELESS)

    def ruleset(self) -> Ruleset:
        """The namespace's ruleset, parsed (numeric priorities, handles, no counters)."""
        text = self.cmd("list ruleset", Output.HANDLE | Output.STATELESS | Output.NUMERIC_PRIO)
        return parse_ruleset(text)

    def list_ruleset_json(self) -> list[dict[str, Any]]:
        """`nft -j -a list ruleset`, the `nftables` array."""
        out = self.cmd("list ruleset", Output.JSON | Output.HANDLE | Output.STATELESS)
        if not out.strip():
            return []
        return list(orjson.loads(out).get("nftables", []))

    def close(self) -> None:
        """Frees the context, closing its socket (and so deleting tables it owns)."""
        with self._lock:
            if self._ctx is not None:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None

    def __enter__(self) -> NftContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown: the library may be gone
            self.close()


# --- what a listed ruleset says ---------------------------------------------------------

#: nfgen_family numbers (NFPROTO_*) to nft family names.
FAMILIES: dict[int, str] = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}

#: Tables iptables-nft creates, and the base chain names it gives each hook.
IPTABLES_TABLES = frozenset({"filter", "nat", "mangle", "raw", "security"})
IPTABLES_FAMILIES = {"ip": "iptables-nft", "ip6": "ip6tables-nft"}

_TABLE_RE = re.compile(r'^table (\w+) ("?)(.+?)\2 \{')
_CHAIN_RE = re.compile(r'^\tchain ("?)(.+?)\1 \{')
_BLOCK_RE = re.compile(r"^\t\S.*\{")
_HOOK_RE = re.compile(
    r'^\t\ttype (?P<type>\S+) hook (?P<hook>\S+)(?: device "?(?P<device>[^";]+?)"?| devices = \{[^}]*\})?'
    r" priority (?P<prio>[^;]+);(?: policy (?P<policy>\w+);)?"
)
_RULE_RE = re.compile(r"^\t\t(?P<text>.*) # handle (?P<handle>\d+)$")
_COMMENT_RE = re.compile(r'^(?P<text>.*?)\s+comment "(?P<comment>(?:[^"\\]|\\.)*)"$')
_JUMP_RE = re.compile(r'\b(?:jump|goto) ("?)([^\s",;}]+)\1')


@dataclass(frozen=True)
class Rule:
    """One rule; `position` is its index in the chain (iptables -S order)."""

    family: str
    table: str
    chain: str
    handle: int
    text: str
    comment: str | None
    position: int


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

    @property
    def owned(self) -> bool:
        """Owned tables vanish with the netlink socket that created them."""
        return "owner" in self.flags


@dataclass(frozen=True, eq=False)
class Ruleset:
    """A snapshot of one namespace's ruleset, indexed for trace lookups."""

    tables: dict[tuple[str, str], Table]
    chains: dict[tuple[str, str, str], Chain]
    rules: dict[tuple[str, str, int], Rule]
    text: str = ""

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


def split_comment(text: str) -> tuple[str, str | None]:
    """Rule text without its trailing `comment "..."`, and the comment."""
    m = _COMMENT_RE.match(text)
    if not m:
        return text, None
    return m.group("text"), m.group("comment").replace('\\"', '"')


def parse_ruleset(text: str) -> Ruleset:
    """Indexes `nft -a -s -y list ruleset` output.

    nft prints one statement per line, indented by nesting depth with
    tabs: tables at depth 0, chains/sets at 1, rules and chain attributes
    at 2. Set element lists may span lines but live in non-chain blocks,
    which are skipped.
    """
    tables: dict[tuple[str, str], Table] = {}
    chains: dict[tuple[str, str, str], Chain] = {}
    rules: dict[tuple[str, str, int], Rule] = {}
    table: tuple[str, str] | None = None
    table_flags: list[str] = []
    chain: dict[str, Any] | None = None
    in_other_block = False

    def finish_chain() -> None:
        nonlocal chain
        if chain is not None and table is not None:
            chains[(table[0], table[1], chain["name"])] = Chain(**chain)
        chain = None

    def finish_table() -> None:
        if table is not None:
            tables[table] = Table(family=table[0], name=table[1], flags=tuple(table_flags))

    for line in text.splitlines():
        if m := _TABLE_RE.match(line):
            finish_table()
            table, table_flags = (m.group(1), m.group(3)), []
            continue
        if table is None:
            continue
        if line == "}":
            finish_chain()
            finish_table()
            table = None
            continue
        if line == "\t}":
            finish_chain()
            in_other_block = False
            continue
        if m := _CHAIN_RE.match(line):
            finish_chain()
            chain = {"family": table[0], "table": table[1], "name": m.group(2), "rules": (), "jumps": ()}
            continue
        if chain is None:
            if line.startswith("\tflags ") and not in_other_block:
                table_flags += [f.strip() for f in line[len("\tflags ") :].split(",")]
            elif _BLOCK_RE.match(line):
                in_other_block = True
            continue
        if m := _HOOK_RE.match(line):
            prio = m.group("prio").strip()
            chain.update(
                type=m.group("type"),
                hook=m.group("hook"),
                device=m.group("device"),
                priority=int(prio) if prio.lstrip("-").isdigit() else None,
                policy=m.group("policy"),
            )
        elif m := _RULE_RE.match(line):
            handle = int(m.group("handle"))
            body, comment = split_comment(m.group("text"))
            rules[(table[0], table[1], handle)] = Rule(
                family=table[0],
                table=table[1],
                chain=chain["name"],
                handle=handle,
                text=body,
                comment=comment,
                position=len(chain["rules"]),
            )
            chain["rules"] += (handle,)
            chain["jumps"] += tuple(j.group(2) for j in _JUMP_RE.finditer(body) if j.group(2) not in chain["jumps"])
    finish_chain()
    finish_table()
    return Ruleset(tables=tables, chains=chains, rules=rules, text=text)
