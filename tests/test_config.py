"""The one configuration object: built from flags or a file, checked once, frozen."""

from __future__ import annotations

import dataclasses
import ipaddress
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tracer.config import Config, ConfigError, Scope, environment_defaults


def test_flags_and_a_file_make_the_same_config():
    flags = Config.from_mapping({"port": ["443,8443"], "host": ["198.18.0.1", "2001:db8::/64"],
                                 "proto": "tcp", "count": "5", "nf_probes": "none"}, environ={})
    doc = tomllib.loads('port = [443, 8443]\nhost = ["198.18.0.1", "2001:db8::/64"]\n'
                        'proto = "tcp"\ncount = 5\nnf_probes = "none"\n')
    assert Config.from_mapping(doc, environ={}) == flags
    assert flags.scope.ports == (443, 8443)
    assert flags.scope.hosts == (ipaddress.ip_network("198.18.0.1/32"), ipaddress.ip_network("2001:db8::/64"))
    assert flags.count == 5 and flags.nf_mode is None


def test_it_is_frozen_all_the_way_down():
    config = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.count = 3  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.scope.ports = (1,)  # type: ignore[misc]


@pytest.mark.parametrize(("doc", "message"), [
    ({"port": ["0"]}, "--port '0': a port is a number from 1 to 65535"),
    ({"port": "80,"}, "--port '80,': empty value"),
    ({"host": ["1.2.3"]}, "neither an IP address nor a CIDR"),
    ({"count": 0}, "count: 0 must be greater than 0"),
    ({"count": 1.5}, "count: 1.5 is not a whole number"),
    ({"duration": "nan"}, "duration: 'nan' is not a finite number"),
    ({"trace_rate": 10**12}, "trace_rate: 1000000000000 must be at most 10000000"),
    ({"stack": "yes"}, "stack: 'yes' is not true or false"),
    ({"nf_probes": "ebpf"}, "nf_probes: 'ebpf' is not one of auto, fentry, kprobe, none"),
    ({"log_level": "loud"}, "log level must be one of"),
    ({"prot": "tcp"}, "unknown setting 'prot'"),
    ({"proto": "47", "port": [80]}, "has no ports"),
    ({"port": {"a": 1}}, "is not a value or a list of values"),
])
def test_a_bad_value_is_one_clear_error(doc, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Config.from_mapping(doc, environ={})


def test_the_environment_is_read_in_one_place_and_flags_win():
    env = {"TRACER_BPF_OBJECT": "/tmp/x.bpf.o", "TRACER_LOG_LEVEL": "info", "TRACER_DEBUG_STATS": "1"}
    assert environment_defaults(env) == {"bpf_object": "/tmp/x.bpf.o", "log_level": "info", "debug_stats": True}
    config = Config.from_mapping({"log_level": "error"}, environ=env)
    assert config.bpf_object == Path("/tmp/x.bpf.o") and config.log_level == "error" and config.debug_stats
    # Nothing below the edge reads the environment.
    root = Path(__file__).resolve().parents[1] / "tracer"
    readers = subprocess.run(["grep", "-rln", "--include=*.py", "-e", "os.environ", "-e", "getenv", "--", str(root)],
                             capture_output=True, text=True, check=False).stdout.split()
    assert [Path(p).relative_to(root).as_posix() for p in readers] == ["config.py"]


def test_scope_normalises_once():
    s = Scope(ports=("443", 443, " 80"), proto="6", reasons=("skb_drop_reason_netfilter_drop",))
    assert s.ports == (80, 443) and s.proto == "tcp" and s.reasons == ("NETFILTER_DROP",)
    assert Scope(**{f.name: getattr(s, f.name) for f in dataclasses.fields(s)}) == s


def test_the_cli_parses_with_the_config_parsers():
    """`tracer watch` refuses what Config refuses, with the same words (no second validator)."""
    out = subprocess.run([sys.executable, "-m", "tracer", "watch", "--port", "0"],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 2
    assert "--port '0': a port is a number from 1 to 65535" in out.stderr
