"""A blocking facade over :class:`OtpRouter` for Django, Flask and scripts.

The async router runs on its own event loop in one background thread; each
method submits a coroutine there and waits for the result. One instance can
be shared by every request thread of a WSGI app.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Self, TypeVar

from otp_router.config import Settings
from otp_router.models import CheckResult, Verification
from otp_router.router import OtpRouter

__all__ = ["SyncOtpRouter"]

_T = TypeVar("_T")


class SyncOtpRouter:
    """Blocking version of :class:`OtpRouter`.

    Args:
        factory: Builds the async router; called on the background loop.
            Defaults to ``OtpRouter.from_settings(settings)``.
        settings: Used by the default factory.
        timeout: Seconds any single call may block.

    Example::

        router = SyncOtpRouter()          # reads OTP_ROUTER_* settings
        v = router.start("+447911123456")
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
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="otp-router", daemon=True)
        self._thread.start()
        build = factory or (lambda: OtpRouter.from_settings(settings))

        async def enter() -> OtpRouter:
            router = build()
            await router.__aenter__()
            return router

        try:
            self._router = self._run(enter())
        except BaseException:
            self._stop_loop()
            raise

    def _run(self, coro: Coroutine[Any, Any, _T]) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(self._timeout)

    def start(self, phone: str, **kwargs: Any) -> Verification:
        """See :meth:`OtpRouter.start`."""
        return self._run(self._router.start(phone, **kwargs))

    def check(self, verification_id: str, code: str) -> CheckResult:
        """See :meth:`OtpRouter.check`."""
        return self._run(self._router.check(verification_id, code))

    def get(self, verification_id: str) -> Verification:
        """See :meth:`OtpRouter.get`."""
        return self._run(self._router.get(verification_id))

    def cancel(self, verification_id: str) -> Verification:
        """See :meth:`OtpRouter.cancel`."""
        return self._run(self._router.cancel(verification_id))

    def resend(self, verification_id: str) -> Verification:
        """See :meth:`OtpRouter.resend`."""
        return self._run(self._router.resend(verification_id))

    def close(self) -> None:
        """Close the router and stop the background loop."""
        if self._loop.is_closed():
            return
        try:
            self._run(self._router.aclose())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(self._timeout)
        self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
