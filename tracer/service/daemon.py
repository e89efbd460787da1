"""`tracer run`: the watch as a supervised service, feeding its configured outputs.

The life of the daemon:
1. the configuration is read and checked whole (tracer.service.config); a
   bad one exits 2 before anything on the host changes;
2. the outputs are opened (each its worker, queue and spool), then the
   metrics endpoint, then the engine attaches its probes; READY=1 goes to
   systemd only then, so `systemctl start` returns when drops are seen;
3. the join loop runs; every pass sends WATCHDOG=1 (at most twice per
   WatchdogSec), so a stuck join gets the service restarted;
4. SIGHUP reloads (RELOADING=1 ... READY=1): new and changed outputs are
   opened before the old ones close, filters move through the BPF map and
   the marking tables in place, file outputs reopen (logrotate); a config
   that no longer checks is refused and the running one stays;
5. SIGTERM or SIGINT stops: the last summaries go out, the marking tables
   come off, outputs deliver what they hold or keep it in their spool.

Signal handlers only set events: the work happens in the join thread and
in a reload thread, never inside a handler that may interrupt a lock
holder.
"""

from __future__ import annotations

import dataclasses
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from tracer import __version__
from tracer import log as logsetup
from tracer.config import ConfigError
from tracer.outputs import registry
from tracer.outputs.base import OutputSink, undelivered_line
from tracer.outputs.fanout import Fanout
from tracer.service import config as service_config
from tracer.service.config import OutputSpec, ServiceConfig
from tracer.service.notify import Notifier

log = structlog.get_logger("tracer.service")

#: How long outputs get at exit to deliver what they hold (the rest stays in their spool).
CLOSE_TIMEOUT = 5.0


@dataclass
class _Output:
    spec: OutputSpec
    sink: OutputSink


class Daemon:
    """One run of the service: its outputs, its metrics, its engine, and what signals ask."""

    def __init__(self, cfg: ServiceConfig, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier or Notifier()
        self.fanout = Fanout()
        self.outputs: dict[str, _Output] = {}
        self.metrics: Any = None
        self.engine: Any = None
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._lock = threading.Lock()  # outputs, metrics: reload against shutdown
        self.reloads = 0

    # ---------------------------------------------------------------- start

    def run(self) -> int:
        from tracer.cli import preflight
        from tracer.pipeline.engine import Engine

        preflight.require_watch_privileges()
        old_handlers = self._handle_signals()
        try:
            self.engine = Engine(self.cfg.watch, self.fanout)
            self._open_outputs()
            self._serve_metrics()
            self.engine.tick = self._tick
            if self._stop.is_set():
                return 0
            self.engine.start()
            if self.metrics is not None:
                self.metrics.watch_engine(self.engine)
            threading.Thread(target=self._reloader, name="reloader", daemon=True).start()
            status = f"watching: {self.engine.describe()}; outputs: {', '.join(self.outputs)}"
            self.notifier.ready(status)
            log.info("ready", version=__version__, outputs=list(self.outputs), config=str(self.cfg.path))
            if self._stop.is_set():
                self.engine.stop()
            self.engine.run()  # until stop(); removes the marking tables however it ends
            return 0
        finally:
            self.notifier.stopping()
            self._stop.set()
            self._reload.set()  # lets the reloader end
            self._close_all()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self.notifier.close()

    def _handle_signals(self) -> dict[int, Any]:
        def stop(signum: int, frame: Any) -> None:
            self.stop()

        def reload(signum: int, frame: Any) -> None:
            self._reload.set()

        old: dict[int, Any] = {}
        for sig, handler in ((signal.SIGTERM, stop), (signal.SIGINT, stop), (signal.SIGHUP, reload)):
            old[sig] = signal.signal(sig, handler)
        return old

    def stop(self) -> None:
        """Ends the run (any thread, or a signal handler: it only sets events)."""
        self._stop.set()
        engine = self.engine
        if engine is not None:
            engine.stop()

    def _tick(self) -> None:
        self.notifier.watchdog()

    # ---------------------------------------------------------------- outputs

    def _make(self, spec: OutputSpec, cfg: ServiceConfig) -> OutputSink:
        return registry.make_sink(spec.type, spec.options, spool_dir=cfg.spool_dir if spec.spool else None,
                                  spool_max_bytes=cfg.spool_max_bytes, name=spec.name, queue=spec.queue,
                                  on_loss=self._on_loss)

    def _on_loss(self, output: str, kind: str, n: int) -> None:
        engine = self.engine
        if engine is not None:
            engine.output_lost(output, kind, n)

    def _open_outputs(self) -> None:
        for spec in self.cfg.outputs:
            self.outputs[spec.name] = _Output(spec, self._make(spec, self.cfg))
        self._publish()

    def _publish(self) -> None:
        sinks: list[Any] = [o.sink for o in self.outputs.values()]
        if self.metrics is not None:
            sinks.append(self.metrics.sink)
        self.fanout.replace(sinks)

    def _serve_metrics(self) -> None:
        if self.cfg.metrics_listen is None:
            return
        from tracer.service.metrics import Metrics

        metrics = Metrics()
        metrics.serve_at(self.cfg.metrics_listen)
        metrics.watch_outputs(self._output_stats)
        self.metrics = metrics
        self._publish()

    def _move_metrics(self, listen: tuple[str, int] | None) -> None:
        """The endpoint moved (or was turned on or off) by a reload; counters are kept."""
        if self.metrics is not None:
            self.metrics.close()
        if listen is None:
            self.metrics = None
            self._publish()
            return
        if self.metrics is None:
            self.cfg = dataclasses.replace(self.cfg, metrics_listen=listen)
            self._serve_metrics()
            if self.metrics is not None and self.engine is not None:
                self.metrics.watch_engine(self.engine)
        else:
            self.metrics.serve_at(listen)

    def _output_stats(self) -> list[Any]:
        return [o.sink.stats() for o in list(self.outputs.values()) if hasattr(o.sink, "stats")]

    def _close_all(self) -> None:
        with self._lock:
            outputs, self.outputs = self.outputs, {}
            self.fanout.replace(())
            for o in outputs.values():
                self._close_output(o, CLOSE_TIMEOUT)
            if self.metrics is not None:
                self.metrics.close()
                self.metrics = None

    @staticmethod
    def _close_output(o: _Output, timeout: float) -> None:
        delivery = o.sink.close(timeout)
        line = undelivered_line(delivery, o.spec.name)
        if line and getattr(o.sink, "spooled", False):
            line += " (kept in its spool)"
        if line:
            log.warning("output closed", output=o.spec.name, report=line)

    # ---------------------------------------------------------------- reload

    def _reloader(self) -> None:
        while True:
            self._reload.wait()
            self._reload.clear()
            if self._stop.is_set():
                return
            self.notifier.reloading()
            ok = self._apply_reload()
            self.reloads += 1
            self.notifier.ready(f"watching; reload {self.reloads} {'applied' if ok else 'refused, config unchanged'}")

    def _apply_reload(self) -> bool:
        path = self.cfg.path
        assert path is not None
        try:
            new = service_config.load(path)
        except ConfigError as exc:
            log.error("reload refused: the configuration does not check; the running one stays",
                      error=str(exc))
            return False
        with self._lock:
            if self._stop.is_set():
                return False
            try:
                self._swap_outputs(new)
            except (ConfigError, OSError) as exc:
                log.error("reload refused: an output could not be opened; the running outputs stay",
                          error=str(exc))
                return False
            if new.metrics_listen != self.cfg.metrics_listen:
                self._move_metrics(new.metrics_listen)
        if new.log_level != self.cfg.log_level or new.log_format != self.cfg.log_format:
            logsetup.configure(new.log_level, json=new.log_format == "json", nonblocking=True)
        kept = self.engine.reconfigure(new.watch) if self.engine is not None else ()
        if kept:
            log.warning("reload: these [watch] settings need a restart and keep their running values",
                        settings=list(kept))
        self.cfg = new
        log.info("reloaded", outputs=list(self.outputs))
        return True

    def _swap_outputs(self, new: ServiceConfig) -> None:
        """New and changed outputs opened first, then the set swapped, then the old ones closed;
        unchanged ones are kept and reopened (a file moved away by logrotate)."""
        kept: dict[str, _Output] = {}
        opened: dict[str, _Output] = {}
        try:
            for spec in new.outputs:
                current = self.outputs.get(spec.name)
                if current is not None and current.spec == spec and _same_spool(self.cfg, new):
                    kept[spec.name] = current
                else:
                    opened[spec.name] = _Output(spec, self._make(spec, new))
        except BaseException:
            for o in opened.values():
                o.sink.close(0)
            raise
        retired = [o for name, o in self.outputs.items() if kept.get(name) is not o]
        self.outputs = {spec.name: kept.get(spec.name) or opened[spec.name] for spec in new.outputs}
        self._publish()
        for o in retired:
            self._close_output(o, CLOSE_TIMEOUT)
        for o in kept.values():
            reopen: Callable[[], None] | None = getattr(o.sink, "reopen", None)
            if reopen is not None:
                reopen()


def _same_spool(a: ServiceConfig, b: ServiceConfig) -> bool:
    return a.spool_dir == b.spool_dir and a.spool_max_bytes == b.spool_max_bytes


def check(path: Path) -> ServiceConfig:
    """`tracer run --check-config`: the checked configuration, or ConfigError."""
    return service_config.load(path)


def run(path: Path, *, notifier: Notifier | None = None) -> int:
    """`tracer run`: 0 after SIGTERM; ConfigError (exit 2) before anything starts."""
    cfg = service_config.load(path)
    logsetup.configure(cfg.log_level, json=cfg.log_format == "json", nonblocking=True)
    began = time.monotonic()
    daemon = Daemon(cfg, notifier)
    try:
        return daemon.run()
    finally:
        log.info("stopped", seconds=round(time.monotonic() - began, 1), reloads=daemon.reloads)
