"""One frozen configuration for a watch: what to watch (`Scope`) and how (`Config`).

`Config` is built once, at the edge: from the command line's flags now
(`Config.from_flags`), from a TOML file in the daemon later
(`Config.from_mapping` takes the parsed document). Everything below the
edge receives it and never re-validates or reads the environment: a value
that reaches the engine is known good. The same scope limits the BPF
filter, the nftrace marking rules and the iptables-legacy tracing, so the
cost of tracing stays proportional to what the user wants to see.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Protocol names the filter accepts, as nft's `meta l4proto` spells them.
PROTO_NAMES: dict[str, str] = {
    "tcp": "tcp",
    "udp": "udp",
    "sctp": "sctp",
    "udplite": "udplite",
    "dccp": "dccp",
    "icmp": "icmp",
    "icmpv6": "ipv6-icmp",
    "ipv6-icmp": "ipv6-icmp",
}
#: Protocols whose first four transport bytes are source and destination port.
PORT_PROTOS = frozenset({"tcp", "udp", "sctp", "udplite", "dccp"})
_PORT_PROTO_NUMBERS = {"6": "tcp", "17": "udp", "132": "sctp", "136": "udplite", "33": "dccp"}
_NAMED_PROTO_NUMBERS = {"1": "icmp", "58": "icmpv6"}
#: IP protocol numbers of the names above (the BPF filter compares numbers).
PROTO_NUMBERS: dict[str, int] = {
    "tcp": 6, "udp": 17, "sctp": 132, "udplite": 136, "dccp": 33, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58,
}
_DIGITS = re.compile(r"^[0-9]{1,3}$")
# Linux refuses '/', ':' and white space in device names (dev_valid_name); ':' labels addresses.
_IFNAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,15}$")
_PROTO_NAME = re.compile(r"^[a-z][a-z0-9._+-]{0,63}$")
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_.@+-]{1,255}$")
_REASON = re.compile(r"^[A-Z0-9_]+$")

@dataclass(frozen=True)
class Scope:
    """Which packets to watch; an empty scope watches everything.

    `ports` match source or destination port, `hosts` match source or
    destination address. Strings are accepted for hosts, ports and proto and
    normalised once, here; the frozen result is what every part of the
    tracer reads.
    """

    ports: tuple[int, ...] = ()
    hosts: tuple[IPNetwork, ...] = ()
    proto: str | None = None
    netns: str | None = None
    iface: str | None = None
    reasons: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        # Normalising a frozen dataclass: the only writes it ever gets.
        object.__setattr__(self, "ports", _ports(self.ports))
        object.__setattr__(self, "hosts", _hosts(self.hosts))
        object.__setattr__(self, "proto", _proto(self.proto))
        if self.ports and self.proto is not None and self.proto not in PORT_PROTOS:
            raise ValueError(f"protocol {self.proto!r} has no ports; ports need one of {sorted(PORT_PROTOS)}")
        if self.iface is not None and (not _IFNAME.match(self.iface) or self.iface in (".", "..")):
            raise ValueError(f"interface name {self.iface!r} is not a valid Linux interface name "
                             "(1-15 characters, letters, digits and _.@+-)")
        if self.netns is not None and not _NETNS_NAME.match(str(self.netns)):
            raise ValueError(f"network namespace {self.netns!r} is not a valid name or inode number")
        object.__setattr__(self, "reasons", _reasons(self.reasons))
        if self.hosts and self.proto in ("icmp", "icmpv6"):
            version = 4 if self.proto == "icmp" else 6
            if not any(h.version == version for h in self.hosts):
                raise ValueError(f"protocol {self.proto} never matches hosts {', '.join(map(str, self.hosts))}")

    @property
    def empty(self) -> bool:
        """True when the filter does not restrict packets (netns aside)."""
        return not (self.ports or self.hosts or self.proto or self.iface)

    def matches_netns(self, inode: int, name: str | None) -> bool:
        """Whether a namespace is in scope: by `ip netns` name or inode number."""
        if self.netns is None:
            return True
        return self.netns == name or self.netns == str(inode)


def _ports(ports: Iterable[int | str]) -> tuple[int, ...]:
    result: set[int] = set()
    for raw in ports:
        try:
            port = int(str(raw).strip(), 10)
        except ValueError:
            raise ValueError(f"port {raw!r} is not a number") from None
        if not _port_in_range(port):
            raise ValueError(f"port {port} is out of range 1-65535")
        result.add(port)
    return tuple(sorted(result))


def _port_in_range(port: int) -> bool:
    return 1 <= port <= 65535


def _hosts(hosts: Iterable[IPNetwork | str]) -> tuple[IPNetwork, ...]:
    result: list[IPNetwork] = []
    for raw in hosts:
        if isinstance(raw, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
            net = raw
        else:
            try:
                net = ipaddress.ip_network(str(raw).strip(), strict=False)
            except ValueError:
                raise ValueError(
                    f"host {raw!r} is not an IPv4/IPv6 address or CIDR prefix (e.g. 198.18.0.0/24, 2001:db8::1)"
                ) from None
        if net not in result:
            result.append(net)
    return tuple(result)


def _proto(proto: str | int | None) -> str | None:
    if proto is None:
        return None
    text = str(proto).strip().lower()
    if text.isascii() and text.isdigit():
        text = text.lstrip("0") or "0"
        if not _DIGITS.match(text) or not 0 <= int(text) <= 255:
            raise ValueError(f"protocol number {text[:20]} is out of range 0-255")
        text = str(int(text))
        return _PORT_PROTO_NUMBERS.get(text) or _NAMED_PROTO_NUMBERS.get(text) or text
    if text == "ipv6-icmp":
        return "icmpv6"
    if text in PROTO_NAMES:
        return text
    number = _system_protocol(text)
    if number is None:
        names = sorted(set(PROTO_NAMES) - {"ipv6-icmp"})
        raise ValueError(f"protocol {proto!r} is not one of {names}, a name in /etc/protocols, "
                         "or a number 0-255")
    return _proto(number)


def _system_protocol(name: str) -> int | None:
    """The number /etc/protocols (through the C library) gives a name, if any.

    Other names become their number, which nft and the BPF filter both take,
    so the filter never depends on what names a tool happens to know.
    """
    if not _PROTO_NAME.match(name):
        return None
    try:
        number = socket.getprotobyname(name)
    except OSError:
        return None
    return number if 0 <= number <= 255 else None


def _reasons(reasons: Iterable[str]) -> tuple[str, ...]:
    result: list[str] = []
    for raw in reasons:
        name = str(raw).strip().upper().removeprefix("SKB_DROP_REASON_")
        if not _REASON.match(name):
            raise ValueError(f"drop reason {raw!r} is not a kernel drop-reason name such as NETFILTER_DROP")
        if name not in result:
            result.append(name)
    return tuple(result)



# ---------------------------------------------------------------- values from outside
# One parser per kind of value. The command line uses them as argparse types
# and `Config.from_mapping` for a configuration file, so a value is checked by
# the same code, with the same message, wherever it comes from.

#: --trace-rate: nft's `limit rate` takes any u64, but more than this per namespace traces everything anyway.
TRACE_RATE_MAX = 10_000_000
TRACE_RATE_DEFAULT = 1000
SUMMARY_INTERVAL_DEFAULT = 10.0
#: A terminal reads a few hundred lines a second at best; a SIEM takes more, if asked.
MAX_RATE_DEFAULT = 500
MAX_RATE_MAX = 1_000_000
CONNTRACK_THRESHOLD_DEFAULT = 0.9
#: select() and friends refuse timeouts beyond ~292 years; an hour per answer is plenty.
MAX_TIMEOUT = 3600.0
NF_PROBES = ("auto", "fentry", "kprobe", "none")
LOG_LEVELS = ("debug", "info", "warning", "error")
_PORT_TEXT = re.compile(r"[0-9]{1,5}")


class ConfigError(ValueError):
    """A value the configuration refuses; the message names the value and what is wanted."""


def split_items(setting: str, values: Iterable[str | int] | None) -> list[str]:
    """`--port 80 --port 443,8443` -> ['80', '443', '8443'].

    An empty item is an error: dropping it would silently widen the watch
    to everything.
    """
    out: list[str] = []
    for v in values or []:
        for item in str(v).split(","):
            item = item.strip()
            if not item:
                raise ConfigError(f"{setting} {str(v)!r}: empty value (give one or more, separated by commas)")
            out.append(item)
    return out


def port_number(text: str | int) -> int:
    """A port as the user typed it; ConfigError unless a number 1-65535 in ASCII digits."""
    s = str(text).strip()
    if not _PORT_TEXT.fullmatch(s) or not _port_in_range(int(s)):
        raise ConfigError(f"{str(text)!r}: a port is a number from 1 to 65535")
    return int(s)


def port_list(setting: str, values: Iterable[str | int] | None) -> tuple[int, ...]:
    """The ports of a repeated, comma-separated setting, in order, without repeats."""
    ports = []
    for item in split_items(setting, values):
        try:
            ports.append(port_number(item))
        except ConfigError as exc:
            raise ConfigError(f"{setting} {exc}") from None
    return tuple(dict.fromkeys(ports))


def host_networks(values: Iterable[str], setting: str = "--host") -> tuple[IPNetwork, ...]:
    """Addresses or CIDR prefixes, as `--host` takes them."""
    out = []
    for v in values:
        try:
            out.append(ipaddress.ip_network(v, strict=False))
        except ValueError:
            raise ConfigError(f"{setting} {v!r} is neither an IP address nor a CIDR network") from None
    return tuple(out)


def positive_number(text: str | int | float, kind: type[int] | type[float],
                    maximum: float | None = None) -> int | float:
    """A finite number above 0 (nan, inf, -0 and 1e309 are refused); int or float as asked."""
    what = "a whole number" if kind is int else "a number"
    try:
        value = kind(text.strip()) if isinstance(text, str) else kind(text)
    except (ValueError, OverflowError):
        raise ConfigError(f"{text!r} is not {what}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{text!r} is not a finite number")
    if kind is int and isinstance(text, float) and not text.is_integer():
        raise ConfigError(f"{text!r} is not {what}")
    if value <= 0:
        raise ConfigError(f"{text!r} must be greater than 0")
    if maximum is not None and value > maximum:
        limit = int(maximum) if float(maximum).is_integer() else maximum
        raise ConfigError(f"{text!r} must be at most {limit}")
    return value


def count_at_least_zero(text: str | int) -> int:
    try:
        value = int(text.strip()) if isinstance(text, str) else int(text)
    except ValueError:
        raise ConfigError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise ConfigError(f"{text!r} must be 0 or more")
    return value


def log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, not {text!r}")
    return level


def environment_defaults(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Settings the environment gives when neither flags nor a file do.

    With `systemd_environment`, the only place the tracer reads its
    environment: for running a build from elsewhere (the bench's --tracer-cmd: TRACER_BPF_OBJECT), another
    libbpf (TRACER_LIBBPF), and the log level of child processes in tests.
    """
    env = os.environ if environ is None else environ
    out: dict[str, Any] = {}
    if env.get("TRACER_BPF_OBJECT"):
        out["bpf_object"] = env["TRACER_BPF_OBJECT"]
    if env.get("TRACER_LIBBPF"):
        out["libbpf"] = env["TRACER_LIBBPF"]
    if env.get("TRACER_LOG_LEVEL"):
        out["log_level"] = env["TRACER_LOG_LEVEL"]
    if env.get("TRACER_DEBUG_STATS"):
        out["debug_stats"] = True
    return out


#: What systemd tells a service through its environment (sd_notify(3)).
SYSTEMD_VARIABLES = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def systemd_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The notify socket and watchdog settings systemd gave `tracer run`, if any."""
    env = os.environ if environ is None else environ
    return {k: env[k] for k in SYSTEMD_VARIABLES if k in env}


@dataclass(frozen=True)
class Config:
    """How to watch, decided once at the edge; every part of the tracer reads it, none changes it.

    Replaces what used to be spread over flag re-validation in the CLI, an
    options object, and environment variables read deep in the code.
    `nf_mode` None means no netfilter probes; "auto" the best the kernel
    allows. `verdict_wait` bounds how long a netfilter drop waits for its
    nftrace verdict; `scan_interval` is how often namespaces are looked for.
    """

    scope: Scope = field(default_factory=Scope)
    count: int | None = None
    duration: float | None = None
    stack: bool = False
    json: bool = False
    nftrace: bool = True
    nf_mode: str | None = "auto"
    trace_rate: int = TRACE_RATE_DEFAULT
    verdict_wait: float = 0.3
    scan_interval: float = 1.0
    bpf_object: Path | None = None
    libbpf: str = "libbpf.so.1"
    log_level: str | None = None
    debug_stats: bool = False
    #: Seconds between summaries of repeated drops (issue 8: flows counted in the kernel).
    summary_interval: float = SUMMARY_INTERVAL_DEFAULT
    #: The ceiling: events a second at most; what it holds back is folded into summaries.
    max_rate: int = MAX_RATE_DEFAULT
    #: Show every drop one by one (up to max_rate) instead of a flow's first and summaries.
    every_drop: bool = False
    #: Fill level (count / max) of a namespace's conntrack table that raises an alert.
    conntrack_threshold: float = CONNTRACK_THRESHOLD_DEFAULT

    def __post_init__(self) -> None:
        # Normalising a frozen dataclass: values from a file arrive as text or
        # the wrong number type, and each is converted (or refused) here, once.
        def put(name: str, check: Any) -> None:
            try:
                object.__setattr__(self, name, check(getattr(self, name)))
            except ConfigError as exc:
                raise ConfigError(f"{name}: {exc}") from None

        if self.count is not None:
            put("count", lambda v: positive_number(v, int))
        if self.duration is not None:
            put("duration", lambda v: float(positive_number(v, float)))
        put("trace_rate", lambda v: positive_number(v, int, TRACE_RATE_MAX))
        put("verdict_wait", _seconds_or_zero)
        put("scan_interval", lambda v: float(positive_number(v, float, MAX_TIMEOUT)))
        put("summary_interval", lambda v: float(positive_number(v, float, MAX_TIMEOUT)))
        put("max_rate", lambda v: positive_number(v, int, MAX_RATE_MAX))
        put("conntrack_threshold", lambda v: float(positive_number(v, float, 1.0)))
        for flag in ("stack", "json", "nftrace", "debug_stats", "every_drop"):
            put(flag, _boolean)
        if self.nf_mode not in (None, "auto", "fentry", "kprobe"):
            raise ConfigError(f"nf_probes: {self.nf_mode!r} is not one of {', '.join(NF_PROBES)}")
        if self.log_level is not None:
            put("log_level", log_level)
        if self.bpf_object is not None:
            put("bpf_object", Path)

    @classmethod
    def from_mapping(cls, doc: Mapping[str, Any], *, environ: Mapping[str, str] | None = None) -> Config:
        """A Config from flag values or a parsed file; ConfigError names the first bad value.

        Keys are the long flags' names (`port`, `host`, `proto`, `netns`,
        `iface`, `reason`, `count`, `duration`, `stack`, `json`, `nftrace`,
        `nf_probes`, `trace_rate`, `verdict_wait`, `scan_interval`,
        `bpf_object`, `libbpf`, `log_level`, `summary_interval`, `max_rate`,
        `every_drop`, `conntrack_threshold`); a missing or None value takes
        the environment's default (see `environment_defaults`), then the
        built-in one. An unknown key is an error, so a typo never passes
        unnoticed.
        """
        known = {"port", "host", "proto", "netns", "iface", "reason", "nf_probes"} | {
            f.name for f in fields(cls) if f.name not in ("scope", "nf_mode")}
        unknown = sorted(set(doc) - known)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}")
        values = {**environment_defaults(environ), **{k: v for k, v in doc.items() if v is not None}}
        try:
            scope = Scope(
                ports=port_list("--port", _as_list(values.get("port"))),
                hosts=host_networks(split_items("--host", _as_list(values.get("host")))),
                proto=values.get("proto"),
                netns=values.get("netns"),
                iface=values.get("iface"),
                reasons=tuple(split_items("--reason", _as_list(values.get("reason")))),
            )
        except ConfigError:
            raise
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        probes = values.pop("nf_probes", "auto")
        if probes not in NF_PROBES:
            raise ConfigError(f"nf_probes: {probes!r} is not one of {', '.join(NF_PROBES)}")
        rest = {k: v for k, v in values.items() if k in {f.name for f in fields(cls)}}
        return cls(scope=scope, nf_mode=None if probes == "none" else probes, **rest)


def _seconds_or_zero(value: Any) -> float:
    return 0.0 if value in (0, "0") else float(positive_number(value, float, MAX_TIMEOUT))


def _boolean(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    raise ConfigError(f"{value!r} is not true or false")


def _as_list(value: Any) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, (str, int)):
        return [value]
    if isinstance(value, Sequence):
        return list(value)
    raise ConfigError(f"{value!r} is not a value or a list of values")
