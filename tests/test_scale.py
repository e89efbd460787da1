"""A node with many namespaces: one `tracer watch` over 100 of them, each with a ruleset.

The 100th namespace's drop must come out with its rule, and the tracer must
stay small however many namespaces it watches: no threads per namespace (one
event loop reads every trace socket, tracer.loop), at most 12 threads and
150 MiB RSS. The tracer runs as the CLI, a process of its own, so the
threads and the memory counted are its own, not pytest's. How long it takes
is the bench's business (tests/bench, phase `scale`), not a test's.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from tests.manyns import DROP_PORT, DROP_RULE_TEXT, Farm
from tests.support import stop_process, tracer_cmd
from tracer import netns as netns_mod
from tracer.event.schema import validate

pytestmark = [pytest.mark.root, pytest.mark.bpf]

NAMESPACES = 100
MAX_THREADS = 12
MAX_RSS_MIB = 150


@pytest.fixture
def farm() -> Iterator[Farm]:
    """NAMESPACES namespaces with tests.manyns.RULESET; deleted after the test, failed or not
    (and by the farm itself when building fails half way)."""
    f = Farm(NAMESPACES)
    try:
        yield f.build()
    finally:
        f.close()


@pytest.fixture
def tracer_proc(farm: Farm) -> Iterator[subprocess.Popen[bytes]]:
    """`tracer watch --json` over every namespace, for the farm's dropped UDP port only, its
    JSON log on stderr; stopped with SIGINT (it removes its marking tables), killed if it hangs."""
    proc = subprocess.Popen(
        tracer_cmd("--log-level", "info", "watch", "--json", "--proto", "udp", "--port", str(DROP_PORT)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        stop_process(proc, signal.SIGINT, 30)


def lines_of(stream: object) -> queue.Queue[bytes]:
    """Every line of a pipe, read by a thread of its own (so the pipe never fills)."""
    lines: queue.Queue[bytes] = queue.Queue()

    def read() -> None:
        for line in stream:  # type: ignore[attr-defined]
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def drop_rule_handle(ns: netns_mod.Netns) -> int:
    """The handle of the farm's drop rule in `ns`, as nft lists it."""
    res = netns_mod.run_in(ns, ["nft", "-j", "-a", "list", "table", "inet", "fw"])
    assert res.returncode == 0, res.stderr
    for item in json.loads(res.stdout)["nftables"]:
        rule = item.get("rule")
        if rule and rule.get("comment") == "scale drop":
            return int(rule["handle"])
    raise AssertionError(f"no drop rule in {ns.label}")


def thread_name(pid: int, tid: str) -> str:
    with open(f"/proc/{pid}/task/{tid}/comm") as f:
        return f.read().strip()


def status_mib(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def test_hundredth_namespace_drop_names_its_rule_in_a_small_tracer(
    farm: Farm, tracer_proc: subprocess.Popen[bytes]
) -> None:
    last = farm.last
    handle = drop_rule_handle(last)
    events, errors = lines_of(tracer_proc.stdout), lines_of(tracer_proc.stderr)
    sender = farm.sender(last)
    found: dict[str, object] | None = None
    deadline = time.monotonic() + 60
    with sender:
        while found is None:
            assert tracer_proc.poll() is None, f"tracer exited {tracer_proc.returncode}: {list(errors.queue)[-5:]}"
            assert time.monotonic() < deadline, f"no drop with its rule from {last.name}: {list(errors.queue)[-5:]}"
            sender.sendto(b"scale", ("127.0.0.1", DROP_PORT))  # dropped on loopback by the ruleset
            with contextlib.suppress(queue.Empty):
                while found is None:
                    ev = json.loads(events.get(timeout=0.05))
                    rule = (ev.get("netfilter") or {}).get("rule")
                    if ev.get("netns", {}).get("name") == last.name and rule:
                        found = ev
    validate(found)
    nf = found["netfilter"]
    assert isinstance(nf, dict)
    assert nf["backend"] == "nftables" and nf["attribution"] == "nftrace"
    assert (nf["table"], nf["chain"], nf["hook"]) == ("fw", "input", "input")
    assert nf["rule"] == {"handle": handle, "text": DROP_RULE_TEXT, "comment": "scale drop"}
    pid = tracer_proc.pid
    threads = sorted(os.listdir(f"/proc/{pid}/task"))
    assert len(threads) <= MAX_THREADS, [thread_name(pid, t) for t in threads]
    rss = status_mib(pid, "VmRSS")
    assert rss <= MAX_RSS_MIB, f"tracer RSS {rss:.0f} MiB over {NAMESPACES} namespaces"
    tracer_proc.send_signal(signal.SIGINT)
    assert tracer_proc.wait(timeout=30) == 0
    ours = marking_table_of(list(errors.queue), last.name or "")
    tables = netns_mod.run_in(last, ["nft", "list", "tables"])
    assert tables.returncode == 0 and f"inet {ours}\n" not in tables.stdout, (ours, tables.stdout)


def marking_table_of(log_lines: list[bytes], netns_name: str) -> str:
    """The marking table the tracer says it added to a namespace (its JSON log on stderr)."""
    for raw in log_lines:
        with contextlib.suppress(ValueError):
            rec = json.loads(raw)
            if rec.get("event") == "nft.marking_table_added" and rec.get("netns") == netns_name:
                return str(rec["table"])
    raise AssertionError(f"the tracer never said it marked {netns_name}")
