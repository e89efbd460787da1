"""The `tracer probe` and `tracer pmtu` commands: run, explain, print, exit code."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext

import orjson

from tracer.cli import preflight
from tracer.log import say
from tracer.probe import pmtu as pmtumod
from tracer.probe import reach as probemod
from tracer.probe.reach import (
    ProbeError,
    ProbeResult,
    Target,
    Wire,
)

EXIT_OK, EXIT_NOT_OPEN, EXIT_USAGE = 0, 1, 2
#: The host cannot run the probe (no raw sockets): the same code as `watch` uses, not the bad-flag one.
EXIT_FAIL = 1


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    say(f"tracer: error: {message}")
    return code


def _probe_error(exc: ProbeError) -> int:
    """A refused raw socket is the host's limit (exit 1); anything else is the input's (exit 2)."""
    return _fail(str(exc), EXIT_FAIL if isinstance(exc.__cause__, PermissionError) else EXIT_USAGE)


def _privileges(explain: bool = False) -> int | None:
    """Exit 1 with the reason when this process cannot send probes (or watch, for --explain)."""
    try:
        preflight.require_raw_sockets()
        if explain:
            preflight.require_watch_privileges()
    except preflight.CannotRun as exc:
        return _fail(str(exc), EXIT_FAIL)
    return None


def probe_all(targets: list[Target], *, explain: bool, retries: int, timeout: float) -> list[ProbeResult]:
    """Probes each target in turn; with `explain`, joins this host's drops to each probe."""
    from tracer.probe.explain import LocalDrops
    from tracer.probe.explain import explain as add_explanation

    wire = Wire(targets[0].version)
    watch = LocalDrops(sorted({t.ip for t in targets})) if explain else nullcontext()
    try:
        with watch:
            n = probemod.next_number()
            results = []
            for i, target in enumerate(targets):
                results.append(probemod.probe_one(wire, target, (n + i) & 0xFFFF,
                                                  retries=retries, timeout=timeout))
    finally:
        wire.close()
    if isinstance(watch, LocalDrops):
        for result in results:
            add_explanation(result, watch.drops([result.probe_id]))
    return results


def render_probe(r: ProbeResult) -> str:
    rtt = f"  {r.rtt_ms:.2f} ms" if r.rtt_ms is not None else ""
    who = ("  not sent" if r.responder == "local" else
           f"  from {r.responder}" if r.responder and r.responder != r.target.ip else "")
    lines = [f"{r.target!s:<32} {r.verdict.upper():<12}{rtt}{who}  [{r.probe_id}]",
             f"    {r.detail}"]
    lines += [f"    -> {step}" for step in r.next_steps]
    return "\n".join(lines)


def run_probe(args: argparse.Namespace, ports: tuple[int, ...]) -> int:
    if args.retries < 0:
        return _fail("--retries must be 0 or more")
    protocol = args.proto or ("tcp" if ports else "icmp")
    if protocol == "icmp" and ports:
        return _fail("--port does not apply to --proto icmp")
    try:
        targets = probemod.targets(args.host, list(ports), protocol, args.v6)
    except ProbeError as exc:
        return _probe_error(exc)
    denied = _privileges(args.explain)
    if denied is not None:
        return denied
    try:
        results = probe_all(targets, explain=args.explain, retries=args.retries, timeout=args.timeout)
    except ProbeError as exc:
        return _probe_error(exc)
    for r in results:
        if args.json:
            sys.stdout.write(orjson.dumps(r.to_json()).decode() + "\n")
        else:
            print(render_probe(r))
    return EXIT_OK if all(r.verdict == "open" for r in results) else EXIT_NOT_OPEN


def render_pmtu(r: pmtumod.PmtuResult) -> str:
    lines = [(f"{r.target!s:<32} {r.verdict.upper().replace('_', ' ')}  path MTU "
              f"{r.path_mtu if r.path_mtu is not None else '?'} (interface {r.interface_mtu}, "
              f"route {r.route_mtu or '-'}; {len(r.steps)} probes via {r.method})"),
             f"    {r.detail}"]
    lines += [f"    -> {fix}" for fix in r.fix]
    return "\n".join(lines)


def run_pmtu(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        return _fail(f"--port {args.port}: a port is a number from 1 to 65535")
    try:
        ip = probemod.resolve(args.host, args.v6)
    except ProbeError as exc:
        return _probe_error(exc)
    denied = _privileges()
    if denied is not None:
        return denied
    try:
        wire = Wire(4 if ":" not in ip else 6)
    except ProbeError as exc:
        return _probe_error(exc)
    try:
        result: pmtumod.PmtuResult | None = None
        if args.proto in ("auto", "icmp"):
            result = pmtumod.discover(wire, Target(args.host, ip, "icmp"), timeout=args.timeout)
        if result is None or (result.path_mtu is None and args.proto == "auto"):
            result = pmtumod.discover(wire, Target(args.host, ip, "tcp", args.port), timeout=args.timeout)
    finally:
        wire.close()
    if args.json:
        sys.stdout.write(orjson.dumps(result.to_json()).decode() + "\n")
    else:
        print(render_pmtu(result))
    return EXIT_OK if result.verdict in ("ok", "reduced") else EXIT_NOT_OPEN
