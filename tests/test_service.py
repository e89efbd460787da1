"""`tracer run`, the daemon: its configuration file, systemd's notify protocol, reload and stop.

The configuration tests need nothing but the parser. The others run the
real daemon as a child process against a lab (namespaces, nft rulesets,
real drops), with a NOTIFY_SOCKET the test listens on, as systemd would
provide, and check the events in the outputs the daemon writes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import textwrap
import threading
import time
import urllib.request
from pathlib import Path

import orjson
import pytest

from tests.support import root_ruleset, stop_process, tracer_cmd, wait_for, wait_ready
from tracer.config import ConfigError
from tracer.service import config as service_config
from tracer.service.notify import Notifier

REPO = Path(__file__).resolve().parent.parent

#: The configuration of issue 9, exactly: it must run as it is.
ISSUE_EXAMPLE = """\
[watch]
port = [7443, 7444]

[spool]
dir = "/var/lib/tracer/spool"

[[output]]
type = "file"
path = "/var/log/tracer/drops.ndjson"

[[output]]
type = "syslog"
address = "tcp://127.0.0.1:6514"

[[output]]
type = "elasticsearch"
url = "http://127.0.0.1:9200"
index = "tracer-drops"
"""


def write(tmp_path: Path, text: str, name: str = "tracer.toml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def one_file_output(tmp_path: Path, port: int, path: Path, name: str | None = None) -> Path:
    """tracer.toml watching `port`, with one file output to `path` (named `name` if given): the reload tests' start."""
    named = f'name = "{name}"\n' if name is not None else ""
    return write(tmp_path, f'[watch]\nport = {port}\n[[output]]\ntype = "file"\n{named}path = "{path}"\n')


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(tracer_cmd("run", "--check-config", "--config", str(path)),
                          check=False, capture_output=True, text=True, timeout=60)


# ------------------------------------------------------------------ configuration


def test_the_issue_example_checks(tmp_path):
    cfg = service_config.load(write(tmp_path, ISSUE_EXAMPLE))
    assert [o.name for o in cfg.outputs] == ["file", "syslog", "elasticsearch"]
    assert cfg.watch.scope.ports == (7443, 7444)
    assert cfg.spool_dir == Path("/var/lib/tracer/spool")
    assert cfg.metrics_listen is None  # off by default


def test_the_shipped_example_checks():
    result = check(REPO / "systemd" / "tracer.toml")
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stderr


@pytest.mark.parametrize(("text", "where", "message"), [
    ("[watch]\nports = 80\n[[output]]\ntype = \"stdout\"\n", ":2: watch.ports", "did you mean 'port'"),
    ("[watch]\nport = 99999\n[[output]]\ntype = \"stdout\"\n", ":2: watch.port", "1 to 65535"),
    ("[watch]\nmax_rate = \"fast\"\n[[output]]\ntype = \"stdout\"\n", ":2: watch.max_rate", "not a whole number"),
    ("[[output]]\ntype = \"stdout\"\n[[output]]\ntype = \"kafka\"\n", ":4: output[2].type", "'kafka' is not one of"),
    ("[[output]]\ntype = \"file\"\npath = 3\n", ":3: output[1].path", "3 is not a string"),
    ("[[output]]\ntype = \"file\"\n", "output[1].path", "required"),
    ("[[output]]\ntype = \"file\"\npath = \"/proc/version/x.ndjson\"\n", ":3: output[1].path", "not a directory"),
    ("[[output]]\ntype = \"file\"\npath = \"relative.ndjson\"\n", ":3: output[1].path", "absolute"),
    ("[spool]\ndir = \"/proc/version/spool\"\n[[output]]\ntype = \"stdout\"\n", ":2: spool.dir", "not a directory"),
    ("[metrics]\nlisten = \"localhost\"\n[[output]]\ntype = \"stdout\"\n", ":2: metrics.listen", ""),
    ("[log]\nlevel = \"loud\"\n[[output]]\ntype = \"stdout\"\n", ":2: log.level", "not one of"),
    ("[watch]\n", "output", "no [[output]]"),
    ("[wach]\n[[output]]\ntype = \"stdout\"\n", ":1: wach", "unknown table"),
    ("[[output]]\ntype = \"stdout\"\nname = \"a b\"\n", ":3: output[1].name", "letters, digits"),
    ("[[output]]\ntype = \"stdout\"\n[[output]]\ntype = \"stdout\"\nname = \"stdout-1\"\n",
     ":5: output[2].name", "another output"),
    ("[[output]\ntype = \"stdout\"\n", "not valid TOML", "line 1"),
])
def test_a_bad_configuration_names_the_line_and_key(tmp_path, text, where, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        service_config.load(path)
    assert where in str(info.value) and message in str(info.value), str(info.value)
    result = check(path)  # the command line: one line, exit 2
    assert result.returncode == 2, result.stderr
    assert where in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_run_refuses_a_bad_configuration_before_touching_the_host(tmp_path):
    """`tracer run` itself (not only --check-config): exit 2, one line, nothing started."""
    path = write(tmp_path, "[[output]]\ntype = \"file\"\npath = \"/proc/version/x\"\n")
    result = subprocess.run(tracer_cmd("run", "--config", str(path)), check=False, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert ":3: output[1].path" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_file_is_a_clear_error(tmp_path):
    result = check(tmp_path / "absent.toml")
    assert result.returncode == 2
    assert "cannot read the configuration" in result.stderr


def test_an_unreachable_address_is_not_a_configuration_error(tmp_path):
    """Only unreachable now: the daemon starts and spools (tested end to end below)."""
    path = write(tmp_path, f"""
        [spool]
        dir = "{tmp_path}/spool"
        [[output]]
        type = "syslog"
        address = "tcp://198.18.255.254:6514"
    """)
    assert check(path).returncode == 0


# ------------------------------------------------------------------ notify protocol


class NotifySocket:
    """The service manager's end of NOTIFY_SOCKET: the datagrams the daemon sends."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[dict[str, str]] = []

    def poll(self) -> None:
        with contextlib.suppress(TimeoutError, BlockingIOError):
            while True:
                data = self.sock.recv(4096)
                self.messages.append(dict(line.split("=", 1) for line in data.decode().splitlines()))

    def wait(self, key: str, value: str = "1", timeout: float = 30.0, after: int = 0) -> int:
        """The index of the first message at or after `after` with key=value."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.poll()
            for i, m in enumerate(self.messages[after:], after):
                if m.get(key) == value:
                    return i
        raise AssertionError(f"no {key}={value} notification; got {self.messages}")

    def close(self) -> None:
        self.sock.close()


def test_notifier_sends_one_datagram_per_call(tmp_path):
    ns = NotifySocket(tmp_path / "notify")
    try:
        n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "1000000",
                      "WATCHDOG_PID": str(os.getpid())})
        assert n.watchdog_seconds == 1.0
        n.ready("watching\nREADY=0")  # a newline in a status cannot forge a field
        n.watchdog()
        n.watchdog()  # within half the interval: not sent again
        n.close()
        time.sleep(0.1)
        ns.poll()
    finally:
        ns.close()
    assert ns.messages[0]["READY"] == "1" and ns.messages[0]["STATUS"] == "watching READY=0"
    assert [m for m in ns.messages if "WATCHDOG" in m] == [{"WATCHDOG": "1"}]
    assert Notifier({}).enabled is False
    assert Notifier({"WATCHDOG_USEC": "5", "WATCHDOG_PID": "1"}).watchdog_seconds is None  # not ours


class Daemon:
    """`tracer run` as a child process, as systemd would start it."""

    def __init__(self, config: Path, tmp_path: Path, *, watchdog_usec: int = 1_000_000,
                 wrap: list[str] | None = None) -> None:
        self.notify = NotifySocket(tmp_path / f"notify-{time.monotonic_ns()}")
        env = {**os.environ, "NOTIFY_SOCKET": str(self.notify.path), "WATCHDOG_USEC": str(watchdog_usec)}
        env.pop("WATCHDOG_PID", None)
        self.stderr_path = tmp_path / f"daemon-{time.monotonic_ns()}.log"
        self._stderr = self.stderr_path.open("w")
        self.proc = subprocess.Popen([*(wrap or []), *tracer_cmd("run", "--config", str(config))],
                                     stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)

    def ready(self, timeout: float = 45.0) -> None:
        try:
            self.notify.wait("READY", timeout=timeout)
        except AssertionError:
            raise AssertionError(f"never ready (exit {self.proc.poll()}): {self.log()}") from None

    def log(self) -> str:
        return self.stderr_path.read_text()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        stop_process(self.proc, sig, timeout)
        self.notify.poll()
        return self.proc.returncode

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._stderr.close()
        self.notify.close()


@pytest.fixture
def daemons():
    started: list[Daemon] = []

    def start(*args, **kw) -> Daemon:
        d = Daemon(*args, **kw)
        started.append(d)
        return d

    yield start
    for d in started:
        d.close()


def watching(daemons, lab, server, config: Path, tmp_path: Path, **kw) -> Daemon:
    """A daemon started, ready, and tracing in the lab's server namespace."""
    d = daemons(config, tmp_path, **kw)
    d.ready()
    wait_ready(lab, server)
    return d


def scrape(port: int) -> dict[str, dict[tuple, float]]:
    """The daemon's /metrics, parsed: metric name -> sorted labels -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def events(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line]


def udp_drops(path: Path, port: int, prefix: str) -> list[dict]:
    return [e for e in events(path) if e.get("destination", {}).get("port") == port
            and e.get("netns", {}).get("name", "").startswith(prefix)]


@pytest.mark.root
@pytest.mark.bpf
def test_notify_reload_and_stop(net, tmp_path, daemons):
    """READY once attached, WATCHDOG while running, RELOADING/READY around SIGHUP, STOPPING at
    SIGTERM; exit 0 with every ruleset as it was."""
    lab, client, server, link = net
    before = {ns.name: lab.nft_list(ns) for ns in (client, server)}
    root_before = root_ruleset()
    metrics = free_port()
    config = write(tmp_path, f"""
        [watch]
        port = [7443]
        [spool]
        dir = "{tmp_path}/spool"
        [metrics]
        listen = "127.0.0.1:{metrics}"
        [[output]]
        type = "file"
        path = "{tmp_path}/drops.ndjson"
    """)
    d = watching(daemons, lab, server, config, tmp_path, watchdog_usec=400_000)
    ready_at = d.notify.wait("READY")
    assert "MAINPID" in d.notify.messages[ready_at]
    first_ping = d.notify.wait("WATCHDOG", after=ready_at)
    d.notify.wait("WATCHDOG", after=first_ping + 1)  # repeated
    lab.udp_send(client, str(link.b_v4.ip), 7443)
    assert wait_for(lambda: udp_drops(tmp_path / "drops.ndjson", 7443, lab.prefix), timeout=10), d.log()
    scraped = scrape(metrics)
    assert scraped["tracer_output_up"][(("output", "file"),)] == 1
    assert scraped["tracer_output_events_total"][(("outcome", "delivered"), ("output", "file"))] >= 1
    assert any(dict(labels).get("reason") == "NETFILTER_DROP" for labels in scraped["tracer_drops_total"])
    d.proc.send_signal(signal.SIGHUP)
    reloading = d.notify.wait("RELOADING")
    d.notify.wait("READY", after=reloading)
    assert d.stop() == 0, d.log()
    d.notify.wait("STOPPING")
    assert "Traceback" not in d.log()
    assert {ns.name: lab.nft_list(ns) for ns in (client, server)} == before
    assert root_ruleset() == root_before
    assert (tmp_path / "drops.ndjson").stat().st_mode & 0o777 == 0o600


@pytest.mark.root
@pytest.mark.bpf
def test_reload_moves_the_filter_and_adds_an_output(net, tmp_path, daemons):
    lab, client, server, link = net
    first, second = tmp_path / "first.ndjson", tmp_path / "second.ndjson"
    config = one_file_output(tmp_path, 7443, first, name="first")
    d = watching(daemons, lab, server, config, tmp_path)
    lab.udp_send(client, str(link.b_v4.ip), 7443)
    lab.udp_send(client, str(link.b_v4.ip), 7444)
    assert wait_for(lambda: udp_drops(first, 7443, lab.prefix), timeout=10), d.log()
    write(tmp_path, f"""
        [watch]
        port = 7444
        [[output]]
        type = "file"
        name = "first"
        path = "{first}"
        [[output]]
        type = "file"
        name = "second"
        path = "{second}"
    """)
    d.proc.send_signal(signal.SIGHUP)
    d.notify.wait("READY", after=d.notify.wait("RELOADING"))
    seen_7443 = len(udp_drops(first, 7443, lab.prefix))
    for _ in range(3):
        lab.udp_send(client, str(link.b_v4.ip), 7444)
        lab.udp_send(client, str(link.b_v4.ip), 7443)
        time.sleep(0.2)
    assert wait_for(lambda: udp_drops(second, 7444, lab.prefix) and udp_drops(first, 7444, lab.prefix),
                    timeout=10), d.log()
    time.sleep(1.0)
    assert len(udp_drops(first, 7443, lab.prefix)) == seen_7443  # the old filter is gone
    assert not udp_drops(second, 7443, lab.prefix)
    assert d.stop() == 0, d.log()


@pytest.mark.root
@pytest.mark.bpf
def test_a_reload_with_a_bad_config_keeps_the_running_one(net, tmp_path, daemons):
    lab, client, server, link = net
    out = tmp_path / "drops.ndjson"
    config = one_file_output(tmp_path, 7443, out)
    d = watching(daemons, lab, server, config, tmp_path)
    config.write_text("[watch]\nport = 0\n")
    d.proc.send_signal(signal.SIGHUP)
    d.notify.wait("READY", after=d.notify.wait("RELOADING"))
    assert "reload refused" in d.log()
    lab.udp_send(client, str(link.b_v4.ip), 7443)
    assert wait_for(lambda: udp_drops(out, 7443, lab.prefix), timeout=10), d.log()
    assert d.stop() == 0


@pytest.mark.root
@pytest.mark.bpf
def test_the_issue_example_runs_as_is(net, tmp_path, daemons):
    """The issue's file, unchanged, in a private mount namespace whose /var/lib and /var/log are
    fresh tmpfs (the host's stay untouched): it starts, writes the file output, and spools for
    the syslog and Elasticsearch outputs that nothing listens for."""
    lab, client, server, link = net
    config = write(tmp_path, ISSUE_EXAMPLE)
    wrap = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
            'mount -t tmpfs tracer-test /var/lib && mount -t tmpfs tracer-test /var/log && exec "$@"', "sh"]
    d = watching(daemons, lab, server, config, tmp_path, wrap=wrap)
    root = Path(f"/proc/{d.proc.pid}/root")
    out = root / "var/log/tracer/drops.ndjson"
    for port in (7443, 7444, 9999):
        lab.udp_send(client, str(link.b_v4.ip), port)
    assert wait_for(lambda: udp_drops(out, 7443, lab.prefix) and udp_drops(out, 7444, lab.prefix),
                    timeout=10), d.log()
    assert not udp_drops(out, 9999, lab.prefix)
    spool = root / "var/lib/tracer/spool"
    assert wait_for(lambda: {p.name for p in spool.glob("*.sqlite")} >= {"syslog.sqlite", "elasticsearch.sqlite"},
                    timeout=10), d.log()
    assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log()


class SyslogReceiver:
    """A TCP syslog receiver the test owns: octet-counted frames (RFC 6587), the JSON of each."""

    def __init__(self, port: int) -> None:
        self.server = socket.create_server(("127.0.0.1", port))
        self.server.settimeout(0.2)
        self.frames: list[bytes] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            threading.Thread(target=self._read, args=(conn,), daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        buf = b""
        with conn:
            conn.settimeout(0.2)
            while not self._stop:
                try:
                    data = conn.recv(1 << 16)
                except TimeoutError:
                    continue
                if not data:
                    return
                buf += data
                while b" " in buf:
                    length, _, rest = buf.partition(b" ")
                    if len(rest) < int(length):
                        break
                    self.frames.append(rest[:int(length)])
                    buf = rest[int(length):]

    def events(self) -> list[dict]:
        return [orjson.loads(f[f.index(b"{"):]) for f in list(self.frames)]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.server.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.root
@pytest.mark.bpf
def test_a_down_output_spools_across_a_kill_and_delivers_in_order(net, tmp_path, daemons):
    """syslog down: events wait in the spool; the daemon is SIGKILLed; once the receiver is up
    and the daemon restarted, every event arrives, in the order the file output got them."""
    lab, client, server, link = net
    before = {ns.name: lab.nft_list(ns) for ns in (client, server)}
    port = free_port()
    reference = tmp_path / "drops.ndjson"
    config = write(tmp_path, f"""
        [watch]
        port = 7443
        every_drop = true
        [spool]
        dir = "{tmp_path}/spool"
        [[output]]
        type = "file"
        path = "{reference}"
        [[output]]
        type = "syslog"
        address = "tcp://127.0.0.1:{port}"
    """)
    d = watching(daemons, lab, server, config, tmp_path)
    for _ in range(20):
        lab.udp_send(client, str(link.b_v4.ip), 7443)
    assert wait_for(lambda: len(udp_drops(reference, 7443, lab.prefix)) == 20, timeout=15), d.log()
    time.sleep(1.0)  # the syslog worker spools what it takes at once; a second is plenty
    assert d.stop(signal.SIGKILL) == -signal.SIGKILL
    assert (tmp_path / "spool" / "syslog.sqlite").exists()
    receiver = SyslogReceiver(port)
    try:
        again = daemons(config, tmp_path)
        again.ready()

        def ours() -> list[dict]:
            return [e for e in receiver.events() if e.get("destination", {}).get("port") == 7443
                    and e.get("netns", {}).get("name", "").startswith(lab.prefix)]

        assert wait_for(lambda: len(ours()) >= 20, timeout=30), again.log()
        sent = [(e["@timestamp"], e["source"]["port"]) for e in udp_drops(reference, 7443, lab.prefix)]
        got = [(e["@timestamp"], e["source"]["port"]) for e in ours()]
        assert got == sent  # all of them, once each, in order
        assert again.stop() == 0, again.log()
    finally:
        receiver.close()
    assert {ns.name: lab.nft_list(ns) for ns in (client, server)} == before
