"""Who paid twice and the time to code, decided from a stored state alone."""

from __future__ import annotations

from decimal import Decimal

import pytest

from otp_router.accounting import PaidTwice, paid_twice, time_to_code
from otp_router.core import Attempt, AttemptPhase, VerificationState
from otp_router.lifecycle import new_state
from otp_router.policy import Step
from otp_router.providers.base import ChannelName

T0 = 1_700_000_000.0


def state(*attempts: Attempt) -> VerificationState:
    base = new_state(
        verification_id="v1",
        phone="+12025550143",
        region="US",
        code_digest="d",
        steps=(Step(ChannelName.TELEGRAM, 5.0, probe=True), Step(ChannelName.SMS, 120.0)),
        now=T0,
        code_ttl=600,
        max_attempts=5,
    )
    return base.model_copy(update={"attempts": attempts})


def telegram(cost: str = "0.01", **update: object) -> Attempt:
    attempt = Attempt(
        step=0,
        channel=ChannelName.TELEGRAM,
        provider="telegram",
        phase=AttemptPhase.FAILED,
        started_at=T0,
        io_since=T0,
        ref="req-1",
        sent_at=T0 + 0.2,
        cost=Decimal(cost),
    )
    return attempt.model_copy(update=update)


def sms(cost: str = "0.0083", **update: object) -> Attempt:
    attempt = Attempt(
        step=1,
        channel=ChannelName.SMS,
        provider="twilio",
        phase=AttemptPhase.AWAITING,
        started_at=T0 + 5,
        io_since=T0 + 5,
        ref="SM1",
        sent_at=T0 + 5.3,
        cost=Decimal(cost),
    )
    return attempt.model_copy(update=update)


def test_delivered_telegram_and_a_charged_sms_paid_twice() -> None:
    """A delivered Telegram message keeps its charge; the SMS on top is the extra cost."""
    got = paid_twice(state(telegram(delivered_at=T0 + 9), sms(delivered_at=T0 + 8)))
    assert got == PaidTwice(telegram=Decimal("0.01"), extra=Decimal("0.0083"))


@pytest.mark.parametrize(
    ("attempts", "why"),
    [
        ((telegram(delivered_at=T0 + 2),), "Telegram only"),
        ((telegram(cost="0", cost_final=True, refunded=True), sms()), "Telegram refunded at its ttl"),
        ((telegram(), sms()), "Telegram still inside its ttl: it may be refunded yet"),
        ((telegram(delivered_at=T0 + 9), sms(cost="0")), "the SMS was never charged"),
        ((sms(delivered_at=T0 + 8),), "SMS only"),
    ],
)
def test_one_kept_charge_is_not_paid_twice(attempts: tuple[Attempt, ...], why: str) -> None:
    """Only a kept Telegram charge plus a charged other channel counts."""
    assert paid_twice(state(*attempts)) is None, why


def test_a_final_undelivered_telegram_charge_still_counts() -> None:
    """The provider's final word that a charge stands is enough even without a delivery report."""
    got = paid_twice(state(telegram(cost_final=True), sms()))
    assert got is not None and got.extra == Decimal("0.0083")


def test_time_to_code_is_the_first_delivery() -> None:
    """From creation to the earliest delivery report of any channel; None before any."""
    assert time_to_code(state(telegram(), sms())) is None
    assert time_to_code(state(telegram(delivered_at=T0 + 9), sms(delivered_at=T0 + 8))) == pytest.approx(8)
