"""Floods for the tests of issue 8: a lab with a counting drop rule, senders, and the tally.

The rule's nft counter is the referee: summed `event.count` of the tracer's
output must equal it exactly, however many events were lost or held back.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from tracer.event.schema import validate
from tracer.lab import Lab
from tracer.netns import Netns

FLOOD_PORT = 5555

DROP_RULESET = f"""
table inet fw {{
    chain input {{
        type filter hook input priority filter; policy accept;
        udp dport {FLOOD_PORT} counter drop comment "flood"
    }}
}}
"""

#: One UDP datagram after another from `sockets` sockets (one source port each), for `seconds`.
_SOCKET_SENDER = """
import socket, sys, time
dst, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
end = time.monotonic() + seconds
sent = 0
while time.monotonic() < end:
    for s in socks:
        s.sendto(b"x", (dst, port))
    sent += n
print(sent)
"""

#: One datagram from each (source address, source port) pair, through a raw socket:
#: more flows than any socket sender could open.
_RAW_SENDER = """
import socket, struct, sys
srcs, dst, port, ports = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
d = socket.inet_aton(dst)
sent = 0
for src in srcs:
    a = socket.inet_aton(src)
    for sport in range(1024, 1024 + ports):
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 29, 0, 0, 64, 17, 0, a, d)
        udp = struct.pack("!HHHH", sport, port, 9, 0) + b"x"
        s.sendto(ip + udp, (dst, 0))
        sent += 1
print(sent)
"""


@dataclass
class FloodLab:
    lab: Lab
    sender: Netns
    target: Netns
    dst: str
    src: str = ""
    src_extra: list[str] = field(default_factory=list)

    def counter(self) -> int:
        """Packets the drop rule has dropped (its nft counter)."""
        found = re.findall(r"packets (\d+) bytes \d+ drop", self.lab.nft_list(self.target))
        assert len(found) == 1, found
        return int(found[0])

    def flood(self, flows: int, seconds: float) -> int:
        out = self.lab.run(self.sender, [sys.executable, "-c", _SOCKET_SENDER, self.dst, str(FLOOD_PORT),
                                         str(flows), str(seconds)])
        return int(out.stdout)

    def spray(self, ports: int) -> int:
        """One datagram per (source address, port): `ports` x the sender's addresses flows."""
        srcs = ",".join([self.src, *self.src_extra])
        out = self.lab.run(self.sender, [sys.executable, "-c", _RAW_SENDER, srcs, self.dst,
                                         str(FLOOD_PORT), str(ports)])
        return int(out.stdout)


def flood_lab(lab: Lab, extra_sources: int = 0) -> FloodLab:
    sender, target = lab.add_ns("snd"), lab.add_ns("tgt")
    link = lab.link(sender, target)
    lab.nft(target, DROP_RULESET)
    fl = FloodLab(lab, sender, target, str(link.b_v4.ip))
    fl.src = str(link.a_v4.ip)
    base = link.a_v4.ip
    for i in range(extra_sources):
        addr = str(base + 100 + i)
        lab.ip(sender, "addr", "add", f"{addr}/24", "dev", link.a_ifname)  # on the link's subnet
        fl.src_extra.append(addr)
    return fl


class TracerRun:
    """`tracer watch --json` as a user runs it, its output in a file."""

    def __init__(self, fl: FloodLab, out: Path, *extra: str) -> None:
        self.out = out
        self._file = out.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tracer", "watch", "--json", "--netns", fl.target.name,
             "--port", str(FLOOD_PORT), *extra],
            stdout=self._file, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 20
        while "tracer_mark" not in fl.lab.nft_list(fl.target):
            assert self.proc.poll() is None, self.proc.stderr.read() if self.proc.stderr else ""
            assert time.monotonic() < deadline, "the tracer never marked the namespace"
            time.sleep(0.1)
        time.sleep(0.3)

    def stop(self) -> list[dict]:
        """SIGINT, as Ctrl-C; returns every event printed, each checked against its schema."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        self._file.close()
        assert self.proc.returncode == 0, err.decode(errors="replace")
        events = [json.loads(line) for line in self.out.read_bytes().splitlines()]
        for ev in events:
            validate(ev)
        return events


def flood_events(events: list[dict]) -> list[dict]:
    """The drop events and summaries of the flood (its port, or a coarse summary without ports)."""
    out = []
    for ev in events:
        if not ev["event"]["dataset"].startswith("tracer.drop"):
            continue
        port = ev.get("destination", {}).get("port")
        if port == FLOOD_PORT or (port is None and ev["drop"]["reason"] == "NETFILTER_DROP"):
            out.append(ev)
    return out


def total(events: list[dict]) -> int:
    return sum(ev["event"]["count"] for ev in flood_events(events))


def datasets(events: list[dict]) -> dict[str, int]:
    out: dict[str, int] = {}
    for ev in events:
        ds = ev["event"]["dataset"]
        out[ds] = out.get(ds, 0) + 1
    return out
