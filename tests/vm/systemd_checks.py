"""tracer.service under real systemd: start after READY=1, events, reload, watchdog, stop.

Runs only in the VM whose PID 1 is systemd (tests/vm/run-systemd-vm.sh):

    tests/vm/run-systemd-tests.sh

pytest does not collect this file from `pytest tests/` (its name does not
start with `test_`), and it is not marked `vm`: the `vm` tests run in the
harness whose PID 1 is busybox. Here the unit is installed the way an
operator does it (`make install-service`, with the checkout's virtualenv as
the tracer), started with the example config exactly as shipped, and
checked against what the unit promises: `systemctl start` returns once the
probes are attached, the sandbox lets every part work (BPF and fentry,
kallsyms, setns into every namespace, iptables-legacy listings and nf_log,
namespaces of other users and ones created later), a reload keeps the
process and a bad config makes the reload fail, the watchdog never fires,
a SIGKILL is restarted and undone, a stop leaves every ruleset (and nf_log
binding) byte for byte as it was, and a bad config fails the start with
exit 2 and no restart loop.

The tests share one service and one lab and run in file order.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support import send_from_nobody, start_nobody
from tracer import netns
from tracer.lab import Lab, Link
from tracer.netns import Netns

REPO = Path(__file__).resolve().parents[2]
UNIT = "tracer.service"
CONFIG = Path("/etc/tracer/tracer.toml")
EVENTS = Path("/var/log/tracer/drops.ndjson")
#: Under TCG the guest runs Python 10-15x slower than a host: starting takes tens of seconds.
START_TIMEOUT = 400.0
#: The capabilities the unit keeps, as /proc/PID/status's CapBnd bit numbers.
KEPT_CAPS = {12: "CAP_NET_ADMIN", 13: "CAP_NET_RAW", 19: "CAP_SYS_PTRACE", 21: "CAP_SYS_ADMIN",
             34: "CAP_SYSLOG", 38: "CAP_PERFMON", 39: "CAP_BPF"}

ROOT_RULESET = """table inet vmroot {
	chain input { type filter hook input priority 0; policy accept; tcp dport 9 counter drop; }
}
"""


def sh(*argv: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, check=check, timeout=timeout)


def show(*props: str) -> dict[str, str]:
    out = sh("systemctl", "show", UNIT, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(since: str = "") -> str:
    args = ["journalctl", "--no-pager", "-o", "cat", "-u", UNIT]
    if since:
        args += ["--cursor", since]
    return sh(*args, check=False).stdout


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def events() -> list[dict]:
    if not EVENTS.exists():
        return []
    return [json.loads(line) for line in EVENTS.read_text().splitlines() if line.strip()]


def event_to(port: int, after: int = 0) -> Callable[[], dict | None]:
    def find() -> dict | None:
        return next((e for e in events()[after:] if e.get("destination", {}).get("port") == port), None)
    return find


def broken(config: str) -> str:
    """The config with an unknown key in [watch]: `tracer run` exits 2 on it."""
    assert "\n[watch]\n" in config
    return config.replace("\n[watch]\n", "\n[watch]\nno_such_key = 1\n", 1)


@dataclass
class Site:
    """The lab the service watches: nftables, iptables-legacy and nobody's namespace."""

    lab: Lab
    srv: Netns
    leg: Netns
    link: Link
    nobody: subprocess.Popen[str]
    nobody_ns: Netns
    rulesets_before: dict[str, str] = field(default_factory=dict)

    def rulesets(self) -> dict[str, str]:
        """`nft -s list ruleset` (no counter values) of the guest's initial namespace and of
        each lab namespace, and the legacy namespace's nf_log binding."""
        out = {"root": sh("nft", "-s", "list", "ruleset").stdout}
        for ns in (self.srv, self.leg, self.nobody_ns):
            out[ns.label] = netns.run_in(ns, ["nft", "-s", "list", "ruleset"], check=True).stdout
        out["leg nf_log/2"] = netns.run_in(self.leg, ["cat", "/proc/sys/net/netfilter/nf_log/2"],
                                           check=True).stdout
        return out

    def send_nobody(self) -> None:
        send_from_nobody(self.nobody)


@pytest.fixture(scope="module", autouse=True)
def under_systemd() -> None:
    """Only in the VM: the tests install a unit and load a ruleset in the initial namespace."""
    if Path("/proc/1/comm").read_text().strip() != "systemd" or not Path("/run/systemd/system").is_dir() \
            or Path("/etc/hostname").read_text().strip() != "tracer-vm":
        pytest.fail("not the systemd VM: run this file with tests/vm/run-systemd-tests.sh", pytrace=False)


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    lab = Lab()
    nobody = None
    # The guest's own initial namespace (this is a throw-away VM): a ruleset there
    # too, so the stop is checked to leave it as it was.
    subprocess.run(["nft", "-f", "-"], input=ROOT_RULESET, text=True, check=True)
    try:
        srv, leg = lab.add_ns("srv"), lab.add_ns("leg")
        link = lab.link(srv, leg)
        lab.nft(srv, 'table inet fw { chain input { type filter hook input priority 0; policy accept; '
                     'udp dport 7443 counter drop comment "srv-drop"; }; }')
        lab.run(leg, ["iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport", "7444", "-j", "DROP"])
        # nobody's own user and network namespace, with its own ruleset: no `ip netns` name
        # shows it, and its processes' capabilities are not the tracer's.
        nobody = start_nobody("nobody-drop")
        path = f"/proc/{nobody.pid}/ns/net"
        nobody_ns = Netns(inode=netns.inode_of(path), path=path, name=None)
        yield Site(lab, srv, leg, link, nobody, nobody_ns)
    finally:
        sh("systemctl", "stop", UNIT, check=False)
        if nobody is not None and nobody.poll() is None:
            nobody.kill()
            nobody.wait()
        lab.close()
        subprocess.run(["nft", "delete", "table", "inet", "vmroot"], check=False)


@pytest.fixture(scope="module")
def installed() -> None:
    """The unit, config and logrotate file as `make install` puts them, the tracer from the checkout."""
    venv = REPO / ".venv"
    sh("make", "-C", str(REPO), "--no-print-directory", "install-service",
       f"PREFIX={venv}", f"BINDIR={venv / 'bin'}")
    # TCG only: the unit's TimeoutStartSec=90s is for real hardware.
    dropin = Path("/etc/systemd/system/tracer.service.d/90-vm-slow.conf")
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(f"[Service]\nTimeoutStartSec={int(START_TIMEOUT)}s\n")
    sh("systemctl", "daemon-reload")


@pytest.fixture(scope="module")
def started(installed: None, site: Site) -> dict[str, float]:
    """`systemctl start` with the shipped config; the unit's states while it starts."""
    site.rulesets_before = site.rulesets()
    began = time.monotonic()
    sh("systemctl", "start", "--no-block", UNIT)
    seen: list[str] = []
    marked_when_active = None
    while time.monotonic() - began < START_TIMEOUT:
        state = show("ActiveState")["ActiveState"]
        if not seen or seen[-1] != state:
            seen.append(state)
        if state == "active":
            marked_when_active = "tracer_mark" in site.lab.nft_list(site.srv)
            break
        if state == "failed":
            break
        time.sleep(0.2)
    took = time.monotonic() - began
    print(f"systemctl start: states {seen}, active after {took:.1f} s")
    assert seen[-1] == "active", f"{seen}\n{journal()}"
    return {"began": began, "took": took, "activating_seen": float("activating" in seen),
            "marked_when_active": float(bool(marked_when_active))}


def test_unit_verifies(installed: None) -> None:
    res = sh("systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}", check=False)
    assert res.returncode == 0, res.stderr


def test_start_waits_for_ready(started: dict[str, float]) -> None:
    """Type=notify: activating until READY=1, which comes after the probes and marking tables."""
    assert started["activating_seen"], "never seen activating: the unit did not wait for READY=1"
    assert started["marked_when_active"], "active before the marking table was in the namespace"
    props = show("Type", "NotifyAccess", "SubState", "StatusText", "WatchdogUSec", "Restart")
    assert props["Type"] == "notify" and props["NotifyAccess"] == "main"
    assert props["SubState"] == "running"
    assert props["WatchdogUSec"] == "30s"
    print("status:", props["StatusText"])


def test_sandbox_is_in_force(started: dict[str, float]) -> None:
    pid = show("MainPID")["MainPID"]
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    bounding = int(fields["CapBnd"], 16)
    assert {bit for bit in range(64) if bounding >> bit & 1} == set(KEPT_CAPS), fields["CapBnd"]
    assert fields["NoNewPrivs"].strip() == "1"
    assert fields["Seccomp"].strip() == "2"
    for path in ("/run/tracer", "/var/lib/tracer/spool", "/var/log/tracer"):
        st = os.stat(path)
        assert (st.st_uid, st.st_mode & 0o777) == (0, 0o700), (path, oct(st.st_mode))


def test_events_from_every_kind_of_namespace(started: dict[str, float], site: Site) -> None:
    """nftables, iptables-legacy, and nobody's namespace: each drop with its rule and location."""
    time.sleep(2)  # the first nf_log binding and relay come with the first poll
    for _ in range(3):
        site.lab.udp_send(site.leg, str(site.link.a_v4.ip), 7443)
        site.lab.udp_send(site.srv, str(site.link.b_v4.ip), 7444)
        site.send_nobody()
    found: dict[int, dict] = {}
    for port, rule in ((7443, "srv-drop"), (7444, "-A INPUT -p udp -m udp --dport 7444 -j DROP"),
                       (7445, "nobody-drop")):
        def named(port: int = port, rule: str = rule) -> dict | None:
            return next((e for e in events() if e.get("destination", {}).get("port") == port
                         and e.get("rule", {}).get("name") == rule), None)
        event = wait_until(named, 60, f"the drop to {port} with its rule")
        assert isinstance(event, dict)
        found[port] = event
    for port, event in found.items():
        assert re.match(r"^[a-z_0-9.]+\+0x[0-9a-f]+", event["drop"]["location"]), (port, event["drop"])
        assert event["netfilter"]["hook"] == "input", (port, event["netfilter"])
    log = journal()
    assert '"netfilter": "fentry"' in log, "the stock kernel's fentry programs were not attached"


def test_namespace_created_later_is_watched(started: dict[str, float], site: Site) -> None:
    """`ip netns add` after the start: its mount reaches the service's mount namespace."""
    late = site.lab.add_ns("late")
    link = site.lab.link(late, site.srv)
    site.lab.nft(late, 'table inet fw { chain input { type filter hook input priority 0; policy accept; '
                       'udp dport 7446 counter drop comment "late-drop"; }; }')
    wait_until(lambda: "tracer_mark" in site.lab.nft_list(late), 60, "the marking table in a new namespace")

    def sent_and_seen() -> dict | None:
        site.lab.udp_send(site.srv, str(link.a_v4.ip), 7446)
        time.sleep(1)
        return next((e for e in events() if e.get("rule", {}).get("name") == "late-drop"), None)
    wait_until(sent_and_seen, 60, "a drop in the namespace created after the start")
    site.lab.delete_ns("late")


def test_reload(started: dict[str, float], site: Site) -> None:
    """`systemctl reload`: same process, READY again, events still delivered; a bad file fails it."""
    pid = show("MainPID")["MainPID"]
    res = sh("systemctl", "reload", UNIT, check=False, timeout=START_TIMEOUT)
    assert res.returncode == 0, res.stderr + journal()
    wait_until(lambda: show("ActiveState")["ActiveState"] == "active", START_TIMEOUT, "active after reload")
    assert show("MainPID")["MainPID"] == pid
    count = len(events())

    def sent_and_seen() -> dict | None:
        site.lab.udp_send(site.leg, str(site.link.a_v4.ip), 7443)
        time.sleep(1)
        return event_to(7443, count)()
    wait_until(sent_and_seen, 60, "an event after the reload")

    good = CONFIG.read_text()
    try:
        CONFIG.write_text(broken(good))
        res = sh("systemctl", "reload", UNIT, check=False, timeout=START_TIMEOUT)
        assert res.returncode != 0, "a reload with a broken config succeeded"
        assert show("ActiveState", "MainPID") == {"ActiveState": "active", "MainPID": pid}
    finally:
        CONFIG.write_text(good)


def test_watchdog_never_fired(started: dict[str, float]) -> None:
    """WatchdogSec=30s: after more than 30 s of running, no restart, no watchdog kill."""
    left = started["began"] + started["took"] + 40 - time.monotonic()
    if left > 0:
        time.sleep(left)
    props = show("NRestarts", "Result", "ActiveState", "WatchdogTimestampMonotonic")
    assert props["NRestarts"] == "0" and props["Result"] == "success", props
    assert props["ActiveState"] == "active"
    assert props["WatchdogTimestampMonotonic"] not in ("", "0"), "no WATCHDOG=1 ever arrived"
    assert "watchdog timeout" not in sh("journalctl", "--no-pager", "-o", "cat").stdout.lower()


def test_sigkill_is_restarted_and_undone(started: dict[str, float], site: Site) -> None:
    """Restart=on-failure after SIGKILL; the kernel drops the marking tables with their owner
    socket, and /run/tracer (RuntimeDirectoryPreserve=yes) keeps the nf_log journal for the
    next start to put back (the stop test compares nf_log with what it was before)."""
    pid = show("MainPID")["MainPID"]
    sh("systemctl", "kill", "--signal=KILL", UNIT)
    wait_until(lambda: show("MainPID")["MainPID"] != pid, 30, "the killed daemon to go")
    wait_until(lambda: "tracer_mark" not in site.lab.nft_list(site.srv), 10,
               "the kernel to remove the dead daemon's marking table")
    assert Path("/run/tracer").is_dir(), "/run/tracer went with the crash"

    def restarted() -> bool:
        props = show("MainPID", "ActiveState")
        return props["ActiveState"] == "active" and props["MainPID"] not in ("0", pid)
    wait_until(restarted, START_TIMEOUT, "the restart")
    assert show("NRestarts")["NRestarts"] == "1"
    assert "tracer_mark" in site.lab.nft_list(site.srv)


def test_security_figure(started: dict[str, float]) -> None:
    out = sh("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    figure = float(match.group(1))
    print(f"systemd-analyze security {UNIT} (live, with the install's drop-ins): {figure}")
    assert figure <= 4.0


def test_stop_leaves_rulesets_as_they_were(started: dict[str, float], site: Site) -> None:
    began = time.monotonic()
    res = sh("systemctl", "stop", UNIT, check=False, timeout=120)
    took = time.monotonic() - began
    print(f"systemctl stop: {took:.1f} s")
    assert res.returncode == 0, res.stderr
    props = show("ActiveState", "Result", "ExecMainStatus")
    assert props == {"ActiveState": "inactive", "Result": "success", "ExecMainStatus": "0"}, props
    assert site.rulesets() == site.rulesets_before


def test_bad_config_fails_and_is_not_restarted() -> None:
    """Exit 2 (a bad config) fails the start with the key named, and RestartPreventExitStatus=2
    keeps systemd from restarting it every RestartSec."""
    good = CONFIG.read_text()
    try:
        CONFIG.write_text(broken(good))
        res = sh("systemctl", "start", UNIT, check=False, timeout=START_TIMEOUT)
        assert res.returncode != 0
        first = show("ActiveState", "ExecMainStatus", "NRestarts")
        time.sleep(12)  # more than RestartSec=5s
        assert show("ActiveState", "ExecMainStatus", "NRestarts") == first
        assert first["ActiveState"] == "failed" and first["ExecMainStatus"] == "2", first
        assert "no_such_key" in journal()
    finally:
        CONFIG.write_text(good)
        sh("systemctl", "reset-failed", UNIT, check=False)
