"""``otp-router worker --processes N``: N worker processes in one consumer group.

The parent process is a small supervisor; it consumes nothing itself. It
starts N children (``multiprocessing``'s *spawn*: each child is a fresh
interpreter, with no event loop, thread or connection inherited), each an
ordinary :class:`~otp_router.worker.Worker` with its own consumer name
(``<name>-<pid>``) in the one consumer group, its own store and queue
connections and its own deadline loop (deadline claims are atomic in the
store, so the processes share the firing without firing anything twice).

Decisions, and why:

* **One process serves HTTP.** Child 0 serves webhooks, the API, ``/metrics``
  and ``/healthz`` on ``settings.http_port``; the others run with no HTTP
  server. No port sharing: one listener keeps ``http_port=0`` (any free port)
  meaningful and the ``http_listening`` log line true, and a webhook is a
  single store write, small next to a start. When child 0 is restarted the
  HTTP side is down until it listens again (providers retry webhooks).
* **Metrics across processes.** The supervisor makes a fresh directory per
  run (inside ``$PROMETHEUS_MULTIPROC_DIR`` when that is set, else in the
  system's temporary folder), hands it to the children as
  ``PROMETHEUS_MULTIPROC_DIR`` so that prometheus-client writes every sample
  to per-process files, and removes it when the run ends. ``/metrics`` then
  sums counters and histograms over every process that ever ran in this run
  (a restarted child's counts stay), and the gauges follow
  :mod:`otp_router.metrics`' multiprocess modes. When a child exits the
  supervisor calls ``mark_process_dead`` so that its live gauges leave the sums.
* **Signals.** SIGTERM or SIGINT is forwarded to every child as SIGTERM: each
  drains its in-flight messages within ``shutdown_grace`` and exits; a second
  signal is forwarded too, which makes the children stop at once. The
  children run in their own process group, so a Ctrl-C in a terminal reaches
  them once, through the supervisor, and they stop gracefully (SIGTERM) if
  the supervisor itself dies (they watch their parent process id).
* **A crashed child is restarted** with exponential backoff (1 s, doubling up
  to 30 s). A child that ran for at least :data:`STABLE_AFTER` seconds resets
  its backoff. A child that fails :data:`MAX_QUICK_FAILURES` times in a row,
  each within :data:`STABLE_AFTER` seconds of starting (a configuration or
  connection problem that a restart will not fix), makes the supervisor stop
  the others and exit 1, so that the service manager sees the failure; a
  configuration error (a child's status 2, as the command line's) stops
  everything at once with status 2.
  Restarting is safe: what a dead child held stays pending in the queue and
  is reclaimed after the visibility timeout; its idempotency keys make the
  redelivery send nothing twice.
* **Exit status**: 0 when every child exited 0 after the stop signal (or,
  with ``--burst``, after draining the queue; a burst child is never
  restarted), else 1.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import signal
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Any

from otp_router.config import Settings
from otp_router.errors import ConfigError

__all__ = ["MAX_QUICK_FAILURES", "STABLE_AFTER", "run_processes"]

log = logging.getLogger("otp_router.supervisor")

#: Seconds a child must run for its exit to count as a crash rather than a failure to start.
STABLE_AFTER = 10.0
#: Consecutive quick failures of one child after which the supervisor gives up (exit 1).
MAX_QUICK_FAILURES = 5
#: First restart delay, doubled after each quick failure up to :data:`MAX_BACKOFF`.
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 30.0
#: Seconds between the supervisor's looks at its children.
POLL = 0.1
#: A child's exit status for a configuration error (the command line's): restarting cannot help.
EXIT_CONFIG = 2
#: Variable the children read their metrics directory from (prometheus-client's own).
MULTIPROC_VAR = "PROMETHEUS_MULTIPROC_DIR"


def _watch_parent(parent: int) -> None:
    """Stop this child gracefully once its supervisor is gone (it was re-parented)."""
    while os.getppid() == parent:
        time.sleep(1.0)
    os.kill(os.getpid(), signal.SIGTERM)


def _child(settings: Settings, index: int, kwargs: dict[str, Any]) -> None:
    """A child's whole life: an ordinary worker; HTTP only in child 0."""
    import sys

    from otp_router.worker import run_worker

    # Out of the terminal's process group: signals come through the supervisor only (once each).
    os.setpgrp()
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True, name="parent-watch").start()
    kwargs = {**kwargs, "serve_http": kwargs.get("serve_http", True) and index == 0}
    try:
        status = run_worker(settings, **kwargs)
    except ConfigError as exc:
        # As the command line reports it (no traceback); the supervisor gives up at once.
        print(f"otp-router: {exc}", file=sys.stderr)
        status = EXIT_CONFIG
    sys.exit(status)


@dataclass
class _Slot:
    """One child position: its current process and its restart history."""

    index: int
    process: BaseProcess | None = None
    started: float = 0.0
    quick_failures: int = 0
    restart_at: float | None = None
    exit_code: int | None = None
    pids: list[int] = field(default_factory=list)


class _Supervisor:
    def __init__(self, settings: Settings, count: int, burst: bool, kwargs: dict[str, Any]) -> None:
        self.settings = settings
        self.burst = burst
        self.kwargs = {**kwargs, "burst": burst}
        self.slots = [_Slot(i) for i in range(count)]
        self.context = multiprocessing.get_context("spawn")
        self.stopping = False
        self.failed = False
        #: Exit status when :attr:`failed` (2 for a configuration error).
        self.status = 1
        #: Signals received, appended by the handler and logged by the loop.
        self.signals: list[str] = []
        self._logged_signals = 0
        self.metrics_dir = ""

    # -- signals ----------------------------------------------------------------

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        # Forwarded as SIGTERM every time: the first drains, a second stops at once. Only flags
        # and kill() here: logging (or reaping) inside a signal handler could deadlock the loop.
        self.signals.append(signal.Signals(signum).name)
        self.stopping = True
        self.forward()

    def forward(self) -> None:
        for slot in self.slots:
            process = slot.process
            if process is not None and process.pid is not None:
                # A child that exited meanwhile is gone (ProcessLookupError) or a zombie (kill is a no-op).
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)

    # -- children -----------------------------------------------------------------

    def start(self, slot: _Slot) -> None:
        process = self.context.Process(
            target=_child,
            args=(self.settings, slot.index, self.kwargs),
            name=f"otp-router-worker-{slot.index}",
        )
        process.start()
        slot.process, slot.started, slot.restart_at = process, time.monotonic(), None
        if process.pid is not None:
            slot.pids.append(process.pid)
        log.info("event=child_started index=%d pid=%s", slot.index, process.pid)

    def reap(self, slot: _Slot) -> None:
        """Handle a child that exited: count it, then schedule a restart or record the end."""
        process = slot.process
        assert process is not None and process.exitcode is not None
        code, ran = process.exitcode, time.monotonic() - slot.started
        process.close()
        slot.process = None
        if process_pid := (slot.pids[-1] if slot.pids else None):
            self.mark_dead(process_pid)
        level = logging.INFO if code == 0 and (self.stopping or self.burst) else logging.WARNING
        log.log(
            level, "event=child_exited index=%d pid=%s code=%d ran_s=%.1f", slot.index, process_pid, code, ran
        )
        if self.stopping or self.burst:
            slot.exit_code = code
            return
        # Exited on its own while the service should run: a crash (or a failed start).
        slot.quick_failures = slot.quick_failures + 1 if ran < STABLE_AFTER else 0
        if code == EXIT_CONFIG:
            log.error("event=giving_up index=%d reason=configuration", slot.index)
            self.failed, self.status = True, EXIT_CONFIG
            self.stopping = True
            slot.exit_code = code
            self.forward()
            return
        if slot.quick_failures >= MAX_QUICK_FAILURES:
            log.error("event=giving_up index=%d quick_failures=%d", slot.index, slot.quick_failures)
            self.failed = True
            self.stopping = True
            slot.exit_code = code or 1
            self.forward()
            return
        delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** max(0, slot.quick_failures - 1))
        slot.restart_at = time.monotonic() + delay
        log.warning("event=child_restart index=%d in_s=%.1f", slot.index, delay)

    def mark_dead(self, pid: int) -> None:
        try:
            from prometheus_client import multiprocess
        except ImportError:  # pragma: no cover - without the metrics extra nothing was written
            return
        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]

    # -- the run ---------------------------------------------------------------------

    def run(self) -> int:
        base = os.environ.get(MULTIPROC_VAR) or None
        self.metrics_dir = tempfile.mkdtemp(prefix="otp-router-metrics-", dir=base)
        # Read by the spawned children when prometheus-client is first imported there.
        os.environ[MULTIPROC_VAR] = self.metrics_dir
        handlers = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            log.info("event=supervisor_started processes=%d burst=%s", len(self.slots), self.burst)
            for slot in self.slots:
                self.start(slot)
            self.loop()
        finally:
            for sig, previous in handlers.items():
                signal.signal(sig, previous)
            if base is None:
                os.environ.pop(MULTIPROC_VAR, None)
            else:
                os.environ[MULTIPROC_VAR] = base
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        codes = [slot.exit_code for slot in self.slots]
        status = self.status if self.failed else 1 if any(code != 0 for code in codes) else 0
        log.info("event=supervisor_stopped status=%d codes=%s", status, ",".join(map(str, codes)))
        return status

    def loop(self) -> None:
        while True:
            while self._logged_signals < len(self.signals):
                log.info("event=stopping signal=%s", self.signals[self._logged_signals])
                self._logged_signals += 1
            now = time.monotonic()
            for slot in self.slots:
                if slot.process is not None and slot.process.exitcode is not None:
                    self.reap(slot)
                if slot.process is None and slot.restart_at is not None:
                    if self.stopping:
                        slot.restart_at, slot.exit_code = None, slot.exit_code or 0
                    elif now >= slot.restart_at:
                        self.start(slot)
            if all(slot.process is None and slot.restart_at is None for slot in self.slots):
                return
            time.sleep(POLL)


def run_processes(settings: Settings, count: int, *, burst: bool = False, **kwargs: Any) -> int:
    """Run ``count`` worker processes under a supervisor until SIGTERM (see the module docstring).

    Args:
        settings: Passed to every child.
        count: Worker processes (at least 1).
        burst: Each child drains the queue and exits; nothing is restarted.
        **kwargs: Passed to each child's :func:`~otp_router.worker.run_worker`
            (``name``, ``serve_http``; HTTP is served by child 0 only).

    Returns:
        The exit status: 0 when every child ended with 0, else 1.
    """
    if count < 1:
        raise ValueError("count must be at least 1")
    from otp_router.worker import configure_logging

    configure_logging(settings.log_level, settings.log_format)
    return _Supervisor(settings, count, burst, kwargs).run()
