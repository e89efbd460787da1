"""The broken-firewall labs of tests/scenarios.py are broken for their stated reason only.

For each scenario: the connection fails, the hand-written fix (and each
alternative fix) applied in the lab makes it succeed. That is what lets the
diagnosis tests trust a lab: if the tracer's printed fix also repairs it, the
fix is right.
"""

from __future__ import annotations

import pytest

from tests import scenarios
from tracer.lab import Lab

pytestmark = [pytest.mark.root]

#: (scenario, which fix): 0 is hand_fix, n > 0 is alt_fixes[n - 1].
CASES = [(name, 0) for name in scenarios.SCENARIOS] + [
    ("rule_order_nft_v4", 1), ("rule_order_ipt_v6", 1), ("egress_blocked", 1), ("nat_forward_missing", 1),
    ("no_route", 1), ("rp_filter", 1), ("icmp_blocked", 1), ("rejected", 1), ("invalid_state", 1),
    ("rule_blocks", 1),
]


def _fix(s: scenarios.Scenario, which: int) -> list[str]:
    return s.hand_fix if which == 0 else s.alt_fixes[which - 1]


@pytest.mark.parametrize(("name", "which"), CASES,
                         ids=[f"{n}-{'hand' if w == 0 else f'alt{w}'}" for n, w in CASES])
def test_scenario_breaks_and_fix_repairs(lab: Lab, name: str, which: int) -> None:
    s = scenarios.SCENARIOS[name](lab)
    assert s.name == name
    assert s.cause in _causes()
    before = s.outcome()
    assert before != "ok", f"{name}: the connection works before any fix"
    scenarios.run_fix(lab, s.fix_ns, _fix(s, which))
    after = s.outcome()
    assert after == "ok", f"{name}: still {after} (was {before}) after {_fix(s, which)}"


def test_every_alternative_fix_is_tested() -> None:
    """CASES must list each alt fix; building a lab only to count them would need root."""
    counted = {name: sum(1 for n, w in CASES if n == name and w > 0) for name in scenarios.SCENARIOS}
    assert counted == {
        "rule_order_nft_v4": 1, "rule_order_ipt_v6": 1, "default_policy_nft_v6": 0, "default_policy_ipt_v4": 0,
        "missing_established": 0, "egress_blocked": 1, "nat_forward_missing": 1, "ip_forward_disabled": 0,
        "no_route": 1, "rp_filter": 1, "conntrack_full": 0, "icmp_blocked": 1,
        "neighbor_discovery_blocked": 0, "closed_port": 0, "rejected": 1, "invalid_state": 1, "rule_blocks": 1,
    }


def test_every_cause_but_firewalld_has_a_scenario() -> None:
    """firewalld_zone has its own lab, a real firewalld (tests/firewalld_lab.py)."""
    covered = {scenarios.SCENARIOS[n].__name__.removeprefix("build_") for n in scenarios.SCENARIOS}
    assert covered == set(scenarios.SCENARIOS)
    missing = _causes() - {n.rsplit("_nft", 1)[0].rsplit("_ipt", 1)[0] for n in scenarios.SCENARIOS}
    assert missing == {"firewalld_zone"}


def test_run_fix_refuses_other_namespaces(lab: Lab) -> None:
    ns = lab.add_ns("only")
    with pytest.raises(scenarios.FixFailed, match="not a namespace of lab"):
        scenarios.run_fix(lab, ns, ["ip netns exec not-a-lab-ns true"])
    with pytest.raises(scenarios.FixFailed, match="exit 1"):
        scenarios.run_fix(lab, ns, ["false"])
    scenarios.run_fix(lab, ns, [f"ip netns exec {ns.name} true", "true"])


def _causes() -> frozenset[str]:
    """Issue 10's cause ids (tracer.diagnosis.causes.CAUSES holds the same; not imported, so that
    these labs are checked on their own while the classifier is being written)."""
    return frozenset({
        "rule_blocks", "rule_order", "default_policy", "missing_established", "egress_blocked",
        "nat_forward_missing", "ip_forward_disabled", "rp_filter", "no_route", "conntrack_full",
        "invalid_state", "icmp_blocked", "neighbor_discovery_blocked", "closed_port", "rejected",
        "firewalld_zone",
    })
