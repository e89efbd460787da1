"""What the diagnosis costs the join: microseconds per event, against rendering the same event.

Not a test: it prints figures and ratios measured side by side in one run.
As root, from the repository root:

    .venv/bin/python -m tests.bench.diagnosis [--events 5000]

A lab namespace gets the demo's server ruleset (a drop before the accept for
443, a drop policy). Events like the tracer builds for three drops (a rule
whose later rule accepts: the evaluator walks the chain; the policy; a
NO_SOCKET, which reads the namespace's sockets) are diagnosed again and
again by the collector the engine runs, and the same events are rendered to
their NDJSON line, the work every event costs anyway.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import orjson

from tracer import netns
from tracer.cli.demo import SERVER_RULESET
from tracer.collectors.base import Evidence
from tracer.collectors.diagnosis import DiagnosisCollector
from tracer.event.model import ConntrackInfo, Drop, DropEvent, Namespace, Netfilter, Packet, Rule
from tracer.event.packet import PacketHeaders
from tracer.lab import Lab
from tracer.netfilter.nftables import NftContext, Ruleset


def _ruleset(ns: netns.Netns) -> Ruleset:
    with netns.entered(ns):
        ctx = NftContext()
    with ctx:
        return ctx.ruleset()


def _events(ns: netns.Netns, rs: Ruleset) -> dict[str, DropEvent]:
    def syn(port: int) -> Packet:
        return Packet(PacketHeaders(version=4, src="198.18.0.1", dst="198.18.0.2", protocol=6, sport=40000,
                                    dport=port, tcp_flags=("SYN",)), 60, 0)

    drop_rule = next(r for r in rs.rules.values() if r.text == "tcp dport 443 drop")
    where = Namespace(ns.inode, ns.name)
    ct = ConntrackInfo("new", "original")
    return {
        "rule_order": DropEvent(timestamp_ns=time.time_ns(), drop=Drop("NETFILTER_DROP", "nft_do_chain+0x46f"),
                                packet=syn(443), netns=where, conntrack=ct,
                                netfilter=Netfilter("nftables", "nftrace", "inet", "input", "fw", "input", "input",
                                                    Rule(drop_rule.handle, drop_rule.text), False, "drop")),
        "default_policy": DropEvent(timestamp_ns=time.time_ns(), drop=Drop("NETFILTER_DROP", "nft_do_chain+0x46f"),
                                    packet=syn(8080), netns=where, conntrack=ct,
                                    netfilter=Netfilter("nftables", "nftrace", "inet", "input", "fw", "input",
                                                        "input", None, True, "drop")),
        "closed_port": DropEvent(timestamp_ns=time.time_ns(), drop=Drop("NO_SOCKET", "tcp_v4_rcv+0x1a"),
                                 packet=syn(9999), netns=where),
    }


def _per_event_us(fn: Callable[[], object], n: int) -> float:
    fn()  # warm
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=5000)
    args = parser.parse_args()
    with Lab() as lab:
        server = lab.add_ns("server")
        lab.nft(server, SERVER_RULESET)
        rs = _ruleset(server)
        collector = DiagnosisCollector()
        print(f"{'drop':<16} {'diagnosis us':>13} {'render us':>10} {'ratio':>6}  cause")
        for name, event in _events(server, rs).items():
            evidence = Evidence(drop=None, netns=server, ruleset=rs)  # type: ignore[arg-type]

            def diagnose(event: DropEvent = event, evidence: Evidence = evidence) -> None:
                event.diagnosis = None
                collector.enrich(event, evidence)

            diag = _per_event_us(diagnose, args.events)
            render = _per_event_us(lambda event=event: orjson.dumps(event.to_ecs()), args.events)
            cause = event.diagnosis.cause if event.diagnosis else "-"
            print(f"{name:<16} {diag:>13.1f} {render:>10.1f} {diag / render:>6.2f}  {cause}")


if __name__ == "__main__":
    main()
