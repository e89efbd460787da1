"""Issue 10, item 6: the probe fixes, end to end in the client - router - server lab.

- an answer this host's own firewall drops is `answer_dropped`, named by the drop event's rule,
  never OPEN (while a real connect times out);
- `--explain` leaves out the kernel's NO_SOCKET for the raw probe's own handshake;
- `pmtu --proto tcp` takes a closed port's RST to a padded SYN (seq + 1 + len) as an answer;
- `--netns NAME` for probe and pmtu, an unknown name is exit 2;
- scapy's own warnings never reach stderr.

Every test runs the real CLI (a subprocess) and validates its JSON against the published schemas.
"""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from tests.support import rule_handles
from tracer.cli.demo import CLIENT_RULESET, build_probe_lab
from tracer.event.schema import validate
from tracer.probe import marker

pytestmark = [pytest.mark.root]

#: The client's own input chain drops the server's SYN-ACKs from 443 (and UDP echo answers):
#: the raw socket still sees them, an application never does.
DROPS_ANSWERS = """
table inet client {
    chain input {
        type filter hook input priority filter; policy accept;
        tcp sport 443 tcp flags syn,ack / syn,ack drop comment "no answers"
        udp sport 7 drop comment "no echo"
    }
}
"""


@pytest.fixture
def path(lab):
    """client -- router -- server (tracer.cli.demo.build_probe_lab): 443 listens, 7/udp echoes,
    80 is closed; the router's link to the server has MTU 1400."""
    p = build_probe_lab(lab)
    return lab, p


def parse(res: subprocess.CompletedProcess[str], schema: str) -> list[dict]:
    docs = [orjson.loads(line) for line in res.stdout.splitlines() if line.strip()]
    for doc in docs:
        validate(doc, schema)
    return docs


def in_client(lab, p, *args: str, schema: str = "probe-result") -> tuple[int, list[dict], str]:
    """The CLI run inside the client namespace (as `ip netns exec` would), with --json."""
    res = lab.run(p.client, [sys.executable, "-m", "tracer", *args, "--json"], check=False)
    return res.returncode, parse(res, schema), res.stderr


def from_root(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI run from this (the test's) namespace: what --netns is for."""
    return subprocess.run([sys.executable, "-m", "tracer", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def quick(*args: str) -> tuple[str, ...]:
    return (*args, "--timeout", "0.5", "--retries", "1")


# ------------------------------------------------------------------ the answer's fate


@pytest.mark.bpf
def test_answer_dropped_by_own_input_rule_is_not_open(path):
    lab, p = path
    lab.nft(p.client, DROPS_ANSWERS)
    handle = rule_handles(lab, p.client)["tcp sport 443 tcp flags syn,ack / syn,ack drop"]
    dst = str(p.far.b_v6.ip)
    assert lab.tcp_connect(p.client, dst, 443) == "timeout"  # what an application sees
    rc, (r,), err = in_client(lab, p, "probe", *quick(dst, "--port", "443"))
    assert rc == 1, err
    assert r["verdict"] == "answer_dropped", r
    assert r["detail"].startswith("answer dropped here by input rule: inet client chain input "
                                  f"rule {handle} "), r["detail"]
    assert "(no answers)" in r["detail"] and "time out" in r["detail"]
    assert r["answer"]["verdict"] == "open" and r["answer"]["fate"] == "dropped"
    assert f"rule {handle}" in r["answer"]["dropped_by"]
    drop = r["local_drops"][0]
    validate(drop)
    assert drop["netfilter"]["hook"] == "input" and drop["netfilter"]["table"] == "client"
    assert drop["netfilter"]["rule"]["handle"] == handle
    assert drop["tcp"]["flags"] == ["SYN", "ACK"] and drop["source"] == {"ip": dst, "port": 443}
    assert drop["probe"]["id"] == r["probe"]["id"]
    # The same for UDP, whose answers carry no probe id: the packet itself is matched.
    rc, (r,), err = in_client(lab, p, "probe", *quick(dst, "--proto", "udp", "--port", "7"))
    assert r["verdict"] == "answer_dropped" and r["answer"]["verdict"] == "open", (r, err)
    assert "(no echo)" in r["answer"]["dropped_by"]


@pytest.mark.bpf
def test_answer_dropped_by_own_input_policy_text_view(path):
    """The demo's client: input policy drop and no `ct state established accept`."""
    lab, p = path
    lab.nft(p.client, CLIENT_RULESET)
    dst = str(p.far.b_v4.ip)
    assert lab.tcp_connect(p.client, dst, 443) == "timeout"
    res = lab.run(p.client, [sys.executable, "-m", "tracer", "probe", *quick(dst, "--port", "443")], check=False)
    assert res.returncode == 1, res.stderr
    assert "ANSWER DROPPED" in res.stdout and "OPEN" not in res.stdout, res.stdout
    assert "answer dropped here by the input policy: inet host chain input policy drop" in res.stdout
    assert res.stderr == ""


@pytest.mark.bpf
def test_delivered_answers_and_no_socket_left_out_of_explain(path, watch):
    lab, p = path
    dst = str(p.far.b_v6.ip)
    # A second tracer in the client proves the kernel does free the SYN-ACK with NO_SOCKET
    # (no socket owns the raw probe's port): that is what --explain must not blame.
    w = watch(netns=p.client.name, reasons=("NO_SOCKET",))
    rc, results, err = in_client(lab, p, "probe", *quick(dst, "--port", "443,80"), "--explain")
    got = {r["target"]["port"]: r for r in results}
    assert rc == 1, err  # 80 is closed
    opened = got[443]
    assert opened["verdict"] == "open", opened
    assert opened["answer"] == {"verdict": "open", "fate": "delivered"}
    assert "local_drops" not in opened and "next_steps" not in opened
    assert "NO_SOCKET" not in opened["detail"] and opened["detail"].startswith("SYN-ACK")
    assert got[80]["verdict"] == "closed" and "local_drops" not in got[80]
    seen = w.sink.wait_for(lambda ev: ev.get("probe", {}).get("id") == opened["probe"]["id"])
    assert seen["drop"]["reason"] == "NO_SOCKET" and seen["tcp"]["flags"] == ["SYN", "ACK"]
    n = int(opened["probe"]["id"][3:], 16)
    assert seen["destination"]["port"] == marker.source_port(n)
    # UDP: the echo answer is freed with NO_SOCKET too, and is no explanation either.
    rc, (r,), err = in_client(lab, p, "probe", *quick(dst, "--proto", "udp", "--port", "7"), "--explain")
    assert rc == 0 and r["verdict"] == "open" and "local_drops" not in r, (r, err)
    assert r["answer"]["fate"] == "delivered"


def test_answer_check_can_be_skipped(path):
    lab, p = path
    rc, (r,), err = in_client(lab, p, "probe", *quick(str(p.far.b_v4.ip), "--port", "443"), "--no-answer-check")
    assert rc == 0 and r["verdict"] == "open", err
    assert r["answer"] == {"verdict": "open", "fate": "unchecked", "note": "--no-answer-check"}


# ------------------------------------------------------------------ pmtu over TCP to a closed port


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_pmtu_tcp_closed_port_is_measured(path, family):
    lab, p = path
    dst = str(p.far.b_v4.ip if family == "ipv4" else p.far.b_v6.ip)
    rc, (result,), err = in_client(lab, p, "pmtu", dst, "--proto", "tcp", "--port", "80", schema="pmtu-result")
    assert rc == 0, (result, err)
    assert result["method"] == "tcp" and result["verdict"] == "reduced" and result["path_mtu"] == 1400
    assert "port 80 is closed" in result["detail"]
    assert {s["outcome"] for s in result["probes"]} <= {"answered", "too_big"}


def test_padded_syn_answers_match():
    """A closed port's RST acknowledges seq + 1 + len of a padded SYN; an open port's SYN-ACK seq + 1."""
    from scapy.layers.inet import IP, TCP

    from tracer.probe.reach import Target, build, matches, syn_data

    target = Target("198.18.1.2", "198.18.1.2", "tcp", 80)
    n = 0x1234
    syn = build(target, n, 600, source="198.18.0.1")
    data = syn_data(syn)
    assert len(syn) == 600 and data > 0
    seq = marker.tcp_sequence(n)

    def reply(flags: str, ack: int):
        return IP(bytes(IP(src="198.18.1.2", dst="198.18.0.1") /
                        TCP(sport=80, dport=marker.source_port(n), flags=flags, ack=ack)))

    assert matches(target, n, reply("RA", seq + 1 + data), data)
    assert matches(target, n, reply("SA", seq + 1), data)
    assert not matches(target, n, reply("RA", seq + 1 + data), 0)
    assert not matches(target, n, reply("RA", seq + 2 + data), data)


# ------------------------------------------------------------------ --netns


@pytest.mark.bpf
def test_netns_flag_for_probe_and_pmtu(path):
    lab, p = path
    name = p.client.name
    v4 = str(p.far.b_v4.ip)
    res = from_root("probe", "--netns", name, *quick(v4, "--port", "443,80"), "--json")
    got = {r["target"]["port"]: r for r in parse(res, "probe-result")}
    assert got[443]["verdict"] == "open" and got[443]["answer"]["fate"] == "delivered", res.stderr
    assert got[80]["verdict"] == "closed"
    # The answer check's engine watches the namespace the probe ran in.
    lab.nft(p.client, DROPS_ANSWERS)
    res = from_root("probe", "--netns", name, *quick(v4, "--port", "443"), "--json")
    (r,) = parse(res, "probe-result")
    assert r["verdict"] == "answer_dropped" and r["local_drops"][0]["netns"]["name"] == name, res.stderr
    res = from_root("pmtu", "--netns", name, v4, "--json")
    (m,) = parse(res, "pmtu-result")
    assert res.returncode == 0 and m["path_mtu"] == 1400 and m["verdict"] == "reduced", res.stderr


@pytest.mark.parametrize("command", [["probe", "198.18.1.2", "--port", "443"], ["pmtu", "198.18.1.2"]])
def test_netns_unknown_or_bad_name_is_exit_2(command):
    for name, says in (("trl-no-such-namespace", "no such network namespace"),
                       ("../../proc/1/ns/net", "not a network namespace name"),
                       ("-x", "not a network namespace name")):
        res = from_root(*command, f"--netns={name}")
        assert res.returncode == 2, (name, res.stdout, res.stderr)
        assert says in res.stderr and "Traceback" not in res.stderr, res.stderr
        assert res.stdout == ""


# ------------------------------------------------------------------ scapy stays quiet


@pytest.mark.parametrize("dst", ["198.18.20.1", "2001:db8:20::1"])
def test_no_scapy_warning_on_stderr(lab, dst):
    """A namespace with no route to the target: scapy warns about its routing table when it builds
    the packet ("No route found for IPv4 destination"); the user sees only the verdict."""
    bare = lab.add_ns("bare")
    lab.ip(bare, "link", "set", "lo", "up")
    for argv in (["probe", dst, "--port", "443", "--no-answer-check"], ["pmtu", dst, "--proto", "icmp"]):
        res = lab.run(bare, [sys.executable, "-m", "tracer", *argv], check=False)
        assert res.returncode == 1, res
        assert res.stderr == "", res.stderr
        assert "UNREACHABLE" in res.stdout
    # Not lost: the debug log has scapy's words.
    res = lab.run(bare, [sys.executable, "-m", "tracer", "--log-level", "debug", "probe", dst, "--port", "443",
                         "--no-answer-check"], check=False)
    assert "No route found" in res.stderr and "WARNING: No route" not in res.stderr, res.stderr
