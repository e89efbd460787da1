"""`tracer doctor`: what this kernel and host allow, and what to do about it.

Every check reports what it found and, when something stands in the way, one
line saying what to do. Program types are checked by actually loading and
attaching them (loader.probe), because config options do not tell whether
lockdown or a hardened sysctl refuses them.
"""

from __future__ import annotations

import gzip
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field

import orjson

OK, WARN, FAIL, INFO = "ok", "warn", "fail", "info"


@dataclass
class Check:
    name: str
    status: str
    detail: str
    fix: str | None = None


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)
    watch_possible: bool = True
    drop_program: str | None = None
    netfilter_probes: str | None = None

    def add(self, name: str, status: str, detail: str, fix: str | None = None) -> Check:
        check = Check(name, status, detail, fix)
        self.checks.append(check)
        return check


def kernel_config() -> dict[str, str]:
    """The running kernel's config, from /proc/config.gz or /boot."""
    for path in ("/proc/config.gz", f"/boot/config-{platform.release()}"):
        try:
            opener = gzip.open if path.endswith(".gz") else open
            with opener(path, "rt") as f:
                text = f.read()
        except OSError:
            continue
        return dict(re.findall(r"^(CONFIG_\w+)=(.*)$", text, re.M))
    return {}


def lockdown_mode(config: dict[str, str]) -> str | None:
    """none/integrity/confidentiality, or None when it cannot be told."""
    # The LSM's own answer (the selected mode in brackets), else the boot command line.
    for path, pattern in (("/sys/kernel/security/lockdown", r"\[(\w+)\]"), ("/proc/cmdline", r"\blockdown=(\w+)")):
        try:
            with open(path) as f:
                m = re.search(pattern, f.read())
        except OSError:
            continue
        if m:
            return m.group(1)
    for mode in ("CONFIDENTIALITY", "INTEGRITY"):
        if config.get(f"CONFIG_LOCK_DOWN_KERNEL_FORCE_{mode}") == "y":
            return mode.lower()
    if config.get("CONFIG_SECURITY_LOCKDOWN_LSM") != "y":
        return "none"
    return None


def _mounted(fstype: str) -> list[str]:
    with open("/proc/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2] == fstype]


def _check_privileges(r: Report) -> None:
    if os.geteuid() != 0:
        r.add("privileges", FAIL, f"running as uid {os.geteuid()}",
              "run as root (needs CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN and CAP_SYS_ADMIN)")
        r.watch_possible = False
    else:
        r.add("privileges", OK, "root")


def _check_kernel(r: Report, config: dict[str, str]) -> None:
    r.add("kernel", INFO, f"{platform.release()} ({platform.machine()})")
    if os.path.exists("/sys/kernel/btf/vmlinux"):
        r.add("btf", OK, "/sys/kernel/btf/vmlinux present (CO-RE works)")
    else:
        r.add("btf", FAIL, "/sys/kernel/btf/vmlinux missing",
              "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (all major distributions since 2021)")
        r.watch_possible = False
    mode = lockdown_mode(config)
    if mode in (None,):
        r.add("lockdown", INFO, "unknown (securityfs not mounted, no config)")
    elif mode == "none":
        r.add("lockdown", OK, "none")
    else:
        r.add("lockdown", WARN if mode == "integrity" else FAIL, mode,
              "lockdown refuses some tracing (fentry/kprobe may fail); tp_btf still works")
    kp = config.get("CONFIG_KPROBES")
    if kp is not None or config:
        r.add("config_kprobes", OK if kp == "y" else WARN,
              "CONFIG_KPROBES=y" if kp == "y" else "CONFIG_KPROBES is not set",
              None if kp == "y" else "kprobes unavailable: netfilter context needs fentry instead")
    tracefs = _mounted("tracefs")
    if tracefs:
        r.add("tracefs", OK, f"mounted at {tracefs[0]}")
    else:
        r.add("tracefs", INFO, "not mounted (only the classic tracepoint fallback needs it)",
              "mount -t tracefs nodev /sys/kernel/tracing")


def _check_kallsyms(r: Report) -> None:
    from tracer.bpf.kallsyms import Kallsyms, KallsymsError

    try:
        k = Kallsyms()
        r.add("kallsyms", OK, f"{len(k)} symbols readable")
    except (KallsymsError, OSError) as exc:
        r.add("kallsyms", FAIL, str(exc).splitlines()[0],
              "run as root with kernel.kptr_restrict <= 1 (sysctl -w kernel.kptr_restrict=1)")
        r.watch_possible = False


def _check_bpf(r: Report) -> None:
    from tracer.bpf import libbpf, loader

    try:
        L = libbpf.lib().lib
        L.libbpf_version_string.restype = __import__("ctypes").c_char_p
        r.add("libbpf", OK, f"libbpf {L.libbpf_version_string().decode()}")
        obj = loader.default_object_path()
        r.add("bpf_object", OK, str(obj))
    except (OSError, FileNotFoundError) as exc:
        r.add("bpf_object", FAIL, str(exc), "run `make -C bpf` (README: set-up)")
        r.watch_possible = False
        return
    if os.geteuid() != 0:
        return
    caps = loader.probe(obj, stop_at_first=False)
    for mode, res in caps.drop.items():
        name = f"prog_{mode}"
        if res.ok:
            r.add(name, OK, "kfree_skb program loads and attaches")
        else:
            fix = ("mount -t tracefs nodev /sys/kernel/tracing" if mode == "tracepoint" else None)
            r.add(name, INFO if caps.drop_mode else FAIL, f"refused: {res.error}", fix)
    r.drop_program = caps.drop_mode
    if caps.drop_mode is None:
        r.watch_possible = False
    for mode, res in caps.nf.items():
        name = f"prog_{mode}"
        if res.ok:
            r.add(name, OK, f"{mode} on nf_hook_slow loads and attaches")
        else:
            r.add(name, WARN if not caps.nf_mode else INFO, f"refused: {res.error}",
                  "netfilter context (table/base chain without nftrace, iptables-legacy table) "
                  "needs fentry or kprobes: a stock distribution kernel has both")
    r.netfilter_probes = caps.nf_mode
    r.add("netfilter_context", OK if caps.nf_mode else WARN,
          f"via {caps.nf_mode}" if caps.nf_mode else
          "none: hook from the stack, rules from nftrace only",
          None if caps.nf_mode else
          "nftables and iptables-nft rules are still named (nftrace); for the table of "
          "iptables-legacy drops, run on a kernel that allows fentry or kprobes")


def _root_ruleset():
    """The initial namespace's ruleset through libnftables in-process (no `nft` run, no text parsed)."""
    from tracer.netfilter.nftables import NftContext, NftError

    try:
        with NftContext() as ctx:
            return ctx.ruleset()
    except (OSError, NftError, ValueError):
        return None


def _check_firewalls(r: Report) -> None:
    from tracer.event.text import printable

    rs = _root_ruleset()
    tables = [] if rs is None else [f"{t.family} {t.name}" for t in rs.tables.values()]
    ours = [t for t in tables if t.split(" ", 1)[1].startswith("tracer_mark")]
    theirs = [printable(t) for t in tables if t not in ours]
    r.add("nftables", OK if rs is not None else WARN,
          f"{len(theirs)} table(s): {', '.join(theirs) or 'none'}",
          None if rs is not None else "apt-get install nftables libnftables1 (rule text needs libnftables)")
    legacy = []
    for family, names in (("ip", "/proc/net/ip_tables_names"), ("ip6", "/proc/net/ip6_tables_names")):
        try:
            with open(names) as f:
                legacy += [f"{family} {t}" for t in f.read().split()]
        except OSError:
            pass
    if legacy:
        r.add("iptables_legacy", WARN, f"legacy tables loaded: {', '.join(legacy)}",
              "rules of iptables-legacy are named only with fentry/kprobes; "
              "consider iptables-nft (update-alternatives --set iptables /usr/sbin/iptables-nft)")
    else:
        r.add("iptables_legacy", OK, "no legacy tables")
    names = " ".join([t.name for t in rs.tables.values()] + [c.name for c in rs.chains.values()]) if rs else ""
    extras = [name for name, marker in (("docker", "DOCKER"), ("kubernetes", "KUBE-"),
                                        ("firewalld", "firewalld")) if marker in names]
    if extras:
        r.add("managers", INFO, f"rules managed by: {', '.join(extras)}")
    if ours:
        r.add("leftovers", WARN, f"tracer marking table present: {', '.join(printable(t) for t in ours)}",
              "another tracer is running, or one crashed; it is removed at the next start")


def _check_conntrack(r: Report) -> None:
    from tracer.collectors.conntrack import table_fill

    fill = table_fill()
    if fill is None:
        r.add("conntrack", INFO, "not loaded in this namespace")
    elif fill.full:
        r.add("conntrack", FAIL, f"table full: {fill.count}/{fill.max}",
              "raise net.netfilter.nf_conntrack_max or find the flood (conntrack -S)")
    else:
        pct = 100 * fill.count / fill.max if fill.max else 0
        r.add("conntrack", WARN if pct > 80 else OK, f"{fill.count}/{fill.max} entries ({pct:.0f}%)",
              "raise net.netfilter.nf_conntrack_max before it fills" if pct > 80 else None)


def _check_collectors(r: Report) -> None:
    """What each collector says about running here (the same answer `tracer watch` acts on)."""
    from tracer.collectors.conntrack import ConntrackCollector
    from tracer.collectors.links import LinksCollector
    from tracer.collectors.neighbors import NeighborsCollector
    from tracer.collectors.netfilter import NftraceCollector, XtraceCollector
    from tracer.config import Config
    from tracer.netfilter.marking import MarkingCoordinator

    config = Config()
    marking = MarkingCoordinator()  # never started: only asked, nothing on the host changes
    xtrace = XtraceCollector(config, marking)
    for collector in (NftraceCollector(config, marking), xtrace, ConntrackCollector(), LinksCollector(),
                      NeighborsCollector()):
        why = collector.unavailable()
        if why is None:
            r.add(f"collector {collector.name}", OK, "can run")
        else:
            status, fix = _COLLECTOR_FIXES.get(collector.name, (WARN, None))
            r.add(f"collector {collector.name}", status, why, fix)


#: What to do when a collector cannot run, and how much it matters.
_COLLECTOR_FIXES = {
    "nftrace": (WARN, "apt-get install libnftables1 (rule text and nftrace verdicts need it)"),
    "xtrace": (WARN, "modprobe nfnetlink (iptables-legacy TRACE is read through it)"),
    "conntrack": (INFO, ("nothing to do: it loads with the first ruleset that uses `ct`; "
                        "`modprobe nf_conntrack` to see states from the start")),
}


def diagnose() -> Report:
    r = Report()
    config = kernel_config()
    _check_privileges(r)
    _check_kernel(r, config)
    _check_kallsyms(r)
    _check_bpf(r)
    _check_firewalls(r)
    _check_conntrack(r)
    _check_collectors(r)
    r.add("watch", OK if r.watch_possible else FAIL,
          f"`tracer watch` can run (drops via {r.drop_program}, netfilter context via "
          f"{r.netfilter_probes or 'stack + nftrace'})" if r.watch_possible else
          "`tracer watch` cannot run here: see the failures above")
    return r


_MARK = {OK: "ok  ", WARN: "warn", FAIL: "FAIL", INFO: "info"}


def render(r: Report) -> str:
    lines = []
    for c in r.checks:
        lines.append(f"[{_MARK[c.status]}] {c.name:<18} {c.detail}")
        if c.fix and c.status in (WARN, FAIL, INFO):
            lines.append(f"       {'':<18} -> {c.fix}")
    return "\n".join(lines)


def run(json_out: bool = False, reasons: bool = False) -> int:
    """The report (exit 1 when `tracer watch` cannot run here), or with `reasons` the drop reasons.

    Output goes to a reader that may stop reading (`| head`): a closed pipe ends the command
    quietly, with status 0, since the reader has all it asked for.
    """
    try:
        status = _reasons_run(json_out) if reasons else _report_run(json_out)
        sys.stdout.flush()  # here, where a closed pipe can still be caught, not at exit
    except BrokenPipeError:
        _silence_stdout()
        return 0
    return status


def _report_run(json_out: bool) -> int:
    import structlog

    structlog.get_logger("tracer.doctor").debug("doctor start")
    r = diagnose()
    if json_out:
        sys.stdout.write(orjson.dumps(asdict(r), option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render(r) + "\n")
    return 0 if r.watch_possible else 1


@dataclass(frozen=True)
class ReasonLine:
    """One drop reason of this kernel: its number here, its name, and what it means."""

    value: int
    name: str
    explanation: str | None  # None: tracer.event.reasons has no sentence for it


def reason_lines() -> list[ReasonLine]:
    """The running kernel's drop reasons (from BTF: numbers and names differ between kernels),
    each with its sentence, in the kernel's order."""
    from tracer.event.reasons import explain

    return [ReasonLine(value, name, explain(name)) for value, name in sorted(_reasons().items())]


#: What a reason the table does not know says instead of a sentence.
UNEXPLAINED = "(no sentence known; see the kernel's include/net/dropreason-core.h)"


def render_reasons(lines: list[ReasonLine]) -> str:
    width = max((len(line.name) for line in lines), default=0)
    return "\n".join(f"{line.value:>5}  {line.name:<{width}}  {line.explanation or UNEXPLAINED}" for line in lines)


def _reasons_run(json_out: bool) -> int:
    lines = reason_lines()
    if json_out:
        doc = {"drop_reasons": [asdict(line) for line in lines]}
        sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        sys.stdout.write(render_reasons(lines) + "\n")
    return 0


def _silence_stdout() -> None:
    """Points stdout at /dev/null, so the interpreter's last flush of what is still buffered
    finds no closed pipe (it would print "Exception ignored ... BrokenPipeError")."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    finally:
        os.close(devnull)


def _reasons() -> dict[int, str]:
    from tracer.sources.drop import DropReasons

    return DropReasons().by_value
