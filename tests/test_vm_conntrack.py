"""A full conntrack table under the stock kernel: a small global nf_conntrack_max, then a refused SYN.

Run in the VM only (tests/vm/run-vm-tests.sh -k conntrack): the test lowers
the global `nf_conntrack_max`, which the host's tests must never touch.
There nf_conntrack is a module, loaded when the server's ruleset uses `ct`,
and the netfilter probes (fentry) record the marking table's accept for the
SYN, which must not turn into a rule attribution.
"""

from __future__ import annotations

import contextlib
import shlex
import socket
import subprocess
from collections.abc import Iterator

import pytest

from tests import ctlab

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.bpf]

#: The guest's hostname (tests/vm/run-in-vm.sh's init sets it).
VM_HOSTNAME = "tracer-vm"
MAX_PATH = "/proc/sys/net/netfilter/nf_conntrack_max"
SMALL_MAX = 32
PORT = 5555


@contextlib.contextmanager
def global_max(value: int) -> Iterator[int]:
    """Sets the global nf_conntrack_max, in the VM only; puts the old value back."""
    if socket.gethostname() != VM_HOSTNAME:
        pytest.fail("refusing to change the global nf_conntrack_max outside the test VM "
                    "(run tests/vm/run-vm-tests.sh -k conntrack)", pytrace=False)
    with open(MAX_PATH) as f:
        old = int(f.read())
    with open(MAX_PATH, "w") as f:
        f.write(str(value))
    try:
        yield old
    finally:
        with open(MAX_PATH, "w") as f:
            f.write(str(old))


def _is_alert(action: str, netns: str | None = None):
    return lambda ev: ev["event"].get("action") == action and (netns is None or ev["netns"]["name"] == netns)


def _refused_syn(ev: dict) -> bool:
    return (ev["event"]["dataset"] == "tracer.drop" and ev.get("destination", {}).get("port") == PORT
            and ev.get("tcp", {}).get("flags") == ["SYN"] and ev["drop"].get("subsystem") == "conntrack")


def test_small_max_next_syn_attributed_to_conntrack(lab, watch):
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(server, ctlab.SERVER_RULESET)  # loads nf_conntrack: the sysctl exists from here on
    addr = str(link.b_v4.ip)
    with ctlab.listener(server, addr, PORT), global_max(SMALL_MAX):
        w = watch(ports=[PORT])  # every event validated, notices against their own schema
        opened, last = ctlab.connect_until_refused(client, addr, PORT, most=4 * SMALL_MAX)
        print(f"\n{len(opened)} connections open, the next one: {last}")
        try:
            assert last != "open", f"{len(opened)} connections and none refused"
            assert len(opened) <= SMALL_MAX
            syn = w.sink.wait_for(_refused_syn, timeout=30)
        finally:
            for s in opened:
                s.close()
        where = syn["netns"]["name"]  # the server's prerouting, or the client's output if it tracks too
        print(f"refused SYN: {where} {syn['netfilter']}")
        assert where in (server.name, client.name)
        nf = syn["netfilter"]
        assert nf["backend"] == "conntrack" and nf["hook"] in ("prerouting", "output")
        assert "rule" not in nf and "policy" not in nf and "table" not in nf
        assert syn["drop"]["reason"] == "NETFILTER_DROP"
        alert = w.sink.wait_for(_is_alert("conntrack_table_full_drop", where), timeout=30)
        table = alert["conntrack"]["table"]
        assert table["max"] == SMALL_MAX and table["count"] == SMALL_MAX and table["ratio"] == 1.0
        assert alert["conntrack"]["delta"]["drop"] >= 1
        filling = w.sink.wait_for(_is_alert("conntrack_table_filling", where), timeout=5)
        assert filling["conntrack"]["table"]["ratio"] >= 0.9
        # The diagnosis names the cause, and its fix (the global limit, on the host) lets the next one in.
        d = syn["diagnosis"]
        assert d["cause"] == "conntrack_full", d
        assert d["fix"] == [f"sysctl -w net.netfilter.nf_conntrack_max={2 * SMALL_MAX}"], d
        subprocess.run(shlex.split(d["fix"][0]), check=True, capture_output=True)
        more, last = ctlab.connect_until_refused(client, addr, PORT, most=4)
        for s in more:
            s.close()
        assert len(more) == 4 and last == "open", (len(more), last)
