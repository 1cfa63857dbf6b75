"""Per-channel circuit breakers.

After ``failures`` consecutive transient failures a channel is skipped for
``cooldown`` seconds (fallback reason ``circuit_open``), so a provider outage
costs each login one fast fallback instead of a full retry budget. After the
cool-down one trial call is let through (half-open); its success closes the
circuit, its failure opens it again.

State is per process: each worker learns about an outage from its own calls,
which is enough to protect it and needs no shared writes on the hot path.

What counts as a failure is the caller's choice (see ``OtpRouter``): only
answers that say something about the provider as a whole (a 5xx, a timeout,
a refused or dropped connection, an unreadable body). A 4xx answer (a
refusal, an invalid number, a rate limit) is an answer: the provider is up.

An open circuit never ends a verification by itself: a step that meets one
moves to another configured channel, or waits for :meth:`retry_in` and tries
again (see ``AttemptPhase.WAITING``).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

__all__ = ["HALF_OPEN_RECHECK", "CircuitBreaker", "CircuitState"]

#: Seconds a caller refused during a half-open trial waits before asking again.
HALF_OPEN_RECHECK = 1.0


class CircuitState(enum.IntEnum):
    """Exported as the ``otp_router_circuit_state`` gauge."""

    CLOSED = 0
    OPEN = 1
    HALF_OPEN = 2


class CircuitBreaker:
    """Counts consecutive transient failures of one channel.

    Args:
        failures: Consecutive transient failures that open the circuit.
        cooldown: Seconds the circuit stays open.
        clock: Monotonic clock (injectable for tests).
        on_change: Called with the new state whenever it changes.
    """

    def __init__(
        self,
        *,
        failures: int = 5,
        cooldown: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._clock = clock
        self._on_change = on_change
        self._consecutive = 0
        self._opened_at: float | None = None
        self._trial_running = False
        self._trial_since = 0.0
        self.state = CircuitState.CLOSED

    def _set(self, state: CircuitState) -> None:
        if state is not self.state:
            self.state = state
            if self._on_change is not None:
                self._on_change(state)

    def allow(self) -> bool:
        """Whether a call may go to the provider now."""
        if self.state is CircuitState.CLOSED:
            return True
        assert self._opened_at is not None
        if self.state is CircuitState.OPEN and self._clock() - self._opened_at >= self.cooldown:
            self._set(CircuitState.HALF_OPEN)
        if self.state is CircuitState.HALF_OPEN and self._trial_running:
            # A trial whose outcome never came back (its caller was cancelled or
            # died in between) must not keep the channel shut forever.
            self._trial_running = self._clock() - self._trial_since < self.cooldown
        if self.state is CircuitState.HALF_OPEN and not self._trial_running:
            self._trial_running = True
            self._trial_since = self._clock()
            return True
        return False

    def retry_in(self) -> float:
        """Seconds until :meth:`allow` may say yes again (0 when closed).

        Open: the rest of the cool-down. Half-open with a trial running: a
        short recheck, since the trial's outcome decides for everyone.
        """
        if self.state is CircuitState.CLOSED:
            return 0.0
        if self.state is CircuitState.OPEN:
            assert self._opened_at is not None
            return max(0.0, self._opened_at + self.cooldown - self._clock())
        return min(HALF_OPEN_RECHECK, self.cooldown)

    def success(self) -> None:
        """The provider answered (any answer, even a permanent error, proves it is up)."""
        self._consecutive = 0
        self._trial_running = False
        self._opened_at = None
        self._set(CircuitState.CLOSED)

    def failure(self) -> None:
        """The provider failed transiently (after its retries)."""
        self._consecutive += 1
        self._trial_running = False
        if self.state is CircuitState.HALF_OPEN or self._consecutive >= self.failures:
            self._opened_at = self._clock()
            self._set(CircuitState.OPEN)
