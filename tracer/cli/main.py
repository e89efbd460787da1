"""The `tracer` command line."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import resource
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import structlog

from tracer import __version__
from tracer import log as logsetup
from tracer.config import (
    MAX_RATE_DEFAULT,
    MAX_RATE_MAX,
    MAX_TIMEOUT,
    SUMMARY_INTERVAL_DEFAULT,
    TRACE_RATE_MAX,
    Config,
    ConfigError,
    count_at_least_zero,
    environment_defaults,
    port_list,
    port_number,
    positive_number,
)
from tracer.log import say

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

#: After SIGINT/SIGTERM: seconds until stdout gives up, until stderr gives up. The
#: whole exit (engine stop, marking tables removed, report) stays within 2 s.
STDOUT_GRACE, STDERR_GRACE = 0.8, 1.2
#: After a normal stop (--count, --duration): how long a live reader gets for the rest.
DRAIN_TIMEOUT = 2.0


class UsageError(Exception):
    """Bad flags or values: exit code 2 with the message."""


class RunError(Exception):
    """The host cannot do what was asked (privileges, kernel): exit code 1 with the message."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are one line (no usage dump) and never echo control characters."""

    def error(self, message: str) -> NoReturn:
        say(f"{self.prog}: error: {message} (see `{self.prog} --help`)")
        sys.exit(EXIT_USAGE)

    def parse_known_args(self, args=None, namespace=None):
        # argparse (3.11) deletes a "--" value given as `--flag=--`, leaving the
        # flag an empty list or unset; no flag takes "--", so say so here.
        for arg in sys.argv[1:] if args is None else args:
            if isinstance(arg, str) and arg.startswith("--") and arg.endswith("=--"):
                self.error(f"argument {arg[:-3]}: '--' is not a value")
        return super().parse_known_args(args, namespace)


def _arg(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type from one of tracer.config's value parsers (one check per kind of value)."""
    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _positive(kind: type[int] | type[float], maximum: float | None = None) -> Callable[[str], Any]:
    return _arg(lambda text: positive_number(text, kind, maximum))


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="tracer",
        description="Which packet was dropped, where in the kernel, by which firewall rule, "
                    "in which conntrack state, and why.")
    p.add_argument("--version", action="version", version=f"tracer {__version__}")
    p.add_argument("--log-level", default=None, help="debug, info, warning (default) or error")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    w = sub.add_parser("watch", help="print every dropped packet as it happens",
                       description="Print every dropped packet: kernel drop reason, netfilter "
                                   "hook/table/chain/rule and conntrack state.")
    w.add_argument("--port", action="append", metavar="N[,N...]",
                   help="only packets from or to these ports (TCP, UDP, SCTP)")
    w.add_argument("--host", action="append", metavar="ADDR|CIDR",
                   help="only packets from or to this address or network")
    w.add_argument("--proto", help="only this protocol: tcp, udp, icmp, icmpv6, sctp, "
                                   "a name from /etc/protocols, or a number 0-255")
    w.add_argument("--netns", help="only this network namespace: its `ip netns` name (followed, "
                                   "waited for if absent) or the inode of a live one")
    w.add_argument("--iface", help="only packets on this interface")
    w.add_argument("--reason", action="append", metavar="NAME[,NAME...]",
                   help="only these kernel drop reasons (e.g. NETFILTER_DROP,NO_SOCKET)")
    w.add_argument("--count", type=_positive(int), help="exit after N events")
    w.add_argument("--duration", type=_positive(float), metavar="S", help="exit after S seconds")
    w.add_argument("--stack", action="store_true", help="include the kernel stack")
    w.add_argument("--json", action="store_true", help="NDJSON (the default when stdout is not a terminal)")
    w.add_argument("--no-nftrace", dest="nftrace", action="store_false",
                   help="do not add the tracer's nftrace marking table (rule text will be missing)")
    w.add_argument("--nf-probes", choices=("auto", "fentry", "kprobe", "none"), default="auto",
                   help="netfilter context probes (default: the best the kernel allows)")
    w.add_argument("--trace-rate", type=_positive(int, TRACE_RATE_MAX), default=None, metavar="N",
                   help="nftrace marking limit in packets per second per namespace (default 1000)")
    w.add_argument("--summary-interval", type=_positive(float, MAX_TIMEOUT), default=None, metavar="SECONDS",
                   help="repeated drops are counted in the kernel and reported as one summary per flow "
                        f"this often (default {SUMMARY_INTERVAL_DEFAULT:g})")
    w.add_argument("--every-drop", action="store_true", default=None,
                   help="one event per drop, not a flow's first and then summaries (still at most "
                        "--max-rate a second; the rest are counted in summaries)")
    w.add_argument("--max-rate", type=_positive(int, MAX_RATE_MAX), default=None, metavar="N",
                   help=f"at most N events a second (default {MAX_RATE_DEFAULT}); first drops beyond it "
                        "are counted in the summaries instead")

    r = sub.add_parser("run", help="the service: watch and feed the outputs of a configuration file",
                       description="Run as a service (systemd/tracer.service): the [watch] filters, the "
                                   "[[output]] tables (file, syslog, journald, Elasticsearch, Splunk HEC), "
                                   "a spool for outputs that are down, and metrics. SIGHUP reloads, SIGTERM "
                                   "stops. Exit 2 on a bad configuration.")
    r.add_argument("--config", default="/etc/tracer/tracer.toml", metavar="FILE",
                   help="the TOML configuration (default /etc/tracer/tracer.toml; example: systemd/tracer.toml)")
    r.add_argument("--check-config", action="store_true", help="check the configuration and exit (0 if good)")

    d = sub.add_parser("doctor", help="check what this kernel and host allow")
    d.add_argument("--json", action="store_true", help="machine-readable report")
    d.add_argument("--reasons", action="store_true",
                   help="list this kernel's drop reasons and what each means (instead of the checks)")

    pr = sub.add_parser("probe", help="is a port open, closed, filtered, prohibited or unreachable?",
                        description="Send marked probes (scapy) and classify each target; with "
                                    "--explain, name the rule on this host that dropped a probe.")
    pr.add_argument("host", help="address or name to probe")
    pr.add_argument("--port", action="append", metavar="N[,N...]", help="ports to probe (tcp, udp)")
    pr.add_argument("--proto", choices=("tcp", "udp", "icmp"), default=None,
                    help="protocol (default: tcp with --port, icmp without)")
    pr.add_argument("-6", dest="v6", action="store_true", help="use IPv6 when HOST is a name")
    pr.add_argument("--explain", action="store_true",
                    help="watch this host's drops during the probe and name the rule that dropped it")
    pr.add_argument("--timeout", type=_positive(float, MAX_TIMEOUT), default=1.0, metavar="S",
                    help="seconds to wait for an answer (default 1)")
    pr.add_argument("--retries", type=_arg(count_at_least_zero), default=2, metavar="N",
                    help="resends before 'filtered' (default 2)")
    pr.add_argument("--json", action="store_true", help="one JSON object per target")
    pr.add_argument("--netns", metavar="NAME", default=None,
                    help="probe from inside this `ip netns` namespace (no `ip netns exec` needed)")
    pr.add_argument("--no-answer-check", dest="answer_check", action="store_false",
                    help="trust the raw socket: do not load BPF to check that this host lets each answer in "
                         "(faster; an answer this host's firewall drops then shows as OPEN)")

    pm = sub.add_parser("pmtu", help="path MTU to a host, and ICMP black holes",
                        description="Binary search of the path MTU with DF probes (ICMP echo, or TCP "
                                    "SYNs where echo is blocked); detects ICMP black holes.")
    pm.add_argument("host", help="address or name")
    pm.add_argument("--port", type=_arg(port_number), default=443, help="TCP port for TCP probes (default 443)")
    pm.add_argument("--proto", choices=("auto", "icmp", "tcp"), default="auto",
                    help="probe with ICMP echo, TCP SYN, or ICMP then TCP (default)")
    pm.add_argument("-6", dest="v6", action="store_true", help="use IPv6 when HOST is a name")
    pm.add_argument("--timeout", type=_positive(float, MAX_TIMEOUT), default=0.5, metavar="S",
                    help="seconds to wait per probe (default 0.5)")
    pm.add_argument("--json", action="store_true", help="a JSON object")
    pm.add_argument("--netns", metavar="NAME", default=None,
                    help="probe from inside this `ip netns` namespace (no `ip netns exec` needed)")

    dg = sub.add_parser("diagnose", help="why does a connection fail, and what to change: checks, a watch, a report",
                        description="Checks this host's rulesets, conntrack, forwarding and sockets for PORT, "
                        "watches the drops for --duration seconds (connecting to HOST meanwhile when given) "
                        "and reports each cause with its evidence and fix. Exit 0: nothing wrong; 1: a cause "
                        "was found; 2: usage error.")
    dg.add_argument("host", nargs="?", default=None, help="address or name to connect to (optional)")
    dg.add_argument("--port", type=_arg(port_number), required=True, help="the port that fails")
    dg.add_argument("--proto", choices=("tcp", "udp", "sctp"), default="tcp", help="its protocol (default tcp)")
    dg.add_argument("--duration", type=_positive(float, MAX_TIMEOUT), default=8.0, metavar="S",
                    help="seconds to watch (default 8)")
    dg.add_argument("--netns", default=None, help="connect from this network namespace (`ip netns` name)")
    dg.add_argument("-6", dest="v6", action="store_true", help="use IPv6 when HOST is a name")
    dg.add_argument("--json", action="store_true", help="the report as one JSON object (docs/diagnose-report.md)")

    demo = sub.add_parser("demo", help="build a lab with broken firewalls and show the drops")
    demo.add_argument("--json", action="store_true", help="print events as NDJSON")
    demo.add_argument("--probes", action="store_true",
                      help="instead: a routed lab where `tracer probe` and `tracer pmtu` meet each case")
    return p


class _Signals:
    """SIGINT, SIGTERM and SIGHUP during a watch: stop, and bound the time left to exit.

    The Python handler only notes the time. The kernel-level wakeup byte
    (signal.set_wakeup_fd) wakes a thread that stops the engine and hurries
    the output: a Python handler runs in the middle of whatever the main
    thread was doing, possibly holding the very lock engine.stop() takes.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    #: When the last watch got its first signal (main() bounds its stderr wait by it).
    latest: float | None = None

    def __init__(self) -> None:
        self.at: float | None = None
        self.output_error: str | None = None
        self._lock = threading.Lock()
        self._fired = False
        self._engine = None
        self._sink = None
        self._r, self._w = socket.socketpair()
        self._w.setblocking(False)  # our own socket: set_wakeup_fd wants it non-blocking
        self._old_fd = signal.set_wakeup_fd(self._w.fileno(), warn_on_full_buffer=False)
        self._old = {sig: signal.signal(sig, self._note) for sig in self.SIGNALS}
        threading.Thread(target=self._wait, name="signals", daemon=True).start()

    def _note(self, signum, frame) -> None:
        if self.at is None:
            self.at = _Signals.latest = time.monotonic()

    def _wait(self) -> None:
        wanted = {int(s) for s in self.SIGNALS}
        while True:
            try:
                data = self._r.recv(64)
            except OSError:
                return
            if not data:
                return  # restore() closed the pair
            if wanted.intersection(data):
                self._stop_all()

    def _stop_all(self) -> None:
        if self.at is None:
            self.at = _Signals.latest = time.monotonic()
        with self._lock:
            self._fired = True
            engine, sink = self._engine, self._sink
        if engine is not None:
            engine.stop()
        if sink is not None:
            sink.hurry(self.stdout_timeout())

    def attach(self, engine, sink) -> None:
        """From now on a signal stops this engine; one that came already stops it now."""
        with self._lock:
            self._engine, self._sink = engine, sink
            fired = self._fired
        if fired:
            engine.stop()
            sink.hurry(self.stdout_timeout())

    @property
    def stopping(self) -> bool:
        return self.at is not None or self._fired

    def output_failed(self, why: str) -> None:
        """The writer thread found stdout unusable (its reader left): stop watching."""
        self.output_error = why
        with self._lock:
            engine = self._engine
        if engine is not None:
            engine.stop()

    def stdout_timeout(self) -> float:
        if self.at is None:
            return DRAIN_TIMEOUT
        return max(0.0, self.at + STDOUT_GRACE - time.monotonic())

    def restore(self) -> None:
        signal.set_wakeup_fd(self._old_fd)
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._w.close()
        self._r.close()


def _watch_config(args: argparse.Namespace) -> Config:
    """The configuration from the flags alone (nothing on the host is looked at); UsageError if bad."""
    try:
        return Config.from_mapping({
            "port": args.port, "host": args.host, "proto": args.proto, "netns": args.netns,
            "iface": args.iface, "reason": args.reason, "count": args.count, "duration": args.duration,
            "stack": args.stack, "json": args.json, "nftrace": args.nftrace, "nf_probes": args.nf_probes,
            "trace_rate": args.trace_rate, "log_level": args.log_level,
            "summary_interval": args.summary_interval, "max_rate": args.max_rate,
            "every_drop": args.every_drop,
        })
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _watch_checks(args: argparse.Namespace, config: Config):
    """What the flags mean on this host, checked before anything is changed.

    Returns the warnings to print and the --netns choice (None without the flag).
    """
    from tracer import netns as netnsmod
    from tracer.cli import preflight

    warnings: list[str] = []
    filt = config.scope
    if not args.nftrace and args.trace_rate is not None:
        warnings.append("--trace-rate has no effect with --no-nftrace (no packet is marked for tracing)")
    try:
        if filt.reasons:
            from tracer.sources.drop import DropReasons

            try:
                known = DropReasons().by_name
            except OSError:
                known = None  # no readable BTF: the engine's start says why
            if known is not None:
                warnings += preflight.check_reasons(filt.reasons, known)
        preflight.require_watch_privileges()
        namespaces = netnsmod.discover()
        choice = preflight.check_netns(filt.netns, namespaces) if filt.netns is not None else None
        if filt.iface is not None and not (choice and choice.waiting):
            watched = [choice.present] if choice and choice.present else list(namespaces.values())
            warning = preflight.check_iface(filt.iface, watched)
            if warning:
                warnings.append(warning)
        if args.nf_probes in ("fentry", "kprobe"):
            preflight.check_nf_probes(args.nf_probes)
    except preflight.FlagError as exc:
        raise UsageError(str(exc)) from None
    except preflight.CannotRun as exc:
        raise RunError(str(exc)) from None
    return warnings, choice


def _wait_for_netns(name: str, signals: _Signals, deadline: float | None) -> bool:
    """Until a namespace of that name exists: True; False on a signal or at the deadline."""
    from tracer import netns as netnsmod
    from tracer.cli import preflight

    path = os.path.join(netnsmod.NETNS_RUN_DIR, name)
    while not signals.stopping and (deadline is None or time.monotonic() < deadline):
        if os.path.exists(path) and preflight.named(name, netnsmod.discover()) is not None:
            return True
        time.sleep(0.2)
    return False


#: Descriptors a watch may hold: a few per watched namespace (nftrace, marking, ruleset
#: sockets), so the soft limit of 1024 would stop it at about 300 namespaces.
NOFILE_WANTED = 1 << 16


def _raise_nofile_limit() -> None:
    """Raises this process's soft RLIMIT_NOFILE towards the hard limit (never above it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = NOFILE_WANTED if hard == resource.RLIM_INFINITY else min(hard, NOFILE_WANTED)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _watch(args: argparse.Namespace) -> int:
    from tracer.outputs.base import undelivered_line
    from tracer.outputs.stdout import choose
    from tracer.pipeline.engine import Engine

    began = time.monotonic()
    config = _watch_config(args)
    warnings, choice = _watch_checks(args, config)
    _raise_nofile_limit()
    for warning in warnings:
        say(f"tracer: warning: {warning}")
    signals = _Signals()
    try:
        duration = args.duration
        if choice is not None and choice.waiting:
            say(f"tracer: warning: --netns {args.netns!r}: no network namespace by that name yet; "
                "waiting for it to appear")
            deadline = None if duration is None else began + duration
            if not _wait_for_netns(args.netns, signals, deadline):
                return EXIT_OK
            if duration is not None:
                duration = max(0.001, began + duration - time.monotonic())
        if signals.stopping:
            return EXIT_OK
        if duration != config.duration:
            config = dataclasses.replace(config, duration=duration)
        sink = choose(config.json, config.stack, on_error=signals.output_failed)
        try:
            engine = Engine(config, sink)
        except ValueError as exc:
            sink.close(0)
            raise UsageError(str(exc)) from None
        signals.attach(engine, sink)
        try:
            engine.start()
            mode = args.nf_probes
            if mode in ("fentry", "kprobe") and engine.tracer is not None and engine.tracer.nf_mode != mode:
                # The preflight loaded them; the real load fell back (a hook module went away).
                raise RunError(f"--nf-probes {mode}: the kernel refused the netfilter programs at load")
        except ValueError as exc:
            engine.close()
            sink.close(0)
            raise UsageError(str(exc)) from None
        except BaseException:
            engine.close()
            sink.close(0)
            raise
        if sys.stderr.isatty():
            say(f"tracer: {engine.describe()} (Ctrl-C to stop)")
        try:
            engine.run()  # removes the marking tables when it ends, however it ends
        finally:
            delivery = sink.close(signals.stdout_timeout())
        line = undelivered_line(delivery, "stdout")
        if line:
            say(f"tracer: {line}")
        return EXIT_FAIL if signals.output_error is not None else EXIT_OK
    finally:
        signals.restore()


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from tracer.cli import preflight
    from tracer.service import daemon

    path = Path(args.config)
    try:
        if args.check_config:
            cfg = daemon.check(path)
            names = ", ".join(f"{o.name} ({o.type})" for o in cfg.outputs)
            say(f"tracer: {path}: configuration is valid; outputs: {names}")
            return EXIT_OK
        return daemon.run(path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None
    except preflight.CannotRun as exc:
        raise RunError(str(exc)) from None


def _stderr_timeout() -> float:
    """What is left for stderr: a signal's 2 s budget, else a second."""
    if _Signals.latest is None:
        return 1.0
    return max(0.05, _Signals.latest + STDERR_GRACE - time.monotonic())


def _thread_failed(args: threading.ExceptHookArgs) -> None:
    """A thread's uncaught exception: one line for the user, the traceback at debug level."""
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    structlog.get_logger("tracer").debug("thread failed", thread=name,
                                         exc_info=(args.exc_type, args.exc_value, args.exc_traceback))
    say(f"tracer: internal error in thread {name}: {args.exc_type.__name__}: {args.exc_value}")


def _use_environment(env: dict[str, Any]) -> None:
    """Process-wide choices from the environment (the BPF object, libbpf), for every command:
    doctor, demo and probe --explain load BPF too, not only watch."""
    if "bpf_object" in env or "libbpf" in env:
        from pathlib import Path

        from tracer.bpf import libbpf, loader

        if "bpf_object" in env:
            loader.use_object(Path(env["bpf_object"]))
        if "libbpf" in env:
            libbpf.use_library(env["libbpf"])


def main(argv: Sequence[str] | None = None) -> int:
    """Runs one command; every failure becomes a one-line message and an exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a bad flag (already said)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        env = environment_defaults()
        logsetup.configure(args.log_level or env.get("log_level"), nonblocking=args.command in ("watch", "run"))
        _use_environment(env)
    except ValueError as exc:
        say(f"tracer: error: {exc}")
        return EXIT_USAGE
    previous_hook, threading.excepthook = threading.excepthook, _thread_failed
    try:
        return _command(args)
    finally:
        threading.excepthook = previous_hook
        logsetup.close(_stderr_timeout())


def _probe_ports(values: list[str] | None) -> tuple[int, ...]:
    try:
        return port_list("--port", values)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _command(args: argparse.Namespace) -> int:
    log = structlog.get_logger("tracer")
    try:
        if args.command == "watch":
            return _watch(args)
        if args.command == "run":
            return _run(args)
        if args.command == "doctor":
            from tracer.cli.doctor import run as doctor

            return doctor(json_out=args.json, reasons=args.reasons)
        if args.command == "probe":
            from tracer.cli.probe import run_probe

            return run_probe(args, _probe_ports(args.port))
        if args.command == "pmtu":
            from tracer.cli.probe import run_pmtu

            return run_pmtu(args)
        if args.command == "diagnose":
            from tracer.cli.diagnose import run_diagnose

            return run_diagnose(args)
        if args.command == "demo":
            from tracer.cli import demo

            return demo.run_probes() if args.probes else demo.run(json_out=args.json)
    except UsageError as exc:
        say(f"tracer: error: {exc}")
        return EXIT_USAGE
    except RunError as exc:
        say(f"tracer: error: {exc}")
        return EXIT_FAIL
    except PermissionError as exc:
        log.debug("failed", exc_info=True)
        say(f"tracer: {exc}")
        say("tracer: run as root (CAP_BPF, CAP_PERFMON, CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_SYS_PTRACE, CAP_SYSLOG)")
        return EXIT_FAIL
    except OSError as exc:
        log.debug("failed", exc_info=True)
        say(f"tracer: {exc}")
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: the user gets one line, --log-level debug the traceback
        log.debug("internal error", exc_info=True)
        say(f"tracer: internal error: {type(exc).__name__}: {exc} (run with --log-level debug for details)")
        return EXIT_FAIL
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
