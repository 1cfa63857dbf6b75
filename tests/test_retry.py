"""Retry policies: what is retried, how often, and what wins the wait."""

from __future__ import annotations

import pytest

from otp_router.config import RetrySettings
from otp_router.errors import (
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from otp_router.retry import CallKind, retrying

FAST = RetrySettings(backoff=False, attempts=4, timeout=10, max_retry_after=5)


async def run(
    kind: CallKind, errors: list[Exception], settings: RetrySettings = FAST
) -> list[tuple[int, float]]:
    waits: list[tuple[int, float]] = []
    calls = iter(errors)

    def hook(exc: BaseException, attempt: int, delay: float) -> None:
        waits.append((attempt, delay))

    async for attempt in retrying(settings, kind, on_retry=hook):
        with attempt:
            err = next(calls, None)
            if err is not None:
                raise err
    return waits


async def test_reads_retry_transient_errors() -> None:
    """A read retries timeouts and 5xx until it succeeds."""
    waits = await run(
        CallKind.READ, [ProviderTimeout("t", provider="x"), ProviderUnavailable("5", provider="x")]
    )
    assert [a for a, _ in waits] == [1, 2]


async def test_sends_retry_only_what_cannot_have_been_performed() -> None:
    """A send retries connection-refused, but a timeout may have sent: it is raised at once."""
    refused = ProviderUnavailable("refused", provider="x", not_performed=True)
    assert len(await run(CallKind.SEND, [refused, refused])) == 2
    with pytest.raises(ProviderTimeout):
        await run(CallKind.SEND, [ProviderTimeout("t", provider="x")])
    with pytest.raises(ProviderUnavailable):
        await run(CallKind.SEND, [ProviderUnavailable("502", provider="x")])


async def test_permanent_errors_are_never_retried() -> None:
    """A permanent error propagates on the first attempt."""
    with pytest.raises(ProviderRejected):
        await run(CallKind.READ, [ProviderRejected("no", provider="x"), ProviderRejected("no", provider="x")])


async def test_attempts_are_capped_and_last_error_reraised() -> None:
    """After the capped number of attempts the last error itself is raised."""
    errors: list[Exception] = [ProviderTimeout(f"t{i}", provider="x") for i in range(10)]
    with pytest.raises(ProviderTimeout, match="t3"):
        await run(CallKind.READ, errors)


async def test_retry_after_wins_and_too_long_is_not_waited() -> None:
    """FLOOD_WAIT/Retry-After sets the wait even with backoff off; a wait over the cap is not waited."""
    waits = await run(CallKind.SEND, [ProviderRateLimited("f", provider="x", retry_after=0.01)])
    assert waits == [(1, 0.01)]
    with pytest.raises(ProviderRateLimited):
        await run(CallKind.SEND, [ProviderRateLimited("f", provider="x", retry_after=60)])


async def test_backoff_grows_when_enabled() -> None:
    """With backoff on, waits are positive and bounded by max_backoff plus jitter."""
    settings = RetrySettings(attempts=4, initial_backoff=0.001, max_backoff=0.004, jitter=0.001)
    waits = await run(CallKind.READ, [ProviderTimeout("t", provider="x")] * 3, settings)
    assert all(0 < d <= 0.005 for _, d in waits)
