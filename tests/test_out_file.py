"""The `file` output: real files through the queued sink; mode, rotation, reopen, refusals.

A full filesystem and a read-only one are real too: a tmpfs or a read-only
bind mount in a mount namespace of a child process (`unshare --mount`), so
the host's mounts never change.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.test_spool import event, wait_for
from tracer.config import ConfigError
from tracer.outputs.file import FileTransport, Options
from tracer.outputs.queued import QueuedSink
from tracer.outputs.spool import Spool
from tracer.outputs.transport import OutputDown, Record, SendResult

ROOT = Path(__file__).resolve().parent.parent
FAST = {"retry_initial": 0.02, "retry_max": 0.1}


def record(i: int, pad: int = 80) -> Record:
    return Record(b'{"tracer":{"seq":%d},"pad":"%s"}' % (i, b"x" * pad), f"event {i}")


def seqs(*paths: Path) -> list[int]:
    """The event numbers in these files, in the order given, checking every line is whole JSON."""
    out = []
    for path in paths:
        data = path.read_bytes()
        assert not data or data.endswith(b"\n")
        out += [int(orjson.loads(line)["tracer"]["seq"]) for line in data.splitlines()]
    return out


def deliver(path: Path, records: list[Record], **kw: int) -> None:
    sink = QueuedSink(FileTransport(str(path), **kw), spool=None, **FAST)
    for r in records:
        sink.submit(r)
    delivery = sink.close(20)
    assert delivery.written == delivery.accepted == len(records)


def test_new_file_is_0600_in_a_directory_made_0750(tmp_path: Path) -> None:
    path = tmp_path / "log" / "tracer" / "drops.ndjson"
    old = os.umask(0)
    try:
        deliver(path, [record(i) for i in range(10)])
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750
    assert seqs(path) == list(range(10))
    deliver(path, [record(i) for i in range(10, 15)])  # appended, never truncated
    assert seqs(path) == list(range(15))


def test_the_json_without_its_newline_becomes_one_line(tmp_path: Path) -> None:
    path = tmp_path / "drops.ndjson"
    sink = QueuedSink(FileTransport(str(path)), spool=None)
    sink.submit(event(7))
    sink.close(10)
    lines = path.read_bytes().splitlines(keepends=True)
    assert len(lines) == 1 and lines[0] == event(7).json()


def test_rotation_keeps_exactly_keep_files_and_loses_no_line(tmp_path: Path) -> None:
    path = tmp_path / "drops.ndjson"
    line = len(record(100).json) + 1  # every line alike: 3-digit numbers
    deliver(path, [record(i) for i in range(100, 1000)], max_bytes=4096, keep=3)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["drops.ndjson", "drops.ndjson.1", "drops.ndjson.2", "drops.ndjson.3"]
    files = [path.with_name(f"drops.ndjson.{n}") for n in (3, 2, 1)] + [path]
    assert all(f.stat().st_size <= 4096 for f in files)
    # rotated only when the next line did not fit
    assert all(f.stat().st_size == 4096 // line * line for f in files[:-1])
    got = seqs(*files)
    assert got == list(range(1000 - len(got), 1000))  # the newest, in order, none missing


def test_rotation_with_room_for_everything_keeps_every_line(tmp_path: Path) -> None:
    path = tmp_path / "drops.ndjson"
    deliver(path, [record(i) for i in range(3000)], max_bytes=4096, keep=1000)
    files = sorted(tmp_path.iterdir(), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit() else 0)
    assert seqs(*files) == list(range(3000))
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)


def test_keep_zero_keeps_only_the_current_file(tmp_path: Path) -> None:
    path = tmp_path / "drops.ndjson"
    deliver(path, [record(i) for i in range(500)], max_bytes=4096, keep=0)
    assert [p.name for p in tmp_path.iterdir()] == ["drops.ndjson"]
    got = seqs(path)
    assert got == list(range(500 - len(got), 500)) and 0 < len(got) < 500


def test_a_line_longer_than_max_bytes_gets_a_file_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "drops.ndjson"
    transport = FileTransport(str(path), max_bytes=4096, keep=5)
    transport.open()
    assert transport.send([record(1), record(2, pad=5000), record(3)]) == SendResult()
    transport.close()
    assert seqs(path.with_name("drops.ndjson.2")) == [1]
    assert seqs(path.with_name("drops.ndjson.1")) == [2]
    assert seqs(path) == [3]


def test_reopen_after_logrotate_moved_the_file(tmp_path: Path) -> None:
    path = tmp_path / "drops.ndjson"
    sink = QueuedSink(FileTransport(str(path)), spool=None, **FAST)
    try:
        for i in range(10):
            sink.submit(record(i))
        wait_for(lambda: sink.stats().delivered == 10)
        moved = tmp_path / "drops.ndjson-20261201"
        path.rename(moved)
        sink.reopen()
        wait_for(path.exists)  # reopened at once, before any new event
        for i in range(10, 20):
            sink.submit(record(i))
        wait_for(lambda: sink.stats().delivered == 20)
    finally:
        sink.close(5)
    assert seqs(moved) == list(range(10))
    assert seqs(path) == list(range(10, 20))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_symlink_where_the_file_should_be_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text("not to be written\n")
    path = tmp_path / "drops.ndjson"
    path.symlink_to(target)
    with pytest.raises(OutputDown, match="symbolic link"):
        FileTransport(str(path)).open()
    with pytest.raises(ConfigError, match=r"^path: .* is a symbolic link"):
        Options(path=str(path)).check()
    spool = Spool.open(tmp_path / "spool", "f", 1 << 20)
    sink = QueuedSink(FileTransport(str(path)), spool=spool, **FAST)
    sink.submit(record(1))
    wait_for(lambda: sink.stats().spooled_now_events == 1)
    assert not sink.stats().up and "symbolic link" in (sink.stats().last_error or "")
    sink.close(1)
    assert target.read_text() == "not to be written\n"


def test_check_accepts_a_good_path_and_names_the_bad_key(tmp_path: Path) -> None:
    Options(path=str(tmp_path / "new" / "dir" / "drops.ndjson")).check()  # may be made
    (tmp_path / "existing.ndjson").write_text("")
    Options(path=str(tmp_path / "existing.ndjson"), max_bytes=4096, keep=0).check()
    blocker = tmp_path / "afile"
    blocker.write_text("")
    bad = {
        "relative/drops.ndjson": r"^path: 'relative/drops.ndjson' is not an absolute path$",
        str(blocker / "sub" / "drops.ndjson"): r"^path: '.*afile' is not a directory$",
        str(tmp_path) + "/": r"^path: .* names a directory",
        str(tmp_path): r"^path: .* is not a regular file",
        "": r"^path: '' is not a file name",
    }
    for path, message in bad.items():
        with pytest.raises(ConfigError, match=message):
            Options(path=path).check()
    with pytest.raises(ConfigError, match=r"^max_bytes: 4095 is less than 4096$"):
        Options(path=str(tmp_path / "x"), max_bytes=4095).check()
    for keep in (-1, 1001):
        with pytest.raises(ConfigError, match=rf"^keep: {keep} is not between 0 and 1000$"):
            Options(path=str(tmp_path / "x"), keep=keep).check()


def in_mount_namespace(setup: str, code: str, mount: str, *args: str) -> dict[str, object]:
    """Runs `code` (Python, printing one JSON object; sys.argv[1:] = args) after `setup` (sh,
    "$1" = mount) in a mount namespace of its own: the mounts it makes vanish with it."""
    script = f'{setup} && shift && exec "$PYTHON" -c "$CODE" "$@"'
    env = {**os.environ, "PYTHON": sys.executable, "CODE": code}
    argv = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh", mount, *args]
    out = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout.splitlines()[-1])
    return result


CHECK_CODE = r"""
import json, sys
from tracer.config import ConfigError
from tracer.outputs.file import Options
try:
    Options(path=sys.argv[1]).check()
    print(json.dumps({"error": None}))
except ConfigError as exc:
    print(json.dumps({"error": str(exc)}))
"""


@pytest.mark.root
def test_check_refuses_a_read_only_directory_even_as_root(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    result = in_mount_namespace('mount --bind -o ro "$1" "$1"', CHECK_CODE, str(ro), str(ro / "drops.ndjson"))
    assert result["error"] == f"path: directory {str(ro)!r} is not writable"
    sub = in_mount_namespace('mount --bind -o ro "$1" "$1"', CHECK_CODE, str(ro), str(ro / "a" / "drops.ndjson"))
    assert sub["error"] == f"path: directory {str(ro)!r} is not writable"


FULL_CODE = r"""
import json, sys
from tracer.outputs.file import FileTransport
from tracer.outputs.transport import OutputDown, Record
t = FileTransport(sys.argv[1] + "/drops.ndjson", max_bytes=1 << 30)
t.open()
sent = retried = 0
error = None
while True:
    batch = [Record(b'{"tracer":{"seq":%d},"pad":"%s"}' % (sent + k, b"y" * 300), "e") for k in range(10)]
    try:
        result = t.send(batch)
    except OutputDown as exc:
        error = str(exc)
        break
    sent += 10 - len(result.retry)
    if result.retry:
        retried += 1
        assert result.retry == tuple(range(10 - len(result.retry), 10))
print(json.dumps({"sent": sent, "error": error, "retried": retried}))
"""


@pytest.mark.root
def test_a_full_filesystem_raises_output_down_and_leaves_whole_lines(tmp_path: Path) -> None:
    full = tmp_path / "full"
    full.mkdir()
    script = 'mount -t tmpfs -o size=64k tracer-test "$1" && "$PYTHON" -c "$CODE" "$1" && cat "$1/drops.ndjson" >&2'
    env = {**os.environ, "PYTHON": sys.executable, "CODE": FULL_CODE}
    out = subprocess.run(["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
                          str(full)], cwd=ROOT, env=env, capture_output=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.decode().splitlines()[-1])
    assert "No space left on device" in result["error"]
    content = out.stderr  # the file as the full filesystem holds it
    assert content.endswith(b"\n")
    numbers = [int(orjson.loads(line)["tracer"]["seq"]) for line in content.splitlines()]
    assert numbers == list(range(result["sent"])) and result["sent"] > 100
    assert result["retried"] == 1  # the batch that filled it: its whole lines kept, the rest to retry
