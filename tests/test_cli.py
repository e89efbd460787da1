"""The command line: doctor tells the truth. Bad input (exit 2, warnings, non-root) is tested
in tests/test_bad_input.py, a stuck output and signals in tests/test_signals.py."""

import re
import subprocess

import orjson
import pytest

from tests.support import tracer_cmd


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(tracer_cmd(*args), capture_output=True, text=True, timeout=timeout, check=False)


@pytest.mark.root
def test_doctor_reports_this_kernel():
    res = run("doctor", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    report = orjson.loads(res.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    assert report["watch_possible"] is True
    assert report["drop_program"] == "tp_btf"
    assert checks["btf"]["status"] == "ok"
    # The build machines refuse fentry and have no kprobes (see shared notes):
    # doctor must say so and name the fallback.
    if report["netfilter_probes"] is None:
        assert checks["prog_fentry"]["status"] == "warn"
        assert checks["netfilter_context"]["status"] == "warn"
        assert "nftrace" in checks["netfilter_context"]["detail"]


@pytest.mark.root
def test_doctor_text_has_a_fix_for_every_problem():
    res = run("doctor")
    lines = res.stdout.splitlines()
    for i, line in enumerate(lines):
        if line.startswith(("[warn]", "[FAIL]")):
            assert i + 1 < len(lines) and "->" in lines[i + 1], line


@pytest.mark.root
def test_doctor_lists_what_each_collector_says():
    """Each collector's own answer to "can you run here?", with a fix when it cannot."""
    report = orjson.loads(run("doctor", "--json").stdout)
    checks = {c["name"]: c for c in report["checks"]}
    for name in ("nftrace", "xtrace", "conntrack", "links"):
        check = checks[f"collector {name}"]
        assert check["status"] in ("ok", "warn", "info"), check
        assert check["status"] == "ok" or check["fix"], check
    assert checks["collector nftrace"]["status"] == "ok"  # libnftables is a dependency of the tracer


@pytest.mark.parametrize("reader", ["head -3", "true"])
@pytest.mark.parametrize("args", [("doctor", "--reasons"), ("doctor", "--reasons", "--json")])
def test_doctor_reasons_survives_head(args, reader):
    """`tracer doctor --reasons | head -3`, through a real pipe whose reader leaves early (`true`
    leaves before the first write, so the write itself meets EPIPE): no "Broken pipe", no
    traceback, status 0 (what the reader asked for, it got)."""
    import shlex

    cmd = " ".join(shlex.quote(word) for word in tracer_cmd(*args)) + f" | {reader}; echo \"status=${{PIPESTATUS[0]}}\""
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60, check=False)
    lines = res.stdout.splitlines()
    assert lines[-1] == "status=0", res.stdout + res.stderr
    assert "Broken pipe" not in res.stderr and "Traceback" not in res.stderr and "Exception" not in res.stderr, \
        res.stderr
    if reader == "head -3":
        assert len(lines) == 4, lines
        if "--json" not in args:
            assert re.match(r"^\s*\d+  [A-Z_]+\s+\S.*\.$", lines[2]), lines


def test_doctor_reasons_explains_the_common_ones():
    res = run("doctor", "--reasons")
    assert res.returncode == 0, res.stderr
    by_name = {line.split()[1]: line for line in res.stdout.splitlines()}
    assert "reverse path" in by_name["IP_RPFILTER"].lower() and "ip_forward" in by_name["IP_INADDRERRORS"]
    assert "no socket" in by_name["NO_SOCKET"].lower()
    doc = orjson.loads(run("doctor", "--reasons", "--json").stdout)
    assert {r["name"]: r["explanation"] for r in doc["drop_reasons"]}["NEIGH_FAILED"].startswith("The next hop")
