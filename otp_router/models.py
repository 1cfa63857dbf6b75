"""What the library API returns: small, frozen, JSON-ready views of a verification."""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from otp_router.accounting import paid_twice, time_to_code
from otp_router.core import CheckOutcome, Status, VerificationState

__all__ = ["CheckResult", "FallbackInfo", "Verification"]


@dataclass(frozen=True, slots=True)
class FallbackInfo:
    """One move to the next channel and why."""

    from_channel: str
    to_channel: str | None
    reason: str
    at: float


@dataclass(frozen=True, slots=True)
class Verification:
    """A verification as callers see it. Never contains the code or the phone number.

    Attributes:
        id: Verification id, to pass to ``check``.
        status: ``pending``, ``verified``, ``expired``, ``canceled``, ``failed`` or ``too_many_attempts``.
        channel: Channel in use (``telegram``/``sms``), None before the first attempt.
        region: ISO region of the number.
        created_at: Unix time.
        expires_at: Unix time after which the code is no longer accepted.
        attempts_left: Code checks left.
        cost: Net cost booked so far (USD), refunds deducted.
        delivered: Whether any channel reported the code delivered.
        fallbacks: Channel changes, in order, with reasons.
        created: True only on the value ``start`` returns when that call created
            the verification; False for an idempotent repeat and everywhere else.
        time_to_code: Seconds from creation to the first delivery report of any
            channel; None while no channel has reported the code delivered.
        paid_twice: True when a Telegram charge was kept (the message was
            delivered) and another channel was charged too (see :mod:`otp_router.accounting`).
        paid_twice_extra: What the other channels cost on top of that Telegram
            message (USD); zero unless ``paid_twice``.
    """

    id: str
    status: Status
    channel: str | None
    region: str
    created_at: float
    expires_at: float
    attempts_left: int
    cost: Decimal
    delivered: bool
    fallbacks: tuple[FallbackInfo, ...]
    created: bool = False
    time_to_code: float | None = None
    paid_twice: bool = False
    paid_twice_extra: Decimal = Decimal(0)

    @classmethod
    def from_state(cls, state: VerificationState) -> Verification:
        """Project the stored state onto the public view."""
        twice = paid_twice(state)
        return cls(
            id=state.id,
            status=state.status,
            channel=str(state.channel) if state.channel else None,
            region=state.region,
            created_at=state.created_at,
            expires_at=state.expires_at,
            attempts_left=state.checks_left,
            cost=state.total_cost,
            delivered=any(a.delivered_at is not None for a in state.attempts),
            fallbacks=tuple(
                FallbackInfo(
                    str(f.from_channel), str(f.to_channel) if f.to_channel else None, f.reason.value, f.at
                )
                for f in state.fallbacks
            ),
            time_to_code=time_to_code(state),
            paid_twice=twice is not None,
            paid_twice_extra=twice.extra if twice is not None else Decimal(0),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (Decimal as string, enums as values)."""
        return {
            "id": self.id,
            "status": self.status.value,
            "channel": self.channel,
            "region": self.region,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "attempts_left": self.attempts_left,
            "cost": str(self.cost),
            "delivered": self.delivered,
            "fallbacks": [
                {"from": f.from_channel, "to": f.to_channel, "reason": f.reason, "at": f.at}
                for f in self.fallbacks
            ],
            "time_to_code": self.time_to_code,
            "paid_twice": self.paid_twice,
            "paid_twice_extra": str(self.paid_twice_extra),
        }


@dataclass(frozen=True, slots=True)
class CheckResult:
    """Outcome of ``check``.

    Attributes:
        verification_id: The id checked.
        status: ``valid``, ``invalid``, ``expired``, ``too_many_attempts`` or ``not_found``.
        attempts_left: Checks left after this one.
        verification: The verification after the check (None when not found).
    """

    verification_id: str
    status: CheckOutcome
    attempts_left: int
    verification: Verification | None

    @property
    def valid(self) -> bool:
        """True only for a correct code on a live verification."""
        return self.status is CheckOutcome.VALID

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "id": self.verification_id,
            "status": self.status.value,
            "valid": self.valid,
            "attempts_left": self.attempts_left,
        }
