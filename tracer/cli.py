"""The `tracer` command line."""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

import structlog

from . import __version__
from . import log as logsetup

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """Bad flags or values: exit code 2 with the message."""


def _split(values: list[str] | None) -> list[str]:
    """`--port 80 --port 443,8443` -> ['80', '443', '8443']."""
    out: list[str] = []
    for v in values or []:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return out


def _ports(values: list[str] | None) -> tuple[int, ...]:
    ports = []
    for v in _split(values):
        if not v.isdigit() or not 0 < int(v) < 65536:
            raise UsageError(f"--port {v!r}: a port is a number from 1 to 65535")
        ports.append(int(v))
    return tuple(dict.fromkeys(ports))


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be greater than 0")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
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
    w.add_argument("--proto", help="only this protocol: tcp, udp, icmp, icmpv6, sctp or a number")
    w.add_argument("--netns", help="only this network namespace: ip netns name, inode or path")
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
    w.add_argument("--trace-rate", type=_positive(int), default=1000, metavar="N",
                   help="nftrace marking limit in packets per second per namespace (default 1000)")

    d = sub.add_parser("doctor", help="check what this kernel and host allow")
    d.add_argument("--json", action="store_true", help="machine-readable report")
    d.add_argument("--reasons", action="store_true", help="also list this kernel's drop reasons")

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
    pr.add_argument("--timeout", type=_positive(float), default=1.0, metavar="S",
                    help="seconds to wait for an answer (default 1)")
    pr.add_argument("--retries", type=int, default=2, metavar="N", help="resends before 'filtered' (default 2)")
    pr.add_argument("--json", action="store_true", help="one JSON object per target")

    pm = sub.add_parser("pmtu", help="path MTU to a host, and ICMP black holes",
                        description="Binary search of the path MTU with DF probes (ICMP echo, or TCP "
                                    "SYNs where echo is blocked); detects ICMP black holes.")
    pm.add_argument("host", help="address or name")
    pm.add_argument("--port", type=int, default=443, help="TCP port for TCP probes (default 443)")
    pm.add_argument("--proto", choices=("auto", "icmp", "tcp"), default="auto",
                    help="probe with ICMP echo, TCP SYN, or ICMP then TCP (default)")
    pm.add_argument("-6", dest="v6", action="store_true", help="use IPv6 when HOST is a name")
    pm.add_argument("--timeout", type=_positive(float), default=0.5, metavar="S",
                    help="seconds to wait per probe (default 0.5)")
    pm.add_argument("--json", action="store_true", help="a JSON object")

    demo = sub.add_parser("demo", help="build a lab with broken firewalls and show the drops")
    demo.add_argument("--json", action="store_true", help="print events as NDJSON")
    demo.add_argument("--probes", action="store_true",
                      help="instead: a routed lab where `tracer probe` and `tracer pmtu` meet each case")
    return p


def _watch(args: argparse.Namespace) -> int:
    from .bpf_filter import host_networks
    from .engine import Engine, WatchOptions
    from .filters import WatchFilter
    from .output import choose

    try:
        filt = WatchFilter(
            ports=_ports(args.port),
            hosts=host_networks(_split(args.host)),
            proto=args.proto,
            netns=args.netns,
            iface=args.iface,
            reasons=tuple(_split(args.reason)),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    opts = WatchOptions(
        filter=filt, count=args.count, duration=args.duration, stack=args.stack,
        nftrace=args.nftrace, nf_mode=None if args.nf_probes == "none" else args.nf_probes,
        trace_rate=args.trace_rate)
    try:
        engine = Engine(opts, choose(args.json, args.stack))
    except ValueError as exc:
        raise UsageError(str(exc)) from None

    def on_signal(signum, _frame):
        engine.stop()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        engine.start()
    except ValueError as exc:
        engine.close()
        raise UsageError(str(exc)) from None
    except BaseException:
        engine.close()
        raise
    if sys.stderr.isatty():
        print(f"tracer: {engine.describe()} (Ctrl-C to stop)", file=sys.stderr)
    engine.run()
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        logsetup.configure(args.log_level)
    except ValueError as exc:
        parser.error(str(exc))
    log = structlog.get_logger("tracer")
    try:
        if args.command == "watch":
            return _watch(args)
        if args.command == "doctor":
            from .doctor import run as doctor

            return doctor(json_out=args.json, reasons=args.reasons)
        if args.command == "probe":
            from .probe_cli import run_probe

            return run_probe(args, _ports(args.port))
        if args.command == "pmtu":
            from .probe_cli import run_pmtu

            return run_pmtu(args)
        if args.command == "demo":
            from . import demo

            return demo.run_probes() if args.probes else demo.run(json_out=args.json)
    except UsageError as exc:
        print(f"tracer: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except PermissionError as exc:
        print(f"tracer: {exc}\ntracer: run as root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)",
              file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        log.debug("failed", exc_info=True)
        print(f"tracer: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
