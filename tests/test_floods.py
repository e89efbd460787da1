"""Floods (issue 8): exact counts from the kernel's per-flow maps, the ceiling, loss reports.

Every test floods an nft drop rule with a counter in a lab namespace and
runs `tracer watch --json` as a user would. The invariant checked each
time: summed `event.count` of the flood's events equals the rule's counter,
however many records were lost or held back on the way.
"""

from __future__ import annotations

import itertools
import time
from datetime import datetime

import pytest

from tests.floods import DROP_RULESET, FLOOD_PORT, TracerRun, datasets, flood_events, flood_lab, total
from tracer.event.sections import Summary

pytestmark = [pytest.mark.root, pytest.mark.bpf]


def _iso(ts: str) -> float:
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


def _run_flood(lab, tmp_path, flows: int, seconds: float, *extra: str):
    fl = flood_lab(lab)
    run = TracerRun(fl, tmp_path / "out.ndjson", "--summary-interval", "1", *extra)
    sent = fl.flood(flows, seconds)
    time.sleep(0.5)
    events = run.stop()
    return fl, sent, events


def test_single_flow_flood_is_counted_exactly(lab, tmp_path):
    fl, sent, events = _run_flood(lab, tmp_path, flows=1, seconds=2)
    dropped = fl.counter()
    assert dropped == sent > 10_000
    assert total(events) == dropped
    mine = flood_events(events)
    singles = [e for e in mine if e["event"]["dataset"] == "tracer.drop"]
    summaries = [e for e in mine if e["event"]["dataset"] == "tracer.drop.summary"]
    # One flow: its first drop in full, the rest as summaries, not one event a packet.
    assert len(singles) == 1
    assert singles[0]["netfilter"]["rule"]["comment"] == "flood"
    assert 1 <= len(summaries) <= 6
    for s in summaries:
        assert s["destination"]["port"] == FLOOD_PORT
        assert _iso(s["event"]["start"]) <= _iso(s["event"]["end"])
        # The same attribution as the first event: the rule that dropped the flow.
        assert s["netfilter"]["rule"]["comment"] == "flood"


def test_2000_flow_flood_is_counted_exactly(lab, tmp_path):
    fl, sent, events = _run_flood(lab, tmp_path, flows=2000, seconds=2)
    dropped = fl.counter()
    assert dropped == sent
    assert total(events) == dropped
    keys = {(e["source"]["port"]) for e in flood_events(events) if "source" in e}
    # Flows keep events of their own up to the ceiling (500/s, a second's burst); the
    # rest are folded, and the whole flood is a few thousand lines, not 100 000.
    assert len(keys) >= 500
    assert len(events) < 10_000 < dropped


def test_ceiling_folds_into_summaries_and_reports_it(lab, tmp_path):
    rate = 50
    fl, sent, events = _run_flood(lab, tmp_path, 2000, 3, "--max-rate", str(rate))
    assert total(events) == fl.counter() == sent
    singles = [e for e in flood_events(events) if e["event"]["dataset"] == "tracer.drop"]
    # A burst of one second's worth, then the rate: never a wall of 2000 lines.
    assert len(singles) <= rate * 5
    losses = [e for e in events if e["event"]["dataset"] == "tracer.loss"]
    assert losses, datasets(events)
    held = sum(e["tracer"]["loss"].get("ceiling", 0) for e in losses)
    assert held >= 2000 - len(singles) - rate
    assert all(e["tracer"]["loss"]["counted_in_summaries"] for e in losses)
    # At most one report a second.
    times = sorted(_iso(e["@timestamp"]) for e in losses)
    assert all(b - a >= 0.9 for a, b in itertools.pairwise(times))


def test_full_flow_map_falls_back_to_coarse_counts(lab, tmp_path):
    """More flows than the kernel's flow map holds (a spoofed-source flood): still exact."""
    fl = flood_lab(lab, extra_sources=1)
    run = TracerRun(fl, tmp_path / "out.ndjson", "--summary-interval", "1", "--max-rate", "100")
    sent = fl.spray(ports=40_000)  # 80 000 flows, the map holds 65 536
    time.sleep(1.0)
    events = run.stop()
    assert fl.counter() == sent == 80_000
    assert total(events) == sent
    coarse = [e for e in flood_events(events) if e["event"]["dataset"] == "tracer.drop.summary"
              and "source" not in e]
    assert coarse, "no coarse summary"
    assert all(e["drop"]["reason"] == "NETFILTER_DROP" and e["netns"]["name"] == fl.target.name for e in coarse)


def test_summary_text_shows_the_count_and_span():
    s = Summary(1234, 1_000_000_000, 11_000_000_000)
    assert s.text() == "×1234 in 10 s"
    assert Summary(3, 0, 200_000_000).text() == "×3 in 0.2 s"


def test_a_reload_never_leaves_a_summary_with_the_old_rule(lab, tmp_path):
    """The flow's rule changes under the flood: no summary after the reload names the old one."""
    fl = flood_lab(lab)
    run = TracerRun(fl, tmp_path / "out.ndjson", "--summary-interval", "1")
    fl.flood(1, 1.5)
    fl.lab.nft(fl.target, "flush ruleset\n" + DROP_RULESET.replace('comment "flood"', 'comment "reloaded"'))
    time.sleep(1.2)  # the reload's generation reaches the tracer; the epoch of the swap closes
    reloaded_at = time.time()
    fl.flood(1, 2.5)
    time.sleep(0.5)
    events = run.stop()
    late = [e for e in flood_events(events) if e["event"]["dataset"] == "tracer.drop.summary"
            and _iso(e["event"]["start"]) > reloaded_at]
    assert late, datasets(events)
    comments = {e.get("netfilter", {}).get("rule", {}).get("comment") for e in late}
    assert "flood" not in comments, comments
    assert "reloaded" in comments  # learnt again from a traced sample
