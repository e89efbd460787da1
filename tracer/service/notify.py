"""systemd's notify protocol: READY, RELOADING, STOPPING, STATUS and the watchdog.

Written here rather than taken from a library: the protocol is one
datagram of `KEY=value` lines to the AF_UNIX socket named by
$NOTIFY_SOCKET (systemd.io and sd_notify(3)), the Python packages for it
are either unmaintained (sdnotify, last release 2017) or need libsystemd's
headers and a compiler on every host (systemd-python). Outside systemd
(no $NOTIFY_SOCKET) every call does nothing, so `tracer run` also works in
a container or a terminal.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

from tracer.config import systemd_environment


class Notifier:
    """The service manager's notify socket, if there is one; every send is best effort."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = systemd_environment() if environ is None else environ
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):  # an abstract socket: a NUL byte instead of the @
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        self.watchdog_seconds = _watchdog_seconds(env)
        self._sock: socket.socket | None = None
        self._last_ping = 0.0
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: str | int) -> bool:
        """One notification (`send(READY=1, STATUS="watching")`); False if it could not go."""
        if self._sock is None or self.address is None:
            return False
        message = "\n".join(f"{k}={_one_line(v)}" for k, v in fields.items()).encode()
        try:
            self._sock.sendto(message, self.address)
        except OSError:
            return False
        return True

    def ready(self, status: str) -> None:
        self.send(READY=1, STATUS=status, MAINPID=os.getpid())

    def reloading(self) -> None:
        # MONOTONIC_USEC lets systemd 253+ (Type=notify-reload) match this to its SIGHUP.
        self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def stopping(self, status: str = "stopping") -> None:
        self.send(STOPPING=1, STATUS=status)

    def watchdog(self) -> None:
        """WATCHDOG=1 at most twice per watchdog interval (systemd wants one within it)."""
        if self.watchdog_seconds is None:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.watchdog_seconds / 2:
            self._last_ping = now
            self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _watchdog_seconds(env: Mapping[str, str]) -> float | None:
    """The watchdog interval systemd asked for (WatchdogSec=), when it is meant for this process."""
    usec = env.get("WATCHDOG_USEC", "")
    pid = env.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and (not pid.isdigit() or int(pid) != os.getpid()):
        return None
    return int(usec) / 1e6


def _one_line(value: str | int) -> str:
    # A newline would start another field: a status naming a path must not forge READY=1.
    return str(value).replace("\n", " ")
