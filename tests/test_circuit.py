"""Circuit breaker: opens after consecutive transient failures, half-opens after the cool-down."""

from __future__ import annotations

from otp_router.circuit import HALF_OPEN_RECHECK, CircuitBreaker, CircuitState


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_opens_after_consecutive_failures_only() -> None:
    """A success in between resets the count; N failures in a row open the circuit."""
    changes: list[CircuitState] = []
    breaker = CircuitBreaker(failures=3, cooldown=10, clock=Clock(), on_change=changes.append)
    breaker.failure()
    breaker.failure()
    breaker.success()
    breaker.failure()
    breaker.failure()
    assert breaker.allow() and breaker.state is CircuitState.CLOSED
    breaker.failure()
    assert breaker.state is CircuitState.OPEN and not breaker.allow()
    assert changes == [CircuitState.OPEN]


def test_half_open_lets_one_trial_through() -> None:
    """After the cool-down exactly one call is allowed; its success closes the circuit."""
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    breaker.failure()
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.2
    assert breaker.allow() and breaker.state is CircuitState.HALF_OPEN
    assert not breaker.allow(), "a second call waits for the trial's outcome"
    breaker.success()
    assert breaker.state is CircuitState.CLOSED and breaker.allow()


def test_failed_trial_reopens_for_a_full_cooldown() -> None:
    """A failing trial opens the circuit again, timed from the trial."""
    clock = Clock()
    breaker = CircuitBreaker(failures=5, cooldown=10, clock=clock)
    for _ in range(5):
        breaker.failure()
    clock.now += 10
    assert breaker.allow()
    breaker.failure()
    assert breaker.state is CircuitState.OPEN
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow()


def test_retry_in_says_when_a_call_may_go_through() -> None:
    """Closed: now; open: the rest of the cool-down; half-open with a trial running: a short recheck."""
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    assert breaker.retry_in() == 0
    breaker.failure()
    clock.now += 4
    assert breaker.retry_in() == 6
    clock.now += 6
    assert breaker.retry_in() == 0 and breaker.allow()
    assert not breaker.allow()
    assert 0 < breaker.retry_in() <= HALF_OPEN_RECHECK


def test_a_trial_that_never_reports_does_not_keep_the_circuit_shut() -> None:
    """A half-open trial whose caller vanished (cancelled, crashed) is replaced after a cool-down."""
    clock = Clock()
    breaker = CircuitBreaker(failures=1, cooldown=10, clock=clock)
    breaker.failure()
    clock.now += 10
    assert breaker.allow()  # the trial; its outcome never comes
    clock.now += 9
    assert not breaker.allow()
    clock.now += 1
    assert breaker.allow(), "a new trial once the lost one is a cool-down old"
    breaker.success()
    assert breaker.state is CircuitState.CLOSED
