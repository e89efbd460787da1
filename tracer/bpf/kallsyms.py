"""Kernel addresses to `symbol+0xoff [module]`, the way the kernel's `%pS` prints them.

Every frame of every dropped packet goes through here, at worst a few hundred
thousand times a second, so the table is read once into parallel sorted lists
and searched with `bisect`, and the answer for each address is cached: the
same return addresses recur in almost every stack.

/proc/kallsyms gives start addresses only, no sizes, so where a symbol ends
is a guess, and the table goes stale as modules and BPF programs (the
tracer's own among them) are loaded. An address is re-checked against a fresh
read of the table when

- it lies more than `max_offset` past the nearest symbol, or below all of
  them: a range we know nothing about; or
- its nearest symbol is the last one of a module: the kernel puts the next
  module right after it, well within `max_offset`, and without sizes the
  two cannot be told apart.

Re-reads cost ~150-250 ms with the GIL held, so they happen at most once
per `refresh_interval`, and that interval doubles after each re-read that
finds no module change: an address no table will ever name (a corrupt
frame) must not make us re-read 120 000 lines per packet.

BPF programs (`[bpf]`) are the exception: the nearest `[bpf]` symbol names
an address without a re-read, even when it is the last one and a program
loaded since might be the one holding the address. The tracer's own program
is on every stack it sees, and usually the last BPF program loaded, so
doubting it would mean a re-read per event for as long as the tracer runs,
repeated each time any program is loaded anywhere on the host. Such a name
can only be wrong until the next re-read (`refresh()`, or one due for a
module's address), which empties the caches when anything changed.
"""

from __future__ import annotations

import time
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path

#: Larger than any kernel function (the largest on x86-64 6.x are ~20 KiB) and
#: smaller than the gaps between the kernel image, its init text and the
#: module area, so an address farther than this from its symbol is "unknown".
DEFAULT_MAX_OFFSET = 0x10000

#: Read /proc/kallsyms again for a doubtful address at most this often (s);
#: doubled after each re-read that finds nothing new, up to the maximum.
DEFAULT_REFRESH_INTERVAL = 1.0
DEFAULT_MAX_REFRESH_INTERVAL = 60.0

#: Bounds the per-address caches; stacks of a busy host touch a few thousand
#: distinct return addresses, so this is only reached by garbage addresses.
_CACHE_LIMIT = 1 << 16

# Only code symbols are kept: every address we resolve is a call site or a
# return address, and data symbols (per-CPU ones sit at 0x0...) would only
# give junk addresses plausible-looking names.
_TEXT_TYPES = frozenset("TtWw")

#: The `[module]` kallsyms gives JIT-compiled BPF programs (and trampolines).
BPF_MODULE = "bpf"


class KallsymsError(RuntimeError):
    """/proc/kallsyms cannot be used to resolve kernel addresses."""


class KallsymsRestricted(KallsymsError, PermissionError):
    """The kernel shows every symbol at address 0 to this process."""


@dataclass(frozen=True, slots=True)
class Symbol:
    """Where an address is: `offset` bytes into `name`, in `module` or (None) the kernel image."""

    name: str
    offset: int
    module: str | None = None

    def __str__(self) -> str:
        text = f"{self.name}+{self.offset:#x}"
        return f"{text} [{self.module}]" if self.module else text


@dataclass(frozen=True, slots=True)
class _Table:
    """Symbols sorted by address, in parallel lists because bisect on a list of ints runs in C."""

    addrs: list[int]
    names: list[str]
    modules: list[str | None]
    #: Indices of the last symbol of each run of one module: see the module docstring.
    tails: frozenset[int]


def restricted_message(path: str) -> str:
    """Says why every address reads as 0 and what the operator can do about it."""
    return (
        f"{path} lists every kernel symbol at address 0: kernel.kptr_restrict "
        "hides kernel addresses from this process, so stack frames and drop "
        "locations cannot be named. Run tracer as root (it needs CAP_SYSLOG in "
        "the initial user namespace, which root inside a container lacks) and "
        "make sure kernel.kptr_restrict is 0 or 1, e.g. "
        "`sysctl -w kernel.kptr_restrict=1` (2 hides addresses even from root)."
    )


def parse(text: str, path: str = "/proc/kallsyms") -> _Table:
    """Builds the sorted table from the text of /proc/kallsyms.

    Lines are `address type name`, plus a tab and `[module]` for module, BPF
    and ftrace-trampoline symbols. Several names can share an address
    (`_text`, `_stext`, ...); the first one listed is kept, as `%pS` does.

    Raises only KallsymsError (KallsymsRestricted when every address is 0),
    whatever the text: a line whose address is not hexadecimal is skipped
    like one with too few fields, so one damaged line costs one symbol, not
    the table.
    """
    rows: list[tuple[int, int, str, str | None]] = []
    seen = nonzero = 0
    for seq, line in enumerate(text.splitlines()):
        parts = line.split()
        if len(parts) < 3:
            continue
        try:
            addr = int(parts[0], 16)
        except ValueError:
            continue
        seen += 1
        if addr:
            nonzero += 1
        if parts[1] not in _TEXT_TYPES or not addr:
            continue
        module = parts[3][1:-1] if len(parts) > 3 and parts[3].startswith("[") else None
        rows.append((addr, seq, parts[2], module))
    if seen and not nonzero:
        raise KallsymsRestricted(restricted_message(path))
    if not rows:
        raise KallsymsError(f"{path} lists no kernel code symbols")
    rows.sort()
    addrs: list[int] = []
    names: list[str] = []
    modules: list[str | None] = []
    last = -1
    for addr, _, name, module in rows:
        if addr == last:
            continue
        last = addr
        addrs.append(addr)
        names.append(name)
        modules.append(module)
    return _Table(addrs, names, modules, _tails(modules))


def _without_bpf(table: _Table) -> list[tuple[int, str]]:
    """The kernel's and the modules' symbols: what a change of BPF programs leaves as it was."""
    return [(a, n) for a, n, m in zip(table.addrs, table.names, table.modules, strict=True) if m != BPF_MODULE]


def _tails(modules: list[str | None]) -> frozenset[int]:
    """Indices of module symbols that the next loaded module or BPF program may follow."""
    n = len(modules)
    return frozenset(
        i for i, mod in enumerate(modules) if mod is not None and (i + 1 == n or modules[i + 1] != mod)
    )


class Kallsyms:
    """Resolves kernel addresses against /proc/kallsyms, re-reading it as modules come and go.

    Not thread-safe by design: the event loop that decodes drops is the only
    caller, and a lock would cost more than a cached lookup.
    """

    def __init__(
        self,
        path: str = "/proc/kallsyms",
        *,
        max_offset: int = DEFAULT_MAX_OFFSET,
        refresh_interval: float = DEFAULT_REFRESH_INTERVAL,
        max_refresh_interval: float = DEFAULT_MAX_REFRESH_INTERVAL,
    ) -> None:
        self.path = path
        self.max_offset = max_offset
        self.refresh_interval = refresh_interval
        self.max_refresh_interval = max(max_refresh_interval, refresh_interval)
        self.refreshes = 0
        #: Counts re-reads that changed the table: names cached under an older generation may be stale.
        self.generation = 0
        self._table = self._read()
        self._loaded_at = time.monotonic()
        self._interval = refresh_interval
        self._symbols: dict[int, Symbol] = {}
        self._formatted: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._table.addrs)

    def _read(self) -> _Table:
        try:
            text = Path(self.path).read_text(encoding="ascii", errors="replace")
        except OSError as exc:
            raise KallsymsError(f"cannot read {self.path}: {exc}") from exc
        return parse(text, self.path)

    def refresh(self) -> bool:
        """Re-reads the table now; returns whether it changed.

        Callers that load modules or BPF programs can call it to have their
        symbols named at once. A change empties the caches (a module or
        program may have been unloaded and its range reused); a table whose
        modules did not change doubles the wait before the next automatic
        re-read.
        """
        table = self._read()
        old, self._table = self._table, table
        changed = table.addrs != old.addrs or table.names != old.names
        self._loaded_at = time.monotonic()
        self.refreshes += 1
        if changed:
            self.generation += 1
            self._symbols.clear()
            self._formatted.clear()
        # BPF programs come and go all the time and are never doubted (see the
        # module docstring): only a module change brings the interval back down.
        if changed and _without_bpf(table) != _without_bpf(old):
            self._interval = self.refresh_interval
        else:
            self._interval = min(self._interval * 2, self.max_refresh_interval)
        return changed

    def address(self, name: str, module: str | None = None) -> int | None:
        """Start address of a symbol (first match); O(n), for tests and diagnostics."""
        table = self._table
        for addr, sym, mod in zip(table.addrs, table.names, table.modules, strict=True):
            if sym == name and (module is None or mod == module):
                return addr
        return None

    def _locate(self, addr: int) -> tuple[int, bool]:
        """Table index of the symbol holding `addr` (-1: none), and whether it is beyond doubt."""
        table = self._table
        i = bisect_right(table.addrs, addr) - 1
        if i < 0 or addr - table.addrs[i] > self.max_offset:
            return -1, False
        return i, i not in table.tails

    def _resolve(self, addr: int) -> tuple[int, bool]:
        """`_locate`, re-reading the table for a doubtful answer; also says whether to cache it.

        A doubtful answer (see the module docstring) is confirmed or corrected
        by a re-read when one is due; when none is due it is returned but not
        cached, so that the re-read, once due, gets its chance to correct it.
        """
        i, certain = self._locate(addr)
        if certain:
            return i, True
        if i >= 0 and self._table.modules[i] == BPF_MODULE:
            return i, True  # only a re-read can change it, and one that does empties the caches
        if time.monotonic() - self._loaded_at < self._interval:
            return i, False
        self.refresh()
        i, _ = self._locate(addr)
        return i, i >= 0

    def lookup(self, addr: int) -> Symbol | None:
        """The symbol holding `addr`, or None when no known symbol is near enough.

        A miss is never cached: the address may belong to a module loaded
        since the last read, and must resolve once a re-read knows it.
        """
        sym = self._symbols.get(addr)
        if sym is not None:
            return sym
        i, cache = self._resolve(addr)
        if i < 0:
            return None
        table = self._table
        sym = Symbol(table.names[i], addr - table.addrs[i], table.modules[i])
        if cache:
            if len(self._symbols) >= _CACHE_LIMIT:
                self._symbols.clear()
            self._symbols[addr] = sym
        return sym

    def format(self, addr: int) -> str:
        """`name+0xoff`, plus ` [module]` for module symbols; `0x...` when unknown.

        An unknown frame keeps its place as hex so a stack keeps its shape.
        This path builds no `Symbol`: constructing a frozen dataclass costs
        ~0.7 us, more than the search itself.
        """
        text = self._formatted.get(addr)
        if text is not None:
            return text
        i, cache = self._resolve(addr)
        if i < 0:
            return f"{addr:#x}"
        table = self._table
        text = f"{table.names[i]}+{addr - table.addrs[i]:#x}"
        module = table.modules[i]
        if module:
            text = f"{text} [{module}]"
        if cache:
            if len(self._formatted) >= _CACHE_LIMIT:
                self._formatted.clear()
            self._formatted[addr] = text
        return text

    def settled(self, addrs: list[int]) -> bool:
        """Whether `format` names each address for good, as long as `generation` stays.

        Not so for an address it doubts and will check against a re-read once
        one is due: a caller that keeps formatted names must not keep those.
        """
        formatted = self._formatted
        return all(a in formatted for a in addrs)

    def format_stack(self, addrs: list[int]) -> list[str]:
        """Formats one stack, innermost frame first, as `drop.stack` carries it."""
        fmt = self.format
        return [fmt(a) for a in addrs]
