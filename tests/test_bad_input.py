"""Bad input, all of it: a clear one-line error and a non-zero exit (2 for bad flags,
1 when the host cannot do it), or a warning when a flag can work but shows
nothing. No traceback ever reaches a user.

The subprocess tests run the real CLI; the hypothesis tests run
`tracer.cli.main` in this process, only on values it rejects before touching
the host (a valid value would start a real watch or send probes).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.support import tracer_cmd, wait_ready
from tracer.cli import main as cli
from tracer.log import clean

SETTINGS = settings(max_examples=100, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])


def run(*args: str, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(tracer_cmd(*args), capture_output=True, text=True, timeout=timeout, **kw, check=False)


def assert_one_error_line(stderr: str) -> str:
    lines = stderr.splitlines()
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tracer") and ": error: " in lines[0], stderr
    assert lines[0].isprintable(), repr(lines[0])
    return lines[0]


# ------------------------------------------------------------------ exit 2


@pytest.mark.parametrize(("args", "message"), [
    (["watch", "--port", "abc"], "a port is a number from 1 to 65535"),
    (["watch", "--port", "0"], "a port is a number from 1 to 65535"),
    (["watch", "--port", "\u00b2"], "a port is a number from 1 to 65535"),  # str.isdigit() says yes
    (["watch", "--port", "9" * 5000], "a port is a number from 1 to 65535"),
    (["watch", "--port", ""], "--port '': empty value"),
    (["watch", "--port", "80,"], "--port '80,': empty value"),
    (["watch", "--host", ""], "--host '': empty value"),
    (["watch", "--host", " , "], "empty value"),
    (["watch", "--reason", ""], "--reason '': empty value"),
    (["watch", "--host", "1.2.3"], "neither an IP address nor a CIDR"),
    (["watch", "--proto", "foo"], "protocol 'foo'"),
    (["watch", "--proto", "256"], "protocol number 256 is out of range 0-255"),
    (["watch", "--proto", ""], "protocol ''"),
    (["watch", "--proto", "47", "--port", "80"], "has no ports"),
    (["watch", "--iface", "x" * 20], "not a valid Linux interface name"),
    (["watch", "--iface", "eth0:1"], "not a valid Linux interface name"),
    (["watch", "--iface", ".."], "not a valid Linux interface name"),
    (["watch", "--netns", ""], "is not a valid name or inode number"),
    (["watch", "--netns", "../../etc"], "is not a valid name or inode number"),
    (["watch", "--count", "0"], "must be greater than 0"),
    (["watch", "--count", "1e3"], "is not a whole number"),
    (["watch", "--duration", "soon"], "is not a number"),
    (["watch", "--duration", "nan"], "'nan' is not a finite number"),
    (["watch", "--duration", "inf"], "'inf' is not a finite number"),
    (["watch", "--duration", "1e309"], "'1e309' is not a finite number"),
    (["watch", "--duration", "-0"], "'-0' must be greater than 0"),
    (["watch", "--trace-rate", "0"], "must be greater than 0"),
    (["watch", "--trace-rate", "99999999999"], "must be at most"),
    # Nothing is sent: the values are refused while the flags are parsed.
    (["probe", "198.18.0.1", "--timeout", "nan"], "'nan' is not a finite number"),
    (["probe", "198.18.0.1", "--timeout", "1e309"], "'1e309' is not a finite number"),
    (["probe", "198.18.0.1", "--timeout", "1e12"], "must be at most 3600"),
    (["probe", "198.18.0.1", "--retries=-1"], "must be 0 or more"),
    (["probe", "198.18.0.1", "--port", ""], "--port '': empty value"),
    (["pmtu", "198.18.0.1", "--timeout", "nan"], "'nan' is not a finite number"),
    (["pmtu", "198.18.0.1", "--timeout=-inf"], "'-inf' is not a finite number"),
    (["pmtu", "198.18.0.1", "--port", "70000"], "a port is a number from 1 to 65535"),
    (["watch", "\x1b[31mred\nline"], "unrecognized arguments: \\x1b[31mred\\nline"),
    (["watch", "--port=--"], "argument --port: '--' is not a value"),
    (["watch", "--count=--"], "argument --count: '--' is not a value"),
    (["--log-level", "loud", "doctor"], "log level must be one of"),
    (["frobnicate"], "invalid choice"),
    # Found only against the running kernel and host: need root.
    pytest.param(["watch", "--reason", "NOPE"], "unknown drop reason 'NOPE'", marks=pytest.mark.root),
    pytest.param(["watch", "--reason", "NETFILTER_DRP"], "did you mean NETFILTER_DROP", marks=pytest.mark.root),
    pytest.param(["watch", "--netns", "12345"], "no live network namespace has inode 12345",
                 marks=pytest.mark.root),
    pytest.param(["watch", "--port", "1,2,3,4,5,6,7,8,9"], "at most 8 ports",
                 marks=[pytest.mark.root, pytest.mark.bpf]),
])
def test_bad_flags_exit_2_with_a_clear_message(args, message):
    res = run(*args)
    assert res.returncode == 2, res.stderr
    assert message in res.stderr
    assert_one_error_line(res.stderr)


# ------------------------------------------------------------------ hypothesis, in process

WATCH_FLAGS = ["--port", "--host", "--proto", "--netns", "--iface", "--reason"]

values = st.one_of(
    st.text(max_size=40),
    st.text(alphabet="0123456789,.:/- abcdef\x00\n\x1b", max_size=24),
    st.sampled_from(["", ",", " ", "--", "-1", "nan", "0", "65536", "256", "lo", ".", "..", "tcp", "47",
                     "::1%eth0", "198.18.0.0/33", "0x10", "\u0663", "\u00b2", "SKB_CONSUMED", "a" * 300]),
)


def parse_watch(flag: str, value: str) -> argparse.Namespace:
    return cli.build_parser().parse_args(["watch", f"{flag}={value}"])


@pytest.fixture
def restore_logging():
    """main() points the logs at this test's captured stderr: put back what was there."""
    import structlog

    saved = structlog.get_config()
    yield
    structlog.configure(**saved)


@pytest.mark.parametrize("flag", WATCH_FLAGS)
@SETTINGS
@given(value=values)
def test_any_filter_value_is_a_filter_or_a_one_line_error(flag, value, capsys):
    try:
        cli._watch_config(parse_watch(flag, value))
    except SystemExit as exc:  # refused by the parser itself
        assert exc.code == 2
        assert_one_error_line(capsys.readouterr().err)
    except cli.UsageError as exc:
        message = str(exc)
        assert message and message.isprintable(), repr(message)


@pytest.mark.parametrize("flag", WATCH_FLAGS)
@settings(SETTINGS, max_examples=50)
@given(value=values)
def test_rejected_filter_values_exit_2_with_one_line(flag, value, capsys, restore_logging):
    try:
        cli._watch_config(parse_watch(flag, value))
        assume(False)  # valid here: main() would start a real watch
    except (cli.UsageError, SystemExit):
        pass
    capsys.readouterr()
    assert cli.main(["watch", f"{flag}={value}"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_error_line(err)


numbers = st.one_of(
    st.text(max_size=12),
    st.floats().map(repr),
    st.integers(min_value=-10**30, max_value=10**30).map(str),
    st.sampled_from(["nan", "NaN", "-nan", "inf", "-inf", "Infinity", "-0", "-0.0", "0", "1e309", "1e-400",
                     " 1 ", "1_000", "0x10", "3601"]),
)

NUMBER_FLAGS = [
    (["pmtu", "198.18.0.1"], "--timeout", cli._positive(float, cli.MAX_TIMEOUT)),
    (["probe", "198.18.0.1"], "--timeout", cli._positive(float, cli.MAX_TIMEOUT)),
    (["watch"], "--duration", cli._positive(float)),
    (["watch"], "--count", cli._positive(int)),
    (["watch"], "--trace-rate", cli._positive(int, cli.TRACE_RATE_MAX)),
]


@pytest.mark.parametrize(("command", "flag", "parse"), NUMBER_FLAGS, ids=lambda x: x if isinstance(x, str) else None)
@settings(SETTINGS, max_examples=60)
@given(text=numbers)
def test_numbers_are_finite_and_positive_or_exit_2(command, flag, parse, text, capsys, restore_logging):
    try:
        value = parse(text)
    except argparse.ArgumentTypeError as exc:
        assert str(exc).isprintable()
    else:
        assert value == value and 0 < value < float("inf")  # never nan, never inf, never -0
        return  # valid: main() would run the command
    capsys.readouterr()
    assert cli.main([*command, f"{flag}={text}"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_error_line(err)


def test_protocol_numbers_and_names():
    from tracer.bpf.filter import protocol_number
    from tracer.config import Scope
    from tracer.netfilter.marking import nft_match_rules

    for number in range(256):
        f = Scope(proto=str(number))
        assert protocol_number(f.proto) == number
    assert Scope(proto="6").proto == "tcp" and Scope(proto="058").proto == "icmpv6"
    import socket

    assert Scope(proto="gre").proto == str(socket.getprotobyname("gre")) == "47"
    assert nft_match_rules(Scope(proto="47")) == ["meta l4proto 47"]


# ------------------------------------------------------------------ warnings and host checks


def watch_briefly(*args: str, duration: str = "1") -> subprocess.CompletedProcess:
    return run("watch", "--json", "--duration", duration, *args, timeout=90)


def warning_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("tracer: warning: ")]


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize(("args", "warning"), [
    (["--iface", "nosuch0"], "--iface 'nosuch0': no interface by that name in any watched network namespace now"),
    (["--reason", "SKB_CONSUMED"], "--reason SKB_CONSUMED: SKB_CONSUMED marks packets freed after normal use"),
    (["--reason", "NETFILTER_DROP,SKB_CONSUMED"], "so it never matches"),
    (["--no-nftrace", "--trace-rate", "5"], "--trace-rate has no effect with --no-nftrace"),
])
def test_flags_that_show_nothing_warn(args, warning):
    res = watch_briefly(*args)
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert any(warning in line for line in warning_lines(res.stderr)), res.stderr


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("args", [["--iface", "lo"], ["--reason", "NETFILTER_DROP"], ["--trace-rate", "5"],
                                  ["--no-nftrace"]])
def test_useful_flags_do_not_warn(args):
    res = watch_briefly(*args)
    assert res.returncode == 0, res.stderr
    assert warning_lines(res.stderr) == [], res.stderr


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("mode", ["fentry", "kprobe"])
def test_nf_probes_the_kernel_refuses_fail_with_the_reason(mode):
    """Exit 1: the flag is well formed, this kernel cannot do it (as `tracer doctor` reports)."""
    from tracer.bpf.loader import probe

    result = probe(drop_modes=(), nf_modes=(mode,)).nf[mode]
    res = watch_briefly("--nf-probes", mode)
    if result.ok:
        assert res.returncode == 0, res.stderr
        return
    assert res.returncode == 1, res.stderr
    line = assert_one_error_line(res.stderr)
    assert f"--nf-probes {mode}: {result.error}" in line


@pytest.mark.root
@pytest.mark.bpf
@pytest.mark.parametrize("proto", ["47", "gre"])
def test_proto_by_number_or_system_name(net, proto):
    """GRE to the server dies in its input policy; `--proto 47` and `--proto gre` both see it."""
    from scapy.layers.inet import IP
    from scapy.packet import Raw

    lab, client, server, link = net
    proc = subprocess.Popen(tracer_cmd("watch", "--proto", proto, "--count", "1", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_ready(lab, server)
        lab.send_ip(client, bytes(IP(src=str(link.a_v4.ip), dst=str(link.b_v4.ip), proto=47) / Raw(b"\0" * 8)))
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    ev = orjson.loads(out.splitlines()[0])
    assert ev["network"]["iana_number"] == "47"
    assert ev["netns"]["name"] == server.name
    assert ev["netfilter"]["policy"] is True


@pytest.mark.root
@pytest.mark.bpf
def test_netns_name_not_there_yet_is_waited_for(lab):
    """A name that does not exist yet: a warning, then the watch starts when it appears."""
    name = f"{lab.prefix}late"
    proc = subprocess.Popen(tracer_cmd("watch", "--netns", name, "--port", "5353", "--count", "1", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert proc.poll() is None, proc.stderr.read()
        a = lab.add_ns("a")
        late = lab.add_ns("late")
        assert late.name == name
        link = lab.link(a, late)
        lab.nft(late, "table inet fw {\n chain input {\n type filter hook input priority 0;\n"
                      ' udp dport 5353 drop comment "late"\n }\n}\n')
        wait_ready(lab, late)
        lab.udp_send(a, str(link.b_v4.ip), 5353)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert f"tracer: warning: --netns {name!r}: no network namespace by that name yet" in err
    ev = orjson.loads(out.splitlines()[0])
    assert ev["netns"]["name"] == name and ev["netfilter"]["rule"]["comment"] == "late"


@pytest.mark.root
def test_waiting_for_a_netns_name_obeys_duration_and_signals(lab):
    res = watch_briefly("--netns", f"{lab.prefix}never", duration="0.5")
    assert res.returncode == 0, res.stderr
    assert len(warning_lines(res.stderr)) == 1
    proc = subprocess.Popen(tracer_cmd("watch", "--netns", f"{lab.prefix}never"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)
    began = time.monotonic()
    proc.terminate()
    try:
        proc.wait(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert time.monotonic() - began < 1.0 and proc.returncode == 0


# ------------------------------------------------------------------ not root

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def tracer_script() -> str:
    """The installed entry point next to this interpreter (.venv/bin/tracer)."""
    path = Path(sys.executable).parent / "tracer"
    assert path.exists(), f"{path} missing: install the package (`make venv`)"
    return str(path)


def as_nobody(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, tracer_script(), *args], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/nonexistent"}, check=False)


@pytest.fixture
def nobody():
    if shutil.which("setpriv") is None:
        pytest.fail("setpriv (util-linux) is needed to test non-root runs")
    res = as_nobody("--version")
    assert res.returncode == 0, f"uid 65534 cannot run {tracer_script()}: {res.stderr}"


@pytest.mark.root
def test_watch_as_non_root_says_it_needs_root(nobody):
    res = as_nobody("watch", "--duration", "1")
    assert res.returncode == 1, res.stderr
    line = assert_one_error_line(res.stderr)
    assert "needs root" in line and "CAP_BPF" in line and "tracefs" not in line


@pytest.mark.root
@pytest.mark.parametrize("args", [["probe", "198.18.0.1", "--port", "443"], ["probe", "198.18.0.1", "--explain"],
                                  ["pmtu", "198.18.0.1"]])
def test_probes_as_non_root_exit_1(nobody, args):
    res = as_nobody(*args)
    assert res.returncode == 1, res.stderr
    line = assert_one_error_line(res.stderr)
    assert "raw sockets" in line and "root" in line


@pytest.mark.root
def test_bad_flags_as_non_root_still_exit_2(nobody):
    res = as_nobody("watch", "--port", "0")
    assert res.returncode == 2
    assert_one_error_line(res.stderr)


def test_clean_escapes_what_could_forge_lines():
    assert clean("a\nb\r\x1b[2Jc\u202e") == "a\\nb\\r\\x1b[2Jc\\u202e"
    assert clean("ordinary text, ünïcode") == "ordinary text, ünïcode"
