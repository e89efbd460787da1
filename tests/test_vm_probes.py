"""The fentry/fexit and kprobe paths, run inside the stock-kernel VM.

The build machines' kernel refuses both program kinds, so these tests are
marked `vm` and run by tests/vm/run-vm-tests.sh under Debian's stock kernel,
where netfilter, nf_tables and ip_tables are modules: the tests load the
rulesets first so the functions and their BTF exist when the tracer starts.
"""

from __future__ import annotations

import sys

import pytest

from tests.support import to_port
from tracer.bpf.loader import LoadedTracer
from tracer.cli.doctor import diagnose

pytestmark = [pytest.mark.vm, pytest.mark.root, pytest.mark.bpf]


@pytest.mark.parametrize("mode", ["fentry", "kprobe"])
def test_netfilter_probes_attach(net, mode):
    tracer = LoadedTracer(nf_mode=mode)
    try:
        assert tracer.drop_mode == "tp_btf"
        assert tracer.nf_mode == mode
        assert {"nf_hook_slow", "nft_do_chain"} <= set(tracer.nf_functions)
    finally:
        tracer.close()


def test_auto_prefers_fentry(net):
    tracer = LoadedTracer()
    try:
        assert tracer.nf_mode == "fentry"
    finally:
        tracer.close()


@pytest.mark.parametrize(("mode", "attribution"), [("fentry", "fexit"), ("kprobe", "kprobe")])
def test_table_and_base_chain_without_nftrace(net, watch, mode, attribution):
    """Without nftrace, the probes alone name hook, family, table and base chain."""
    lab, client, _server, link = net
    w = watch(nftrace=False, nf_mode=mode)
    assert lab.tcp_connect(client, str(link.b_v4.ip), 443) == "timeout"
    ev = w.sink.wait_for(to_port(443), timeout=20)
    nf = ev["netfilter"]
    assert nf["attribution"] == attribution
    assert (nf["backend"], nf["family"], nf["table"], nf["base_chain"], nf["hook"]) == (
        "nftables", "inet", "fw", "input", "input")
    assert "rule" not in nf


def test_nftrace_still_names_the_rule(net, watch):
    lab, client, _server, link = net
    w = watch()
    lab.tcp_connect(client, str(link.b_v4.ip), 443)
    ev = w.sink.wait_for(to_port(443), timeout=20)
    assert ev["netfilter"]["rule"]["text"] == "tcp dport 443 drop"
    assert ev["netfilter"]["attribution"] == "nftrace"


def test_iptables_legacy_table_from_fexit(lab, watch):
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.run(server, ["iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "8443", "-j", "DROP"])
    w = watch(nftrace=False)
    assert lab.tcp_connect(client, str(link.b_v4.ip), 8443) == "timeout"
    ev = w.sink.wait_for(to_port(8443), timeout=20)
    nf = ev["netfilter"]
    assert (nf["backend"], nf["table"], nf["hook"], nf["attribution"]) == (
        "iptables-legacy", "filter", "input", "fexit")


def test_doctor_tells_the_truth_here():
    report = diagnose()
    by_name = {c.name: c for c in report.checks}
    assert by_name["prog_fentry"].status == "ok"
    assert by_name["prog_kprobe"].status in ("ok", "info")
    assert report.watch_possible and report.netfilter_probes == "fentry"
    assert sys.platform == "linux"
