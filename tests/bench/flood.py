"""Issue 8's side-by-side flood benchmarks: the tracer against the tools users would pick instead.

Run through tests/bench/run.py (`--phases flood,flows,accepted`); this module
holds those phases and reuses run.py's lab (`Net`), `Tracer` wrapper and
CPU/RSS helpers. Nothing here asserts a time: every figure is printed next
to the same figure measured without an observer in the same run, and the
ratios are what two runs (two commits) compare.

- flood / flows: one sender (a small C program using sendmmsg, compiled
  here with gcc) floods `udp dport 9000-9999 counter drop` in the lab's
  `rcv` namespace, from 1 flow or from N source ports in turn, for a few
  seconds per round. The rate is what the rule's nft counter dropped per
  second. Rounds are interleaved (observers in a rotating order) and the
  medians compared. With the tracer, each round also measures its CPU and
  RSS at rest and under the flood, and its exactness: the summed
  `event.count` of its output against the nft counter.
- accepted: iperf3 (TCP) from `snd` to `rcv` through the accepting ruleset,
  without and with `tracer watch --port <iperf3's port>`, interleaved;
  the median ratio and its spread.

Safety: the sender refuses any destination outside 198.18.0.0/15 and sends
only from `snd` to `rcv` (lab namespaces, no route out). Rules are added to
and removed from the lab's own `inet bench` table only; bpftrace gets tracefs
in a private mount namespace of its own (the host's mounts are untouched);
nf_log_all_netns is read, never written. Every process started here is
stopped at the end of its round, and again by `FloodBench.close()`.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.run import (
    CLK_TCK,
    NFT_PORT_BASE,
    QUEUE_FULL_EVENT,
    BenchError,
    Net,
    Tracer,
    cpu_ticks,
    log,
    status_mib,
    tracer_command,
)

FLOOD_PORT = NFT_PORT_BASE + 500  # inside the `bench drop` rule's 9000-9999
#: The flood's source ports start here, below the ephemeral range (32768-60999)
#: that the bench's sentinel socket gets its port from: its events are told apart.
FLOOD_SPORT = 12000
PAYLOAD = 18
IPERF_PORT = 5201
OBSERVER_COMMENT = "bench observer"
DROP_DATASETS = ("tracer.drop", "tracer.drop.summary")
LOSS_DATASET = "tracer.loss"

#: name -> what the report calls it. "none" first: every ratio is to it.
OBSERVERS = {
    "none": "none",
    "bpftrace": "bpftrace: kfree_skb count by reason",
    "tracer": f"tracer watch --port {FLOOD_PORT}",
    "monitor": "nft monitor trace (nftrace rule)",
    "log": "nft log rule",
}

BPFTRACE_PROG = 'tracepoint:skb:kfree_skb { @[args->reason] = count(); } BEGIN { printf("ready\\n"); }'

# One UDP socket per flow, bound to its source port and connected (the route is
# cached: a raw socket that routes every datagram sends ~25% fewer). sendmmsg
# sends BATCH datagrams on a socket, then the next socket takes over:
# round-robin over the flows in runs of BATCH packets.
SENDER_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

int main(int argc, char **argv) {
    if (argc != 8) {
        fprintf(stderr, "usage: %s DST DPORT SPORT FLOWS SECONDS PAYLOAD BATCH\n", argv[0]);
        return 2;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET};
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1 ||
        (ntohl(dst.sin_addr.s_addr) & 0xfffe0000u) != 0xc6120000u) {
        fprintf(stderr, "refusing %s: not in 198.18.0.0/15\n", argv[1]);
        return 2;
    }
    int dport = atoi(argv[2]), sport = atoi(argv[3]), flows = atoi(argv[4]);
    double secs = atof(argv[5]);
    int payload = atoi(argv[6]), batch = atoi(argv[7]);
    if (dport < 1 || dport > 65535 || sport < 1 || flows < 1 || sport + flows - 1 > 65535 ||
        !(secs > 0 && secs <= 60) || payload < 0 || payload > 1400 || batch < 1 || batch > 1024) {
        fprintf(stderr, "bad arguments\n");
        return 2;
    }
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < (rlim_t)flows + 16) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    dst.sin_port = htons((unsigned short)dport);
    int *fds = calloc((size_t)flows, sizeof *fds);
    for (int i = 0; i < flows; i++) {
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = htons((unsigned short)(sport + i))};
        fds[i] = socket(AF_INET, SOCK_DGRAM, 0);
        if (fds[i] < 0 || bind(fds[i], (struct sockaddr *)&src, sizeof src) != 0 ||
            connect(fds[i], (struct sockaddr *)&dst, sizeof dst) != 0) {
            perror("socket/bind/connect");
            return 1;
        }
    }
    static char data[1400];
    memset(data, 'f', sizeof data);
    struct iovec iov = {.iov_base = data, .iov_len = (size_t)payload};
    struct mmsghdr *msgs = calloc((size_t)batch, sizeof *msgs);
    for (int i = 0; i < batch; i++) {
        msgs[i].msg_hdr.msg_iov = &iov;
        msgs[i].msg_hdr.msg_iovlen = 1;
    }
    long long sent = 0, errors = 0;
    int next = 0;
    double t0 = now(), end = t0 + secs, t = t0;
    while (t < end) {
        int n = sendmmsg(fds[next], msgs, (unsigned)batch, 0);
        if (n < 0)
            errors++;
        else
            sent += n;
        next = next + 1 == flows ? 0 : next + 1;
        t = now();
    }
    printf("%lld %lld %.6f\n", sent, errors, t - t0);
    return 0;
}
"""


def median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def count_in_file(path: Path, needle: bytes) -> int:
    """Occurrences of `needle` in a file that may be hundreds of MiB (read in chunks)."""
    n, tail = 0, b""
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        while chunk := f.read(1 << 22):
            data = tail + chunk
            n += data.count(needle)
            # Shorter than the needle: a match across two chunks is counted once, with the next.
            tail = data[-(len(needle) - 1):] if len(needle) > 1 else b""
    return n


def wait_quiet(path: Path, quiet_s: float, limit_s: float) -> None:
    """Until `path` stopped growing for `quiet_s` (an observer done printing), at most `limit_s`."""
    deadline = time.monotonic() + limit_s
    size, since = file_size(path), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now_size = file_size(path)
        if now_size != size:
            size, since = now_size, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return


def watch_flags() -> set[str]:
    """The `tracer watch` options of the build under test (issue 8 adds --summary-interval, --max-rate)."""
    out = subprocess.run([*tracer_command(), "watch", "--help"], capture_output=True, text=True, cwd="/",
                         timeout=60, check=False)
    return set(re.findall(r"--[a-z][a-z-]+", out.stdout))


def reason_names() -> dict[int, str]:
    """enum skb_drop_reason from this kernel's BTF, to name bpftrace's numbers (empty if unreadable)."""
    try:
        from tracer.sources.drop import DropReasons

        return dict(DropReasons().by_value)
    except Exception:  # a label only: the numbers are printed then
        return {}


def nf_log_all_netns() -> str:
    """The global sysctl that decides whether an nft `log` in a non-init namespace logs (read only)."""
    try:
        return Path("/proc/sys/net/netfilter/nf_log_all_netns").read_text().strip()
    except OSError:
        return "?"


# ----------------------------------------------------------------------- exactness


@dataclass
class Exactness:
    """The tracer's summed `event.count` for the flood's flows against the rule's nft counter."""

    nft: int = 0  # packets the drop rule counted from just before the flood to after the tracer stopped
    summed: int = 0  # sum of event.count over the flood's drop and summary events
    by_dataset: dict[str, int] = field(default_factory=dict)  # dataset -> summed count
    events: dict[str, int] = field(default_factory=dict)  # dataset -> lines
    unkeyed: int = 0  # summed count of drop events without ports (a coarse key), included in `summed`
    loss_events: int = 0  # tracer.loss events printed
    loss_details: dict[str, int] = field(default_factory=dict)  # their numeric `tracer.*` fields, summed
    ring_lost_log: int = 0  # what the tracer's exit warning said the ring buffer lost
    queue_lost_log: int = 0  # what its "event queue full" warnings said
    exit_code: int | None = None

    @property
    def diff(self) -> int:
        return self.summed - self.nft

    @property
    def exact(self) -> bool:
        return self.nft > 0 and self.diff == 0


def read_tracer_output(path: Path, flows: int, nft: int) -> Exactness:
    """Sums event.count over the drops of the flood's flows (source ports FLOOD_SPORT..+flows-1,
    destination FLOOD_PORT; events without ports count too: a flow map that filled up falls
    back to a coarse key) and collects tracer.loss events."""
    ex = Exactness(nft=nft)
    by_dataset: Counter[str] = Counter()
    events: Counter[str] = Counter()
    loss: Counter[str] = Counter()
    lo, hi = FLOOD_SPORT, FLOOD_SPORT + flows - 1
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        for raw in f:
            try:
                doc = json.loads(raw)
            except ValueError:
                continue
            ev = doc.get("event") or {}
            dataset = str(ev.get("dataset", "?"))
            events[dataset] += 1
            if dataset == LOSS_DATASET:
                ex.loss_events += 1
                for k, v in (doc.get("tracer") or {}).items():
                    if isinstance(v, int) and not isinstance(v, bool):
                        loss[k] += v
                continue
            if dataset not in DROP_DATASETS:
                continue
            sport = (doc.get("source") or {}).get("port")
            dport = (doc.get("destination") or {}).get("port")
            count = int(ev.get("count", 1))
            if sport is None and dport is None:
                ex.unkeyed += count
            elif dport != FLOOD_PORT or not lo <= int(sport or 0) <= hi:
                continue  # a sentinel, not the flood
            by_dataset[dataset] += count
    ex.by_dataset, ex.events, ex.loss_details = dict(by_dataset), dict(events), dict(loss)
    ex.summed = sum(by_dataset.values())
    return ex


# ----------------------------------------------------------------------- observers


class Observer:
    """One way of watching the flood. start() returns once it observes; stop() is idempotent."""

    key = "none"

    def __init__(self, bench: FloodBench) -> None:
        self.bench = bench

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def pid(self) -> int | None:
        """The observer's own process, whose CPU the round reports (None: no process)."""
        return None

    def note(self) -> str:
        return ""

    def reported(self) -> int | None:
        """How many of the flood's drops it reported (None: it reports none by design)."""
        return None


class BpftraceObserver(Observer):
    """bpftrace counting `skb:kfree_skb` by reason, as the usual one-liner does (all namespaces).

    tracefs is mounted in a private mount namespace of its own: bpftrace's
    tracepoint probes need it, the host's mount table stays as it was.
    """

    key = "bpftrace"

    def __init__(self, bench: FloodBench) -> None:
        super().__init__(bench)
        self.proc: subprocess.Popen[str] | None = None
        self.counts: dict[str, int] = {}

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c",
             'mount -t tracefs nodev /sys/kernel/tracing && exec bpftrace -e "$1"', "sh", BPFTRACE_PROG],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
        self.bench.procs.append(self.proc)
        assert self.proc.stdout is not None
        for _ in range(3):  # "Attaching 2 probes...", then BEGIN's "ready" (the probes are attached)
            line = self.proc.stdout.readline()
            if not line:
                raise BenchError(f"bpftrace exited: {self._stderr()}")
            if line.strip() == "ready":
                time.sleep(0.3)
                return
        raise BenchError("bpftrace did not say it was ready")

    def _stderr(self) -> str:
        if self.proc is None or self.proc.stderr is None:
            return ""
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)
        return self.proc.stderr.read().strip()[-300:]

    def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGINT)  # prints its map and exits
        try:
            out, _ = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=5)
        self.counts = {m[0]: int(m[1]) for m in re.findall(r"@\[(\w+)\]: (\d+)", out or "")}

    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def reported(self) -> int | None:
        """Its NETFILTER_DROP count (other namespaces' nft drops, if any, count too)."""
        names = reason_names()
        return sum(v for k, v in self.counts.items() if names.get(int(k)) == "NETFILTER_DROP") if names else None

    def note(self) -> str:
        return "reported: its NETFILTER_DROP count"


class RuleObserver(Observer):
    """An nft rule inserted before the drop rule in the lab's `inet bench` input chain."""

    rule = ""

    def __init__(self, bench: FloodBench) -> None:
        super().__init__(bench)
        self.handle: int | None = None

    def start(self) -> None:
        self.handle = self.bench.insert_rule(self.rule)

    def stop(self) -> None:
        if self.handle is not None:
            self.bench.delete_rule(self.handle)
            self.handle = None


class NftLogObserver(RuleObserver):
    """`log` before the drop rule: the usual advice. In a non-init namespace the kernel's
    syslog logger returns at once while nf_log_all_netns is 0 (the default, a global sysctl
    not changed here): what is measured is the rule and nf_log's dispatch, not printk."""

    key = "log"
    rule = f'udp dport {NFT_PORT_BASE}-{NFT_PORT_BASE + 999} log prefix "bench-log "'

    def note(self) -> str:
        return f"nf_log_all_netns={self.bench.nf_log_all_netns}"


class NftMonitorObserver(RuleObserver):
    """`nft monitor trace` in rcv (line-buffered to a file, as on a terminal), with a
    `meta nftrace set 1` rule for the flood's ports before the drop rule."""

    key = "monitor"
    rule = f"udp dport {NFT_PORT_BASE}-{NFT_PORT_BASE + 999} meta nftrace set 1"

    def __init__(self, bench: FloodBench) -> None:
        super().__init__(bench)
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = bench.tmp / "nft-monitor.out"
        self.printed = 0

    def start(self) -> None:
        super().start()
        with self.out.open("wb") as f:
            proc = self.bench.net.lab.spawn(self.bench.net.rcv, ["stdbuf", "-oL", "nft", "monitor", "trace"],
                                            stdout=f, stderr=subprocess.STDOUT)
        self.proc = proc
        self.bench.sentinel(self.out, lambda: proc.poll() is None, "nft monitor")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                wait_quiet(self.out, 0.5, 5.0)
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
            self.printed = count_in_file(self.out, b"(verdict drop)")
            self.proc = None
            self.out.unlink(missing_ok=True)
        super().stop()

    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def reported(self) -> int | None:
        return self.printed

    def note(self) -> str:
        return "reported: drop verdicts printed"


class TracerObserver(Observer):
    """`tracer watch --netns rcv --port FLOOD_PORT --json`, stdout to a file (no reader in the bench)."""

    key = "tracer"

    def __init__(self, bench: FloodBench, flows: int) -> None:
        super().__init__(bench)
        self.flows = flows
        self.out = bench.tmp / "tracer.out"
        self.tr: Tracer | None = None
        self.exact: Exactness | None = None

    def start(self) -> None:
        self.tr = self.bench.start_tracer(FLOOD_PORT, self.out)

    def finish(self, nft_before: int) -> Exactness:
        """After the flood: until the output is quiet (summaries included), SIGINT, then the sums."""
        assert self.tr is not None
        wait_quiet(self.out, max(1.0, self.bench.summary_interval + 0.5), 10.0 + self.bench.summary_interval)
        self.tr.stop()
        nft = self.bench.net.nft_drops() - nft_before
        self.exact = read_tracer_output(self.out, self.flows, nft)
        self.exact.ring_lost_log = self.tr.ring_lost_at_exit
        self.exact.queue_lost_log = self.tr.log_events.get(QUEUE_FULL_EVENT, 0)
        self.exact.exit_code = self.tr.proc.returncode
        return self.exact

    def stop(self) -> None:
        if self.tr is not None:
            self.tr.stop()
        self.out.unlink(missing_ok=True)

    def pid(self) -> int | None:
        return self.tr.proc.pid if self.tr else None

    def reported(self) -> int | None:
        return self.exact.summed if self.exact else None

    def note(self) -> str:
        return "reported: summed event.count"


# ----------------------------------------------------------------------- rounds


@dataclass
class FloodRound:
    observer: str
    flows: int
    round: int
    sent: int = 0
    send_errors: int = 0
    secs: float = 0.0
    dropped: int = 0  # the drop rule's nft counter over the flood
    reported: int | None = None  # how many of those drops the observer reported (Observer.reported)
    observer_cpu: float | None = None  # % of one core during the flood (the observer's process)
    cpu_rest: float | None = None  # tracer only: % of one core over the rest window before the flood
    rss_rest: float | None = None  # tracer only, MiB
    rss_flood: float | None = None
    hwm: float | None = None
    note: str = ""
    exact: Exactness | None = None
    error: str | None = None

    @property
    def rate(self) -> float:
        return self.dropped / self.secs if self.secs else 0.0

    @property
    def reported_pct(self) -> float | None:
        """`reported` as a share of what the rule dropped (the tracer's: until it stopped)."""
        total = self.exact.nft if self.exact else self.dropped
        return self.reported / total * 100 if self.reported is not None and total else None


@dataclass
class FloodPhase:
    """One phase (1 flow, or N flows): every round of every observer."""

    flows: int
    secs: float
    rounds: list[FloodRound] = field(default_factory=list)

    def rates(self, observer: str) -> list[float]:
        return [r.rate for r in self.rounds if r.observer == observer and not r.error]

    def ratio(self, observer: str) -> float:
        ref = median(self.rates("none"))
        return median(self.rates(observer)) / ref if ref else 0.0

    def tracer_rounds(self) -> list[FloodRound]:
        return [r for r in self.rounds if r.observer == "tracer" and not r.error]


@dataclass
class AcceptedRound:
    round: int
    none_bps: float = 0.0
    tracer_bps: float = 0.0
    tracer_cpu: float = 0.0

    @property
    def ratio(self) -> float:
        return self.tracer_bps / self.none_bps if self.none_bps else 0.0


@dataclass
class AcceptedPhase:
    secs: float
    rounds: list[AcceptedRound] = field(default_factory=list)
    error: str | None = None


@dataclass
class FloodBench:
    """The lab (run.py's Net), the compiled sender, a temporary directory, the processes started here."""

    net: Net
    tmp: Path
    sender: Path
    batch: int
    rest_s: float
    summary_interval: float
    flags: set[str]
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)
    nf_log_all_netns: str = field(default_factory=nf_log_all_netns)

    @classmethod
    def create(cls, net: Net, *, batch: int, rest_s: float, summary_interval: float) -> FloodBench:
        if not shutil.which("gcc"):
            raise BenchError("gcc is needed for the flood sender (scripts/install-deps.sh installs it)")
        tmp = Path(tempfile.mkdtemp(prefix="tracer-bench-"))
        src, exe = tmp / "flood.c", tmp / "flood"
        src.write_text(SENDER_C)
        res = subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(src)], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise BenchError(f"gcc: {res.stderr.strip()}")
        flags = watch_flags()
        log(f"floods: sender compiled in {tmp}; tracer watch has "
            f"{', '.join(f for f in ('--summary-interval', '--max-rate') if f in flags) or 'no summary options'}")
        return cls(net, tmp, exe, batch, rest_s, summary_interval, flags)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        # Observer rules live in the lab's table, which goes with the lab.
        shutil.rmtree(self.tmp, ignore_errors=True)

    # --- lab helpers

    def insert_rule(self, rule: str) -> int:
        """Inserts `rule` at the head of rcv's `inet bench` input chain; returns its handle."""
        res = self.net.lab.run(self.net.rcv, ["nft", "--echo", "--handle", "-f", "-"],
                               input=f'insert rule inet bench input {rule} comment "{OBSERVER_COMMENT}"\n')
        m = re.search(r"# handle (\d+)", res.stdout)
        if not m:
            raise BenchError(f"no handle for the inserted rule: {res.stdout.strip()}")
        return int(m.group(1))

    def delete_rule(self, handle: int) -> None:
        self.net.lab.run(self.net.rcv, ["nft", "delete", "rule", "inet", "bench", "input", "handle", str(handle)])

    def sentinel(self, out: Path, alive: Callable[[], bool], what: str, port: int = FLOOD_PORT,
                 timeout: float = 30.0) -> None:
        """UDP from the bench's ephemeral port to rcv:`port` every 100 ms until `out` grows."""
        size = file_size(out)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.net.sock.sendto(b"sentinel", (self.net.dst, port))
            time.sleep(0.1)
            if file_size(out) > size:
                time.sleep(0.2)  # the last sentinels are dropped and printed before the counters are read
                return
            if not alive():
                raise BenchError(f"{what} exited before printing the sentinel")
        raise BenchError(f"{what} printed no sentinel in {timeout:.0f}s")

    def start_tracer(self, port: int, out: Path) -> Tracer:
        """`tracer watch --netns rcv --port PORT` (with a 1 s summary interval where the build has
        one), once attached and printing."""
        args = ["--netns", self.net.rcv.name or "", "--port", str(port)]
        if "--summary-interval" in self.flags:
            args += ["--summary-interval", f"{self.summary_interval:g}"]
        tr = Tracer(args, out=out)
        deadline = time.monotonic() + 60
        while not tr.watching_at:
            if not tr.alive():
                raise BenchError(tr.failure())
            if time.monotonic() > deadline:
                raise BenchError(f"tracer {args} not watching after 60s")
            time.sleep(0.05)
        self.sentinel(out, tr.alive, "the tracer", port)
        return tr

    def send(self, flows: int, secs: float) -> tuple[int, int, float]:
        res = self.net.lab.run(self.net.snd, [str(self.sender), self.net.dst, str(FLOOD_PORT), str(FLOOD_SPORT),
                                              str(flows), f"{secs:g}", str(PAYLOAD), str(self.batch)])
        sent, errors, took = res.stdout.split()
        return int(sent), int(errors), float(took)

    def make(self, key: str, flows: int) -> Observer:
        if key == "tracer":
            return TracerObserver(self, flows)
        kinds: dict[str, type[Observer]] = {"none": Observer, "bpftrace": BpftraceObserver,
                                            "monitor": NftMonitorObserver, "log": NftLogObserver}
        return kinds[key](self)

    # --- phases

    def flood_round(self, key: str, flows: int, secs: float, rnd: int) -> FloodRound:
        r = FloodRound(key, flows, rnd)
        obs = self.make(key, flows)
        try:
            obs.start()
            pid = obs.pid()
            if isinstance(obs, TracerObserver) and pid:
                c0, t0 = cpu_ticks(pid), time.time()
                time.sleep(self.rest_s)
                r.cpu_rest = (cpu_ticks(pid) - c0) / CLK_TCK / (time.time() - t0) * 100
                r.rss_rest = status_mib(pid, "VmRSS")
            k0 = self.net.nft_drops()
            c0, t0 = (cpu_ticks(pid) if pid else 0), time.time()
            r.sent, r.send_errors, r.secs = self.send(flows, secs)
            if pid:
                r.observer_cpu = (cpu_ticks(pid) - c0) / CLK_TCK / (time.time() - t0) * 100
            time.sleep(0.1)  # the last datagrams through the receiving softirq
            r.dropped = self.net.nft_drops() - k0
            if isinstance(obs, TracerObserver) and pid:
                r.rss_flood, r.hwm = status_mib(pid, "VmRSS"), status_mib(pid, "VmHWM")
                r.exact = obs.finish(k0)
        except BenchError as exc:
            r.error = str(exc)
            log(f"  {key}: failed: {exc}")
        finally:
            obs.stop()
        r.note, r.reported = obs.note(), obs.reported()
        return r

    def phase_flood(self, flows: int, secs: float, rounds: int, observers: list[str]) -> FloodPhase:
        """Interleaved rounds; the order of the observers rotates each round."""
        phase = FloodPhase(flows, secs)
        started = time.monotonic()
        for rnd in range(rounds):
            order = observers[rnd % len(observers):] + observers[:rnd % len(observers)]
            for key in order:
                log(f"{'flood' if flows == 1 else 'flows'}: {flows} flow(s), {OBSERVERS[key]}, "
                    f"round {rnd + 1}/{rounds}")
                r = self.flood_round(key, flows, secs, rnd)
                phase.rounds.append(r)
                ex = f", tracer summed {r.exact.summed} of {r.exact.nft}" if r.exact else ""
                log(f"  {r.rate:.0f} drops/s (sent {r.sent} in {r.secs:.2f}s){ex}")
        log(f"{'flood' if flows == 1 else 'flows'}: done in {time.monotonic() - started:.0f}s")
        return phase

    def iperf(self, secs: float) -> float:
        """One iperf3 TCP run snd -> rcv; bits per second received."""
        argv = ["iperf3", "-c", self.net.dst, "-p", str(IPERF_PORT), "-t", f"{secs:g}", "-J"]
        why = ""
        for _ in range(5):
            res = self.net.lab.run(self.net.snd, argv, check=False)
            with contextlib.suppress(ValueError, KeyError, TypeError):
                return float(json.loads(res.stdout)["end"]["sum_received"]["bits_per_second"])
            why = f"{res.stdout.strip()[-300:]} {res.stderr.strip()[-300:]}"
            time.sleep(0.5)  # the server still busy with the previous run
        raise BenchError(f"iperf3 failed: {why}")

    def phase_accepted(self, secs: float, rounds: int) -> AcceptedPhase:
        """iperf3 through the accepting ruleset, without and with a watch on its port (ABBA order)."""
        phase = AcceptedPhase(secs)
        if not shutil.which("iperf3"):
            phase.error = "iperf3 not installed (scripts/install-deps.sh bench)"
            return phase
        self.net.lab.spawn(self.net.rcv, ["iperf3", "-s", "-p", str(IPERF_PORT), "-B", self.net.dst],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while self.net.lab.tcp_connect(self.net.snd, self.net.dst, IPERF_PORT) != "open":
            if time.monotonic() > deadline:
                phase.error = "iperf3 server not listening"
                return phase
            time.sleep(0.1)
        out = self.tmp / "tracer-accepted.out"
        started = time.monotonic()
        for rnd in range(rounds):
            ar = AcceptedRound(rnd)
            for watched in ((False, True) if rnd % 2 == 0 else (True, False)):
                log(f"accepted: iperf3 {secs:g}s, {'with' if watched else 'without'} tracer, "
                    f"round {rnd + 1}/{rounds}")
                if not watched:
                    ar.none_bps = self.iperf(secs)
                    continue
                tr = self.start_tracer(IPERF_PORT, out)
                try:
                    c0, t0 = tr.cpu(), time.time()
                    ar.tracer_bps = self.iperf(secs)
                    ar.tracer_cpu = (tr.cpu() - c0) / CLK_TCK / (time.time() - t0) * 100
                finally:
                    tr.stop()
                    out.unlink(missing_ok=True)
            log(f"  {ar.none_bps / 1e9:.2f} / {ar.tracer_bps / 1e9:.2f} Gbit/s, x{ar.ratio:.3f}")
            phase.rounds.append(ar)
        log(f"accepted: done in {time.monotonic() - started:.0f}s")
        return phase


# ----------------------------------------------------------------------- report


def _flood_table(title: str, phase: FloodPhase) -> list[str]:
    lines = [title,
             (f"   {'observer':<38}{'drops/s':>8}{'vs none':>8}  {'rounds (drops/s)':<42}{'cpu%':>5}"
              f"{'reported':>9}  notes")]
    keys = list(dict.fromkeys(r.observer for r in phase.rounds))
    for key in keys:
        rounds = [r for r in phase.rounds if r.observer == key]
        rates = phase.rates(key)
        errors = [r.error for r in rounds if r.error]
        cpu = [r.observer_cpu for r in rounds if r.observer_cpu is not None]
        shares = [x for x in (r.reported_pct for r in rounds if not r.error) if x is not None]
        notes = "; ".join(dict.fromkeys(r.note for r in rounds if r.note))
        if errors:
            notes = f"{len(errors)} round(s) failed: {errors[0][:80]}" + (f"; {notes}" if notes else "")
        runs = "[" + ", ".join(f"{x:.0f}" for x in rates) + "]"
        lines.append(f"   {OBSERVERS[key]:<38}{median(rates):>8.0f}{phase.ratio(key):>8.2f}  {runs:<42}"
                     + (f"{median(cpu):>5.0f}" if cpu else f"{'-':>5}")
                     + (f"{median(shares):>8.1f}%" if shares else f"{'-':>9}") + f"  {notes}")
    trs = phase.tracer_rounds()
    if trs:
        def med(attr: str) -> float:
            return median([float(getattr(r, attr)) for r in trs if getattr(r, attr) is not None])
        lines.append(f"   tracer CPU (% of one core): at rest {med('cpu_rest'):.1f}, under the flood "
                     f"{med('observer_cpu'):.0f}; RSS MiB: at rest {med('rss_rest'):.0f}, under the flood "
                     f"{med('rss_flood'):.0f} (peak {med('hwm'):.0f})")
        lines.append("   exactness per tracer round (nft counter of the drop rule vs summed event.count of the "
                     "flood's events):")
        for r in trs:
            ex = r.exact
            if ex is None:
                continue
            share = f"{ex.summed / ex.nft * 100:.2f}%" if ex.nft else "-"
            parts = ", ".join(f"{k} {v}" for k, v in sorted(ex.by_dataset.items())) or "no events"
            loss = (f"tracer.loss events {ex.loss_events}"
                    + (f" ({', '.join(f'{k} {v}' for k, v in sorted(ex.loss_details.items()))})"
                       if ex.loss_details else ""))
            lines.append(f"     round {r.round + 1}: nft {ex.nft}, tracer {ex.summed} ({parts}"
                         + (f"; unkeyed {ex.unkeyed}" if ex.unkeyed else "") + f"), diff {ex.diff:+d} "
                         f"({share}) {'EXACT' if ex.exact else 'NOT exact'}; {loss}; ring buffer lost "
                         f"{ex.ring_lost_log} (exit log), queue lost {ex.queue_lost_log}")
    lines.append("")
    return lines


def report_lines(floods: dict[str, FloodPhase], accepted: AcceptedPhase | None, lat: dict | None,
                 meta: dict) -> list[str]:
    lines: list[str] = []
    bench = meta.get("floods", {})
    how = (f"one sender (sendmmsg, {bench.get('batch')} datagrams per call, UDP {PAYLOAD} B) from snd into "
           f"`udp dport 9000-9999 counter drop` in rcv, dport {FLOOD_PORT}; rate = that rule's nft counter / "
           "the sender's seconds")
    for name, phase in floods.items():
        flows = (f"{phase.flows} flows (source ports {FLOOD_SPORT}-{FLOOD_SPORT + phase.flows - 1} in turn)"
                 if phase.flows > 1 else "1 flow")
        rounds = len({r.round for r in phase.rounds})
        lines += _flood_table(f"{'6' if name == 'flood' else '7'}. Drop flood, {flows}: {how}; {rounds} "
                              f"interleaved rounds of {phase.secs:g} s, medians", phase)
    if accepted is not None:
        lines.append(f"8. Accepted traffic: iperf3 TCP snd -> rcv through the accepting ruleset, {accepted.secs:g} s "
                     f"runs, without and with `tracer watch --netns rcv --port {IPERF_PORT}` (ABBA order)")
        if accepted.error:
            lines.append(f"   failed: {accepted.error}")
        for ar in accepted.rounds:
            lines.append(f"   round {ar.round + 1}: {ar.none_bps / 1e9:7.2f} Gbit/s without, "
                         f"{ar.tracer_bps / 1e9:7.2f} with (x{ar.ratio:.3f}, tracer CPU {ar.tracer_cpu:.0f}%)")
        ratios = [ar.ratio for ar in accepted.rounds]
        if ratios:
            lines.append(f"   median ratio x{median(ratios):.3f}, spread {min(ratios):.3f}..{max(ratios):.3f}; "
                         f"median {median([a.none_bps for a in accepted.rounds]) / 1e9:.2f} Gbit/s without")
        lines.append("")
    lines += targets(floods, accepted, lat)
    return lines


def targets(floods: dict[str, FloodPhase], accepted: AcceptedPhase | None, lat: dict | None) -> list[str]:
    """Issue 8's targets against this run's figures (printed, never asserted)."""
    lines = ["Issue 8 targets, this run"]
    for name, phase in floods.items():
        if "tracer" not in {r.observer for r in phase.rounds}:
            continue
        t, b = phase.ratio("tracer"), phase.ratio("bpftrace")
        vs_bpf = (f", bpftrace {b:.2f}: {'no worse' if t >= b else 'WORSE'} than bpftrace"
                  if phase.rates("bpftrace") else "")
        lines.append(f"   {name} ({phase.flows} flow{'s' if phase.flows > 1 else ''}): tracer x{t:.2f} of the "
                     f"unobserved rate (target >= 0.90: {'met' if t >= 0.90 else 'NOT met'}){vs_bpf}")
        exs = [r.exact for r in phase.tracer_rounds() if r.exact]
        if exs:
            exact = sum(e.exact for e in exs)
            missing = sum(max(0, -e.diff) for e in exs)
            reported = sum(e.loss_events for e in exs)
            lines.append(f"   {name}: counts exact in {exact}/{len(exs)} rounds; {missing} drops missing in all, "
                         f"{reported} tracer.loss events"
                         + (" (silent loss)" if missing and not reported else ""))
    if accepted is not None and accepted.rounds:
        m = median([a.ratio for a in accepted.rounds])
        lines.append(f"   accepted traffic watched: x{m:.3f} (target >= 0.99: {'met' if m >= 0.99 else 'NOT met'})")
    if lat:
        for case, v in lat.items():
            if isinstance(v, dict) and "p99" in v:
                lines.append(f"   drop-to-print, {case}: p50 {v['p50']:.1f} ms, p99 {v['p99']:.1f} ms "
                             f"(target p99 < 50 ms: {'met' if v['p99'] < 50 else 'NOT met'})")
    lines.append("")
    return lines
