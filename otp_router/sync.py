"""A blocking facade over :class:`OtpRouter` for Django, Flask and scripts.

The async router runs on its own event loop in one background thread; each
method submits a coroutine there and waits for the result. One instance can
be shared by every request thread of a WSGI app.

**Fork safety.** Servers that fork after the app is imported (``gunicorn
--preload``, uWSGI without ``lazy-apps``, ``multiprocessing`` with the fork
start method) give each child a copy of the facade whose loop thread does not
exist there, and whose store and HTTP connections are shared with the
parent. Each call compares :func:`os.getpid` with the process that started
the loop; in a new process it sets the inherited loop and router aside
without touching them (closing them would talk on the parent's sockets) and
builds a new loop thread and router from the same factory. Nothing is lost:
state lives in the store, not in the router.

**Errors.** Everything a call raises is an :class:`~otp_router.errors.OtpRouterError`:
the router's own errors unchanged, :class:`~otp_router.errors.CallTimeout`
when a call takes longer than ``timeout`` (the operation may still complete
in the background; repeat a ``start`` with the same idempotency key to learn
its outcome), :class:`~otp_router.errors.RouterClosed` after :meth:`close`,
and :class:`~otp_router.errors.UnexpectedError` (the original as its cause)
for anything else.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from decimal import Decimal
from types import TracebackType
from typing import Any, Self, TypeVar

from otp_router.config import Settings
from otp_router.errors import CallTimeout, OtpRouterError, RouterClosed, UnexpectedError
from otp_router.models import CheckResult, Verification
from otp_router.router import OtpRouter

__all__ = ["SyncOtpRouter"]

_T = TypeVar("_T")

#: Loops and routers inherited from a parent process. Kept referenced so that they are never
#: finalized in the child: a finalizer could close, or write to, a connection the parent uses.
_INHERITED: list[object] = []

#: Live facades, so that a fork can give each a fresh lock in the child (a lock held by
#: another parent thread at the moment of the fork would otherwise stay locked there forever).
_FACADES: weakref.WeakSet[SyncOtpRouter] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for facade in list(_FACADES):
        facade._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


class SyncOtpRouter:
    """Blocking version of :class:`OtpRouter`.

    Args:
        factory: Builds the async router; called on the background loop (again
            in each forked child). Defaults to ``OtpRouter.from_settings(settings)``.
        settings: Used by the default factory.
        timeout: Seconds any single call may block before :class:`~otp_router.errors.CallTimeout`.

    Raises:
        ConfigError: The default factory found the settings invalid or incomplete.

    Example::

        router = SyncOtpRouter()          # reads OTP_ROUTER_* settings
        try:
            v = router.start("+447911123456")
        except AllProvidersFailed:
            ...                           # no code is on its way
        router.check(v.id, "123456").valid
        router.close()
    """

    def __init__(
        self,
        factory: Callable[[], OtpRouter] | None = None,
        *,
        settings: Settings | None = None,
        timeout: float = 60.0,
    ) -> None:
        self._timeout = timeout
        self._factory: Callable[[], OtpRouter] = factory or (lambda: OtpRouter.from_settings(settings))
        self._lock = threading.Lock()
        self._closed = False
        self._pid = os.getpid()
        self._loop, self._thread, self._router = self._launch()
        _FACADES.add(self)

    # --- the loop thread ------------------------------------------------------

    def _launch(self) -> tuple[asyncio.AbstractEventLoop, threading.Thread, OtpRouter]:
        """Start a loop thread and build and open the router on it."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="otp-router", daemon=True)
        thread.start()
        build = self._factory

        async def enter() -> OtpRouter:
            router = build()
            await router.__aenter__()
            return router

        try:
            router = self._wait(asyncio.run_coroutine_threadsafe(enter(), loop))
        except BaseException:
            self._stop(loop, thread)
            raise
        return loop, thread, router

    def _stop(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(self._timeout)
        if not thread.is_alive():
            loop.close()

    def _current(self) -> tuple[asyncio.AbstractEventLoop, OtpRouter]:
        """The loop and router of this process, relaunched after a fork."""
        if self._closed:
            raise RouterClosed("this SyncOtpRouter is closed")
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid() and not self._closed:
                    # Forked: the loop thread was not copied, the connections are the parent's.
                    _INHERITED.append((self._loop, self._thread, self._router))
                    self._loop, self._thread, self._router = self._launch()
                    self._pid = os.getpid()
        return self._loop, self._router

    def _wait(self, future: Future[_T]) -> _T:
        try:
            return future.result(self._timeout)
        except TimeoutError:
            # Not cancelled: like a lost answer, the call may still complete, and every
            # router operation is safe to repeat (start with its idempotency key).
            raise CallTimeout(f"no result within {self._timeout:g} s") from None
        except OtpRouterError:
            raise
        except Exception as exc:
            raise UnexpectedError(f"unexpected {type(exc).__name__}") from exc

    def _run(self, call: Callable[[OtpRouter], Coroutine[Any, Any, _T]]) -> _T:
        loop, router = self._current()
        return self._wait(asyncio.run_coroutine_threadsafe(call(router), loop))

    # --- the router's API -------------------------------------------------------

    def start(
        self,
        phone: str,
        *,
        idempotency_key: str | None = None,
        default_region: str | None = None,
        verification_id: str | None = None,
    ) -> Verification:
        """See :meth:`OtpRouter.start`; raises :class:`~otp_router.errors.AllProvidersFailed` the same way."""
        return self._run(
            lambda r: r.start(
                phone,
                idempotency_key=idempotency_key,
                default_region=default_region,
                verification_id=verification_id,
            )
        )

    def check(self, verification_id: str, code: str) -> CheckResult:
        """See :meth:`OtpRouter.check`."""
        return self._run(lambda r: r.check(verification_id, code))

    def get(self, verification_id: str) -> Verification:
        """See :meth:`OtpRouter.get`."""
        return self._run(lambda r: r.get(verification_id))

    def cancel(self, verification_id: str) -> Verification:
        """See :meth:`OtpRouter.cancel`."""
        return self._run(lambda r: r.cancel(verification_id))

    def resend(self, verification_id: str) -> Verification:
        """See :meth:`OtpRouter.resend`."""
        return self._run(lambda r: r.resend(verification_id))

    def ledger_total(self, verification_id: str | None = None) -> Decimal:
        """See :meth:`OtpRouter.ledger_total`."""
        return self._run(lambda r: r.ledger_total(verification_id))

    # --- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the router and stop the background loop. Idempotent.

        In a forked child whose facade was never used, the inherited router is
        only set aside: its connections belong to the parent.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._pid != os.getpid():
            _INHERITED.append((self._loop, self._thread, self._router))
            return
        try:
            self._wait(asyncio.run_coroutine_threadsafe(self._router.aclose(), self._loop))
        finally:
            self._stop(self._loop, self._thread)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
