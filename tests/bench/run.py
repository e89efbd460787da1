"""Benchmarks of `tracer watch`, in a lab of network namespaces made here.

Run as root: `.venv/bin/python -m tests.bench.run` (about 9 minutes; see README.md).

Benchmarks print figures and ratios measured side by side in one run; they
assert nothing about absolute times. Five phases here, and issue 8's flood
phases (flood, flows, accepted) in tests/bench/flood.py:

1. latency: from the kernel's drop (the event's `@timestamp`, the drop time
   converted to wall clock) to the NDJSON line read from `tracer watch
   --json` stdout, for a drop by an nftables rule (nftrace attribution) and
   a drop outside netfilter (UDP to a closed port, NO_SOCKET);
2. throughput: UDP floods at increasing rates, to a closed port and into an
   nftables drop rule; what the sender sent and the kernel dropped against
   what the tracer printed, lost in its ring buffer (BPF side) or in its
   event queue (Python side), or had not printed yet when the step ended;
   then the same flood with `--port` set to a port the flood does not use;
3. overhead: sender packet rate and a TCP transfer between two namespaces
   without a tracer, with one filtered to unrelated traffic, and with one
   printing every drop (or watching all the transfer's packets);
4. idle CPU of `tracer watch` over 30 s;
5. scale: one tracer over 1, 10, 100 and 300 namespaces, each with a
   ruleset: the time from launching it to the last namespace's first drop
   printed with its rule, its threads, RSS and CPU while idle.

Safety: all traffic stays between namespaces created here (198.18.0.0/15
only, no default route; the scale phase's on each namespace's loopback);
every tracer of phases 1-4 is started with `--netns` on a lab namespace, so
no firewall outside the lab is touched. The scale phase's tracer watches
every namespace (that is what it measures), for one UDP port only; it runs
only when the host's own ruleset has no hooked chain, so it never marks the
host (other namespaces with rulesets get its owner-flagged marking table
while it runs, as under any `tracer watch`). Tracers, senders and
namespaces are removed at the end, on an error and on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from tracer import netns as netns_mod
from tracer.lab import Lab

CLK_TCK = os.sysconf("SC_CLK_TCK")

#: UDP ports: 9000-9999 are dropped by the receiver's nftables rule, the rest
#: are closed (NO_SOCKET). 5001/5002 are open (TCP and UDP sinks).
NFT_PORT_BASE = 9000
CLOSED_PORT_BASE = 20000
SENTINEL_PORT = 29999  # closed: its first event shows the tracer is printing
UNRELATED_PORT = 29998  # closed, never flooded: the `--port` filter of the "filtered" runs
TCP_PORT = 5001
UDP_SINK_PORT = 5002

RULESET = """
table inet bench {
    chain input {
        type filter hook input priority filter; policy accept;
        udp dport 9000-9999 counter drop comment "bench drop"
    }
}
"""

NFTRACE = b'"attribution":"nftrace"'
QUEUE_FULL_EVENT = "event queue full, drop event lost"  # the engine's warning (a `lost` count)
#: `tracer watch`'s default --trace-rate, and the burst it derives (rate // 10).
TRACE_RATE, TRACE_BURST = 1000, 100

# A paced UDP sender: `rate` packets per second (0: as fast as it can) for
# `dur` seconds from the wall-clock time `start_at`; prints sent, errors, seconds.
SENDER = r"""
import socket, sys, time
dst, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
dur, start_at, size = min(float(sys.argv[4]), 60.0), float(sys.argv[5]), int(sys.argv[6])
s = socket.socket(socket.AF_INET6 if ":" in dst else socket.AF_INET, socket.SOCK_DGRAM)
send, addr, data = s.sendto, (dst, port), b"b" * size
tried = err = 0
delay = start_at - time.time()
if delay > 0:
    time.sleep(delay)
t0 = time.perf_counter()
end = t0 + dur
while True:
    now = time.perf_counter()
    if now >= end:
        break
    if rate > 0:
        n = int((now - t0) * rate) + 1 - tried
        if n <= 0:
            time.sleep(0.0002)
            continue
        n = min(n, 256)
    else:
        n = 256
    for _ in range(n):
        try:
            send(data, addr)
        except OSError:
            err += 1
    tried += n
print(tried - err, err, time.perf_counter() - t0, flush=True)
"""

# Sinks (in rcv) for accepted traffic; they exit by themselves after SINK_LIFETIME s.
UDP_SINK = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(1.0)
end, buf = time.monotonic() + float(sys.argv[2]), bytearray(2048)
while time.monotonic() < end:
    try:
        s.recv_into(buf)
    except TimeoutError:
        pass
"""

TCP_SINK = r"""
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(4)
s.settimeout(1.0)
end, buf = time.monotonic() + float(sys.argv[2]), bytearray(1 << 20)
while time.monotonic() < end:
    try:
        c, _ = s.accept()
    except TimeoutError:
        continue
    c.settimeout(30)
    with c:
        while c.recv_into(buf):
            pass
"""
SINK_LIFETIME = 600

TCP_SOURCE = r"""
import socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
dur, data, n = min(float(sys.argv[3]), 60.0), b"x" * (1 << 18), 0
t0 = time.perf_counter()
while time.perf_counter() - t0 < dur:
    s.sendall(data)
    n += len(data)
el = time.perf_counter() - t0
s.close()
print(n, el, flush=True)
"""


class BenchError(RuntimeError):
    pass


def log(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


#: Set by --tracer-cmd, to measure another build (a patched copy) with the same bench.
TRACER_CMD: list[str] | None = None


def tracer_command() -> list[str]:
    if TRACER_CMD:
        return TRACER_CMD
    script = Path(sys.executable).parent / "tracer"
    return [str(script)] if script.exists() else [sys.executable, "-m", "tracer"]


def port_pat(port: int) -> bytes:
    """How a destination port appears in an event (source ports here are all ephemeral, >= 32768)."""
    return b'"port":%d}' % port


def iso_to_epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()  # 3.11 reads the "Z"


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))
    return s[k]


def cpu_ticks(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class OtherLoad:
    """CPU used by processes that are not the bench's (another test run, a VM...).

    Sums utime+stime of every user process outside the bench's process tree
    between two snapshots; a busy machine makes every figure here slower.
    """

    def __init__(self) -> None:
        self.t0 = time.time()
        self.snap0 = self._snapshot()

    @staticmethod
    def _snapshot() -> dict[int, int]:
        me = os.getpid()
        parents: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid = int(d)
            parents[pid] = int(fields[1])
            ticks[pid] = int(fields[11]) + int(fields[12])
        out = {}
        for pid, t in ticks.items():
            p, ours = pid, False
            while p > 2:  # kernel threads (children of kthreadd, 2) are left out
                if p == me:
                    ours = True
                    break
                p = parents.get(p, 0)
            if not ours and p != 2 and pid != 2:
                out[pid] = t
        return out

    def percent(self) -> float:
        """% of the whole machine (all CPUs) used by others since the start."""
        snap1 = self._snapshot()
        used = sum(t - self.snap0.get(pid, 0) for pid, t in snap1.items())
        return used / CLK_TCK / (time.time() - self.t0) / (os.cpu_count() or 1) * 100


# ----------------------------------------------------------------------- tracer


class Tracer:
    """`tracer watch --json ARGS` with its stdout counted and its stderr parsed.

    stdout is read in chunks, as the tracer flushes them; per chunk the
    reader counts registered byte patterns (a destination port, the nftrace
    attribution) and notes the lag (read time - @timestamp) of the oldest
    line matching `lag_pattern`. With `keep`, every line is kept with the
    time it was read, for latency figures. No JSON is parsed on this path,
    so the bench's own CPU stays small (~3% of a core at 5000 lines/s).
    With `out`, stdout goes to that file instead, as `> FILE` would, and the
    bench reads nothing while the tracer runs (the flood phases).
    """

    live: ClassVar[list[Tracer]] = []
    watching: ClassVar[dict] = {}  # what the last tracer said it attached (its "watching" log line)

    def __init__(self, args: list[str], *, keep: bool = False, out: Path | None = None) -> None:
        self.args = args
        self.keep = keep
        self.started = time.time()
        # cwd "/": with `python -m tracer` a checkout in the cwd would win over PYTHONPATH.
        with open(out, "wb") if out else contextlib.nullcontext(subprocess.PIPE) as stdout:
            self.proc = subprocess.Popen([*tracer_command(), "--log-level", "info", "watch", "--json", *args],
                                         cwd="/", stdout=stdout, stderr=subprocess.PIPE, bufsize=0)
        Tracer.live.append(self)
        self.lines = 0
        self.counts: Counter[bytes] = Counter()
        self.patterns: list[bytes] = []
        self.kept: list[tuple[float, bytes]] = []
        self.lag_pattern = b""  # lines whose lag (read time - @timestamp) is recorded
        self.lags: list[tuple[float, float]] = []  # (read time, lag of the chunk's oldest such line)
        self.log_events: Counter[str] = Counter()
        self.log_samples: list[dict] = []
        self.ring_lost_at_exit = 0
        self.watching_at = 0.0  # when its "watching" line (everything attached) was read
        self._cond = threading.Condition()
        self._map_id: int | None = None
        self._readers = [threading.Thread(target=self._read_stderr, daemon=True)]
        if out is None:
            self._readers.append(threading.Thread(target=self._read_stdout, daemon=True))
        for t in self._readers:
            t.start()

    # --- readers

    def _read_stdout(self) -> None:
        fd = self.proc.stdout.fileno()
        rest = b""
        while True:
            chunk = os.read(fd, 1 << 20)
            now = time.time()
            if not chunk:
                break
            data = rest + chunk
            cut = data.rfind(b"\n") + 1
            if not cut:
                rest = data
                continue
            done, rest = data[:cut], data[cut:]
            lag = None
            hit = done.find(self.lag_pattern) if self.lag_pattern else -1
            if hit >= 0:  # the oldest line of the measured flow in this chunk
                start = done.rfind(b"\n", 0, hit) + 1
                if done.startswith(b'{"@timestamp":"', start):
                    with contextlib.suppress(ValueError):
                        lag = now - iso_to_epoch(done[start + 15:start + 42].decode())
            with self._cond:
                self.lines += done.count(b"\n")
                for pat in self.patterns:
                    self.counts[pat] += done.count(pat)
                if lag is not None:
                    self.lags.append((now, lag))
                if self.keep:
                    self.kept.extend((now, line) for line in done.splitlines())
                self._cond.notify_all()

    def _read_stderr(self) -> None:
        for raw in self.proc.stderr:
            try:
                rec = json.loads(raw)
            except ValueError:
                rec = {"event": raw.decode(errors="replace").strip()}
            name = str(rec.get("event", ""))
            # The queue-full warning says how many events it stands for (older builds: one each).
            self.log_events[name] += int(rec.get("lost", 1)) if name == QUEUE_FULL_EVENT else 1
            if name.startswith("ring buffer overflowed"):
                self.ring_lost_at_exit = int(rec.get("lost", 0))
            elif name == "watching":
                Tracer.watching = {k: rec.get(k) for k in ("drop_program", "netfilter_context", "nftrace")}
                self.watching_at = time.time()
            if self.log_events[name] <= 3 and rec.get("level") in ("warning", "error", None):
                self.log_samples.append(rec)

    # --- queries

    def watch(self, *patterns: bytes) -> None:
        with self._cond:
            for p in patterns:
                if p not in self.patterns:
                    self.patterns.append(p)

    def count(self, pattern: bytes) -> int:
        with self._cond:
            return self.counts[pattern]

    def wait_count(self, pattern: bytes, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.counts[pattern] < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def cpu(self) -> int:
        return cpu_ticks(self.proc.pid)

    def bpf_stats(self) -> dict[str, int]:
        """seen/filtered/emitted/lost of this tracer's `stats` map (summed over CPUs)."""
        if self._map_id is None:
            self._map_id = self._find_stats_map()
        out = subprocess.run(["bpftool", "-j", "map", "dump", "id", str(self._map_id)],
                             capture_output=True, text=True, timeout=10, check=False)
        if out.returncode != 0:
            raise BenchError(f"bpftool map dump: {out.stderr.strip()}")
        names = ("seen", "filtered", "emitted", "lost")
        stats = {}
        for entry in json.loads(out.stdout):
            f = entry["formatted"]
            if f["key"] < len(names):  # the later counters (repeat, coarse, overflow) are not used here
                stats[names[f["key"]]] = sum(v["value"] for v in f["values"])
        return stats

    def _find_stats_map(self) -> int:
        """The per-CPU array of u64 counters (bpf/tracer.h: STAT_MAX of them) among the tracer's open BPF maps."""
        pid = self.proc.pid
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") != "anon_inode:bpf-map":
                    continue
                with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                    info = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in f if ":" in ln)}
            except OSError:
                continue
            if info.get("map_type") == "6" and info.get("max_entries") in ("4", "7") and info.get("value_size") == "8":
                return int(info["map_id"])
        raise BenchError("the tracer's stats map was not found")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self) -> int | None:
        """SIGINT (the tracer removes its marking tables), then SIGKILL if it hangs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        for t in self._readers:
            t.join(timeout=5)
        if self in Tracer.live:
            Tracer.live.remove(self)
        return self.proc.returncode

    def failure(self) -> str:
        return f"tracer {' '.join(self.args)} exited {self.proc.returncode}: {self.log_samples[-3:]}"


# ----------------------------------------------------------------------- the lab


@dataclass
class Net:
    lab: Lab
    snd: netns_mod.Netns
    rcv: netns_mod.Netns
    quiet: netns_mod.Netns  # a ruleset, no traffic (idle phase)
    idle: netns_mod.Netns  # no ruleset, no traffic (idle phase)
    dst: str  # rcv's address, seen from snd
    quiet_dst: str
    idle_dst: str
    sock: socket.socket = field(init=False)  # a UDP socket in snd for sentinels and paced probes

    def __post_init__(self) -> None:
        with netns_mod.entered(self.snd):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    @classmethod
    def build(cls, lab: Lab) -> Net:
        snd, rcv, quiet, idle = (lab.add_ns(r) for r in ("snd", "rcv", "quiet", "idle"))
        main = lab.link(snd, rcv)
        q = lab.link(snd, quiet)
        i = lab.link(snd, idle)
        for ns in (rcv, quiet):
            lab.nft(ns, RULESET)
        for ns in (rcv, quiet, idle):
            # No ICMP port-unreachable answers to the floods: less noise on both sides.
            lab.run(ns, ["sysctl", "-qw", "net.ipv4.icmp_msgs_per_sec=0"], check=False)
        return cls(lab, snd, rcv, quiet, idle, str(main.b_v4.ip), str(q.b_v4.ip), str(i.b_v4.ip))

    def udp_snmp(self, ns: netns_mod.Netns) -> dict[str, int]:
        lines = [ln.split() for ln in self.lab.run(ns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
                 if ln.startswith("Udp:")]
        return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}

    def nft_drops(self) -> int:
        """Packets the `bench drop` rule counted in rcv."""
        data = json.loads(self.lab.run(self.rcv, ["nft", "-j", "list", "table", "inet", "bench"]).stdout)
        for item in data["nftables"]:
            rule = item.get("rule")
            if rule and rule.get("comment") == "bench drop":
                for expr in rule["expr"]:
                    if "counter" in expr:
                        return int(expr["counter"]["packets"])
        raise BenchError("bench drop rule counter not found")

    def kernel_drops(self, kind: str) -> int:
        return self.nft_drops() if kind == "nft" else self.udp_snmp(self.rcv)["NoPorts"]

    def sentinel(self, tr: Tracer, dst: str | None = None, port: int = SENTINEL_PORT, timeout: float = 30.0) -> float:
        """Sends to a closed port until the tracer prints it; returns seconds since the tracer started."""
        pat = port_pat(port)
        tr.watch(pat)
        have = tr.count(pat)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.sock.sendto(b"sentinel", (dst or self.dst, port))
            if tr.wait_count(pat, have + 1, 0.1):
                return time.time() - tr.started
            if not tr.alive():
                raise BenchError(tr.failure())
        raise BenchError(f"tracer {tr.args} printed no sentinel event in {timeout:.0f}s")

    def flood(self, port: int, rate: float, dur: float, procs: int = 1, dst: str | None = None,
              background: bool = False) -> Any:
        """UDP from snd to rcv:port; returns (packets sent, send errors, seconds)."""
        start_at = time.time() + 0.3
        per = rate / procs if rate > 0 else 0
        ps = [self.lab.spawn(self.snd, [sys.executable, "-c", SENDER, dst or self.dst, str(port), str(per),
                                        str(dur), str(start_at), "18"], stdout=subprocess.PIPE, text=True)
              for _ in range(procs)]
        if background:
            return ps
        return collect_senders(ps, dur)


def collect_senders(ps: list[subprocess.Popen], dur: float) -> tuple[int, int, float]:
    sent = errors = 0
    secs = 0.0
    for p in ps:
        out, _ = p.communicate(timeout=dur + 20)
        s, e, t = out.split()
        sent, errors, secs = sent + int(s), errors + int(e), max(secs, float(t))
    return sent, errors, secs


# ----------------------------------------------------------------------- phases


def phase_latency(net: Net, n: int, spacing: float) -> dict:
    log(f"latency: {n} packets {spacing * 1000:.0f} ms apart, nft rule drop then closed port")
    # One flow's drops, each to be timed: one by one (a tracer given by --tracer-cmd is taken to
    # predate summaries, which it then shows every drop anyway).
    every = [] if TRACER_CMD else ["--every-drop"]
    tr = Tracer(["--netns", net.rcv.name, "--proto", "udp", *every], keep=True)
    results: dict[str, Any] = {}
    try:
        results["startup_s"] = net.sentinel(tr)
        cases = (("nft rule (nftrace)", NFT_PORT_BASE + 1), ("closed port (NO_SOCKET)", CLOSED_PORT_BASE + 1))
        for case, port in cases:
            pat = port_pat(port)
            tr.watch(pat)
            t0 = time.perf_counter()
            for i in range(n):
                delay = t0 + i * spacing - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                net.sock.sendto(b"latency", (net.dst, port))
            tr.wait_count(pat, n, 5.0)
            with tr._cond:
                kept = list(tr.kept)
            lat, attribution = [], Counter()
            for t_read, line in kept:
                if pat not in line:
                    continue
                ev = json.loads(line)
                lat.append((t_read - iso_to_epoch(ev["@timestamp"])) * 1000)
                attribution[ev.get("netfilter", {}).get("attribution", "-")] += 1
            results[case] = {"sent": n, "printed": len(lat), "attribution": dict(attribution),
                             **({"first": lat[0], "p50": pct(lat, 50), "p90": pct(lat, 90), "p99": pct(lat, 99),
                                 "max": max(lat), "samples": [round(x, 2) for x in lat]} if lat else {})}
    finally:
        tr.stop()
    return results


@dataclass
class Step:
    kind: str  # "closed" or "nft"
    target: float  # pps asked of the sender, 0 = as fast as it can
    filtered: bool = False
    sent: int = 0
    send_errors: int = 0
    secs: float = 0.0
    kernel: int = 0  # drops the kernel counted (UDP NoPorts or the nft rule counter)
    printed: int = 0
    nftrace: int = 0
    bpf: dict = field(default_factory=dict)
    ring_lost: int = 0
    queue_full: int = 0
    backlog: int = 0
    max_lag: float = 0.0
    cpu_flood: float = 0.0  # % of one core during the flood
    cpu_drain: float = 0.0
    drain_s: float = 0.0
    startup_s: float = 0.0
    trace_errors: int = 0
    lost_logged: int = 0

    @property
    def pps(self) -> float:
        return self.sent / self.secs if self.secs else 0.0

    @property
    def rule_pct(self) -> float:
        """nftrace-attributed events, % of the drops the trace rate allows to be traced."""
        traceable = min(self.kernel, TRACE_RATE * self.secs + TRACE_BURST)
        return self.nftrace / traceable * 100 if traceable else 0.0

    @property
    def kept_up(self) -> bool:
        return self.printed >= self.kernel and not self.ring_lost and not self.queue_full and self.kernel > 0


def flood_step(net: Net, kind: str, target: float, port: int, dur: float, *, filtered: bool = False,
               drain_max: float = 3.0) -> Step:
    args = ["--netns", net.rcv.name, "--proto", "udp"]
    if filtered:
        args += ["--port", str(UNRELATED_PORT)]
    step = Step(kind, target, filtered)
    tr = Tracer(args)
    try:
        if filtered:
            step.startup_s = net.sentinel(tr, port=UNRELATED_PORT)
        else:
            step.startup_s = net.sentinel(tr)
        pat = port_pat(port)
        tr.watch(pat, NFTRACE)
        tr.lag_pattern = pat
        nftrace0 = tr.count(NFTRACE)
        k0, s0, c0, lines0 = net.kernel_drops(kind), tr.bpf_stats(), tr.cpu(), tr.lines
        t0 = time.time()
        step.sent, step.send_errors, step.secs = net.flood(port, target, dur)
        t1, c1 = time.time(), tr.cpu()
        step.kernel = net.kernel_drops(kind) - k0
        # Drain: until everything the kernel dropped is printed, everything the
        # BPF side emitted is printed (the rest was lost in the ring), or drain_max.
        while time.time() - t1 < drain_max and tr.count(pat) < step.kernel and not filtered:
            time.sleep(0.2)
            if tr.bpf_stats()["emitted"] - s0["emitted"] <= tr.lines - lines0:
                break
        t2, c2 = time.time(), tr.cpu()
        s1 = tr.bpf_stats()
        step.printed = tr.count(pat)
        step.nftrace = tr.count(NFTRACE) - nftrace0
        step.bpf = {k: s1[k] - s0.get(k, 0) for k in s1}
        step.drain_s = t2 - t1
        step.cpu_flood = (c1 - c0) / CLK_TCK / (t1 - t0) * 100
        step.cpu_drain = (c2 - c1) / CLK_TCK / (t2 - t1) * 100 if t2 > t1 else 0.0
        with tr._cond:
            step.max_lag = max((lag for _, lag in tr.lags), default=0.0)
    finally:
        tr.stop()
    step.ring_lost = step.bpf.get("lost", 0)
    step.lost_logged = tr.ring_lost_at_exit  # the CLI's own "events lost" warning at exit (whole run)
    step.queue_full = tr.log_events.get(QUEUE_FULL_EVENT, 0)
    step.trace_errors = tr.log_events.get("nft.trace_socket_error", 0)
    step.backlog = max(0, step.bpf.get("emitted", 0) - step.printed - step.queue_full)
    return step


def phase_throughput(net: Net, rates: list[float], dur: float) -> list[Step]:
    steps: list[Step] = []
    for kind, base in (("closed", CLOSED_PORT_BASE), ("nft", NFT_PORT_BASE)):
        lossy = 0
        for i, rate in enumerate(rates):
            if lossy >= 2 and rate != rates[-1]:
                continue  # two steps over the limit: only the last (highest) rate is still run
            log(f"throughput: {kind} flood at {'max' if not rate else int(rate)} pps for {dur:.0f}s")
            step = flood_step(net, kind, rate, base + 10 + i, dur)
            steps.append(step)
            log(f"  sent {step.sent} ({step.pps:.0f}/s), kernel {step.kernel}, printed {step.printed}, "
                f"ring lost {step.ring_lost}, queue full {step.queue_full}, backlog {step.backlog}, "
                f"tracer cpu {step.cpu_flood:.0f}%")
            lossy = 0 if step.kept_up else lossy + 1
    log(f"throughput: closed-port flood at max pps with --port {UNRELATED_PORT} (in-kernel filter)")
    step = flood_step(net, "closed", 0, CLOSED_PORT_BASE + 99, dur, filtered=True)
    log(f"  sent {step.sent} ({step.pps:.0f}/s), bpf {step.bpf}, tracer cpu {step.cpu_flood:.1f}%")
    steps.append(step)
    return steps


def phase_overhead(net: Net, dur: float, rounds: int = 2) -> dict:
    """Sender rates without a tracer, with a filtered one, and with one printing
    every drop (TCP: watching every packet), in alternating rounds."""
    net.lab.spawn(net.rcv, [sys.executable, "-c", TCP_SINK, str(TCP_PORT), str(SINK_LIFETIME)])
    time.sleep(0.5)
    filtered = ["--port", str(UNRELATED_PORT)]
    kinds = {
        "udp": [("no tracer", None), (f"tracer --port {UNRELATED_PORT} (filtered out)", filtered),
                ("tracer printing every drop", [])],
        "tcp": [("no tracer", None), (f"tracer --port {UNRELATED_PORT} (filtered out)", filtered),
                ("tracer watching all (nftrace marks the transfer)", [])],
    }
    out: dict[str, Any] = {k: {name: {"runs": [], "tracer_cpu": []} for name, _ in v} for k, v in kinds.items()}
    for kind, configs in kinds.items():
        for rnd in range(rounds):
            for name, extra in configs:
                log(f"overhead: {'UDP flood to a closed port' if kind == 'udp' else 'TCP transfer'}, "
                    f"{name} (round {rnd + 1})")
                out[kind][name]["runs"].append(0.0)
                tr = None
                if extra is not None:
                    tr = Tracer(["--netns", net.rcv.name, *(["--proto", "udp"] if kind == "udp" else []), *extra])
                try:
                    if tr:
                        net.sentinel(tr, port=UNRELATED_PORT if extra else SENTINEL_PORT)
                    c0, t0 = (tr.cpu() if tr else 0), time.time()
                    if kind == "udp":
                        sent, _, secs = net.flood(CLOSED_PORT_BASE + 200, 0, dur)
                        rate = sent / secs
                    else:
                        p = net.lab.spawn(net.snd, [sys.executable, "-c", TCP_SOURCE, net.dst, str(TCP_PORT), str(dur)],
                                          stdout=subprocess.PIPE, text=True)
                        res, _ = p.communicate(timeout=dur + 20)
                        nbytes, secs = res.split()
                        rate = int(nbytes) / float(secs) / 1e6
                    out[kind][name]["runs"][-1] = rate
                    if tr:
                        out[kind][name]["tracer_cpu"].append((tr.cpu() - c0) / CLK_TCK / (time.time() - t0) * 100)
                finally:
                    if tr:
                        tr.stop()
    return out


def phase_idle(net: Net, secs: float, traffic_pps: int) -> dict:
    """Three tracers side by side, each on its own lab namespace, CPU over `secs`."""
    log(f"idle: three tracers for {secs:.0f}s (no ruleset / ruleset / ruleset + {traffic_pps} pps accepted)")
    net.lab.spawn(net.rcv, [sys.executable, "-c", UDP_SINK, str(UDP_SINK_PORT), str(SINK_LIFETIME)])
    cases = [
        ("no ruleset in the watched netns", net.idle, net.idle_dst),
        ("ruleset, nftrace marking table, no traffic", net.quiet, net.quiet_dst),
        (f"ruleset, marking, {traffic_pps} pps accepted UDP", net.rcv, net.dst),
    ]
    trs = [Tracer(["--netns", ns.name]) for _, ns, _ in cases]
    out: dict[str, Any] = {}
    try:
        for tr, (_, _, dst) in zip(trs, cases, strict=True):
            net.sentinel(tr, dst)
        senders = net.flood(UDP_SINK_PORT, traffic_pps, secs + 2, background=True)
        time.sleep(1.0)
        c0, n0 = [tr.cpu() for tr in trs], [tr.lines for tr in trs]
        t0 = time.time()
        time.sleep(secs)
        c1, n1 = [tr.cpu() for tr in trs], [tr.lines for tr in trs]
        t1 = time.time()
        for tr, (name, _, _), a, b, m0, m1 in zip(trs, cases, c0, c1, n0, n1, strict=True):
            out[name] = {"cpu": (b - a) / CLK_TCK / (t1 - t0) * 100, "rss_mib": rss_mib(tr.proc.pid),
                         "printed": m1 - m0}
        sent, _, _ = collect_senders(senders, secs + 2)
        out["traffic_sent"] = sent
    finally:
        for tr in trs:
            tr.stop()
    return out


@dataclass
class ScaleRun:
    """One `tracer watch` over `namespaces` lab namespaces, each with a ruleset (phase 5)."""

    namespaces: int
    build_s: float = 0.0  # creating the namespaces and loading their rulesets (the bench's own cost)
    start_s: float = 0.0  # launching `tracer watch` -> the last namespace's drop printed with its rule
    first_event_s: float = 0.0  # launching -> the first event of the last namespace (with or without rule)
    ready_s: float = 0.0  # launching -> the tracer's "watching" line (collectors set up, ring buffer read)
    threads: int = 0
    rss_mib: float = 0.0
    hwm_mib: float = 0.0  # peak RSS (VmHWM)
    idle_cpu: float = 0.0  # % of one core over the idle window
    idle_s: float = 0.0
    marked: int = 0  # `nft.marking_table_added` lines: namespaces the tracer marked
    stop_s: float = 0.0  # SIGINT -> exit (every marking table removed)
    error: str | None = None


#: Seconds between the last namespace's first drop and the idle window: each namespace lists
#: its ruleset again about a second after it was marked, which is start-up, not idling.
SCALE_SETTLE = 2.0


def root_has_base_chains() -> bool:
    """Whether the host's own ruleset has hooked chains: the tracer would then mark it."""
    out = subprocess.run(["nft", "-j", "list", "chains"], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return False
    return any("hook" in item.get("chain", {}) for item in json.loads(out.stdout or "{}").get("nftables", []))


def status_mib(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    return 0.0


def scale_run(count: int, idle_secs: float, timeout: float = 60.0) -> ScaleRun:
    """`count` namespaces; a tracer over all of them; a drop in the last one, every 20 ms
    until the tracer prints it with its rule; then its threads, RSS and idle CPU."""
    from tests.manyns import DROP_PORT, DROP_RULE_TEXT, Farm

    run = ScaleRun(count)
    farm = Farm(count)
    log(f"scale: building {count} namespaces")
    farm.build()
    run.build_s = farm.build_seconds
    last = farm.last.name or ""
    tr: Tracer | None = None
    sock = farm.sender(farm.last)
    try:
        tr = Tracer(["--proto", "udp", "--port", str(DROP_PORT)], keep=True)
        name_pat = f'"name":"{last}"'.encode()
        seen = 0
        deadline = time.monotonic() + timeout
        while not run.start_s:
            if time.monotonic() > deadline or not tr.alive():
                raise BenchError(f"{count} namespaces: no drop with its rule from {last} in {timeout:.0f}s"
                                 f" ({tr.failure() if not tr.alive() else 'tracer running'})")
            sock.sendto(b"scale", ("127.0.0.1", DROP_PORT))
            time.sleep(0.02)
            with tr._cond:
                kept = tr.kept[seen:]
            seen += len(kept)
            for t_read, line in kept:
                if name_pat not in line:
                    continue
                run.first_event_s = run.first_event_s or t_read - tr.started
                rule = (json.loads(line).get("netfilter") or {}).get("rule") or {}
                if rule.get("text") == DROP_RULE_TEXT and rule.get("handle"):
                    run.start_s = t_read - tr.started
                    break
        pid = tr.proc.pid
        run.ready_s = tr.watching_at - tr.started if tr.watching_at else 0.0
        run.threads = len(os.listdir(f"/proc/{pid}/task"))
        time.sleep(SCALE_SETTLE)  # start-up work still under way (snapshots after marking) settles
        c0, t0 = tr.cpu(), time.time()
        time.sleep(idle_secs)
        run.idle_cpu = (tr.cpu() - c0) / CLK_TCK / (time.time() - t0) * 100
        run.idle_s = idle_secs
        run.threads = max(run.threads, len(os.listdir(f"/proc/{pid}/task")))
        run.rss_mib, run.hwm_mib = status_mib(pid, "VmRSS"), status_mib(pid, "VmHWM")
        t_stop = time.monotonic()
        tr.stop()
        run.stop_s = time.monotonic() - t_stop
        run.marked = tr.log_events.get("nft.marking_table_added", 0)
    finally:
        sock.close()
        if tr is not None:
            tr.stop()
        farm.close()
    log(f"  start {run.start_s:.2f}s, threads {run.threads}, RSS {run.rss_mib:.0f} MiB, "
        f"idle CPU {run.idle_cpu:.2f}%, marked {run.marked}, stop {run.stop_s:.1f}s")
    return run


def phase_scale(counts: list[int], idle_secs: float) -> list[ScaleRun]:
    """Phase 5: start time, threads, RSS and idle CPU against the number of namespaces."""
    if root_has_base_chains():
        log("scale: skipped: the host's own ruleset has hooked chains, and a tracer over every "
            "namespace would add its marking table there")
        return []
    runs = []
    for count in counts:
        try:
            runs.append(scale_run(count, idle_secs))
        except BenchError as exc:
            log(f"  failed: {exc}")
            runs.append(ScaleRun(count, error=str(exc)))
    return runs


# ----------------------------------------------------------------------- report


def report(lat: dict | None, steps: list[Step] | None, over: dict | None, idle: dict | None,
           meta: dict, scale: list[ScaleRun] | None = None, floods: dict | None = None,
           accepted: Any = None) -> str:
    lines = [f"tracer watch benchmark  ({meta['kernel']}, {meta['cpus']} CPUs, {meta['when']})"]
    if meta.get("watching"):
        w = meta["watching"]
        lines.append(f"tracer attached: drop program {w.get('drop_program')}, netfilter context "
                     f"probes {w.get('netfilter_context')}, nftrace {w.get('nftrace')}")
    if meta["other_cpu"]:
        others = ", ".join(f"{k} {v:.0f}%" for k, v in meta["other_cpu"].items())
        busy = any(v > 5 for v in meta["other_cpu"].values())
        lines.append(f"other processes' CPU during the phases (% of the machine): {others}"
                     + ("  -- NOT a quiet machine: figures are pessimistic" if busy else ""))
    lines.append("")
    if lat:
        lines += [("1. Drop-to-print latency, ms (kernel drop time -> line read from stdout; "
                   f"tracer startup to first event {lat['startup_s']:.2f}s)"),
                  f"   {'case':<26}{'printed':>9}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}{'1st':>8}  attribution"]
        for case, r in lat.items():
            if case == "startup_s":
                continue
            if "p50" in r:
                lines.append(f"   {case:<26}{r['printed']:>5}/{r['sent']:<3}{r['p50']:>8.1f}{r['p90']:>8.1f}"
                             f"{r['p99']:>8.1f}{r['max']:>8.1f}{r['first']:>8.1f}  {r['attribution']}")
            else:
                lines.append(f"   {case:<26}{r['printed']:>5}/{r['sent']:<3}  (no events)")
        lines.append("")
    if steps:
        lines += ["2. Throughput (one fresh tracer per step; `--netns rcv --proto udp`)",
                  (f"   {'flood':<8}{'target':>7}{'sent/s':>8}{'kernel':>8}{'printed':>8}{'rule%':>7}"
                   f"{'ringlost':>9}{'qfull':>7}{'backlog':>8}{'maxlag':>8}{'cpu%':>6}  kept up")]
        for s in steps:
            if s.filtered:
                continue
            lines.append(f"   {s.kind:<8}{('max' if not s.target else int(s.target)):>7}{s.pps:>8.0f}{s.kernel:>8}"
                         f"{s.printed:>8}{(f'{s.rule_pct:.0f}' if s.kind == 'nft' else '-'):>7}{s.ring_lost:>9}"
                         f"{s.queue_full:>7}{s.backlog:>8}{s.max_lag:>7.2f}s{s.cpu_flood:>6.0f}  "
                         f"{'yes' if s.kept_up else 'NO'}")
        for kind in ("closed", "nft"):
            ok = [s.pps for s in steps if s.kind == kind and not s.filtered and s.kept_up]
            bad = [s for s in steps if s.kind == kind and not s.filtered and not s.kept_up]
            best = f"{max(ok):.0f} pps" if ok else "none of the rates"
            above = ""
            if bad:
                b = bad[0]
                above = (f"; above it ({b.pps:.0f} pps): printed {b.printed}/{b.kernel}, "
                         f"ring buffer lost {b.ring_lost}, "
                         f"Python queue lost {b.queue_full}, not printed {b.drain_s:.1f}s after the flood {b.backlog}")
            lines.append(f"   {kind}: highest rate printed without loss {best}{above}")
        for s in steps:
            if s.filtered:
                lines.append(f"   --port {UNRELATED_PORT} (flood on other ports, in-kernel filter): "
                             f"{s.pps:.0f} pps sent, "
                             f"BPF seen {s.bpf.get('seen', 0)} filtered {s.bpf.get('filtered', 0)} "
                             f"emitted {s.bpf.get('emitted', 0)}, tracer CPU {s.cpu_flood:.1f}% of a core")
        lines.append("")
    if over:
        lines.append("3. Overhead (same sender; configurations alternate; best of the rounds, all rounds in brackets)")
        for kind, unit in (("udp", "pps"), ("tcp", "MB/s")):
            rows = over.get(kind, {})
            ref = max(rows.get("no tracer", {}).get("runs", [0]))
            title = "UDP flood to a closed port, 1 sender" if kind == "udp" else "TCP transfer snd -> rcv, 1 stream"
            lines.append(f"   {title}")
            for name, v in rows.items():
                best = max(v["runs"])
                ratio = f"x{best / ref:.2f}" if ref else ""
                runs = ", ".join(f"{r:.0f}" for r in v["runs"])
                cpu = f"  tracer CPU {max(v['tracer_cpu']):.0f}%" if v["tracer_cpu"] else ""
                lines.append(f"     {name:<50}{best:>9.0f} {unit:<5}{ratio:>6}  [{runs}]{cpu}")
        lines.append("")
    if idle:
        lines.append("4. Idle CPU of `tracer watch` (utime+stime over the window, % of one core)")
        for name, v in idle.items():
            if isinstance(v, dict):
                lines.append(f"   {name:<48}{v['cpu']:>6.2f}%   RSS {v['rss_mib']:.0f} MiB   "
                             f"events printed {v['printed']}")
        lines.append("")
    if scale:
        lines += [("5. Namespaces (one tracer over N namespaces, each with a ruleset; start = launch -> "
                   "the last namespace's drop printed with its rule)"),
                  (f"   {'netns':>6}{'start':>8}{'ready':>8}{'1st ev':>8}{'threads':>8}{'RSS MiB':>9}{'peak':>6}"
                   f"{'idle cpu%':>10}{'marked':>7}{'stop':>7}{'build':>7}")]
        for r in scale:
            if r.error:
                lines.append(f"   {r.namespaces:>6}  failed: {r.error}")
                continue
            lines.append(f"   {r.namespaces:>6}{r.start_s:>7.2f}s{r.ready_s:>7.2f}s{r.first_event_s:>7.2f}s"
                         f"{r.threads:>8}{r.rss_mib:>9.0f}{r.hwm_mib:>6.0f}{r.idle_cpu:>10.2f}{r.marked:>7}"
                         f"{r.stop_s:>6.1f}s{r.build_s:>6.1f}s")
        lines.append(f"   (idle CPU over {scale[0].idle_s:.0f} s without traffic; build = the bench making "
                     "the namespaces, not the tracer)")
        lines.append("")
    if floods or accepted is not None:
        from tests.bench import flood

        lines += flood.report_lines(floods or {}, accepted, lat, meta)
    return "\n".join(lines)


PHASES = {"latency", "throughput", "overhead", "idle", "scale", "flood", "flows", "accepted"}
DEFAULT_PHASES = "latency,throughput,overhead,idle,scale,flood,flows,accepted"
OBSERVER_KEYS = ("none", "bpftrace", "tracer", "monitor", "log")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.run", description=__doc__.split("\n\n")[0])
    p.add_argument("--phases", default=DEFAULT_PHASES, help="comma-separated subset of %(default)s")
    p.add_argument("--packets", type=int, default=200, help="latency probes per case (default 200)")
    p.add_argument("--spacing-ms", type=float, default=20.0, help="between latency probes (default 20)")
    p.add_argument("--rates", default="1000,2000,3000,5000,7000,10000,0",
                   help="flood rates in pps, 0 = as fast as one sender can (default %(default)s)")
    p.add_argument("--step-seconds", type=float, default=3.0, help="flood duration per step (default 3)")
    p.add_argument("--idle-seconds", type=float, default=30.0, help="idle CPU window (default 30)")
    p.add_argument("--idle-traffic", type=int, default=1000, help="accepted pps in the busiest idle case")
    p.add_argument("--scale-counts", default="1,10,100,300",
                   help="namespace counts of the scale phase (default %(default)s, at most 500)")
    p.add_argument("--scale-idle-seconds", type=float, default=5.0, help="idle CPU window per scale run")
    p.add_argument("--flood-seconds", type=float, default=2.0, help="length of each flood round (default 2)")
    p.add_argument("--flood-rounds", type=int, default=4, help="interleaved rounds per observer (default 4)")
    p.add_argument("--flows", type=int, default=2000, help="source ports of the flows phase (default 2000)")
    p.add_argument("--observers", default=",".join(OBSERVER_KEYS),
                   help="observers of the flood phases, 'none' always included (default %(default)s)")
    p.add_argument("--flood-batch", type=int, default=64, help="datagrams per sendmmsg call (default 64)")
    p.add_argument("--rest-seconds", type=float, default=2.0,
                   help="tracer CPU at rest, measured before each flood round (default 2)")
    p.add_argument("--summary-interval", type=float, default=1.0,
                   help="passed to `tracer watch` when it has the option (default 1)")
    p.add_argument("--accepted-seconds", type=float, default=3.0, help="length of each iperf3 run (default 3)")
    p.add_argument("--accepted-rounds", type=int, default=5, help="iperf3 rounds, each with and without (default 5)")
    p.add_argument("--json", metavar="PATH", help="also write the raw figures here")
    p.add_argument("--tracer-cmd", metavar="CMD",
                   help="command line that runs the tracer CLI (default: the venv's `tracer`), "
                        "e.g. 'env PYTHONPATH=/tmp/copy .venv/bin/python -m tracer' to compare a patched copy")
    args = p.parse_args(argv)
    global TRACER_CMD
    TRACER_CMD = args.tracer_cmd.split() if args.tracer_cmd else None
    if os.geteuid() != 0:
        print("the benchmark needs root (BPF, network namespaces)", file=sys.stderr)
        return 2
    phases = set(args.phases.split(","))
    if not phases <= PHASES:
        p.error(f"--phases: unknown {', '.join(sorted(phases - PHASES))}")
    rates = [float(r) for r in args.rates.split(",")]
    if not 1 <= args.packets <= 2000 or not 1 <= args.spacing_ms <= 1000:
        p.error("--packets 1..2000, --spacing-ms 1..1000")
    if not 1 <= args.step_seconds <= 10 or not 1 <= args.idle_seconds <= 120 or len(rates) > 12:
        p.error("--step-seconds 1..10, --idle-seconds 1..120, at most 12 rates")
    try:
        scale_counts = [int(c) for c in args.scale_counts.split(",")]
    except ValueError:
        p.error("--scale-counts: comma-separated numbers")
    if not all(1 <= c <= 500 for c in scale_counts) or not 1 <= args.scale_idle_seconds <= 60:
        p.error("--scale-counts 1..500 each, --scale-idle-seconds 1..60")
    observers = ["none", *(o for o in dict.fromkeys(args.observers.split(",")) if o != "none")]
    if not set(observers) <= set(OBSERVER_KEYS):
        p.error(f"--observers: unknown {', '.join(sorted(set(observers) - set(OBSERVER_KEYS)))}")
    if not 0.5 <= args.flood_seconds <= 10 or not 1 <= args.flood_rounds <= 20 or not 2 <= args.flows <= 20000:
        p.error("--flood-seconds 0.5..10, --flood-rounds 1..20, --flows 2..20000")
    if not 1 <= args.flood_batch <= 1024 or not 0.5 <= args.rest_seconds <= 30 or not 0 < args.summary_interval <= 60:
        p.error("--flood-batch 1..1024, --rest-seconds 0.5..30, --summary-interval (0, 60]")
    if not 1 <= args.accepted_seconds <= 30 or not 1 <= args.accepted_rounds <= 20:
        p.error("--accepted-seconds 1..30, --accepted-rounds 1..20")

    def on_term(signum, _frame):
        raise KeyboardInterrupt

    # Explicitly: a shell that starts us in the background leaves SIGINT ignored.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_term)
    meta: dict[str, Any] = {"kernel": os.uname().release, "cpus": os.cpu_count(),
                            "when": time.strftime("%Y-%m-%d %H:%M"), "other_cpu": {}}
    lat = steps = over = idle = scale = None
    floods: dict[str, Any] = {}
    accepted = None
    bench = None
    started = time.monotonic()
    net: Net | None = None
    lab = Lab()
    try:
        if phases - {"scale"}:
            net = Net.build(lab)
            log(f"lab {lab.suffix}: {', '.join(ns.name for ns in lab.namespaces.values())}")
        if "latency" in phases:
            other = OtherLoad()
            lat = phase_latency(net, args.packets, args.spacing_ms / 1000)
            meta["other_cpu"]["latency"] = other.percent()
        if "throughput" in phases:
            other = OtherLoad()
            steps = phase_throughput(net, rates, args.step_seconds)
            meta["other_cpu"]["throughput"] = other.percent()
        if "overhead" in phases:
            other = OtherLoad()
            over = phase_overhead(net, args.step_seconds)
            meta["other_cpu"]["overhead"] = other.percent()
        if "idle" in phases:
            other = OtherLoad()
            idle = phase_idle(net, args.idle_seconds, args.idle_traffic)
            meta["other_cpu"]["idle"] = other.percent()
        if "scale" in phases:
            other = OtherLoad()
            scale = phase_scale(scale_counts, args.scale_idle_seconds)
            meta["other_cpu"]["scale"] = other.percent()
        if phases & {"flood", "flows", "accepted"}:
            from tests.bench import flood

            assert net is not None
            bench = flood.FloodBench.create(net, batch=args.flood_batch, rest_s=args.rest_seconds,
                                            summary_interval=args.summary_interval)
            meta["floods"] = {"batch": args.flood_batch, "nf_log_all_netns": bench.nf_log_all_netns,
                              "summary_options": sorted(bench.flags & {"--summary-interval", "--max-rate"})}
            for name, flows in (("flood", 1), ("flows", args.flows)):
                if name in phases:
                    other = OtherLoad()
                    floods[name] = bench.phase_flood(flows, args.flood_seconds, args.flood_rounds, observers)
                    meta["other_cpu"][name] = other.percent()
            if "accepted" in phases:
                other = OtherLoad()
                accepted = bench.phase_accepted(args.accepted_seconds, args.accepted_rounds)
                meta["other_cpu"]["accepted"] = other.percent()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    except BenchError as exc:
        log(f"failed: {exc}")
        return 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        for tr in list(Tracer.live):
            tr.stop()
        if bench is not None:
            bench.close()
        if net is not None:
            net.sock.close()
        lab.close()
        log(f"lab removed; {time.monotonic() - started:.0f}s")
    meta["watching"] = Tracer.watching
    print(report(lat, steps, over, idle, meta, scale, floods, accepted))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "latency": lat, "throughput": [vars(s) for s in steps or []],
                       "overhead": over, "idle": idle, "scale": [vars(r) for r in scale or []],
                       "floods": {k: dataclasses.asdict(v) for k, v in floods.items()},
                       "accepted": dataclasses.asdict(accepted) if accepted is not None else None},
                      f, indent=2, default=str)
    return 0


if __name__ == "__main__":
    # Through the imported module, not __main__: tests/bench/flood.py imports
    # tests.bench.run, and both must share one Tracer.live and TRACER_CMD.
    from tests.bench import run as _run  # noqa: PLW0406 (on purpose, see above)

    sys.exit(_run.main())
