"""Who paid twice: one verification charged for a Telegram message *and* another channel.

A Telegram step whose deadline (``deliver_within``) is shorter than its ttl
can fall back to SMS while the Telegram message is still alive. If Telegram
then delivers it within the ttl, Telegram keeps its charge and the SMS was
paid for too: the user "paid twice". With ``deliver_within == ttl`` this
cannot happen, because a message not delivered by the deadline is refunded.

:func:`paid_twice` decides it from the stored state alone (no I/O), so the
router's metrics, the public :class:`~otp_router.models.Verification` and the
demo all use the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal

from otp_router.core import Attempt, VerificationState

__all__ = ["PaidTwice", "paid_twice", "time_to_code"]


@dataclass(frozen=True, slots=True)
class PaidTwice:
    """A verification that kept a Telegram charge and paid another channel as well.

    Attributes:
        telegram: Net amount booked for the Telegram attempt(s) whose charge is kept (USD).
        extra: Net amount booked for the other channels' attempts (USD): what the
            user cost on top of the Telegram message that reached them.
    """

    telegram: Decimal
    extra: Decimal


def _refunding(state: VerificationState, attempt: Attempt) -> bool:
    """The attempt's route refunds a message not delivered within its ttl (Telegram)."""
    return state.steps[attempt.step].capabilities.refunds_undelivered


def _kept_telegram(state: VerificationState, attempt: Attempt) -> bool:
    """A refundable charge (Telegram's) that will not be refunded any more.

    A charged message is refunded when it is not delivered within its ttl; so
    the charge is kept once the message is delivered, or once the provider's
    final cost says so. Before either, a charge may still turn into a refund
    and the verification is not (yet) counted.
    """
    if not _refunding(state, attempt) or attempt.cost <= 0 or attempt.refunded:
        return False
    return attempt.delivered_at is not None or attempt.cost_final


def paid_twice(state: VerificationState) -> PaidTwice | None:
    """Whether ``state`` kept a Telegram charge and also paid another channel.

    Returns:
        The amounts, or None when the verification paid for at most one channel
        (or its Telegram charge may still be refunded).
    """
    kept = [a for a in state.attempts if _kept_telegram(state, a)]
    if not kept:
        return None
    others = [a for a in state.attempts if not _refunding(state, a) and a.cost > 0]
    if not others:
        return None
    return PaidTwice(
        telegram=sum((a.cost for a in kept), Decimal(0)),
        extra=sum((a.cost for a in others), Decimal(0)),
    )


def time_to_code(state: VerificationState) -> float | None:
    """Seconds from the start to the first delivery report of any channel; None before one."""
    delivered = [a.delivered_at for a in state.attempts if a.delivered_at is not None]
    if not delivered:
        return None
    return max(min(delivered) - state.created_at, 0.0)
