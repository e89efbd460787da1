"""Shared fixtures: throw-away namespace labs, and the root guard.

Tests marked `root` need root, network namespaces and netfilter. Outside CI
they are skipped for a normal user; under CI=true a missing privilege is a
failure, so a misconfigured runner cannot turn the suite green by skipping.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tracer import log as tracer_log
from tracer.lab import Lab

tracer_log.configure("info", json=False)


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("root") is None or os.geteuid() == 0:
        return
    message = "needs root (network namespaces, nftables)"
    if _in_ci():
        pytest.fail(f"{message}; CI=true must run these tests as root", pytrace=False)
    pytest.skip(message)


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """A fresh lab; its namespaces and processes go away even if the test fails."""
    if os.geteuid() != 0:
        if _in_ci():
            pytest.fail("the lab fixture needs root; CI=true must run as root", pytrace=False)
        pytest.skip("the lab fixture needs root")
    the_lab = Lab()
    yield the_lab  # pytest runs what follows when the test ends, failed or not
    the_lab.close()


@pytest.fixture
def net(lab: Lab):
    """Client and server joined by one link; the server runs SERVER_RULESET and
    listens on 22 and 443, the client runs CLIENT_RULESET."""
    from tests.support import CLIENT_RULESET, SERVER_RULESET

    client, server = lab.add_ns("client"), lab.add_ns("server")
    link = lab.link(client, server)
    lab.nft(server, SERVER_RULESET)
    lab.nft(client, CLIENT_RULESET)
    lab.listen(server, 22, 443)
    return lab, client, server, link


@pytest.fixture
def watch(lab: Lab):
    """Starts engines like `tracer watch` (tests.support.Watch); stops them after the test.

    Events are kept only from this test's lab namespaces.
    """
    from tests.support import Watch

    started: list[Watch] = []

    def start(**kw) -> Watch:
        w = Watch(netns_prefix=lab.prefix, **kw)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
