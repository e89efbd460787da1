"""Namespaces: discovery, entering, running commands, and libnftables contexts inside them."""

from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import threading
import time

import pytest

from tracer import netns
from tracer.lab import LAB_V4, Lab
from tracer.netfilter.nftables import NftContext
from tracer.netns import Netns, NetnsGone

pytestmark = pytest.mark.root


def test_discover_finds_root_and_named_namespaces(lab: Lab) -> None:
    a = lab.add_ns("a")
    found = netns.discover()
    root = netns.root()
    assert root.inode in found
    assert os.stat("/proc/self/ns/net").st_ino == root.inode  # pytest runs in the host namespace
    assert found[a.inode] == Netns(inode=a.inode, path=f"/var/run/netns/{a.name}", name=a.name)
    assert netns.name_of(a.inode) == a.name
    assert netns.name_of(root.inode) is None


def test_discover_finds_namespaces_held_only_by_a_process() -> None:
    proc = subprocess.Popen(["unshare", "--net", "sleep", "60"])
    try:
        path = f"/proc/{proc.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.stat(path).st_ino == netns.root().inode and time.monotonic() < deadline:
            time.sleep(0.02)  # unshare has not switched yet
        inode = os.stat(path).st_ino
        found = netns.discover()
        assert inode in found
        assert found[inode].name is None
        assert found[inode].path.startswith("/proc/") and os.stat(found[inode].path).st_ino == inode
    finally:
        proc.kill()
        proc.wait()
    assert inode not in netns.discover()


def test_discover_tolerates_processes_and_namespaces_vanishing(lab: Lab) -> None:
    """Namespaces and processes come and go while discover() scans."""
    stop = threading.Event()
    errors: list[BaseException] = []

    def churn() -> None:
        i = 0
        while not stop.is_set():
            try:
                subprocess.run(["unshare", "--net", "true"], check=True)
                lab.add_ns(f"churn{i}")
                lab.delete_ns(f"churn{i}")
                i += 1
            except BaseException as exc:  # report, do not hang the test
                errors.append(exc)
                return

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        for _ in range(30):
            assert netns.root().inode in netns.discover()
    finally:
        stop.set()
        worker.join()
    assert not errors


def test_entered_moves_only_this_thread_and_restores(lab: Lab) -> None:
    a = lab.add_ns("a")
    outside = netns.current_inode()
    seen_by_other_thread: list[int] = []
    go = threading.Event()

    def look() -> None:
        go.wait(5)
        seen_by_other_thread.append(netns.current_inode())

    # Started before entering: a thread started inside would inherit the namespace.
    t = threading.Thread(target=look)
    t.start()
    with netns.entered(a):
        assert netns.current_inode() == a.inode
        go.set()
        t.join()
    assert seen_by_other_thread == [outside]
    assert netns.current_inode() == outside

    with pytest.raises(RuntimeError, match="boom"), netns.entered(a):
        raise RuntimeError("boom")
    assert netns.current_inode() == outside


def test_socket_created_inside_stays_in_the_namespace(lab: Lab) -> None:
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    with netns.entered(server):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns.entered(client):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        # The server address exists only in the server namespace.
        rx.bind((str(link.b_v4.ip), 9999))
        rx.settimeout(2)
        tx.sendto(b"hello", (str(link.b_v4.ip), 9999))
        data, (src, _) = rx.recvfrom(100)
    assert data == b"hello" and src == str(link.a_v4.ip)
    assert ipaddress.ip_address(src) in LAB_V4


def test_entered_raises_clearly_when_the_namespace_is_gone(lab: Lab) -> None:
    a = lab.add_ns("a")
    lab.delete_ns("a")
    outside = netns.current_inode()
    with pytest.raises(NetnsGone, match="is gone"), netns.entered(a):
        pass
    assert netns.current_inode() == outside
    assert not netns.exists(a)
    with pytest.raises(NetnsGone):
        netns.run_in(a, ["true"])


def test_entered_detects_a_reused_path(lab: Lab) -> None:
    """A path that now opens another namespace (pid reuse, re-created name) is refused."""
    a = lab.add_ns("a")
    stale = Netns(inode=a.inode + 1_000_000, path=a.path, name=a.name)
    with pytest.raises(NetnsGone, match="another namespace"), netns.entered(stale):
        pass


def test_run_in(lab: Lab) -> None:
    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    out = netns.run_in(server, ["ip", "-br", "addr", "show", "dev", link.b_ifname]).stdout
    assert str(link.b_v4.ip) in out
    assert netns.run_in(server, ["ip", "route", "show", "default"]).stdout == ""  # no way out of the lab
    assert netns.run_in(netns.root(), ["true"]).returncode == 0


def test_nft_context_keeps_its_socket_in_the_namespace(lab: Lab) -> None:
    a = lab.add_ns("a")
    lab.nft(a, "table inet only_in_lab { }\n")
    with netns.entered(a):
        ctx = NftContext()
    with ctx:
        # Used from the host namespace, from another thread too: still the lab's ruleset.
        assert ("inet", "only_in_lab") in ctx.ruleset().tables
        result: list[bool] = []
        t = threading.Thread(target=lambda: result.append(("inet", "only_in_lab") in ctx.ruleset().tables))
        t.start()
        t.join()
        assert result == [True]
    with NftContext() as host_ctx:
        assert ("inet", "only_in_lab") not in host_ctx.ruleset().tables


def test_lab_close_removes_everything() -> None:
    lab = Lab()
    a, b = lab.add_ns("a"), lab.add_ns("b")
    lab.link(a, b)
    proc = lab.spawn(a, ["sleep", "60"])
    lab.close()
    lab.close()
    assert proc.poll() is not None
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=False).stdout
    assert a.name not in listed and b.name not in listed
