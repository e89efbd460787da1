"""The iptables-legacy model: tables as iptables-legacy-save lists them, checked
against what the kernel itself says about them.

Read-only by design. Legacy iptables has no change notifications and no
generation number; the kernel's own view of a table (IPT_SO_GET_INFO /
_GET_ENTRIES, the same calls iptables makes) gives a digest of its rules
and its chains with exact names and sizes, which is what tells a cached
listing from a stale one and a well-read listing from one that hostile
names or comments broke (parse_save). Nothing here changes the host: the
nf_log bindings that tracing needs are in tracer.netfilter.marking.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import hashlib
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tracer import netns as netns_mod
from tracer.libc import libc
from tracer.netfilter.constants import IPTABLES_CHAINS, NF_INET_HOOKS, NFPROTO_IPV4, NFPROTO_IPV6
from tracer.netns import Netns

#: Order the kernel runs legacy tables within a hook (priorities -300 .. 50).
TABLE_ORDER = ("raw", "mangle", "nat", "filter", "security")

#: Targets after which a packet goes on (or is accepted): never the reason for a drop.
NON_DROPPING_TARGETS = frozenset(
    {
        "ACCEPT", "RETURN", "LOG", "NFLOG", "ULOG", "MARK", "CONNMARK", "CT", "NOTRACK", "TRACE",
        "DSCP", "TOS", "TTL", "HL", "TCPMSS", "TCPOPTSTRIP", "CLASSIFY", "SECMARK", "CONNSECMARK",
        "CHECKSUM", "AUDIT", "IDLETIMER", "LED", "SET", "TEE", "DNAT", "SNAT", "MASQUERADE",
        "REDIRECT", "NETMAP", "HMARK", "RATEEST", "TPROXY", "CLUSTERIP", "ECN", "SYNPROXY_ACCEPT",
    }
)  # fmt: skip


@dataclass(frozen=True)
class XtFamily:
    """What differs between ip_tables and ip6_tables."""

    name: str  # ip / ip6, as the drop event's netfilter.family spells it
    pf: int  # NFPROTO_IPV4 / NFPROTO_IPV6: the nf_log sysctl index
    save: str  # the listing tool
    names_file: str  # /proc/net file listing the loaded tables
    sock_family: int
    level: int  # getsockopt level of IPT_SO_GET_INFO / IP6T_SO_GET_INFO
    next_offset: int  # offsetof(struct ipt_entry / ip6t_entry, next_offset)
    counters: int  # offsetof(..., counters); 16 bytes of packet/byte counts


#: The two legacy table families, by the name the drop event gives them.
FAMILIES: dict[str, XtFamily] = {
    "ip": XtFamily("ip", NFPROTO_IPV4, "iptables-legacy-save", "ip_tables_names", socket.AF_INET, socket.SOL_IP,
                   90, 96),
    "ip6": XtFamily("ip6", NFPROTO_IPV6, "ip6tables-legacy-save", "ip6_tables_names", socket.AF_INET6, 41,
                    142, 152),
}
#: The same, by NFPROTO_* (an nf_log sysctl index, a logged packet's nfgen_family).
PF_FAMILIES: dict[int, XtFamily] = {f.pf: f for f in FAMILIES.values()}


# --- tables as iptables-legacy-save prints them -------------------------------------------


@dataclass(frozen=True)
class XtChain:
    """A chain: built-in ones have a policy, user chains have None.

    `trusted` is False when the listing cannot be matched rule for rule to
    the table the kernel has (a name or comment with a line break in the
    wrong place, or rules changed while they were listed): the chain then
    lends no rule text to any verdict, rather than a wrong one.
    """

    name: str
    policy: str | None
    rules: tuple[str, ...] = ()  # full `-A CHAIN ...` lines, in order
    trusted: bool = True


@dataclass(frozen=True)
class XtTable:
    family: str
    name: str
    chains: dict[str, XtChain]

    @functools.cached_property
    def spaced(self) -> tuple[str, ...]:
        """spaced_names of this table's chains, worked out once."""
        return spaced_names(self.chains)

    def rule(self, chain: str, number: int) -> str | None:
        """The `-A` line of rule `number` (1-based) in `chain`."""
        c = self.chains.get(chain)
        if c is None or not c.trusted or not 1 <= number <= len(c.rules):
            return None
        return c.rules[number - 1]

    def verdict_of(self, line: str) -> str | None:
        """`drop`/`reject` when this rule ends a packet, None when it lets it go on."""
        target, _ = rule_target(line, self.spaced)
        if target is None or target in NON_DROPPING_TARGETS or target in self.chains:
            return None
        return "reject" if target == "REJECT" else "drop"

    def can_drop_from(self, chain: str) -> bool:
        """Whether a packet entering `chain` can be dropped: a DROP policy, or a
        dropping rule in it or in any chain reachable by jump/goto. A chain we
        could not read rule for rule counts as one that can."""
        start = self.chains.get(chain)
        if start is None:
            return False
        if start.policy == "DROP":
            return True
        seen, todo = {chain}, [chain]
        while todo:
            c = self.chains[todo.pop()]
            if not c.trusted:
                return True
            for line in c.rules:
                if self.verdict_of(line) is not None:
                    return True
                target, _ = rule_target(line, self.spaced)
                if target in self.chains and target not in seen:
                    seen.add(target)
                    todo.append(target)
        return False

    @property
    def can_drop(self) -> bool:
        return any(self.can_drop_from(c.name) for c in self.chains.values() if c.policy is not None)


#: Options iptables-save follows with a chain or target name, printed bare whatever it holds.
_NAME_OPTIONS = frozenset({"-A", "-j", "-g", "--jump", "--goto"})


def spaced_names(chains: Iterable[str]) -> tuple[str, ...]:
    """The chain names a space-split would cut, longest first: what split_words needs to know."""
    return tuple(sorted((c for c in chains if " " in c), key=len, reverse=True))


def split_words(line: str, spaced: Sequence[str] = ()) -> list[str]:
    """The words of an iptables-save line, unquoted as xtables quotes them.

    xtables_save_string() puts a value with anything but letters, digits,
    `_` and `-` in double quotes and escapes `"`, `\\` and `'` inside with a
    backslash; nothing else is special (shlex would also take single
    quotes, which xtables prints bare). A quote only opens at the start of
    a word. The chain after `-A` and the target after `-j`/`-g` are printed
    bare, so a name like `"q` is one word there; `spaced` (spaced_names of
    the known chains) lets a name with spaces be one word too.
    """
    words: list[str] = []
    cur: list[str] = []
    in_word = quoted = False
    i, n = 0, len(line)
    while i < n:
        ch = line[i]
        if quoted:
            if ch == "\\" and i + 1 < n:
                cur.append(line[i + 1])
                i += 2
                continue
            if ch == '"':
                quoted = False
            else:
                cur.append(ch)
        elif ch == " ":
            if in_word:
                words.append("".join(cur))
                cur, in_word = [], False
        elif not in_word and words and words[-1] in _NAME_OPTIONS:
            rest = line[i:]
            name = next((c for c in spaced if rest == c or rest.startswith(c + " ")), None)
            if name is None:
                name = rest.split(" ", 1)[0]
            words.append(name)
            i += len(name)
            continue
        elif ch == '"' and not in_word:
            quoted = in_word = True
        else:
            cur.append(ch)
            in_word = True
        i += 1
    if in_word:
        words.append("".join(cur))
    return words


def _quote_open(text: str, skip: int = 0) -> bool:
    """Whether a quoted value (as split_words reads them) is still open at the end of `text`.

    `skip`: characters at the start that are a raw name, printed without
    quotes whatever they contain.
    """
    quoted = False
    prev = " "
    i, n = skip, len(text)
    while i < n:
        ch = text[i]
        if quoted:
            if ch == "\\":
                i += 2
                prev = "x"
                continue
            if ch == '"':
                quoted = False
        elif ch == '"' and prev == " ":
            quoted = True
        prev = ch
        i += 1
    return quoted


def rule_target(line: str, spaced: Sequence[str] = ()) -> tuple[str | None, bool]:
    """The target of an `-A` line (`-j` or `-g`) and whether it is a goto."""
    words = split_words(line, spaced)
    for i, word in enumerate(words[:-1]):
        if word in ("-j", "--jump", "-g", "--goto"):
            return words[i + 1], word in ("-g", "--goto")
    return None, False


def rule_comment(line: str, spaced: Sequence[str] = ()) -> str | None:
    """The `-m comment --comment` text of a rule, if it has one (exactly, control characters too)."""
    words = split_words(line, spaced)
    for i, word in enumerate(words[:-1]):
        if word == "--comment":
            return words[i + 1]
    return None


def split_iptables_rules(listing: str) -> dict[str, list[str]]:
    """`-A CHAIN ...` records of `iptables -S` output, by chain, in order.

    A rule's comment may hold newlines (iptables prints it raw between
    quotes), so a line that does not start a record continues the one before.
    A chain name is the word after `-A` as iptables prints it; callers check
    the count of records against the chain's rules before trusting positions.
    """
    records: list[str] = []
    for line in listing.removesuffix("\n").split("\n"):
        if line.startswith("-") or not records:
            records.append(line)
        else:
            records[-1] += "\n" + line
    chains: dict[str, list[str]] = {}
    for rec in records:
        if rec.startswith("-A "):
            chain = rec[3:].split(" ", 1)[0]
            chains.setdefault(chain, []).append(rec)
    return chains


@dataclass(frozen=True)
class TableLayout:
    """What the kernel says a legacy table is: a digest of its rules, and its chains.

    `chains`: chain name -> its entries, the closing policy (built-in) or
    RETURN (user chain) included, so one more than its rules. The names are
    exact (the kernel's bytes); the listing tool prints them raw.
    """

    digest: bytes
    chains: dict[str, int]


class _ChainNames:
    """Chain names for reading a listing around them: fast for plain names, exact for odd ones."""

    def __init__(self, names: Iterable[str]) -> None:
        self.names = set(names)
        # Names a space-split would cut, longest first (a name may be another's prefix).
        self.spaced = sorted((n for n in self.names if " " in n or not n), key=len, reverse=True)

    def at(self, text: str) -> str | None:
        """The declared name `text` starts with (followed by a space or the end)."""
        for name in self.spaced:
            if text == name or text.startswith(name + " "):
                return name
        word = text.split(" ", 1)[0]
        return word if word in self.names else None


def _listed_chain(line: str, names: _ChainNames) -> str | None:
    """The chain an `-A <chain> ...` line appends to."""
    return names.at(line[3:]) if line.startswith("-A ") else None


def _declared_chain(line: str, names: _ChainNames | None) -> tuple[str, str | None]:
    """(name, policy) of a `:<name> <policy> [<packets>:<bytes>]` line; the name may hold spaces."""
    body = line[1:]
    name = names.at(body) if names is not None else None
    if name is not None and body != name:
        policy = body[len(name) + 1 :].split(" ", 1)[0]
        return name, None if policy == "-" else policy
    parts = body.rsplit(" ", 2) if body.endswith("]") else body.split(" ", 2)
    name = parts[0]
    policy = parts[1] if len(parts) > 1 else "-"
    return name, None if policy == "-" else policy


def _starts_statement(line: str) -> bool:
    return line.startswith(("*", ":", "-A ", "#")) or line == "COMMIT" or line == ""


def _logical_lines(text: str, chain_names: _ChainNames, quotes: bool) -> list[str]:
    """Lines of an iptables-save listing, with the line breaks inside a name or comment mended.

    The tool prints names and comments as they are, line breaks included.
    A physical line continues the previous one when it starts no statement
    of the format (a line break in a name printed without quotes) or, with
    `quotes`, when a quoted value is still open there (a line break in a
    comment, which may be followed by what looks like a rule). Only "\\n"
    breaks lines: a CR or any other control character is part of the text.
    """
    out: list[str] = []
    for line in text.split("\n"):
        prev = out[-1] if out else ""
        if prev.startswith(("-A ", ":")) and (
            not _starts_statement(line) or (quotes and prev.startswith("-A ") and _rule_quote_open(prev, chain_names))
        ):
            out[-1] += "\n" + line
        else:
            out.append(line)
    return out


def _rule_quote_open(line: str, chain_names: _ChainNames) -> bool:
    if '"' not in line:
        return False
    chain = _listed_chain(line, chain_names)
    skip = 3 + len(chain) if chain is not None else 0
    # Jump targets are chain names too, printed raw: mask them before looking for quotes.
    for flag in (" -j ", " -g "):
        at = line.find(flag, skip)
        while at >= 0:
            name = chain_names.at(line[at + len(flag) :])
            if name:
                start = at + len(flag)
                line = line[:start] + "x" * len(name) + line[start + len(name) :]
            at = line.find(flag, at + 1)
    return _quote_open(line, skip)


def parse_save(text: str, family: str, layouts: dict[str, TableLayout] | None = None) -> dict[str, XtTable]:
    """Tables of `iptables-legacy-save` output (its `-A` lines are those of `iptables -S`).

    Names and comments are hostile: a chain may be called `-Z` or `"q` or
    hold spaces, a comment may hold line breaks followed by what looks like
    a rule or a COMMIT. With `layouts` (the kernel's own chain names and
    sizes, table_layout), chain names are matched exactly, tables the
    kernel does not have are ignored, and the listing is read twice: with
    line breaks inside quoted values mended, and line by line (a bare word
    that starts with a quote, say an interface name, would otherwise open
    a "quote" that swallows the rules after it). Each table is taken from
    the reading that matches the kernel's chains best, and a chain whose
    rules still do not add up is marked untrusted, so it never lends a
    wrong rule. Without layouts the listing is read line by line.
    """
    if layouts is None:
        return _parse_save(text, family, None, quotes=False)
    quoted = _parse_save(text, family, layouts, quotes=True)
    if all(c.trusted for t in quoted.values() for c in t.chains.values()) and quoted.keys() == layouts.keys():
        return quoted
    plain = _parse_save(text, family, layouts, quotes=False)
    best: dict[str, XtTable] = {}
    for name in layouts:
        candidates = [t for t in (quoted.get(name), plain.get(name)) if t is not None]
        if candidates:
            best[name] = min(candidates, key=lambda t: sum(not c.trusted for c in t.chains.values()))
    return best


def _parse_save(text: str, family: str, layouts: dict[str, TableLayout] | None, *, quotes: bool) -> dict[str, XtTable]:
    tables: dict[str, XtTable] = {}
    known = _ChainNames(c for layout in (layouts or {}).values() for c in layout.chains)
    # The declared names first, so that `-A` lines and their quotes can be read around them.
    declared = set(known.names)
    for line in text.split("\n"):
        if line.startswith(":"):
            declared.add(_declared_chain(line, known if layouts else None)[0])
    names = _ChainNames(declared)
    name: str | None = None
    policies: dict[str, str | None] = {}
    rules: dict[str, list[str]] = {}
    for line in _logical_lines(text, names, quotes):
        if line.startswith("*"):
            name, policies, rules = line[1:].strip(), {}, {}
        elif name is None:
            continue
        elif line.startswith(":"):
            chain, policy = _declared_chain(line, known if layouts else names)
            policies[chain] = policy
            rules.setdefault(chain, [])
        elif line.startswith("-A "):
            chain = _listed_chain(line, names) or line.split(" ", 2)[1]
            rules.setdefault(chain, []).append(line)
        elif line.strip() == "COMMIT":
            tables[name] = _table(family, name, policies, rules, (layouts or {}).get(name) if layouts else None)
            name = None
    if layouts is not None:
        tables = {t: table for t, table in tables.items() if t in layouts}
    return tables


def _table(
    family: str,
    name: str,
    policies: dict[str, str | None],
    rules: dict[str, list[str]],
    layout: TableLayout | None,
) -> XtTable:
    if layout is None:
        return XtTable(family, name, {c: XtChain(c, policies.get(c), tuple(rules.get(c, ()))) for c in rules})
    chains = {}
    for c, entries in layout.chains.items():
        listed = tuple(rules.get(c, ()))
        chains[c] = XtChain(c, policies.get(c), listed, trusted=len(listed) == entries - 1)
    return XtTable(family, name, chains)


# --- reading tables without changing them -------------------------------------------------

def _getsockopt(fd: int, level: int, option: int, buf: bytes) -> bytes:
    """getsockopt(2) with an input buffer (Python's own cannot pass the table name in)."""
    cbuf = ctypes.create_string_buffer(buf, len(buf))
    size = ctypes.c_uint32(len(buf))
    if libc().getsockopt(fd, level, option, cbuf, ctypes.byref(size)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return cbuf.raw[: size.value]


_SO_GET_INFO, _SO_GET_ENTRIES = 64, 65  # IPT_SO_GET_INFO / IP6T_SO_GET_INFO, ..._ENTRIES
_GET_INFO_SIZE = 84  # struct ipt_getinfo
_GET_ENTRIES_HEADER = 40  # struct ipt_get_entries up to its 8-byte aligned entry table


_TARGET_NAME = slice(2, 31)  # struct xt_entry_target: __u16 target_size; char name[29]; __u8 revision
_TARGET_DATA = 32
_ERROR_TARGET = b"ERROR"  # heads each user chain, its data the chain's name; also ends the table


def table_layout(sock: socket.socket, fam: XtFamily, table: str) -> TableLayout:
    """A digest of a loaded table's rules (counters left out), and its chains as the kernel has them.

    Legacy iptables sends no change notifications and has no generation
    number; the digest is what tells a cached listing from a stale one
    without running a program. The chains, with exact names and sizes, are
    what a listing is checked against (parse_save). Only ever call it for
    tables listed in /proc/net/ip*_tables_names: asking for another name
    makes the kernel create that table.
    """
    name = table.encode().ljust(32, b"\0")
    for _ in range(5):
        info = _getsockopt(sock.fileno(), fam.level, _SO_GET_INFO, name + bytes(_GET_INFO_SIZE - 32))
        valid_hooks = struct.unpack_from("=I", info, 32)[0]
        hook_entry = struct.unpack_from("=5I", info, 36)
        size = struct.unpack_from("=I", info, 80)[0]
        request = name + struct.pack("=I", size) + bytes(_GET_ENTRIES_HEADER - 36 + size)
        try:
            blob = bytearray(_getsockopt(sock.fileno(), fam.level, _SO_GET_ENTRIES, request)[_GET_ENTRIES_HEADER:])
        except OSError as exc:
            if exc.errno == errno.EAGAIN:  # replaced between the two calls
                continue
            raise
        starts = {
            hook_entry[h]: IPTABLES_CHAINS[hook] for h, hook in enumerate(NF_INET_HOOKS) if valid_hooks & (1 << h)
        }
        chains = _chain_sizes(blob, fam, starts)
        off = 0
        while off + fam.counters + 16 <= len(blob):
            step = struct.unpack_from("=H", blob, off + fam.next_offset)[0]
            blob[off + fam.counters : off + fam.counters + 16] = bytes(16)
            if step == 0:
                break
            off += step
        return TableLayout(hashlib.blake2b(blob, digest_size=16).digest(), chains)
    raise OSError(errno.EAGAIN, f"table {table} kept changing")


def _chain_sizes(blob: bytes | bytearray, fam: XtFamily, starts: dict[int, str]) -> dict[str, int]:
    """Entries of each chain, counted as ipt_do_table numbers rules in its traces.

    A built-in chain starts at its hook's entry; a user chain at an ERROR
    entry naming it (not counted: the kernel numbers from the entry after).
    The last entry of the table is an ERROR entry too.
    """
    chains: dict[str, int] = {}
    current: str | None = None
    off = 0
    while off + fam.next_offset + 2 <= len(blob):
        target_offset, step = struct.unpack_from("=HH", blob, off + fam.next_offset - 2)
        if step == 0:
            break
        if off in starts:
            current = starts[off]
            chains.setdefault(current, 0)
        t = off + target_offset
        target = bytes(blob[t + _TARGET_NAME.start : t + _TARGET_NAME.stop]).split(b"\0", 1)[0]
        if target == _ERROR_TARGET and off not in starts:
            if off + step >= len(blob):
                break  # the table's end
            data = bytes(blob[t + _TARGET_DATA : off + step]).split(b"\0", 1)[0]
            current = data.decode(errors="replace")
            chains[current] = 0
        elif current is not None:
            chains[current] += 1
        off += step
    return chains


def table_generation(sock: socket.socket, fam: XtFamily, table: str) -> bytes:
    """The digest of table_layout alone."""
    return table_layout(sock, fam, table).digest


def loaded_tables(ns: Netns) -> dict[str, tuple[str, ...]]:
    """family -> legacy tables loaded in the namespace (reading does not load any)."""
    found: dict[str, tuple[str, ...]] = {}
    with netns_mod.entered(ns):
        for fam in FAMILIES.values():
            try:
                with open(f"/proc/thread-self/net/{fam.names_file}") as fh:
                    names = tuple(fh.read().split())
            except FileNotFoundError:
                names = ()
            if names:
                found[fam.name] = names
    return found
