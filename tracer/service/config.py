"""The daemon's configuration file (TOML), checked whole before anything starts.

`load(path)` returns a frozen `ServiceConfig` or raises `ConfigError` with
a message an operator can act on: the file, the line where the parser
knows it, the key (`output[2].address`), and what is wanted. The `[watch]`
table takes the settings of `tracer watch` under the flags' names and goes
through the same `Config.from_mapping`, so a value is checked by one piece
of code wherever it comes from. Each `[[output]]` table is checked against
its type's `Options` dataclass (tracer.outputs.registry): unknown keys and
wrong types here, generically; what only the output understands (a URL, a
facility name, a writable directory) in `Options.check()`.
"""

from __future__ import annotations

import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any

from tracer.config import LOG_LEVELS, Config, ConfigError, positive_number

DEFAULT_PATH = Path("/etc/tracer/tracer.toml")
DEFAULT_SPOOL_DIR = Path("/var/lib/tracer/spool")
#: Per output: an hour of a busy SIEM outage at ~300 events/s of ~1 KB.
DEFAULT_SPOOL_BYTES = 1 << 30
#: Events an output holds in memory before it counts them lost (or spools them).
DEFAULT_QUEUE = 10_000

#: The `[watch]` keys: `tracer watch`'s filters and tuning, by the flags' names.
WATCH_KEYS = ("port", "host", "proto", "netns", "iface", "reason", "nftrace", "nf_probes", "trace_rate",
              "summary_interval", "max_rate", "every_drop", "stack", "conntrack_threshold", "verdict_wait",
              "scan_interval")
#: Keys every `[[output]]` table takes, whatever its type.
OUTPUT_COMMON = ("type", "name", "queue", "spool")
_TABLES = ("watch", "log", "spool", "metrics", "output")
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
LOG_FORMATS = ("json", "console")


@dataclass(frozen=True)
class OutputSpec:
    """One `[[output]]`: its type, its stable name (spool file, metrics label), and its options."""

    type: str
    name: str
    options: Any  # the type's Options dataclass instance, checked
    queue: int = DEFAULT_QUEUE
    spool: bool = True


@dataclass(frozen=True)
class ServiceConfig:
    """Everything `tracer run` needs, known good."""

    watch: Config
    outputs: tuple[OutputSpec, ...]
    spool_dir: Path | None = DEFAULT_SPOOL_DIR
    spool_max_bytes: int = DEFAULT_SPOOL_BYTES
    metrics_listen: tuple[str, int] | None = None
    log_level: str = "info"
    log_format: str = "json"
    path: Path | None = None

    def output(self, name: str) -> OutputSpec | None:
        return next((o for o in self.outputs if o.name == name), None)


def load(path: Path) -> ServiceConfig:
    """Reads and checks the file; ConfigError names the file, line and key of the first problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
        doc = tomllib.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    try:
        return from_document(doc, path=path)
    except _KeyError as exc:
        line = locate(text, exc.where)
        at = f"{path}:{line}" if line is not None else str(path)
        raise ConfigError(f"{at}: {_dotted(exc.where)}: {exc.message}") from None


class _KeyError(Exception):
    """A problem at a key path, before the file and line are added."""

    def __init__(self, where: tuple[str | int, ...], message: str) -> None:
        super().__init__(message)
        self.where, self.message = where, message


def from_document(doc: Mapping[str, Any], *, path: Path | None = None) -> ServiceConfig:
    """A ServiceConfig from a parsed document; _KeyError (key path, message) when bad."""
    for key in doc:
        if key not in _TABLES:
            raise _KeyError((key,), f"unknown table or key (known: {', '.join(_TABLES)})")
    watch = _watch(_table(doc, "watch"))
    log = _table(doc, "log")
    _known(("log",), log, ("level", "format"))
    level = _text(("log", "level"), log.get("level", "info"))
    if level.lower() not in LOG_LEVELS:
        raise _KeyError(("log", "level"), f"{level!r} is not one of {', '.join(LOG_LEVELS)}")
    fmt = _text(("log", "format"), log.get("format", "json"))
    if fmt not in LOG_FORMATS:
        raise _KeyError(("log", "format"), f"{fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    spool = _table(doc, "spool")
    _known(("spool",), spool, ("dir", "max_bytes"))
    spool_dir = None
    if "dir" in spool:
        spool_dir = Path(_text(("spool", "dir"), spool["dir"]))
        problem = writable_dir_problem(spool_dir)
        if problem:
            raise _KeyError(("spool", "dir"), problem)
    max_bytes = _whole(("spool", "max_bytes"), spool.get("max_bytes", DEFAULT_SPOOL_BYTES), minimum=1 << 20)
    metrics = _table(doc, "metrics")
    _known(("metrics",), metrics, ("listen",))
    listen = None
    if "listen" in metrics:
        from tracer.service.metrics import parse_listen

        try:
            listen = parse_listen(_text(("metrics", "listen"), metrics["listen"]))
        except ConfigError as exc:
            raise _KeyError(("metrics", "listen"), str(exc).removeprefix("listen: ")) from None
    outputs = _outputs(doc.get("output", []), spool_dir)
    return ServiceConfig(watch=watch, outputs=outputs, spool_dir=spool_dir, spool_max_bytes=max_bytes,
                         metrics_listen=listen, log_level=level.lower(), log_format=fmt, path=path)


def _watch(table: Mapping[str, Any]) -> Config:
    _known(("watch",), table, WATCH_KEYS)
    try:
        return Config.from_mapping(dict(table), environ={})
    except ConfigError as exc:
        # Config's messages start with the setting's name (or flag) where it knows it.
        message = str(exc)
        key = next((k for k in table if message.startswith((f"{k}:", f"--{k.replace('_', '-')} "))), None)
        if key is None:
            key = next((k for k in table if k in message), None)
        where: tuple[str | int, ...] = ("watch", key) if key else ("watch",)
        if key and message.startswith(f"{key}:"):
            message = message[len(key) + 1:].strip()
        raise _KeyError(where, message) from None


def _outputs(raw: Any, spool_dir: Path | None) -> tuple[OutputSpec, ...]:
    from tracer.outputs import registry

    if not isinstance(raw, list):
        raise _KeyError(("output",), "write each output as an [[output]] table")
    if not raw:
        raise _KeyError(("output",), "no [[output]]: add at least one (e.g. type = \"journald\" or \"file\")")
    by_type: dict[str, int] = {}
    specs: list[OutputSpec] = []
    for i, table in enumerate(raw):
        where: tuple[str | int, ...] = ("output", i)
        if not isinstance(table, Mapping):
            raise _KeyError(where, "an output is a table of keys")
        kind = table.get("type")
        if kind is None:
            raise _KeyError(where, f"no type (one of {', '.join(registry.TYPES)})")
        if kind not in registry.TYPES:
            raise _KeyError((*where, "type"), f"{kind!r} is not one of {', '.join(registry.TYPES)}")
        by_type[kind] = by_type.get(kind, 0) + 1
        options_class = registry.options_class(kind)
        keys = tuple(f.name for f in fields(options_class))
        _known(where, table, OUTPUT_COMMON + keys)
        name = table.get("name")
        if name is None:
            name = kind if sum(1 for t in raw if isinstance(t, Mapping) and t.get("type") == kind) == 1 \
                else f"{kind}-{by_type[kind]}"
        name = _text((*where, "name"), name)
        if not _NAME.match(name):
            raise _KeyError((*where, "name"), f"{name!r}: 1-64 letters, digits and _.-")
        if any(s.name == name for s in specs):
            raise _KeyError((*where, "name"), f"{name!r} is the name of another output")
        queue = _whole((*where, "queue"), table.get("queue", DEFAULT_QUEUE), minimum=1, maximum=10_000_000)
        spool = table.get("spool", True)
        if not isinstance(spool, bool):
            raise _KeyError((*where, "spool"), f"{spool!r} is not true or false")
        values = {k: _typed((*where, k), v, _field_type(options_class, k)) for k, v in table.items()
                  if k not in OUTPUT_COMMON}
        missing = [f.name for f in fields(options_class)
                   if f.default is MISSING and f.default_factory is MISSING and f.name not in values]
        if missing:
            raise _KeyError((*where, missing[0]), "required")
        options = options_class(**values)
        try:
            options.check()
        except ConfigError as exc:
            message = str(exc)
            key = next((k for k in keys if message.startswith(f"{k}:")), None)
            if key is not None:
                raise _KeyError((*where, key), message[len(key) + 1:].strip()) from None
            raise _KeyError(where, message) from None
        specs.append(OutputSpec(kind, name, options, queue=queue,
                                spool=spool and spool_dir is not None and registry.spoolable(kind)))
    return tuple(specs)


# ---------------------------------------------------------------- generic checks


def _table(doc: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = doc.get(name, {})
    if not isinstance(value, Mapping):
        raise _KeyError((name,), f"write it as a [{name}] table")
    return value


def _known(where: tuple[str | int, ...], table: Mapping[str, Any], keys: tuple[str, ...]) -> None:
    for key in table:
        if key not in keys:
            close = difflib.get_close_matches(str(key).replace("-", "_"), keys, n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(keys)})"
            raise _KeyError((*where, key), f"unknown key{hint}")


def _text(where: tuple[str | int, ...], value: Any) -> str:
    if not isinstance(value, str):
        raise _KeyError(where, f"{value!r} is not a string")
    return value


def _whole(where: tuple[str | int, ...], value: Any, *, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _KeyError(where, f"{value!r} is not a whole number")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"from {minimum} to {maximum}" if maximum is not None else f"at least {minimum}"
        raise _KeyError(where, f"{value} is out of range ({bound})")
    return value


def _field_type(options_class: type, key: str) -> Any:
    return typing.get_type_hints(options_class)[key]


def _typed(where: tuple[str | int, ...], value: Any, wanted: Any) -> Any:
    """`value` as the Options field's type wants it (a list becomes a tuple); _KeyError if not."""
    origin = typing.get_origin(wanted)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for member in typing.get_args(wanted):
            try:
                return _typed(where, value, member)
            except _KeyError as exc:
                errors.append(exc.message)
        raise _KeyError(where, errors[0] if len(errors) == 1 else f"{value!r} is not {_type_name(wanted)}")
    if wanted is type(None):
        raise _KeyError(where, f"{value!r} is not {_type_name(wanted)}")
    if origin is tuple:
        (item_type, *_rest) = typing.get_args(wanted)
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise _KeyError(where, f"{value!r} is not a list")
        return tuple(_typed(where, v, item_type) for v in value)
    if wanted is bool:
        if not isinstance(value, bool):
            raise _KeyError(where, f"{value!r} is not true or false")
        return value
    if wanted is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _KeyError(where, f"{value!r} is not a whole number")
        return value
    if wanted is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _KeyError(where, f"{value!r} is not a number")
        try:
            return float(positive_number(value, float))
        except ConfigError as exc:
            raise _KeyError(where, str(exc)) from None
    if wanted is str:
        return _text(where, value)
    raise _KeyError(where, f"{value!r} is not {_type_name(wanted)}")


def _type_name(wanted: Any) -> str:
    names = {str: "a string", int: "a whole number", float: "a number", bool: "true or false"}
    if typing.get_origin(wanted) in (typing.Union, types.UnionType):
        parts = [_type_name(a) for a in typing.get_args(wanted) if a is not type(None)]
        return " or ".join(parts)
    if typing.get_origin(wanted) is tuple:
        return "a list"
    return names.get(wanted, str(wanted))


def writable_dir_problem(path: Path) -> str | None:
    """Why `path` cannot be a directory the daemon writes in (None: it can, or can be made).

    Looks at the nearest existing ancestor: a file where a directory should
    be, or a read-only filesystem (access(2) reports EROFS even to root).
    """
    if not path.is_absolute():
        return f"{str(path)!r} is not an absolute path"
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        return f"{str(probe)!r} is not a directory"
    if not os.access(probe, os.W_OK | os.X_OK):
        return f"{str(probe)!r} is not writable"
    return None


# ---------------------------------------------------------------- where in the file


def _dotted(where: tuple[str | int, ...]) -> str:
    out = ""
    for part in where:
        out += f"[{part + 1}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


_HEADER = re.compile(r"^\s*(\[\[?)\s*([A-Za-z0-9_.-]+)\s*\]\]?")
_KEY = re.compile(r"^\s*([A-Za-z0-9_-]+|\"[^\"]*\")\s*=")


def locate(text: str, where: tuple[str | int, ...]) -> int | None:
    """The line (1-based) of a key path in the TOML text, when a simple scan can tell.

    Tables (`[watch]`) and arrays of tables (`[[output]]`, counted) with
    plain `key = value` lines cover the files this daemon reads; for other
    spellings (inline or dotted tables) the message goes without a line.
    """
    if not where:
        return None
    table, index, key = where[0], None, None
    rest = list(where[1:])
    if rest and isinstance(rest[0], int):
        index = rest.pop(0)
    if rest:
        key = str(rest[0])
    current: str | None = None
    count = -1
    header_line: int | None = None
    for number, line in enumerate(text.splitlines(), 1):
        header = _HEADER.match(line)
        if header:
            current = header.group(2)
            if current == table:
                count = count + 1 if header.group(1) == "[[" else 0
                if index is None or count == index:
                    header_line = number
                    if key is None:
                        return number
            continue
        if key is None and current is None and table == _key_of(line):
            return number
        if key is not None and current == table and (index is None or count == index) and _key_of(line) == key:
            return number
    return header_line


def _key_of(line: str) -> str | None:
    m = _KEY.match(line)
    return m.group(1).strip('"') if m else None
