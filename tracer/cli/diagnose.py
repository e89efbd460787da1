"""The `tracer diagnose [HOST] --port N` command: checks, a watch with connection attempts, a report.

Exit codes: 0 when nothing is wrong, 1 when a cause was found (or the host
cannot run the watch), 2 for usage errors, as `tracer watch` does.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import socket
import sys
import threading
import time
from typing import Any

import orjson

from tracer import netns as netnsmod
from tracer.cli import preflight
from tracer.config import Config, Scope
from tracer.diagnosis import host
from tracer.diagnosis.report import Check, Finding, Report, Target, local_checks
from tracer.event.model import DropEvent
from tracer.event.rendered import Rendered
from tracer.event.text import printable
from tracer.log import say

EXIT_OK, EXIT_FOUND, EXIT_USAGE = 0, 1, 2


class _Collect:
    """The engine's sink: keeps the drop events (the watch is short and filtered to one port)."""

    def __init__(self) -> None:
        self.events: list[DropEvent] = []
        self.others: list[Any] = []
        self._lock = threading.Lock()

    def submit(self, rendered: Rendered) -> None:
        with self._lock:
            if isinstance(rendered.event, DropEvent):
                self.events.append(rendered.event)
            else:
                self.others.append(rendered.event)


def _target(args: argparse.Namespace) -> Target:
    host = args.host
    if host is not None:
        try:
            host = str(ipaddress.ip_address(host))
        except ValueError:
            try:
                host = socket.getaddrinfo(host, None, socket.AF_INET6 if args.v6 else socket.AF_INET)[0][4][0]
            except (OSError, UnicodeError):
                raise ValueError(f"{printable(args.host)}: not an address, and the name does not resolve") \
                    from None
    return Target(port=args.port, proto=args.proto, host=host, netns=args.netns)


def _attempt(target: Target, ns: netnsmod.Netns | None, timeout: float) -> str:
    """One real connection from `ns` with the kernel's own stack: connected, refused or timeout."""
    assert target.host is not None
    family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
    kind = socket.SOCK_STREAM if target.proto == "tcp" else socket.SOCK_DGRAM
    with netnsmod.entered(ns) if ns is not None else contextlib.nullcontext():
        sock = socket.socket(family, kind)
    try:
        sock.settimeout(timeout)
        if kind == socket.SOCK_DGRAM:
            sock.connect((target.host, target.port))
            sock.send(b"tracer diagnose")
            try:
                sock.recv(1)
                return "connected"
            except TimeoutError:
                return "timeout"
            except ConnectionRefusedError:
                return "refused"
        try:
            sock.connect((target.host, target.port))
            return "connected"
        except TimeoutError:
            return "timeout"
        except ConnectionRefusedError:
            return "refused"
        except OSError as exc:
            if exc.errno in (errno.EHOSTUNREACH, errno.ENETUNREACH):
                return "unreachable"
            return f"error: {exc.strerror}"
    finally:
        sock.close()


def run_diagnose(args: argparse.Namespace) -> int:
    try:
        target = _target(args)
    except ValueError as exc:
        say(f"tracer: error: {exc}")
        return EXIT_USAGE
    client: netnsmod.Netns | None = None
    if args.netns is not None:
        try:
            client = netnsmod.by_name(args.netns)
        except (OSError, ValueError):
            say(f"tracer: error: --netns {printable(args.netns)}: no network namespace by that name")
            return EXIT_USAGE
    try:
        preflight.require_watch_privileges()
    except preflight.CannotRun as exc:
        say(f"tracer: error: {exc}")
        return EXIT_FOUND
    report = diagnose(target, client, args.duration)
    if args.json:
        sys.stdout.buffer.write(orjson.dumps(report.to_json()) + b"\n")
    else:
        print(report.text())
    sys.stdout.flush()
    return report.exit_code


def diagnose(target: Target, client: netnsmod.Netns | None, duration: float) -> Report:
    """The whole run: checks, counters before, a watch with attempts, counters after, the report."""
    from tracer.pipeline.engine import Engine

    report = Report(target, duration)
    namespaces = list(netnsmod.discover().values())
    local_checks(report, namespaces)
    counters = _counters(namespaces)
    sink = _Collect()
    scope = Scope(ports=(target.port,), proto=target.proto)
    engine = Engine(Config(scope=scope, duration=duration), sink)
    engine.start()
    thread = threading.Thread(target=engine.run, name="diagnose-watch", daemon=True)
    thread.start()
    began = time.monotonic()
    try:
        if target.host is not None:
            outcomes: list[str] = []
            while time.monotonic() - began < max(0.5, duration - 1.5) and len(outcomes) < 3:
                outcomes.append(_attempt(target, client, min(2.0, max(0.5, duration / 4))))
                if outcomes[-1] == "connected":
                    break
            report.probe = {"attempts": outcomes, "verdict": outcomes[-1] if outcomes else "not sent",
                            "detail": f"{len(outcomes)} connection attempt(s) from "
                                      f"{client.label if client else 'this namespace'}: {', '.join(outcomes)}"}
        thread.join(timeout=max(0.0, duration - (time.monotonic() - began)) + 5)
    finally:
        engine.stop()
        thread.join(timeout=10)
    report.drops = len(sink.events)
    for event in sink.events:
        d = event.diagnosis
        if d is None:
            continue
        ns = event.netns.name if event.netns is not None else None
        count = event.summary.count if event.summary is not None else 1
        report.add(Finding(d.cause, d.summary, d.fix, d.evidence, ns, "drops", count))
    if counters is not None:
        _counter_findings(report, counters, namespaces, client)
    if target.host is not None and report.probe is not None and report.probe["verdict"] == "connected" \
            and not report.findings:
        report.checks.append(_connected_check(report))
    return report


def _connected_check(report: Report) -> Check:
    return Check("probe", report.target.netns, True, f"a {report.target.proto} connection to "
                 f"{report.target.host} port {report.target.port} succeeded")


def _counters(namespaces: list[netnsmod.Netns]) -> Any:
    """Each namespace's counters before the watch; None when the counters module cannot read them."""
    try:
        from tracer.collectors import counters
    except ImportError:
        return None
    before = {}
    for ns in namespaces:
        try:
            before[ns.inode] = counters.snapshot(ns)
        except OSError:  # the namespace vanished meanwhile
            continue
    return before


def _no_route_back(report: Report, server: netnsmod.Netns, namespaces: list[netnsmod.Netns], counter: str,
                   delta: int, client: netnsmod.Netns | None) -> Finding:
    """A no_route finding from a counter: where it rose and, when the client is known, the fix."""
    from tracer.diagnosis.report import return_path_fixes

    label = host.label_of(server)
    evidence = [f"{counter} rose by {delta} in {host.where(server)}: these packets never reach kfree_skb"]
    commands: list[str] = []
    target = report.target.host
    if target is not None:
        route = host.route_to(client, target)
        source = route.source if isinstance(route, host.Route) else None
        if source is not None:
            back = host.route_to(server, source)
            if back is False:
                evidence.append(f"{host.where(server)} has no route back to {source}")
            found = return_path_fixes(server, source, target, namespaces)
            commands = [c for c in found if not c.startswith("or")]
            evidence += [c for c in found if c.startswith("or")]
    return Finding("no_route", f"{host.where(server)} could not route {delta} packet(s) out: a reply with no "
                   "route back (masquerade missing on the router, or a wrong return route)",
                   tuple(commands), tuple(evidence), label, "counters", delta)




def _counter_findings(report: Report, before: dict[int, Any], namespaces: list[netnsmod.Netns],
                      client: netnsmod.Netns | None) -> None:
    from tracer.collectors import counters

    for ns in namespaces:
        if ns.inode not in before:
            continue
        try:
            after = counters.snapshot(ns)
        except OSError:
            continue
        for inc in counters.increases(before[ns.inode], after):
            report.counters.append({"netns": ns.label, "counter": inc.name, "delta": inc.delta,
                                    "meaning": inc.meaning})
            if inc.name in ("IpOutNoRoutes", "Ip6OutNoRoutes"):  # the reply with no route back
                report.add(_no_route_back(report, ns, namespaces, inc.name, inc.delta, client))
