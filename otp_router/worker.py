"""The standalone worker: consume the queue, run deadlines, serve webhooks.

One process runs, side by side:

* the **consumer**: reads queue messages, never more than it has free slots
  for (``settings.concurrency``), and handles each one as *claim → execute →
  ack/record*: ``router.start(...)``, then acknowledge. The acknowledgement
  comes only after the verification is durably stored or definitively
  refused, so a crash at any point leaves the message pending for another
  worker, and the idempotency key makes that second delivery send nothing.
  Every few seconds it first reclaims messages another consumer left pending
  for longer than ``settings.queue_visibility_timeout`` (that consumer died);
* **maintenance**: renews the claims on messages still being worked on,
  writes the heartbeat (``otp-router worker --check`` reads it) and updates
  the queue depth and lag gauges;
* the router's **deadline loop** (fallbacks at step deadlines), through
  ``async with router``;
* the **HTTP server** (uvicorn) with :mod:`otp_router.webapp`: webhooks, the
  API, ``/metrics`` and ``/healthz`` — the last two on a second listener of
  their own when ``settings.ops_port`` is set.

SIGTERM or SIGINT stops reading, lets in-flight messages finish within
``settings.shutdown_grace`` seconds (the rest stay pending and are
redelivered), stops the HTTP server and exits 0. A second signal stops at
once.

Outcome of one message:

=====================================================  ==========================================
What happened                                           What the worker does
=====================================================  ==========================================
``start`` returned a new verification                   ack; ``processed``
``start`` returned an existing one (same key)           ack; ``duplicate``
``start`` raised ``AllProvidersFailed`` (it is stored)  ack; ``processed`` (a repeat: ``duplicate``)
unparsable/invalid message, bad or denied number,       dead letter with the reason, ack;
idempotency conflict, rate limit, too many deliveries   ``dead_letter``
store or connection failure, unexpected error           nothing: redelivered after the visibility
                                                        timeout (at most ``queue_max_deliveries``)
=====================================================  ==========================================

Log lines are events with fields (see :mod:`otp_router.logs`; JSON or logfmt
with ``OTP_ROUTER_LOG_FORMAT``) with timings; they never contain a phone
number, an idempotency key, a code or a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from otp_router.config import Settings
from otp_router.errors import (
    AllProvidersFailed,
    ConfigError,
    IdempotencyConflict,
    InputError,
    InvalidPhoneNumber,
    RateLimited,
    StoreError,
    UnsupportedCountry,
    UnsupportedNumberType,
)
from otp_router.inputs import check_text
from otp_router.logs import bind, event
from otp_router.logs import configure_logging as _configure_output
from otp_router.queue import Delivery, Queue, open_queue, queue_url_for
from otp_router.queue.base import DeadLetterReason, PoisonMessage, parse_delivery
from otp_router.router import OtpRouter

if TYPE_CHECKING:
    import uvicorn

__all__ = [
    "Worker",
    "check_health",
    "configure_logging",
    "create_worker",
    "default_worker_name",
    "run_worker",
    "run_worker_command",
    "worker_arguments",
]

log = logging.getLogger("otp_router.worker")

#: Seconds between heartbeats; a heartbeat stays fresh for three of them.
HEARTBEAT_INTERVAL = 5.0


def default_worker_name() -> str:
    """The host name: unique per container, and what ``--check`` looks for by default."""
    return socket.gethostname() or "worker"


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What executing one message decided: ``processed``, ``duplicate``, ``dead_letter`` or ``retry``."""

    kind: str
    reason: str | None = None
    detail: str | None = None
    verification_id: str | None = None


class _Slots:
    """A counting semaphore that hands out several permits at once.

    The consumer asks for as many slots as it could use and reads exactly
    that many messages, so the worker never holds more messages than
    ``concurrency``, however long the queue.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.used = 0
        self.closed = False
        self._changed = asyncio.Event()

    async def take(self, most: int) -> int:
        """Wait for at least one free slot and take up to ``most``; 0 once closed."""
        while self.used >= self.size and not self.closed:
            self._changed.clear()
            await self._changed.wait()
        return 0 if self.closed else self.try_take(most)

    def try_take(self, most: int) -> int:
        """Take up to ``most`` free slots without waiting."""
        n = max(0, min(most, self.size - self.used))
        self.used += n
        return n

    def give(self, n: int) -> None:
        """Return ``n`` slots."""
        self.used -= n
        self._changed.set()

    def close(self) -> None:
        """Wake every waiter with nothing."""
        self.closed = True
        self._changed.set()


def _uvicorn_server(config: uvicorn.Config, on_started: Callable[[uvicorn.Server], None]) -> uvicorn.Server:
    """A uvicorn server that leaves signal handling to the worker and reports when it listens."""
    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            # uvicorn would replace our SIGTERM handler and re-raise the signal on exit.
            yield

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                on_started(self)

    return Server(config)


class Worker:
    """Consumes the queue with bounded concurrency; see the module docstring.

    Build it with :func:`create_worker`; run it with :meth:`run` (or
    :func:`run_worker`, which also installs signal handlers).

    Args:
        settings: Concurrency, grace, visibility timeout, HTTP address.
        router: The router to start verifications with (default: from settings).
            The worker enters and leaves it (``async with``).
        queue: The queue (default: :func:`~otp_router.queue.open_queue` of
            :func:`~otp_router.queue.queue_url_for`). The worker closes it.
        name: Worker name for the heartbeat (default: host name). The consumer
            name is ``<name>-<pid>``; give in-process workers distinct names.
        burst: Process what is queued (and reclaimable), then return. A
            message that failed transiently stays pending for a later run.
        serve_http: Serve the web app on ``settings.http_host``/``http_port``.
        heartbeat_interval: Seconds between heartbeats and gauge updates.
        read_block: Seconds one read waits for messages (bounds how long a
            stop request waits for the consumer).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        router: OtpRouter | None = None,
        queue: Queue | None = None,
        name: str | None = None,
        burst: bool = False,
        serve_http: bool = True,
        heartbeat_interval: float = HEARTBEAT_INTERVAL,
        read_block: float = 1.0,
    ) -> None:
        self.settings = settings
        self.router = router if router is not None else OtpRouter.from_settings(settings)
        self.queue = queue if queue is not None else open_queue(queue_url_for(settings))
        self.metrics = self.router.metrics
        self.name = name or default_worker_name()
        self.consumer = f"{self.name}-{os.getpid()}"
        self.burst = burst
        self.serve_http = serve_http
        self.heartbeat_interval = heartbeat_interval
        self.read_block = read_block
        self.visibility = settings.queue_visibility_timeout
        self.http_port: int | None = None
        #: The port ``/metrics`` and ``/healthz`` listen on when ``settings.ops_port`` is set.
        self.ops_port: int | None = None
        self._slots = _Slots(settings.concurrency)
        self._inflight: dict[asyncio.Task[None], Delivery] = {}
        self._stopping = asyncio.Event()
        #: Cleared to end the maintenance loop (see :meth:`_maintain`).
        self._maintaining = True
        self._force = asyncio.Event()
        self._http: list[uvicorn.Server] = []
        self._exit_code = 0
        #: Messages this process handled, by outcome (for the stop log line).
        self.handled: Counter[str] = Counter()

    # -- lifetime -------------------------------------------------------------

    def stop(self) -> None:
        """Ask the worker to stop: the first call drains in-flight work, a second one cancels it."""
        if self._stopping.is_set():
            event(log, logging.WARNING, "force_stop", inflight=len(self._inflight))
            self._force.set()
        self._stop_reading()

    def _stop_reading(self) -> None:
        self._stopping.set()
        self._slots.close()

    async def run(self) -> int:
        """Run until :meth:`stop` (or, in burst mode, until the queue is drained).

        Returns:
            The exit status: 0, or 1 when the HTTP server could not start.

        Raises:
            StoreError: The store or the queue is unreachable at start-up.
        """
        started = time.monotonic()
        try:
            await self.queue.ping()
            async with self.router:
                event(
                    log,
                    logging.INFO,
                    "worker_started",
                    name=self.name,
                    consumer=self.consumer,
                    concurrency=self._slots.size,
                    burst=self.burst,
                    visibility_s=self.visibility,
                )
                await self._beat()
                maintain = asyncio.create_task(self._maintain(), name="otp-router-maintain")
                http = (
                    asyncio.create_task(self._serve_http(), name="otp-router-http")
                    if self.serve_http
                    else None
                )
                try:
                    await self._consume()
                finally:
                    self._stop_reading()
                    await self._drain()
                    # Webhooks keep flowing while in-flight messages finish; only then close HTTP.
                    await self._stop_http(http)
                    self._maintaining = False
                    maintain.cancel()
                    await asyncio.gather(maintain, return_exceptions=True)
                    with contextlib.suppress(StoreError):
                        await self.queue.clear_heartbeat(self.name)
        finally:
            await self.queue.aclose()
        handled: dict[str, Any] = {
            k: self.handled[k] for k in ("processed", "duplicate", "dead_letter", "retry")
        }
        event(
            log,
            logging.INFO,
            "worker_stopped",
            name=self.name,
            consumer=self.consumer,
            uptime_s=time.monotonic() - started,
            **handled,
        )
        return self._exit_code

    # -- consuming ------------------------------------------------------------

    async def _consume(self) -> None:
        """Claim work while free slots last: reclaimed messages first (now and then), then new ones.

        One loop does both so that it alone hands out slots: a separate
        reclaimer would find every free slot already taken by a pending read.
        """
        interval = max(0.05, min(5.0, self.visibility / 2))
        next_reclaim = time.monotonic()
        while not self._stopping.is_set():
            want = await self._slots.take(self._slots.size)
            if want == 0:
                break
            deliveries: list[Delivery] = []
            try:
                if self.burst or time.monotonic() >= next_reclaim:
                    next_reclaim = time.monotonic() + interval
                    deliveries = await self._reclaim(want)
                if len(deliveries) < want:
                    # Block only when there is nothing at all to do, and never in burst mode.
                    block = 0.0 if self.burst or deliveries else min(self.read_block, interval)
                    deliveries += await self.queue.read(self.consumer, want - len(deliveries), block)
            except StoreError as exc:
                event(log, logging.WARNING, "read_failed", error=type(exc).__name__)
                await self._pause(1.0)
            finally:
                self._slots.give(want - len(deliveries))
            for delivery in deliveries:
                self._spawn(delivery)
            if self.burst and not deliveries:
                if not self._inflight:
                    break
                # Wait for some work to finish rather than spin on empty reads.
                await asyncio.wait(list(self._inflight), return_when=asyncio.FIRST_COMPLETED)

    async def _reclaim(self, most: int) -> list[Delivery]:
        """Take over messages a dead consumer left pending for longer than the visibility timeout."""
        deliveries = await self.queue.reclaim(self.consumer, self.visibility, most)
        for delivery in deliveries:
            self.metrics.queue_message("reclaimed")
            event(log, logging.INFO, "reclaimed", id=delivery.id, attempt=delivery.attempt)
        return deliveries

    def _spawn(self, delivery: Delivery) -> None:
        task = asyncio.create_task(self._handle(delivery), name=f"otp-router-message-{delivery.id}")
        self._inflight[task] = delivery
        self.metrics.inflight(len(self._inflight))

    async def _handle(self, delivery: Delivery) -> None:
        started = time.monotonic()
        try:
            # Bound once: every line logged for this message (the router's too) names it.
            with bind(message=delivery.id):
                outcome = await self._execute(delivery)
                await self._record(delivery, outcome, started)
        except StoreError as exc:
            # Typically the ack during a store outage: the message stays pending and is
            # redelivered, and its idempotency key makes that second run send nothing.
            event(log, logging.WARNING, "record_failed", id=delivery.id, error=type(exc).__name__)
        except Exception as exc:  # one message must never take the worker down
            event(
                log,
                logging.ERROR,
                "handle_failed",
                id=delivery.id,
                error=type(exc).__name__,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
        finally:
            current = asyncio.current_task()
            if current is not None:
                self._inflight.pop(current, None)
            self._slots.give(1)
            self.metrics.inflight(len(self._inflight))

    async def _execute(self, delivery: Delivery) -> _Outcome:
        """Decide one message's fate; performs ``router.start`` but never acks."""
        if delivery.attempt > self.settings.queue_max_deliveries:
            return _Outcome("dead_letter", DeadLetterReason.TOO_MANY_DELIVERIES)
        try:
            message = parse_delivery(delivery)
        except PoisonMessage as exc:
            return _Outcome("dead_letter", exc.reason, exc.detail)
        try:
            verification = await self.router.start(
                message.phone,
                idempotency_key=message.idempotency_key,
                default_region=message.default_region,
                # Messages enqueued before ids were carried have none: the router derives it.
                verification_id=message.verification_id,
                locale=message.locale,
            )
        except InvalidPhoneNumber:
            return _Outcome("dead_letter", DeadLetterReason.INVALID_PHONE)
        except UnsupportedCountry:
            return _Outcome("dead_letter", DeadLetterReason.UNSUPPORTED_COUNTRY)
        except UnsupportedNumberType as exc:
            reason = DeadLetterReason.UNSUPPORTED_NUMBER_TYPE
            return _Outcome("dead_letter", reason, f"type={exc.number_type}")
        except InputError:
            return _Outcome("dead_letter", DeadLetterReason.INVALID_INPUT)
        except IdempotencyConflict:
            return _Outcome("dead_letter", DeadLetterReason.IDEMPOTENCY_CONFLICT)
        except RateLimited as exc:
            # A definitive answer for this message: retrying later would send a code nobody waits for.
            return _Outcome("dead_letter", DeadLetterReason.RATE_LIMITED, f"scope={exc.scope}")
        except AllProvidersFailed as exc:
            # The failed verification is stored (check() and status see it): the message is done.
            # A redelivery finds it by its key and raises the same again, so acking is safe.
            created = exc.verification is not None and exc.verification.created
            return _Outcome(
                "processed" if created else "duplicate",
                "all_providers_failed",
                verification_id=exc.verification_id,
            )
        except (StoreError, OSError) as exc:
            return _Outcome("retry", type(exc).__name__)
        except Exception as exc:
            event(
                log,
                logging.ERROR,
                "start_failed",
                error=type(exc).__name__,
                exc_info=log.isEnabledFor(logging.DEBUG),
            )
            return _Outcome("retry", type(exc).__name__)
        kind = "processed" if verification.created else "duplicate"
        return _Outcome(kind, verification_id=verification.id)

    async def _record(self, delivery: Delivery, outcome: _Outcome, started: float) -> None:
        """Acknowledge or dead-letter per the outcome, count it and log it."""
        if outcome.kind in ("processed", "duplicate"):
            await self.queue.ack(delivery)
            self.metrics.queue_message(outcome.kind)
        elif outcome.kind == "dead_letter":
            reason = str(outcome.reason)
            await self.queue.dead_letter(delivery, reason)
            self.metrics.queue_message("dead_letter")
            self.metrics.dead_letter(reason)
        self.handled[outcome.kind] += 1  # after the ack: an ack that failed counts nothing
        level = logging.WARNING if outcome.kind in ("dead_letter", "retry") else logging.INFO
        event(
            log,
            level,
            outcome.kind,
            # The message id is bound by _handle().
            attempt=delivery.attempt,
            reason=outcome.reason,
            detail=outcome.detail,
            verification=outcome.verification_id,
            ms=(time.monotonic() - started) * 1000,
        )

    async def _drain(self) -> None:
        """Let in-flight messages finish within the grace period; cancel the rest."""
        if not self._inflight:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.shutdown_grace
        event(
            log, logging.INFO, "draining", inflight=len(self._inflight), grace_s=self.settings.shutdown_grace
        )
        force = asyncio.create_task(self._force.wait())
        try:
            while self._inflight and not self._force.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                await asyncio.wait(
                    [*self._inflight, force], timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
        finally:
            force.cancel()
        leftovers = list(self._inflight)
        if leftovers:
            # Not acknowledged: they stay pending and another worker reclaims them.
            event(log, logging.WARNING, "abandoned", count=len(leftovers))
            for task in leftovers:
                task.cancel()
            await asyncio.gather(*leftovers, return_exceptions=True)

    async def _pause(self, seconds: float) -> None:
        """Sleep, waking early when the worker is asked to stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    # -- maintenance ------------------------------------------------------------

    async def _maintain(self) -> None:
        tick = max(0.05, min(self.heartbeat_interval, self.visibility / 3))
        last_beat = time.monotonic()
        # Ended by cancel() *and* this flag: a cancel that lands inside a Redis call can be swallowed
        # by the client (the task was seen stuck "cancelling" in its next sleep, the worker never
        # returning), so the loop also stops at its next tick.
        while self._maintaining:
            await asyncio.sleep(tick)
            inflight = list(self._inflight.values())
            try:
                # Renew claims so a slow message is not reclaimed from a live worker.
                await self.queue.touch(self.consumer, inflight)
                if time.monotonic() - last_beat >= self.heartbeat_interval:
                    last_beat = time.monotonic()
                    await self._beat()
            except StoreError as exc:
                event(log, logging.WARNING, "maintenance_failed", error=type(exc).__name__)

    async def _beat(self) -> None:
        await self.queue.heartbeat(self.name, ttl=self.heartbeat_interval * 3)
        self.metrics.worker_heartbeat(time.time())
        self.metrics.queue_depth(await self.queue.depth())
        self.metrics.queue_lag(await self.queue.lag())

    # -- HTTP -----------------------------------------------------------------

    async def _serve_http(self) -> None:
        # Imported here: the HTTP side is the optional [server] extra, and the
        # worker still consumes the queue without it.
        try:
            import uvicorn

            from otp_router.webapp import create_app, create_ops_app, provider_pings

            pings = {"queue": self.queue.ping, **provider_pings(self.router)}
            own_port = self.settings.ops_port is not None
            listeners = [
                (
                    "http",
                    create_app(
                        self.router, pings=pings, public_url=self.settings.public_url, ops=not own_port
                    ),
                    self.settings.http_host,
                    self.settings.http_port,
                )
            ]
            if self.settings.ops_port is not None:
                ops_host = self.settings.ops_host or self.settings.http_host
                listeners.append(
                    ("ops", create_ops_app(self.router, pings=pings), ops_host, self.settings.ops_port)
                )
        except (ImportError, ConfigError) as exc:
            event(
                log,
                logging.WARNING,
                "http_disabled",
                reason=repr(str(exc)),
                hint="'pip install otp-router[server]'",
            )
            return
        servers = []
        for name, app, host, port in listeners:
            config = uvicorn.Config(
                app,
                host=host,
                port=port,
                # The worker owns the router's lifetime, not the ASGI app.
                lifespan="off",
                log_config=None,
                access_log=False,
                timeout_graceful_shutdown=max(1, int(self.settings.shutdown_grace)),
            )
            servers.append((name, host, port, _uvicorn_server(config, self._listening(name, host))))
        self._http = [server for *_, server in servers]
        # One task per listener; each catches its own SystemExit, so none escapes a task.
        await asyncio.gather(
            *(self._serve_one(name, host, port, server) for name, host, port, server in servers)
        )

    def _listening(self, name: str, host: str) -> Callable[[uvicorn.Server], None]:
        def started(server: uvicorn.Server) -> None:
            port = int(server.servers[0].sockets[0].getsockname()[1])
            if name == "ops":
                self.ops_port = port
            else:
                self.http_port = port
            event(log, logging.INFO, f"{name}_listening", host=host, port=port)

        return started

    async def _serve_one(self, name: str, host: str, port: int, server: uvicorn.Server) -> None:
        try:
            await server.serve()
        except SystemExit:
            # uvicorn exits the process when it cannot bind; stop the worker instead
            # (and the other listener with it: a worker half-served is not running).
            event(log, logging.ERROR, f"{name}_failed", host=host, port=port)
            self._exit_code = 1
            for other in self._http:
                other.should_exit = True
            self.stop()

    async def _stop_http(self, task: asyncio.Task[None] | None) -> None:
        if task is None:
            return
        for server in self._http:
            server.should_exit = True
        try:
            await asyncio.wait_for(task, timeout=self.settings.shutdown_grace + 5)
        except TimeoutError:
            event(log, logging.WARNING, "http_stop_timeout")


def create_worker(settings: Settings | None = None, **kwargs: Any) -> Worker:
    """Build a worker (no I/O until :meth:`Worker.run`).

    Args:
        settings: Settings (default: read from the environment).
        **kwargs: Passed to :class:`Worker`.
    """
    return Worker(settings or Settings.load(), **kwargs)


def run_worker(settings: Settings | None = None, **kwargs: Any) -> int:
    """Run a worker in a new event loop until SIGTERM/SIGINT (or the burst ends).

    Args:
        settings: Settings (default: read from the environment).
        **kwargs: Passed to :class:`Worker` (``burst``, ``name``, ``serve_http`` …).

    Returns:
        The exit status: 0 after a clean stop, 1 when start-up failed.
    """
    settings = settings or Settings.load()
    configure_logging(settings.log_level, settings.log_format)

    async def main() -> int:
        worker = create_worker(settings, **kwargs)
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for sig in signals:
            loop.add_signal_handler(sig, worker.stop)
        try:
            return await worker.run()
        except StoreError as exc:
            event(log, logging.ERROR, "worker_failed", error=type(exc).__name__, detail=repr(str(exc)))
            return 1
        finally:
            for sig in signals:
                loop.remove_signal_handler(sig)

    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        return runner.run(main())


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (the ``server`` extra brings it): the event loop itself
    was a sixth of the worker's CPU in profiles, and uvloop runs it in C."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


async def check_health(settings: Settings, *, name: str | None = None) -> int:
    """Whether a worker's heartbeat is fresh (``otp-router worker --check``).

    Args:
        settings: Where the queue is.
        name: Worker name (default: this host's name, as workers default to).

    Returns:
        0 and prints the heartbeat's age when fresh; 1 otherwise.
    """
    name = name or default_worker_name()
    queue = open_queue(queue_url_for(settings))
    try:
        beat = await queue.last_heartbeat(name)
    except StoreError as exc:
        print(f"worker {name}: cannot read the heartbeat ({type(exc).__name__})")
        return 1
    finally:
        await queue.aclose()
    if beat is None:
        print(f"worker {name}: no fresh heartbeat")
        return 1
    print(f"worker {name}: heartbeat {max(0.0, time.time() - beat):.1f} s ago")
    return 0


def worker_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``otp-router worker``'s options to ``parser``."""
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 0 if the worker's heartbeat is fresh, else 1 (for container health checks)",
    )
    parser.add_argument(
        "--burst",
        action="store_true",
        help="process what is queued, then exit, without HTTP (tests, benchmarks, cron)",
    )
    parser.add_argument(
        "--name", help="worker name for the heartbeat and consumer name (default: the host name)"
    )
    parser.add_argument(
        "--no-http", action="store_true", help="do not serve webhooks, the API, /metrics and /healthz"
    )
    parser.add_argument(
        "--processes",
        type=int,
        default=1,
        metavar="N",
        help="run N worker processes in one consumer group under a supervisor; the first serves HTTP "
        "(default: %(default)s)",
    )


def run_worker_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run ``otp-router worker`` with parsed arguments; returns the exit status."""
    if args.name is not None:
        # The name becomes a queue consumer and a heartbeat key: it must be storable text.
        try:
            check_text(args.name, name="--name", max_length=200)
        except InputError as exc:
            raise ConfigError(str(exc)) from None
    if args.check:
        return asyncio.run(check_health(settings, name=args.name))
    if args.processes < 1:
        raise ConfigError("--processes must be at least 1")
    # A burst run ends as soon as the queue is drained: serving webhooks for that long is pointless.
    serve_http = not (args.no_http or args.burst)
    if args.processes > 1:
        from otp_router.supervisor import run_processes

        return run_processes(
            settings, args.processes, burst=args.burst, name=args.name, serve_http=serve_http
        )
    return run_worker(settings, burst=args.burst, name=args.name, serve_http=serve_http)


def configure_logging(level: str, style: str = "text") -> None:
    """Log to stderr at ``level`` in ``style`` (``OTP_ROUTER_LOG_FORMAT``) unless the application
    configured logging already."""
    if logging.getLogger().handlers:
        return
    try:
        _configure_output(level, style)
    except ValueError:
        raise ConfigError(f"OTP_ROUTER_LOG_LEVEL: unknown level {level!r}") from None
    # httpx logs every request at INFO: two lines per verification that say nothing our
    # own timed log lines don't, and whose URLs could carry query strings. Keep its warnings.
    if logging.getLogger().getEffectiveLevel() >= logging.INFO:
        logging.getLogger("httpx").setLevel(logging.WARNING)
