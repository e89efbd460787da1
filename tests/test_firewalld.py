"""The real firewalld in a lab namespace: its zones read back from its ruleset, and its fix applied.

firewalld runs as tests/firewalld_lab.py starts it (private bus, private mount
namespace, the lab namespace as its network namespace). The zone functions of
tracer.diagnosis.firewalld are checked against what firewalld itself built,
and the printed fix commands are run as a user would paste them: the
connection must then succeed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.firewalld_lab import FirewalldError, FirewalldLab, available
from tests.support import root_ruleset
from tracer import netns
from tracer.diagnosis import firewalld as fwd
from tracer.lab import Lab
from tracer.netfilter.nftables import NftContext, Ruleset, parse_ruleset

pytestmark = pytest.mark.root


@pytest.fixture
def firewalld_ok() -> None:
    missing = available()
    if missing:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{missing}; CI=true needs firewalld (scripts/install-deps.sh)", pytrace=False)
        pytest.skip(missing)


@pytest.fixture
def fw_net(lab: Lab, firewalld_ok: None) -> Iterator[tuple[Lab, netns.Netns, netns.Netns, object, FirewalldLab]]:
    """client -- server; firewalld on the server, its veth bound to zone public, listeners on 8080 and 5201."""
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.listen(server, 8080, 5201)
    with FirewalldLab(lab, server, interfaces={link.b_ifname: "public"}) as fw:
        yield lab, client, server, link, fw


def connect(ns: netns.Netns, addr: str, port: int, timeout: float = 1.0) -> str:
    """A TCP connect from `ns`: "open", the errno name (EHOSTUNREACH for firewalld's admin-prohibited
    reject over IPv4), or "timeout"."""
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with netns.entered(ns):
        sock = socket.socket(family, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except TimeoutError:
            return "timeout"
        except OSError as exc:
            return errno.errorcode.get(exc.errno or 0, type(exc).__name__)
    return "open"


def ruleset_of(ns: netns.Netns) -> Ruleset:
    with netns.entered(ns):
        ctx = NftContext()
    with ctx:
        return ctx.ruleset()


@pytest.mark.parametrize(("family", "port"), [(4, 8080), (6, 5201)])
def test_closed_in_zone_then_fix_opens_it(fw_net, family: int, port: int) -> None:
    _lab, client, server, link, fw = fw_net
    addr = str(link.b_v4.ip if family == 4 else link.b_v6.ip)
    # Rejected by zone public with admin-prohibited: IPv4's ICMP error ends the connect; this kernel
    # takes ICMPv6's as a soft error and retries the SYN until the connect times out (EACCES on others).
    assert connect(client, addr, port) in (("EHOSTUNREACH",) if family == 4 else ("timeout", "EACCES"))

    rs = ruleset_of(server)
    assert fwd.uses_firewalld(rs)
    assert fwd.zone_of_interface(rs, link.b_ifname) == "public"
    assert fwd.zone_of_interface(rs, "other0") == "public"  # the default zone's catch-all
    assert fwd.zone_of_chain("filter_IN_public", rs) == "public"
    assert fwd.zone_of_chain("filter_IN_public_allow", rs) == "public"
    assert fwd.zone_of_chain("filter_INPUT_ZONES", rs) is None
    assert fwd.zone_of_chain("filter_IN_policy_allow-host-ipv6", rs) is None
    zone_chain = rs.chain("inet", "firewalld", "filter_IN_public")
    assert zone_chain is not None
    last = rs.rule("inet", "firewalld", zone_chain.rules[-1])
    assert last is not None and last.reject and last.text == "reject with icmpx admin-prohibited"

    runtime, permanent = fwd.fix_commands("public", "tcp", port, family, prefix=["ip", "netns", "exec", server.name])
    assert runtime == f"ip netns exec {server.name} firewall-cmd --zone=public --add-port={port}/tcp"
    fw.run_fix(runtime)
    assert connect(client, addr, port) == "open"

    if family == 6:
        return  # the --permanent twin once is enough (a reload costs seconds)
    fw.run_fix(permanent)  # lands in the instance's own config dir, and survives its reload
    fw.firewall_cmd("--reload")
    assert f"{port}/tcp" in fw.firewall_cmd("--zone=public", "--list-ports").stdout.split()
    assert (fw.config_dir / "zones" / "public.xml").is_file()
    assert connect(client, addr, port) == "open"


def test_service_fix_opens_its_port(fw_net) -> None:
    lab, client, server, link, fw = fw_net
    lab.listen(server, 443)
    addr = str(link.b_v4.ip)
    assert connect(client, addr, 443) == "EHOSTUNREACH"
    commands = fwd.service_fix_commands("public", "tcp", 443, 4)
    assert commands == ["firewall-cmd --zone=public --add-service=https",
                        "firewall-cmd --permanent --zone=public --add-service=https"]
    fw.run_fix(commands[0])
    assert connect(client, addr, 443) == "open"
    assert fwd.service_fix_commands("public", "tcp", 9090, 4) == []  # cockpit and prometheus: no guess
    assert fwd.service_fix_commands("public", "tcp", 5201, 4) == []  # no service defines 5201/tcp


def test_zones_read_back_from_firewalld(fw_net) -> None:
    """Interfaces in other zones, firewalld's `+` wildcard, sources, and zone names that read two ways."""
    _lab, _client, server, link, fw = fw_net
    for zone in ("web_allow", "policy_x"):
        fw.firewall_cmd("--permanent", f"--new-zone={zone}")
    fw.firewall_cmd("--reload")
    fw.firewall_cmd("--zone=web_allow", f"--change-interface={link.b_ifname}")
    fw.firewall_cmd("--zone=internal", "--add-interface=eth+")
    fw.firewall_cmd("--zone=policy_x", "--add-interface=dummy7")
    fw.firewall_cmd("--zone=dmz", "--add-source=198.18.200.0/24")
    rs = ruleset_of(server)

    assert fwd.zone_of_interface(rs, link.b_ifname) == "web_allow"
    assert fwd.zone_of_interface(rs, "eth0") == "internal"
    assert fwd.zone_of_interface(rs, "eth") == "internal"  # `eth+` is nft's "eth*": any suffix, none too
    assert fwd.zone_of_interface(rs, "dummy7") == "policy_x"
    assert fwd.zone_of_interface(rs, "dummy8") == "public"
    assert fwd.zone_of_interface(rs, "eth0", hook="forward") == "internal"
    # The zone web_allow's own chain, and its allow part: the ruleset settles the reading.
    assert fwd.zone_of_chain("filter_IN_web_allow", rs) == "web_allow"
    assert fwd.zone_of_chain("filter_IN_web_allow_allow", rs) == "web_allow"
    assert fwd.parse_chain("filter_IN_web_allow", rs) == fwd.FirewalldChain("zone", "web_allow", "filter", "IN", None)
    # A zone named policy_x is a zone (a *_ZONES chain goes to it), the real policy a policy.
    assert fwd.zone_of_chain("filter_IN_policy_x_deny", rs) == "policy_x"
    parsed = fwd.parse_chain("filter_IN_policy_allow-host-ipv6_allow", rs)
    assert parsed is not None and (parsed.kind, parsed.name, parsed.part) == ("policy", "allow-host-ipv6", "allow")
    assert fwd.zone_of_chain("filter_IN_dmz", rs) == "dmz"  # active through its source
    assert fwd.zone_of_chain("filter_IN_work", rs) is None  # not active: no chain in the ruleset


def _proc_sys_net() -> dict[str, str]:
    values = {}
    for directory, _dirs, files in os.walk("/proc/sys/net"):
        for name in files:
            path = os.path.join(directory, name)
            if name.endswith("_count"):
                continue  # nf_conntrack_count moves with the host's own traffic
            try:
                with open(path) as f:
                    values[path] = f.read()
            except OSError:
                continue
    return values


def _tree_digest(root: str) -> str:
    digest = hashlib.sha256()
    for directory, dirs, files in sorted(os.walk(root)):
        dirs.sort()
        for name in sorted(files):
            path = Path(directory, name)
            digest.update(str(path).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def test_firewalld_touches_only_its_namespace(lab: Lab, firewalld_ok: None) -> None:
    """Root ruleset byte-identical, root sysctls unchanged, host config and run dirs untouched,
    nothing left running; firewalld's own ip_forward write (masquerade) lands in the lab."""
    before_rules, before_sysctl = root_ruleset(), _proc_sys_net()
    before_etc = _tree_digest("/etc/firewalld")
    host_paths = ("/run/firewalld", "/var/log/firewalld", "/run/firewalld.pid", "/run/dbus/system_bus_socket")
    before_paths = {p: os.path.exists(p) for p in host_paths}
    ns = lab.add_ns("fw")
    with FirewalldLab(lab, ns) as fw:
        tmp = fw.tmp
        fw.firewall_cmd("--zone=public", "--add-masquerade")  # firewalld writes ip_forward=1 for it
        fw.firewall_cmd("--permanent", "--zone=public", "--add-port=7000/udp")
        assert lab.run(ns, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.strip() == "1"
        assert "table inet firewalld" in lab.nft_list(ns)
        pids = [p for p in (fw._firewalld, fw._dbus) if p is not None]
        assert len(pids) == 2
    assert all(p.poll() is not None for p in pids)
    assert tmp is not None and not tmp.exists()
    assert root_ruleset() == before_rules
    after_sysctl = _proc_sys_net()
    changed = [k for k in before_sysctl.keys() & after_sysctl.keys() if before_sysctl[k] != after_sysctl[k]]
    assert changed == []
    assert _tree_digest("/etc/firewalld") == before_etc
    assert {p: os.path.exists(p) for p in host_paths} == before_paths


def test_failed_setup_cleans_up(lab: Lab, firewalld_ok: None) -> None:
    """A zone setup firewalld refuses: the error says why, and no process or temp dir is left."""
    ns = lab.add_ns("fw")
    fw = FirewalldLab(lab, ns, interfaces={"nope0": "nozone"})
    with pytest.raises(FirewalldError, match="INVALID_ZONE: nozone"):
        fw.start()
    assert fw.tmp is None and fw._firewalld is None and fw._dbus is None
    pids = subprocess.run(["ip", "netns", "pids", ns.name or ""], capture_output=True, text=True, check=True)
    assert pids.stdout == ""


# --- the pure functions on hostile and odd inputs ------------------------------------------


def _ruleset(chains: dict[str, list[list[dict]]]) -> Ruleset:
    """A `inet firewalld` ruleset as nft's JSON lists it: chain name -> its rules' expressions."""
    doc: list[dict] = [{"table": {"family": "inet", "name": "firewalld", "handle": 1}}]
    handle = 10
    for name, rules in chains.items():
        doc.append({"chain": {"family": "inet", "table": "firewalld", "name": name, "handle": handle}})
        for expr in rules:
            handle += 1
            doc.append({"rule": {"family": "inet", "table": "firewalld", "chain": name, "handle": handle,
                                 "expr": expr}})
    return parse_ruleset(doc)


def _iif(name: str, target: str) -> list[dict]:
    return [{"match": {"op": "==", "left": {"meta": {"key": "iifname"}}, "right": name}},
            {"goto": {"target": target}}]


def test_hostile_chain_names_are_no_zone() -> None:
    for chain in ("filter_IN_a b", "filter_IN_$(reboot)", "filter_IN_x\nfilter_IN_public", "filter_IN_",
                  "filter_IN_/x", "filter_IN_a/b/c", "filter_IN_" + "z" * 18, "mangle_FOO_public",
                  "filterIN_public", "filter_IN_public;", "filter_IN_public\n"):
        assert fwd.zone_of_chain(chain) is None, chain
    # Names firewalld itself accepts, however odd: the fix commands keep them one word.
    assert fwd.zone_of_chain("filter_IN_-") == "-"
    assert fwd.zone_of_chain("filter_IN__allow") == "_allow"
    assert fwd.zone_of_chain("filter_IN_a/b") == "a/b"
    assert fwd.zone_of_chain("filter_IN_" + "z" * 17) == "z" * 17
    assert fwd.zone_of_chain("nat_POST_zöne") == "zöne"  # firewalld's isalnum() takes letters of any script


def test_zone_of_interface_reads_rules_in_order() -> None:
    rs = _ruleset({
        "filter_INPUT_ZONES": [
            [{"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}},
                        "right": {"prefix": {"addr": "198.18.5.0", "len": 24}}}},
             {"goto": {"target": "filter_IN_dmz"}}],
            _iif("lit\\*", "filter_IN_trusted"),
            _iif("veth*", "filter_IN_internal"),
            _iif("veth0", "filter_IN_work"),
            [{"goto": {"target": "filter_IN_public"}}],
        ],
        **{f"filter_IN_{z}": [] for z in ("dmz", "trusted", "internal", "work", "public")},
    })
    assert fwd.zone_of_interface(rs, "veth0") == "internal"  # the wildcard rule comes first
    assert fwd.zone_of_interface(rs, "lit*") == "trusted"
    assert fwd.zone_of_interface(rs, "litx") == "public"
    assert fwd.zone_of_interface(rs, "eth0") == "public"
    assert fwd.zone_of_interface(rs, "eth0", hook="forward") is None  # no such dispatch chain
    with pytest.raises(ValueError, match="no zone dispatch"):
        fwd.zone_of_interface(rs, "eth0", hook="output")
    odd = _ruleset({"filter_INPUT_ZONES": [[{"match": {"op": "!=", "left": {"meta": {"key": "iifname"}},
                                                       "right": "x"}}, {"goto": {"target": "filter_IN_a"}}],
                                           [{"goto": {"target": "filter_IN_public"}}]],
                    "filter_IN_a": [], "filter_IN_public": []})
    assert fwd.zone_of_interface(odd, "y") is None  # a rule shape it cannot read: no guess
    assert not fwd.uses_firewalld(parse_ruleset([{"table": {"family": "inet", "name": "fw", "handle": 1}}]))


def test_fix_commands_quote_and_refuse() -> None:
    assert fwd.fix_commands("-x", "udp", 53, 6) == ["firewall-cmd --zone=-x --add-port=53/udp",
                                                     "firewall-cmd --permanent --zone=-x --add-port=53/udp"]
    assert fwd.fix_commands("zöne", "sctp", 1, 4)[0] == "firewall-cmd '--zone=zöne' --add-port=1/sctp"
    weird_ns = ["ip", "netns", "exec", "a b;c"]
    assert fwd.fix_commands("public", "tcp", 22, 4, weird_ns)[0].startswith("ip netns exec 'a b;c' firewall-cmd ")
    for bad in (("a b", "tcp", 1, 4), ("public", "icmp", 1, 4), ("public", "tcp", 0, 4),
                ("public", "tcp", 65536, 4), ("public", "tcp", True, 4), ("public", "tcp", 1, 5),
                ("", "tcp", 1, 4), ("x'y", "tcp", 1, 4)):
        with pytest.raises(fwd.FirewalldFixError):
            fwd.fix_commands(*bad)


def test_services_defined_by_files(tmp_path: Path) -> None:
    usr, etc = tmp_path / "usr", tmp_path / "etc"
    usr.mkdir()
    etc.mkdir()

    def service(directory: Path, name: str, body: str) -> None:
        (directory / f"{name}.xml").write_text(f'<?xml version="1.0"?>\n<service><short>s</short>{body}</service>')

    service(usr, "web", '<port protocol="tcp" port="8000"/>')
    service(usr, "mcast", '<port protocol="udp" port="8001"/><destination ipv4="224.0.0.1"/>')
    service(usr, "two", '<port protocol="tcp" port="8002"/><port protocol="udp" port="8002"/>')
    service(usr, "over", '<port protocol="tcp" port="8003"/>')
    service(etc, "over", '<port protocol="tcp" port="8004"/>')  # /etc overrides /usr/lib
    (usr / "broken.xml").write_text("<service><port")
    (usr / "bomb.xml").write_text('<!DOCTYPE x [<!ENTITY a "aaaa">]><service><port protocol="tcp" port="8000"/>'
                                  "</service>")
    dirs = (str(usr), str(etc))
    assert fwd.services_for_port("tcp", 8000, dirs) == ["web"]
    assert fwd.services_for_port("udp", 8001, dirs) == []
    assert fwd.services_for_port("tcp", 8002, dirs) == []
    assert fwd.services_for_port("tcp", 8003, dirs) == []
    assert fwd.services_for_port("tcp", 8004, dirs) == ["over"]
    assert fwd.service_fix_commands("home", "tcp", 8004, 6, dirs=dirs)[1] == (
        "firewall-cmd --permanent --zone=home --add-service=over")


@pytest.mark.bpf
@pytest.mark.parametrize("family", [4, 6])
def test_drop_event_names_the_zone_chain(fw_net, watch, family: int) -> None:
    """What a drop by zone public's target looks like to the tracer: the reject at the end of
    filter_IN_public, reached from the base chain filter_INPUT, over both families."""
    _lab, client, server, link, _fw = fw_net
    addr = str(link.b_v4.ip if family == 4 else link.b_v6.ip)
    w = watch()
    connect(client, addr, 8080, timeout=0.5)
    ev = w.sink.wait_for(lambda e: e.get("destination", {}).get("port") == 8080, timeout=5)
    nf = ev["netfilter"]
    assert (nf["family"], nf["table"], nf["chain"], nf["base_chain"], nf["hook"]) == (
        "inet", "firewalld", "filter_IN_public", "filter_INPUT", "input")
    assert nf["rule"]["text"] == "reject with icmpx admin-prohibited" and nf["policy"] is False
    assert fwd.zone_of_chain(nf["chain"], ruleset_of(server)) == "public"
    assert ev["observer"]["ingress"]["interface"]["name"] == link.b_ifname
