"""systemd/: the unit, the example config, the logrotate snippet and `make install-service`.

What can be checked without systemd as PID 1 is checked here: systemd's own
analyzers on the unit file, that every kept capability is justified and
that this exact set runs a watch that names every rule (nftables,
iptables-legacy, another user's namespace) with MemoryDenyWriteExecute's
kernel equivalent in force, that the example config loads and lists every
key with its real default, that logrotate takes the snippet, and what
`make install-service` writes. The unit under a real systemd is
tests/vm/systemd_checks.py (tests/vm/run-systemd-tests.sh).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support import send_from_nobody, start_nobody
from tracer.config import Config
from tracer.lab import Lab
from tracer.netfilter.marking import STATE_DIR
from tracer.outputs import registry
from tracer.service import config as service_config

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "systemd" / "tracer.service"
EXAMPLE = REPO / "systemd" / "tracer.toml"
LOGROTATE = REPO / "systemd" / "tracer.logrotate"
#: The notes' figure for a strongly hardened unit that keeps these capabilities is ~3.4.
MAX_EXPOSURE = 4.0


def unit_values(key: str) -> list[str]:
    """Every value of `key=` in the unit's [Service] section, in order."""
    return [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith(f"{key}=")]


def unit_value(key: str) -> str:
    (value,) = unit_values(key)
    return value


def bounding_set() -> list[str]:
    return unit_value("CapabilityBoundingSet").split()


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed (scripts/install-deps.sh installs it)", pytrace=False)
    return path


# ---------------------------------------------------------------- the unit


def test_security_exposure_at_most_4() -> None:
    res = subprocess.run([tool("systemd-analyze"), "security", "--offline=yes", "--no-pager", str(UNIT)],
                         check=False, capture_output=True, text=True, timeout=60)
    found = re.search(r"Overall exposure level for tracer\.service: (\d+\.\d+)", res.stdout)
    assert found, res.stdout + res.stderr
    figure = float(found.group(1))
    print(f"systemd-analyze security --offline=yes: {figure}")
    assert figure <= MAX_EXPOSURE, res.stdout


def test_verify_passes(tmp_path: Path) -> None:
    """systemd-analyze verify, with ExecStart pointing at this checkout's tracer (it checks the
    binary exists; /usr/local/bin/tracer exists only after `make install`)."""
    tracer = Path(sys.executable).parent / "tracer"
    assert tracer.is_file(), f"{tracer}: the virtualenv's tracer script is missing"
    copy = tmp_path / "tracer.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/tracer", str(tracer)))
    res = subprocess.run([tool("systemd-analyze"), "verify", str(copy)],
                         check=False, capture_output=True, text=True, timeout=60)
    complaints = [line for line in res.stderr.splitlines() if "tracer.service" in line]
    assert res.returncode == 0 and not complaints, res.stderr


def test_every_capability_is_justified() -> None:
    """Each kept capability is named in the comment block above CapabilityBoundingSet=."""
    lines = UNIT.read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("CapabilityBoundingSet="))
    start = at
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    comment = "\n".join(lines[start:at])
    caps = bounding_set()
    assert caps and all(re.fullmatch(r"CAP_[A-Z_]+", c) for c in caps), caps
    for cap in caps:
        assert re.search(rf"^#\s+(\S+,\s+)*{cap}\b", comment, re.M), f"{cap} has no justification comment"
    assert unit_value("AmbientCapabilities") == "", "root needs no ambient capabilities"


def test_directories_match_the_tracer() -> None:
    """The unit's directories are the ones the tracer and the example config use."""
    assert unit_value("RuntimeDirectory") == STATE_DIR.name and STATE_DIR.parent == Path("/run")
    # xtrace_relay.check_state_dir refuses /run/tracer unless it is root's with mode 0700.
    assert unit_value("RuntimeDirectoryMode") == "0700"
    assert unit_value("RuntimeDirectoryPreserve") == "yes"
    assert "User" not in {line.split("=")[0] for line in UNIT.read_text().splitlines()}
    spool = service_config.DEFAULT_SPOOL_DIR
    assert spool.parent == Path("/var/lib/tracer")
    assert f"tracer/{spool.name}" in unit_value("StateDirectory").split()
    example = service_config.load(EXAMPLE)
    assert example.spool_dir == spool
    (file_output,) = example.outputs
    assert Path(file_output.options.path).parent == Path("/var/log") / unit_value("LogsDirectory")
    config = str(service_config.DEFAULT_PATH)
    assert unit_value("ExecStart") == f"/usr/local/bin/tracer run --config {config}"
    assert unit_values("ExecReload") == [f"/usr/local/bin/tracer run --check-config --config {config}",
                                         "/bin/kill -HUP $MAINPID"]
    assert unit_value("Type") == "notify" and unit_value("NotifyAccess") == "main"
    assert unit_value("StandardOutput") == "null" and unit_value("StandardError") == "journal"


# ---------------------------------------------------------------- the example config


def _commented_blocks() -> dict[str, dict[str, Any]]:
    """The example's keys, commented out or not, by table: "watch", ..., "output:file", ...

    Each `# key = value` line is read as TOML, so the example's values are
    checked to be valid TOML of the right kind too.
    """
    blocks: dict[str, dict[str, Any]] = {}
    current = ""
    for raw in EXAMPLE.read_text().splitlines():
        line = raw.lstrip("#").strip()
        header = re.fullmatch(r"\[\[?(\w+)\]\]?", line)
        if header:
            current = header.group(1)
            continue
        pair = re.match(r"^([a-z_]+) = ", line)
        if not pair or not current:
            continue
        value = tomllib.loads(line)[pair.group(1)]
        if current == "output" and pair.group(1) == "type":
            current = f"output:{value}"
        blocks.setdefault(current, {})[pair.group(1)] = value
    return blocks


def test_example_config_loads_with_safe_defaults() -> None:
    config = service_config.load(EXAMPLE)
    assert config.watch.scope == Config().scope, "the example watches everything"
    assert [(o.type, o.options.path, o.spool) for o in config.outputs] == \
        [("file", "/var/log/tracer/drops.ndjson", True)]
    assert config.spool_dir == service_config.DEFAULT_SPOOL_DIR
    assert config.metrics_listen is None, "metrics are off by default"
    assert (config.log_level, config.log_format) == ("info", "json")


def test_example_lists_every_key_with_its_default() -> None:
    blocks = _commented_blocks()
    defaults = Config()
    watch_defaults = {f.name: getattr(defaults, f.name) for f in dataclasses.fields(Config)}
    watch_defaults["nf_probes"] = defaults.nf_mode
    filters = {"port", "host", "proto", "netns", "iface", "reason"}
    assert set(blocks["watch"]) == set(service_config.WATCH_KEYS)
    for key, value in blocks["watch"].items():
        if key not in filters:
            assert value == watch_defaults[key], f"[watch] {key}: example {value!r}, default {watch_defaults[key]!r}"
    assert blocks["log"] == {"level": "info", "format": "json"}
    assert blocks["spool"] == {"dir": str(service_config.DEFAULT_SPOOL_DIR),
                               "max_bytes": service_config.DEFAULT_SPOOL_BYTES}
    assert set(blocks["metrics"]) == {"listen"}
    text = EXAMPLE.read_text()
    for key in service_config.OUTPUT_COMMON:
        assert re.search(rf"^#   {key} ", text, re.M), f"the keys of every output: {key!r} missing"
    assert f"(default {service_config.DEFAULT_QUEUE})" in text
    for kind in registry.TYPES:
        block = blocks.get(f"output:{kind}")
        assert block is not None, f"no example of the {kind!r} output"
        for f in dataclasses.fields(registry.options_class(kind)):
            assert f.name in block, f"output {kind!r}: key {f.name!r} missing from the example"
            if f.default not in (dataclasses.MISSING, None, ()):
                assert block[f.name] == f.default, \
                    f"output {kind!r}: {f.name} = {block[f.name]!r} in the example, {f.default!r} by default"
        unknown = set(block) - {f.name for f in dataclasses.fields(registry.options_class(kind))} \
            - set(service_config.OUTPUT_COMMON)
        assert not unknown, f"output {kind!r}: the example names keys it does not take: {unknown}"


# ---------------------------------------------------------------- logrotate


def test_logrotate_moves_the_file_and_reloads(tmp_path: Path) -> None:
    """A forced rotation: the file is moved aside (not copied and truncated), none is created in
    its place (the output makes its own, mode 0600), and the postrotate script runs."""
    logrotate = tool("logrotate")
    events, marker = tmp_path / "drops.ndjson", tmp_path / "reloaded"
    text = LOGROTATE.read_text()
    assert "systemctl reload tracer.service" in text and "copytruncate" not in text.split("Not copytruncate")[1]
    conf = text.replace("/var/log/tracer/drops.ndjson", str(events))
    conf = re.sub(r"(?m)^\t\tif systemctl .*$", f"\t\ttouch {marker}", conf)
    (tmp_path / "conf").write_text(conf)
    events.write_text('{"event": 1}\n')
    res = subprocess.run([logrotate, "--force", "--state", str(tmp_path / "state"), str(tmp_path / "conf")],
                         check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    rotated = [p.name for p in tmp_path.glob("drops.ndjson-*")]
    assert len(rotated) == 1 and re.fullmatch(r"drops\.ndjson-\d{8}-\d+", rotated[0]), rotated
    assert not events.exists(), "logrotate created the file (the output must, mode 0600)"
    assert marker.exists(), "postrotate did not run"


# ---------------------------------------------------------------- make install-service


def _make(*args: str) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["make", "-C", str(REPO), "--no-print-directory", *args],
                         check=False, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    return res


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_make_install_service_and_uninstall(tmp_path: Path) -> None:
    dest, prefix = tmp_path / "root", Path(sys.prefix)
    args = (f"DESTDIR={dest}", f"PREFIX={prefix}", "BINDIR=/usr/bin")
    _make("install-service", *args)
    unit = dest / "etc/systemd/system/tracer.service"
    config = dest / "etc/tracer/tracer.toml"
    rotate = dest / "etc/logrotate.d/tracer"
    example = dest / str(prefix).lstrip("/") / "share/tracer/tracer.toml.example"
    assert (_mode(unit), _mode(config), _mode(config.parent), _mode(rotate)) == (0o644, 0o640, 0o750, 0o644)
    assert "ExecStart=/usr/bin/tracer run --config /etc/tracer/tracer.toml" in unit.read_text()
    assert "/usr/local/bin" not in unit.read_text()
    assert config.read_text() == EXAMPLE.read_text() == example.read_text()
    assert rotate.read_text() == LOGROTATE.read_text()
    dropin = dest / "etc/systemd/system/tracer.service.d/10-python-home.conf"
    code = str(REPO)  # the editable install's code
    # pyenv under /root, a venv or checkout under /tmp: ProtectHome=/PrivateTmp= would hide them.
    hidden = [d for d in dict.fromkeys((sys.base_prefix, str(prefix), code))
              if d.startswith(("/root/", "/home/", "/tmp/", "/var/tmp/"))]
    if hidden:
        line = next(x for x in dropin.read_text().splitlines() if x.startswith("BindReadOnlyPaths="))
        assert line.removeprefix("BindReadOnlyPaths=").split() == hidden
        assert ("ProtectHome=tmpfs" in dropin.read_text()) == any(d.startswith(("/root/", "/home/")) for d in hidden)
    else:
        assert not dropin.exists()

    config.write_text("# the operator's own\n")
    res = _make("install-service", *args)
    assert config.read_text() == "# the operator's own\n", "a second install overwrote the config"
    assert "kept /etc/tracer/tracer.toml" in res.stdout

    _make("uninstall-service", *args)
    assert not unit.exists() and not rotate.exists() and not example.exists()
    assert not dropin.parent.exists()
    assert config.read_text() == "# the operator's own\n", "uninstall removed the operator's config"


# ---------------------------------------------------------------- the capabilities, for real

#: Run before the tracer: PR_SET_MDWE(PR_MDWE_REFUSE_EXEC_GAIN), the kernel's own form of the
#: unit's MemoryDenyWriteExecute= (no mapping both writable and executable, none made
#: executable later; inherited across exec). Then exec the rest of argv.
MDWE_EXEC = (
    "import ctypes, os, sys\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "if libc.prctl(65, 1, 0, 0, 0) != 0:\n"
    "    sys.exit('PR_SET_MDWE: ' + os.strerror(ctypes.get_errno()))\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


@pytest.fixture
def nobody_ns() -> Iterator[subprocess.Popen[str]]:
    """nobody's own user and network namespace (what a rootless container is): no `ip netns` name."""
    proc = start_nobody("nobody", tool("setpriv"))
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


@pytest.mark.root
@pytest.mark.bpf
def test_the_units_capabilities_run_a_full_watch(lab: Lab, nobody_ns: subprocess.Popen[str]) -> None:
    """`tracer watch` as root with exactly the unit's bounding set, no new privileges and MDWE
    names the rule of an nftables drop, an iptables-legacy drop and a drop in nobody's namespace,
    each with its kernel location: every part that needs a capability works with this set."""
    srv, leg = lab.add_ns("srv"), lab.add_ns("leg")
    link = lab.link(srv, leg)
    lab.nft(srv, 'table inet fw { chain input { type filter hook input priority 0; policy accept; '
                 'udp dport 7443 counter drop comment "nft"; }; }')
    lab.run(leg, ["iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport", "7444", "-j", "DROP"])
    caps = ",".join(f"+{c.removeprefix('CAP_').lower()}" for c in bounding_set())
    argv = [tool("setpriv"), "--bounding-set", f"-all,{caps}", "--inh-caps=-all", "--no-new-privs", "--",
            sys.executable, "-c", MDWE_EXEC, sys.executable, "-m", "tracer", "watch", "--json",
            "--port", "7443,7444,7445", "--duration", "60"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, "TRACER_LOG_LEVEL": "info"})
    stderr: list[str] = []
    watching = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            stderr.append(line)
            if '"event": "watching"' in line:
                watching.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert watching.wait(45), "".join(stderr)
        time.sleep(1)  # the legacy namespace's nf_log binding comes with the first poll
        for _ in range(3):
            lab.udp_send(leg, str(link.a_v4.ip), 7443)
            lab.udp_send(srv, str(link.b_v4.ip), 7444)
            send_from_nobody(nobody_ns)
        time.sleep(3)
    finally:
        proc.send_signal(2)
        out, _ = proc.communicate(timeout=30)
        reader.join(10)
    assert proc.returncode == 0, "".join(stderr)
    seen = {}
    for line in out.splitlines():
        event = json.loads(line)
        port = event.get("destination", {}).get("port")
        if event.get("rule"):
            seen[port] = event
    wanted = {7443: "nft", 7444: "-A INPUT -p udp -m udp --dport 7444 -j DROP", 7445: "nobody"}
    assert {p: seen[p]["rule"]["name"] for p in wanted if p in seen} == wanted, "".join(stderr)
    for port, event in seen.items():
        assert re.match(r"^[a-z_0-9.]+\+0x[0-9a-f]+", event["drop"]["location"]), (port, event["drop"])


def test_mdwe_is_in_force_in_the_wrapper() -> None:
    """The wrapper above really refuses writable+executable memory (else its test proves nothing)."""
    probe = ("import mmap\n"
             "try:\n"
             "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
             "except PermissionError:\n"
             "    print('refused')\n")
    res = subprocess.run([sys.executable, "-c", MDWE_EXEC, sys.executable, "-c", probe],
                         check=False, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "refused", res.stdout + res.stderr
