"""Every retry policy, built in one place from :class:`RetrySettings`.

The rules, and why:

* **Reads** (``checkSendAbility``, ``checkVerificationStatus``, fetching a
  Twilio message) retry on any :class:`ProviderTransientError`: asking again
  cannot cause a second message.
* **Sends** retry only when the request *cannot have been performed*
  (``not_performed``): connection refused before the request was written,
  HTTP 429 / Twilio 20429 (documented as never processed) and Telegram
  ``FLOOD_WAIT_N``. A timeout or a 5xx after the request was written may have
  sent the message, so it is *not* retried blindly: the router resolves it by
  a status read or falls back (never two codes by accident).
* Permanent errors are never retried: they fall over to the next channel.
* Attempts and total time are both capped. Backoff is exponential with
  jitter; a provider's Retry-After / ``FLOOD_WAIT_N`` value wins. A wait longer
  than ``max_retry_after`` is not waited out: the error is raised so the
  router can fall back instead of stalling a login.
* When retries run out the last exception is re-raised unchanged.

Tests turn backoff off with ``RetrySettings(backoff=False)``; nothing patches ``sleep``.
"""

from __future__ import annotations

import enum
import inspect
from collections.abc import Callable

from tenacity import AsyncRetrying, RetryCallState, stop_after_attempt, stop_after_delay
from tenacity.wait import wait_exponential_jitter

from otp_router.config import RetrySettings
from otp_router.errors import ProviderRateLimited, ProviderTransientError

# tenacity 9.2 renamed wait_exponential_jitter's ``initial`` to ``multiplier`` and
# warns on the old name (an error under pytest's filterwarnings); older 9.x only know ``initial``.
_JITTER_PARAMS = inspect.signature(wait_exponential_jitter.__init__).parameters
_FIRST_WAIT = "multiplier" if "multiplier" in _JITTER_PARAMS else "initial"

__all__ = ["CallKind", "RetryHook", "retrying"]

#: Called before each retry with (error, attempt number that failed, seconds to wait).
RetryHook = Callable[[BaseException, int, float], None]


class CallKind(enum.Enum):
    """Whether a call only reads or may cause a message to be sent."""

    READ = "read"
    SEND = "send"


def _should_retry(kind: CallKind, settings: RetrySettings) -> Callable[[RetryCallState], bool]:
    def predicate(state: RetryCallState) -> bool:
        if state.outcome is None or not state.outcome.failed:
            return False
        exc = state.outcome.exception()
        if not isinstance(exc, ProviderTransientError):
            return False
        if isinstance(exc, ProviderRateLimited) and (exc.retry_after or 0) > settings.max_retry_after:
            # Waiting this long would stall a login: let the router fall back.
            return False
        return kind is CallKind.READ or exc.not_performed

    return predicate


def _wait(settings: RetrySettings) -> Callable[[RetryCallState], float]:
    backoff = wait_exponential_jitter(
        max=settings.max_backoff, jitter=settings.jitter, **{_FIRST_WAIT: settings.initial_backoff}
    )

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome is not None else None
        if isinstance(exc, ProviderRateLimited) and exc.retry_after is not None:
            return float(exc.retry_after)
        return float(backoff(state)) if settings.backoff else 0.0

    return wait


def retrying(settings: RetrySettings, kind: CallKind, *, on_retry: RetryHook | None = None) -> AsyncRetrying:
    """Build the tenacity controller for one provider call.

    Args:
        settings: Limits and backoff.
        kind: :attr:`CallKind.READ` or :attr:`CallKind.SEND` (see the module rules).
        on_retry: Hook for metrics/logging, called before each sleep.

    Returns:
        An ``AsyncRetrying`` to use as ``async for attempt in retrying(...)``.
    """

    def before_sleep(state: RetryCallState) -> None:
        if on_retry is not None and state.outcome is not None:
            exc = state.outcome.exception()
            delay = state.next_action.sleep if state.next_action is not None else 0.0
            if exc is not None:
                on_retry(exc, state.attempt_number, float(delay))

    return AsyncRetrying(
        retry=_should_retry(kind, settings),
        stop=stop_after_attempt(settings.attempts) | stop_after_delay(settings.timeout),
        wait=_wait(settings),
        before_sleep=before_sleep,
        reraise=True,
    )
