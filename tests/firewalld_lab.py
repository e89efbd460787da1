"""The real firewalld, running inside one lab namespace and touching nothing else.

firewalld wants a D-Bus system bus, writes its permanent configuration to
/etc/firewalld and temporary files to /run/firewalld, and programs the
firewall of the network namespace it runs in. So each instance gets:

- its own dbus-daemon (a config of ours: a socket in a 0700 temp dir, no
  service activation, so nothing can start polkitd or systemd units), reached
  through DBUS_SYSTEM_BUS_ADDRESS by firewalld and firewall-cmd alike;
- a private mount namespace (`unshare --mount --propagation private`) in which
  an empty temp dir is bound over /etc/firewalld and another over /run (which
  also hides the host's /run/dbus, so even a missing bus address cannot reach a
  host bus), so `--permanent` changes and its temp files land in the temp dir;
- the lab namespace as its network namespace (nsenter --net), so its nft
  table, its `ip_forward` writes (per namespace) and its iptables probes all
  stay there. The kernel has no modules, and no modprobe is installed.

`FirewalldLab.close()` kills both processes and removes the temp dir; the
mounts die with the mount namespace, which dies with firewalld. It runs on a
failed start too, and at interpreter exit if a test forgot.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

from tracer.lab import Lab
from tracer.netns import Netns

FIREWALLD = "/usr/sbin/firewalld"
FIREWALL_CMD = "/usr/bin/firewall-cmd"
DBUS_DAEMON = "/usr/bin/dbus-daemon"
#: `firewall-cmd --state` exits 252 while firewalld is not (yet) running.
NOT_RUNNING = 252

_BUS_CONFIG = """<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"""

#: firewalld.conf of the instance: the Debian defaults, written out so the host's own
#: /etc/firewalld (which an admin may have changed) plays no part.
_FIREWALLD_CONF = """DefaultZone={zone}
CleanupOnExit=yes
CleanupModulesOnExit=no
Lockdown=no
IPv6_rpfilter=yes
IndividualCalls=no
LogDenied=off
FirewallBackend=nftables
FlushAllOnReload=yes
RFC3964_IPv4=yes
"""

#: Run inside the private mount namespace: $1 the config dir, $2 the /run stand-in, $3 the log.
_START_SCRIPT = (
    'set -e; mount --bind "$1" /etc/firewalld; mount --bind "$2" /run; '
    f'exec {FIREWALLD} --nofork --nopid --log-target=file --log-file="$3"'
)


class FirewalldError(RuntimeError):
    """firewalld did not come up, or a firewall-cmd call failed; the message says why."""


def available() -> str | None:
    """None when firewalld can run here, else what is missing (for the skip or failure)."""
    for tool in (FIREWALLD, FIREWALL_CMD, DBUS_DAEMON, "/usr/bin/unshare", "/usr/bin/nsenter"):
        if not os.access(tool, os.X_OK):
            return f"{tool} is not installed (apt-get install --no-install-recommends firewalld)"
    return None


class FirewalldLab:
    """firewalld in `ns` of `lab`, with `default_zone`, and `interfaces` (name -> zone) bound at runtime.

    Use as a context manager; `firewall_cmd()` talks to this instance only.
    """

    def __init__(
        self,
        lab: Lab,
        ns: Netns,
        default_zone: str = "public",
        interfaces: Mapping[str, str] | None = None,
        timeout: float = 30.0,
    ) -> None:
        self.lab = lab
        self.ns = ns
        self.default_zone = default_zone
        self.interfaces = dict(interfaces or {})
        self.timeout = timeout
        self.tmp: Path | None = None
        self._dbus: subprocess.Popen[bytes] | None = None
        self._firewalld: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None
        self.started_in: float | None = None  # seconds from spawning firewalld to its RUNNING state

    # --- paths and environment --------------------------------------------------------

    @property
    def _dir(self) -> Path:
        if self.tmp is None:
            raise FirewalldError("firewalld lab not started")
        return self.tmp

    @property
    def bus_socket(self) -> Path:
        return self._dir / "bus"

    @property
    def config_dir(self) -> Path:
        """What firewalld sees as /etc/firewalld: `--permanent` changes land here."""
        return self._dir / "etc"

    @property
    def log_file(self) -> Path:
        return self._dir / "firewalld.log"

    def _env(self) -> dict[str, str]:
        return {
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
            "LC_ALL": "C.UTF-8",
            "DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={self.bus_socket}",
        }

    # --- life cycle ---------------------------------------------------------------------

    def start(self) -> FirewalldLab:
        """Starts the bus and firewalld, waits until firewalld is RUNNING, binds the interfaces."""
        missing = available()
        if missing:
            raise FirewalldError(missing)
        atexit.register(self.close)
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix="trl-firewalld-"))  # 0700: only root reaches the bus
            for sub in ("etc", "run"):
                (self._dir / sub).mkdir()
            (self.config_dir / "firewalld.conf").write_text(_FIREWALLD_CONF.format(zone=self.default_zone))
            (self._dir / "bus.conf").write_text(_BUS_CONFIG.format(socket=self.bus_socket))
            self._start_bus()
            self._start_firewalld()
            for ifname, zone in self.interfaces.items():
                self.firewall_cmd(f"--zone={zone}", f"--change-interface={ifname}")
        except BaseException:
            self.close()
            raise
        return self

    def _nsenter(self) -> list[str]:
        return ["nsenter", f"--net={self.ns.path}", "--"]

    def _start_bus(self) -> None:
        self._dbus = subprocess.Popen(
            [*self._nsenter(), DBUS_DAEMON, f"--config-file={self._dir / 'bus.conf'}", "--nofork", "--nopidfile"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            env=self._env(), start_new_session=True,
        )
        deadline = time.monotonic() + 10
        while not self.bus_socket.exists():
            if self._dbus.poll() is not None:
                raise FirewalldError(f"dbus-daemon exited with {self._dbus.returncode}")
            if time.monotonic() > deadline:
                raise FirewalldError("dbus-daemon made no socket within 10 s")
            time.sleep(0.02)

    def _start_firewalld(self) -> None:
        t0 = time.monotonic()
        self._stderr = open(self._dir / "stderr", "wb")  # noqa: SIM115 (closed by close())
        self._firewalld = subprocess.Popen(
            [*self._nsenter(), "unshare", "--mount", "--propagation", "private", "--",
             "sh", "-c", _START_SCRIPT, "sh", str(self.config_dir), str(self._dir / "run"), str(self.log_file)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=self._stderr,
            env=self._env(), start_new_session=True,
        )
        deadline = t0 + self.timeout
        while True:
            time.sleep(0.2)
            if self._firewalld.poll() is not None:
                raise FirewalldError(f"firewalld exited with {self._firewalld.returncode}: {self._why()}")
            res = self._run_cmd("--state")
            if res.returncode == 0:
                self.started_in = time.monotonic() - t0
                return
            if res.returncode != NOT_RUNNING:
                raise FirewalldError(f"firewall-cmd --state: exit {res.returncode}: {res.stderr.strip()}")
            if time.monotonic() > deadline:
                raise FirewalldError(f"firewalld not running after {self.timeout:g} s: {self._why()}")

    def _why(self) -> str:
        parts = []
        for path in (self._dir / "stderr", self.log_file):
            with contextlib.suppress(OSError):
                parts.append(path.read_text(errors="replace")[-2000:])
        return " | ".join(p.strip() for p in parts if p.strip()) or "no output"

    def close(self) -> None:
        """Stops firewalld and the bus, removes the temp dir; safe to call twice."""
        atexit.unregister(self.close)
        for proc in (self._firewalld, self._dbus):
            if proc is not None and proc.poll() is None:
                proc.terminate()  # firewalld flushes its table (CleanupOnExit); the lab drops it anyway
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
        self._firewalld = self._dbus = None
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> FirewalldLab:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- talking to it ----------------------------------------------------------------

    def _run_cmd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*self._nsenter(), FIREWALL_CMD, *args],
            capture_output=True, text=True, check=False, env=self._env(), timeout=60,
        )

    def firewall_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Runs `firewall-cmd ARGS` against this instance (its namespace, its bus)."""
        if self._firewalld is None:
            raise FirewalldError("firewalld lab not started")
        res = self._run_cmd(*args)
        if check and res.returncode != 0:
            raise FirewalldError(f"firewall-cmd {' '.join(args)}: exit {res.returncode}: {res.stderr.strip()}")
        return res

    def run_fix(self, command: str) -> subprocess.CompletedProcess[str]:
        """Runs one printed fix line (`firewall-cmd ...`, shell-quoted) against this instance.

        The line is split as a shell would (shlex), and must be firewall-cmd,
        optionally behind the prefix that runs it in this namespace (`ip netns
        exec NAME`, `nsenter --net=PATH --`): what the user pastes is what the
        test runs.
        """
        import shlex

        words = shlex.split(command)
        if words[:3] == ["ip", "netns", "exec"] and len(words) > 3 and words[3] == self.ns.name:
            words = words[4:]  # the namespace prefix of a fix line: this instance's namespace
        elif words[:3] == ["nsenter", f"--net={self.ns.path}", "--"]:
            words = words[3:]
        if not words or os.path.basename(words[0]) != "firewall-cmd":
            raise FirewalldError(f"not a firewall-cmd line: {command!r}")
        return self.firewall_cmd(*words[1:])
