"""The command line: doctor tells the truth. Bad input (exit 2, warnings, non-root) is tested
in tests/test_bad_input.py, a stuck output and signals in tests/test_signals.py."""

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
