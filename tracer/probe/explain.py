"""`--explain`: watch this host's drops while probes run, and tie them to the probes.

The drop engine runs in-process, filtered to the probed addresses and to
this network namespace; every drop event of a probe packet (or of its
answer) carries the probe's id, which is how a probe result finds the rule
that killed it.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

from tracer import netns
from tracer.config import Config, Scope
from tracer.event.rendered import Rendered
from tracer.event.sections import Netfilter
from tracer.event.text import describe_rule
from tracer.pipeline.engine import Engine
from tracer.probe.reach import ProbeResult

_ANSWER_FLAGS = ("SYN", "ACK")


class LocalDrops:
    """A context manager: drop events of probe packets, by probe id."""

    def __init__(self, addresses: list[str]) -> None:
        from tracer.config import host_networks

        filt = Scope(hosts=host_networks(addresses), netns=str(netns.current_inode()))
        self.engine = Engine(Config(scope=filt), self)
        self.by_probe: dict[str, list[Rendered]] = defaultdict(list)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    # the engine's sink: keeps the probes' events, rendered only when `drops` asks for them
    def submit(self, rendered: Rendered) -> None:
        probe = getattr(rendered.event, "probe", None)  # notices carry none
        if probe is not None and probe.id:
            with self._lock:
                self.by_probe[probe.id].append(rendered)

    def __enter__(self) -> LocalDrops:
        self.engine.start()
        self._thread = threading.Thread(target=self.engine.run, name="explain", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        # A drop's event can trail the probe by the engine's verdict wait.
        time.sleep(self.engine.config.verdict_wait + 0.2)
        self.engine.stop()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def drops(self, ids: list[str]) -> list[dict]:
        with self._lock:
            return [r.ecs() for i in ids for r in self.by_probe.get(i, [])]


def sentence(event: dict) -> str:
    """"dropped here by input rule 4 of table inet fw (`tcp dport 443 drop`)", or the policy/reason."""
    nf = event.get("netfilter")
    what = "rejected" if event["event"]["action"] == "rejected" else "dropped"
    if nf is None:
        return f"{what} here by the kernel: {event['drop']['reason']} at {event['drop'].get('location', '?')}"
    hook = nf.get("hook", "")
    if nf.get("policy"):
        return f"{what} here by the {hook} policy of chain {nf.get('chain')} ({describe_rule(Netfilter.from_ecs(nf))})"
    rule = nf.get("rule")
    if rule:
        table = " ".join(x for x in (nf.get("family"), nf.get("table")) if x)
        comment = f", comment \"{rule['comment']}\"" if rule.get("comment") else ""
        return f"{what} here by {hook} rule {rule['handle']} of table {table} (`{rule['text']}`{comment})"
    return f"{what} here in netfilter ({nf.get('backend')} {hook})"


def explain(result: ProbeResult, drops: list[dict]) -> None:
    """Adds this host's drops of the probe (or of its answer) to the result."""
    # The probe's own drop says more than that of an answer it provoked.
    drops = sorted(drops, key=lambda ev: ev.get("source", {}).get("ip") == result.target.ip)
    result.local_drops = drops
    if drops:
        first = drops[0]
        flags = first.get("tcp", {}).get("flags", [])
        own = first.get("source", {}).get("ip") != result.target.ip
        packet = "your probe" if own else ("the answer " + ("(" + ",".join(flags) + ")" if flags else ""))
        result.detail = f"{packet.strip()} to {result.target} was {sentence(first)}"
        result.next_steps = ["change or remove that rule on this host, then probe again"]
        if first["event"]["action"] == "rejected":
            # A local reject rule answers like a closed port (RST) or an ICMP
            # error; the drop event is what tells it apart.
            result.verdict = "prohibited"
    elif result.verdict == "filtered":
        result.detail = ("the probe left this host (no drop here) and no answer came back: it was lost "
                         "upstream, at the remote host's firewall, a cloud security group or a network ACL")
        result.next_steps = [
            f"run `tracer watch --port {result.target.port}` on the target: its events carry "
            f"probe.id {result.probe_id}" if result.target.port else
            f"run `tracer watch --host <this host>` on the target: its events carry probe.id {result.probe_id}",
            "check the cloud security group / network ACL for this port",
            "traceroute to see where the path ends",
        ]
