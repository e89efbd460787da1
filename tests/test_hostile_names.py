"""Names chosen by an unprivileged user, read by the root tracer.

On most distributions any user can create a user namespace with its own
network namespace and ruleset, so every table, chain and comment name the
tracer reads may have been written by an attacker. These tests build such a
namespace exactly as an attacker would (`setpriv` to nobody, `unshare
--user --map-root-user --net`), with chains named like iptables options and
comments full of control characters, and check that the tracer reports
them exactly, changes nothing there, and runs nothing they name.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.support import Watch
from tracer import netns
from tracer.event.text import one_line
from tracer.netns import Netns

pytestmark = [pytest.mark.root, pytest.mark.bpf]

#: Control characters and quotes a comment may hold: newline, CR, ESC, tab, quote, backslash.
NASTY_COMMENT = 'line one\nline two\r\x1b[31mred\x1b[0m\t"quoted" \\ # handle 99'

#: Runs as nobody inside its own user and network namespace. Loads the ruleset
#: given in $RULESET (JSON: nft's grammar refuses such names, its JSON input and
#: netlink do not), says READY, sends when told, then waits to be told to go.
HOSTILE_SH = r"""
set -e
ip link set lo up
printf '%s' "$RULESET" | nft -j -f /dev/stdin
echo READY
read -r _
python3 -c '
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in (7001, 7002, 7003):
    for _ in range(3):
        s.sendto(b"x", ("127.0.0.1", port))
'
echo SENT
read -r _
"""


def _ruleset(modprobe_chain: str) -> dict:
    def rule(chain: str, expr: list, comment: str | None = None) -> dict:
        r: dict = {"family": "ip", "table": "filter", "chain": chain, "expr": expr}
        if comment is not None:
            r["comment"] = comment
        return {"add": {"rule": r}}

    def dport(port: int) -> dict:
        return {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": port}}

    return {
        "nftables": [
            {"add": {"table": {"family": "ip", "name": "filter"}}},
            {"add": {"chain": {"family": "ip", "table": "filter", "name": "INPUT", "type": "filter",
                               "hook": "input", "prio": 0, "policy": "accept"}}},
            {"add": {"chain": {"family": "ip", "table": "filter", "name": "-Z"}}},
            {"add": {"chain": {"family": "ip", "table": "filter", "name": modprobe_chain}}},
            rule("INPUT", [dport(7001), {"jump": {"target": "-Z"}}]),
            rule("INPUT", [dport(7002), {"jump": {"target": modprobe_chain}}]),
            rule("INPUT", [dport(7003), {"counter": None}, {"drop": None}], NASTY_COMMENT),
            rule("-Z", [{"counter": None}, {"drop": None}]),
            rule(modprobe_chain, [{"counter": None}, {"drop": None}]),
        ]
    }


class HostileNamespace:
    """nobody's user+network namespace, held by a shell the test drives line by line."""

    def __init__(self, ruleset: dict) -> None:
        self.proc = subprocess.Popen(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
             "unshare", "--user", "--map-root-user", "--net", "sh", "-c", HOSTILE_SH],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "RULESET": json.dumps(ruleset)},
        )
        line = self._line()
        if line != "READY":
            self.close()
            raise AssertionError(f"hostile namespace did not start: {line!r} {self.proc.stderr.read()!r}")
        # The shell's namespace, by the child that holds it (the shell itself after unshare's exec).
        path = f"/proc/{self.proc.pid}/ns/net"
        self.ns = Netns(inode=netns.inode_of(path), path=path, name=None)

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def send(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        assert self._line() == "SENT"

    def ruleset_json(self) -> list[dict]:
        out = netns.run_in(self.ns, ["nft", "-j", "list", "ruleset"], check=True).stdout
        return orjson.loads(out)["nftables"]

    def listing(self) -> str:
        return netns.run_in(self.ns, ["nft", "-s", "list", "ruleset"], check=True).stdout

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


@pytest.fixture
def trap() -> Iterator[tuple[str, Path]]:
    """A script that leaves a mark if anything runs it, and the chain name that points at it."""
    token = secrets.token_hex(4)
    script, mark = Path(f"/tmp/tracer-test-modprobe-{token}.sh"), Path(f"/tmp/tracer-test-ran-{token}")
    script.write_text(f"#!/bin/sh\ntouch {mark}\n")
    script.chmod(0o755)
    yield f"--modprobe={script}", mark
    script.unlink(missing_ok=True)
    mark.unlink(missing_ok=True)


@pytest.fixture
def hostile(trap: tuple[str, Path]) -> Iterator[HostileNamespace]:
    h = HostileNamespace(_ruleset(trap[0]))
    yield h
    h.close()


def _counters(doc: list[dict]) -> dict[str, int]:
    """Packets counted by each chain's counter rule (chains with one counter rule)."""
    found: dict[str, int] = {}
    for item in doc:
        rule = item.get("rule")
        if rule is None:
            continue
        for stmt in rule["expr"]:
            if "counter" in stmt and isinstance(stmt["counter"], dict):
                found[rule["chain"]] = stmt["counter"]["packets"]
    return found


def _wait_marked(h: HostileNamespace, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "tracer_mark" in h.listing():
            time.sleep(0.3)
            return
        time.sleep(0.1)
    raise AssertionError("the tracer never marked the hostile namespace")


def test_option_like_chain_names_and_control_characters(hostile: HostileNamespace, trap: tuple[str, Path]) -> None:
    """Chains `-Z` and `--modprobe=<script>`, a comment with newline/CR/ESC: reported exactly, nothing run or zeroed."""
    modprobe_chain, mark = trap
    before = hostile.listing()
    w = Watch(hosts=["127.0.0.1/32"], ports=(7001, 7002, 7003), netns=str(hostile.ns.inode))
    try:
        _wait_marked(hostile)
        hostile.send()
        mine = lambda ev: ev.get("netns", {}).get("inode") == hostile.ns.inode  # noqa: E731
        by_chain = {}
        for port in (7001, 7002, 7003):
            ev = w.sink.wait_for(lambda e, p=port: mine(e) and e["destination"]["port"] == p, timeout=10)
            by_chain[port] = ev
        counters_during = _counters(hostile.ruleset_json())
    finally:
        w.stop()

    z, modprobe, nasty = (by_chain[p]["netfilter"] for p in (7001, 7002, 7003))
    assert (z["chain"], z["base_chain"], z["backend"]) == ("-Z", "INPUT", "iptables-nft")
    assert z["rule"]["text"] == "counter drop" and z["rule"]["iptables"] == "-A -Z -j DROP"
    assert (modprobe["chain"], modprobe["rule"]["text"]) == (modprobe_chain, "counter drop")
    assert modprobe["rule"]["iptables"] == f"-A {modprobe_chain} -j DROP"
    # The comment survives byte for byte in JSON, and the rule text is still found.
    assert nasty["chain"] == "INPUT" and nasty["rule"]["text"] == "udp dport 7003 counter drop"
    assert nasty["rule"]["comment"] == NASTY_COMMENT
    # The text view shows no raw control character (one line, no escape sequence).
    line = one_line(w.sink.model(by_chain[7003]))
    assert not any(ord(c) < 0x20 or c == "\x7f" for c in line), repr(line)

    # Nothing ran, nothing was zeroed, and the namespace's ruleset is as its owner left it.
    assert not mark.exists(), "a chain name was run as iptables' --modprobe"
    assert counters_during.get("-Z", 0) >= 3 and counters_during.get(modprobe_chain, 0) >= 3
    assert _counters(hostile.ruleset_json()) == counters_during
    assert hostile.listing() == before


def test_hostile_table_names_never_reach_a_command(hostile: HostileNamespace) -> None:
    """A stale-looking marking table whose name is nft syntax is removed by handle, and only it."""
    evil = 'tracer_mark"; flush ruleset; add table ip x { }; #'
    netns.run_in(hostile.ns, ["nft", "-j", "-f", "-"], check=True, input=json.dumps(
        {"nftables": [{"add": {"table": {"family": "inet", "name": evil}}}]}))
    from tracer.netfilter.marking import remove_stale_marking_tables

    assert remove_stale_marking_tables([hostile.ns]) == 1
    tables = {(t["table"]["family"], t["table"]["name"]) for t in hostile.ruleset_json() if "table" in t}
    assert tables == {("ip", "filter")}
    assert os.path.exists(hostile.ns.path)
