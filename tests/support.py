"""Helpers shared by the end-to-end tests: running the engine, waiting for events."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from tracer.cli import demo
from tracer.config import Config, Scope, host_networks
from tracer.event.model import DropEvent
from tracer.event.rendered import Rendered
from tracer.event.schema import validate
from tracer.pipeline.engine import Engine

LAB_NETS = host_networks(["198.18.0.0/15", "2001:db8::/32"])

SERVER_RULESET = """
table inet fw {
    chain input {
        type filter hook input priority filter; policy drop;
        ct state established,related accept
        ct state invalid drop comment "invalid"
        iif "lo" accept
        tcp dport 22 accept
        tcp dport 443 drop comment "legacy block"
        tcp dport 443 accept
        jump checks
    }
    chain checks {
        udp dport 53 drop comment "no dns"
    }
}
"""

# The demo's client: input policy drop, `ct state invalid drop`, no rule for replies.
CLIENT_RULESET = demo.CLIENT_RULESET

_OPTION_KEYS = {"nftrace", "nf_mode", "stack", "verdict_wait", "trace_rate", "every_drop", "summary_interval"}


class Collector:
    """A sink that validates every event and lets a test wait for one.

    With `netns_prefix`, events from other namespaces (another lab running
    at the same time reuses the same addresses) are validated, then ignored.
    """

    def __init__(self, netns_prefix: str | None = None, validate: bool = True) -> None:
        self.events: list[dict] = []
        self.counters: list[dict] = []
        self._models: dict[int, DropEvent] = {}  # id of an event in `events` -> its model
        self._cond = threading.Condition()
        self._prefix = netns_prefix
        self._validate = validate  # ~10 ms an event: off where a test needs thousands

    def submit(self, rendered: Rendered) -> None:
        event = rendered.ecs()
        if self._validate:
            validate(event)
        if event["event"]["dataset"] == "tracer.counter":
            # Counter rises (tracer.collectors.counters) are kept apart: tests read drops and notices.
            with self._cond:
                self.counters.append(event)
                self._cond.notify_all()
            return
        if self._prefix and not event.get("netns", {}).get("name", "").startswith(self._prefix):
            return
        with self._cond:
            self.events.append(event)
            self._models[id(event)] = rendered.event
            self._cond.notify_all()

    def model(self, event: dict) -> DropEvent:
        """The event model behind one of `events` (what the text view is made from)."""
        with self._cond:
            return self._models[id(event)]

    def wait_for(self, pred, timeout: float = 3.0) -> dict:
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for ev in self.events:
                    if pred(ev):
                        return ev
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"no matching event in {timeout}s; got {self.events}")
                self._cond.wait(left)


class Watch:
    """The engine running in a thread, as `tracer watch` runs it.

    Keyword arguments are Scope fields, or Config fields for
    the few options tests vary. The filter defaults to the lab's addresses.
    """

    def __init__(self, netns_prefix: str | None = None, validate: bool = True, **kw) -> None:
        options = {k: kw.pop(k) for k in list(kw) if k in _OPTION_KEYS}
        kw.setdefault("hosts", LAB_NETS)
        self.sink = Collector(netns_prefix, validate)
        self.engine = Engine(Config(scope=Scope(**kw), **options), self.sink)
        self.engine.start()
        self.thread = threading.Thread(target=self.engine.run, daemon=True)
        self.thread.start()
        time.sleep(0.3)

    def stop(self) -> None:
        self.engine.stop()
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()


def to_port(port: int, dst: str | None = None):
    def pred(ev: dict) -> bool:
        return ev.get("destination", {}).get("port") == port and (dst is None or ev["destination"]["ip"] == dst)
    return pred


def rule_handles(lab, ns) -> dict[str, int]:
    """Rule text (without comment) -> handle, as `nft -a` lists it."""
    out = lab.run(ns, ["nft", "-a", "-s", "list", "ruleset"]).stdout
    handles = {}
    for line in out.splitlines():
        line = line.strip()
        if "# handle" not in line or line.startswith(("table", "chain", "type")):
            continue
        text, handle = line.rsplit(" # handle ", 1)
        handles[text.split(' comment "', 1)[0]] = int(handle)
    return handles


def doc_examples(*, notices: bool = False) -> list[dict]:
    """The complete events in docs/drop-event.md's ```json blocks: drop events (and
    summaries), or with `notices` the notices (alerts, loss reports) instead."""
    import json
    import re
    from pathlib import Path

    from tracer.event.schema import NOTICE_EVENT, schema_of

    text = (Path(__file__).resolve().parent.parent / "docs" / "drop-event.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```json\n(.*?)```", text, re.S)
    events = [e for e in map(json.loads, blocks) if isinstance(e, dict) and "@timestamp" in e]
    return [e for e in events if (schema_of(e) == NOTICE_EVENT) == notices]


def stop_process(proc: subprocess.Popen, sig: int, timeout: float) -> None:
    """Ends a tracer the test started: `sig` (as a user would), then SIGKILL after `timeout`."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def tracer_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "tracer", *args]


def wait_ready(lab, ns, timeout: float = 15.0) -> None:
    """Until the tracer's marking table is in the namespace (it is then tracing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "tracer_mark" in lab.nft_list(ns):
            time.sleep(0.3)
            return
        time.sleep(0.1)
    raise AssertionError("tracer never installed its marking table")


def root_ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True, check=True).stdout


# ------------------------------------------------------------ collector tests


def datagram(link, l4, v6: bool = False, ident: int = 4242) -> bytes:
    """A client->server datagram with fields fixed so its fingerprint is known."""
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6

    if v6:
        return bytes(IPv6(src=str(link.a_v6.ip), dst=str(link.b_v6.ip), fl=ident) / l4)
    return bytes(IP(src=str(link.a_v4.ip), dst=str(link.b_v4.ip), id=ident) / l4)


def fingerprint_of(data: bytes) -> bytes:
    """The drop/trace join key of a whole datagram."""
    from tracer.event import packet

    hlen = (data[0] & 0x0F) * 4 if data[0] >> 4 == 4 else 40
    fp = packet.fingerprint(data[:hlen], data[hlen:])
    assert fp is not None
    return fp


def send_and_wait(lab, col, src, dst, data: bytes, timeout: float = 5.0):
    """Sends a datagram and waits for the collector's verdict on it."""
    lab.send_ip(src, data)
    return col.wait_verdict(dst.inode, fingerprint_of(data), timeout)


def fields(v, *names: str) -> dict:
    from dataclasses import asdict

    assert v is not None, "no verdict arrived"
    d = asdict(v)
    return {k: d[k] for k in names}


def wait_for(predicate, timeout: float = 3.0) -> bool:
    """Polls `predicate` until it is true or `timeout` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return bool(predicate())


#: The UDP port nobody's namespace (`start_nobody`) drops with its own rule.
NOBODY_PORT = 7445


def nobody_script(comment: str) -> str:
    """bash for nobody's own user and network namespace (what a rootless container is; no `ip netns`
    name shows it): lo up, a ruleset of its own dropping UDP to NOBODY_PORT with the rule comment
    `comment`, READY, then one datagram to that port (and SENT) for each line read."""
    rule = f'udp dport {NOBODY_PORT} counter drop comment "{comment}";'
    return ("\nset -e\nip link set lo up\nnft -f - <<'NFT'\ntable ip fw {\n"
            f"  chain input {{ type filter hook input priority 0; policy accept; {rule} }}\n"
            "}\nNFT\necho READY\n"
            f"while read -r _; do echo x > /dev/udp/127.0.0.1/{NOBODY_PORT} || true; echo SENT; done\n")


def start_nobody(comment: str, setpriv: str = "setpriv") -> subprocess.Popen[str]:
    """nobody (65534) in a user and network namespace of its own running `nobody_script(comment)`;
    returns once its ruleset is in (killed if it never says READY). The caller kills it."""
    proc = subprocess.Popen(
        [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
         "unshare", "--user", "--map-root-user", "--net", "bash", "-c", nobody_script(comment)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
    except BaseException:
        proc.kill()
        proc.wait(timeout=10)
        raise
    return proc


def send_from_nobody(proc: subprocess.Popen[str]) -> None:
    """One datagram from inside nobody's namespace (`start_nobody`) to its dropping port."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "SENT"


def wait_started(proc: subprocess.Popen, ready: Callable[[], bool], stderr_file: Path,
                 timeout: float = 10.0) -> str | None:
    """Polls `ready()` while a receiver the test started comes up: None once it is true, else why
    not ("exited: " and its stderr_file, or "not ready within N s"), for the caller's own failure."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            return f"exited: {stderr_file.read_text()}"
        if time.monotonic() > deadline:
            return f"not ready within {timeout:g} s"
        time.sleep(0.05)
    return None


T = TypeVar("T")


def wait_for_n(read: Callable[[], list[T]], n: int, timeout: float, step: float,
               short: Callable[[list[T]], str]) -> list[T]:
    """Polls `read()` (what a receiver has so far) until it holds `n` items, and returns them;
    AssertionError with `short(got)` if it never does within `timeout`."""
    deadline = time.monotonic() + timeout
    while len(got := read()) < n:
        if time.monotonic() > deadline:
            raise AssertionError(short(got))
        time.sleep(step)
    return got
