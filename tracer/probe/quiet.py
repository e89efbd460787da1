"""Scapy's own warnings go to the tracer's debug log, never to the user's terminal.

Scapy installs a stderr handler on its "scapy" logger when it is first
imported, and warns while it builds packets ("No route found for IPv4
destination", "Mac address to reach destination not found") or while it
loads ("No route found for IPv6 destination"). Those lines are about
scapy's own routing table, which the probes do not use (they set their
source address and send through their own raw socket), so a person would
only be misled by them. This module replaces that handler with one that
forwards each record to structlog at debug level, and imports the scapy
modules the probes use with Python warnings caught, logged the same way.

Importing this module does it: the probe modules import it before scapy
(`from tracer.probe import quiet` above an `# isort: split`). It is not in
tracer/probe/__init__.py because `tracer watch` imports tracer.probe.marker
and must not pay for loading scapy.
"""

from __future__ import annotations

import logging
import warnings

import structlog

#: The modules the probes import; loading them here, caught, keeps their import-time warnings quiet.
_MODULES = ("scapy.layers.inet", "scapy.layers.inet6", "scapy.packet")


class ToDebugLog(logging.Handler):
    """A logging handler that hands each record to the tracer's structlog at debug level."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a malformed %-format in someone else's call
            message = str(record.msg)
        structlog.get_logger("tracer.scapy").debug("scapy", logger=record.name, level=record.levelname,
                                                   message=message.strip())


def _route_scapy_logging() -> None:
    import scapy.error  # noqa: F401  (creates the "scapy" logger and its stderr handler)

    log = logging.getLogger("scapy")
    for handler in list(log.handlers):
        if not isinstance(handler, ToDebugLog):
            log.removeHandler(handler)
    if not any(isinstance(h, ToDebugLog) for h in log.handlers):
        log.addHandler(ToDebugLog())
    log.propagate = False


def quiet_scapy() -> None:
    """Routes scapy's logging and import-time warnings to the debug log; idempotent."""
    import importlib

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _route_scapy_logging()
        for name in _MODULES:
            importlib.import_module(name)
    for w in caught:
        structlog.get_logger("tracer.scapy").debug("scapy", category=w.category.__name__,
                                                   message=str(w.message).strip())


quiet_scapy()
