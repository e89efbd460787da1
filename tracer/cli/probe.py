"""The `tracer probe` and `tracer pmtu` commands: run, explain, print, exit code."""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from typing import TYPE_CHECKING

import orjson
import structlog

from tracer import netns
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

if TYPE_CHECKING:
    from tracer.probe.explain import LocalDrops

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


#: `ip netns` names: what `ip netns add` accepts, without a path separator or a leading dot or dash.
_NETNS_NAME = re.compile(r"^[A-Za-z0-9_@+][A-Za-z0-9_.@+-]{0,254}$")


class NetnsError(Exception):
    """--netns names no namespace we can enter (exit 2)."""


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Runs the body with this thread inside the `ip netns` namespace `name` (None: where it
    is), as `ip netns exec` would: sockets made there, and threads started there, stay there."""
    with ExitStack() as stack:
        if name is not None:
            if not _NETNS_NAME.match(name):
                raise NetnsError(f"--netns {name!r}: not a network namespace name (`ip netns list` shows them)")
            try:
                stack.enter_context(netns.entered(netns.by_name(name)))
            except netns.NetnsGone:
                raise NetnsError(f"--netns {name!r}: no such network namespace "
                                 "(`ip netns list` shows them)") from None
        yield


def _local_drops(addresses: list[str], explain: bool, check: bool) -> tuple[LocalDrops | None, str]:
    """The running engine for this probe run, or None and why there is none.

    --explain needs it (a failure is the command's); the answer check only
    wants it: without BPF the probe still runs and says its answers went unchecked.
    """
    from tracer.probe.explain import LocalDrops

    if not (explain or check):
        return None, "--no-answer-check"
    if not explain:
        try:
            preflight.require_watch_privileges()
        except preflight.CannotRun as exc:
            return None, str(exc)
    drops = LocalDrops(addresses)
    try:
        drops.start()
    except Exception as exc:
        # A half-started engine may have put its marking table in: take it out either way.
        with suppress(Exception):
            drops.engine.close()
        if explain:
            raise
        structlog.get_logger("tracer.probe").debug("answer check unavailable", exc_info=True)
        return None, f"the drop engine could not start ({exc})"
    return drops, ""


def probe_all(targets: list[Target], *, explain: bool, retries: int, timeout: float,
              check_answers: bool = True) -> list[ProbeResult]:
    """Probes each target in turn. Each answer's fate on this host comes from the drop engine
    (an answer this host's firewall drops makes `answer_dropped`); with `explain`, this host's
    drops of each probe are joined to it too."""
    from tracer.probe.explain import explain as add_explanation
    from tracer.probe.explain import judge

    wire = Wire(targets[0].version)
    try:
        # This host's own addresses too: an ICMP error from a router is addressed to them.
        addresses = sorted({t.ip for t in targets} | {a for t in targets if (a := wire.source_for(t.ip))})
        watch, unchecked = _local_drops(addresses, explain, check_answers)
        try:
            n = probemod.next_number()
            results = [probemod.probe_one(wire, target, (n + i) & 0xFFFF, retries=retries, timeout=timeout)
                       for i, target in enumerate(targets)]
            if watch is not None:
                watch.wait_fates([r.answer for r in results if r.answer is not None])
        finally:
            if watch is not None:
                watch.stop()
    finally:
        wire.close()
    for result in results:
        if watch is None:
            if result.answer is not None:
                result.answer_fate, result.answer_note = "unchecked", unchecked
            continue
        judge(result, watch)
        if explain:
            add_explanation(result, watch.drops([result.probe_id]))
    return results


def render_probe(r: ProbeResult) -> str:
    rtt = f"  {r.rtt_ms:.2f} ms" if r.rtt_ms is not None else ""
    who = ("  not sent" if r.responder == "local" else
           f"  from {r.responder}" if r.responder and r.responder != r.target.ip else "")
    verdict = r.verdict.upper().replace("_", " ")
    lines = [f"{r.target!s:<32} {verdict:<12}{rtt}{who}  [{r.probe_id}]", f"    {r.detail}"]
    if r.answer_fate == "unchecked" and r.answer_note and r.answer_note != "--no-answer-check":
        lines.append(f"    (not checked whether this host's firewall lets the answer in: {r.answer_note})")
    lines += [f"    -> {step}" for step in r.next_steps]
    return "\n".join(lines)


def run_probe(args: argparse.Namespace, ports: tuple[int, ...]) -> int:
    """`tracer probe`, inside --netns when given."""
    try:
        with in_netns(getattr(args, "netns", None)):
            return _run_probe(args, ports)
    except NetnsError as exc:
        return _fail(str(exc))


def _run_probe(args: argparse.Namespace, ports: tuple[int, ...]) -> int:
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
        results = probe_all(targets, explain=args.explain, retries=args.retries, timeout=args.timeout,
                            check_answers=getattr(args, "answer_check", True))
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
    """`tracer pmtu`, inside --netns when given."""
    try:
        with in_netns(getattr(args, "netns", None)):
            return _run_pmtu(args)
    except NetnsError as exc:
        return _fail(str(exc))


def _run_pmtu(args: argparse.Namespace) -> int:
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
