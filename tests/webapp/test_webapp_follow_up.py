"""A delivery report is answered once stored; the fallback it sets off runs outside the request.

Twilio is a fake whose send waits on an ``asyncio.Event`` the test controls: a
webhook that did its fallback send inside the request could not answer before
the event is set. Bounded waits only (a hang fails the test), no timing checks.
"""

from __future__ import annotations

import asyncio
import logging
from decimal import Decimal
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from webapp_helpers import Env, Factory, post_tg, tg_body, webhook_count

from otp_router.core import AttemptPhase, Status
from otp_router.providers.base import ChannelName, DeliveryState, SendResult


class HangingTwilio:
    """SMS sends wait for ``release``; ``waiting`` is set once a send is waiting."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()

    async def __call__(self, method: str, arg: Any) -> Any:
        if method == "send":
            self.waiting.set()
            await self.release.wait()
            return SendResult(ref="SM1", state=DeliveryState.PENDING, cost=Decimal("0.0083"))
        return False


def sms_sends(env: Env) -> int:
    return sum(1 for method, _ in env.sms.calls if method == "send")


async def test_a_hanging_twilio_does_not_slow_the_webhook_answer(
    make_env: Factory, registry: CollectorRegistry
) -> None:
    """Telegram reports the message expired: the webhook answers 200 while the SMS fallback send is
    still hanging (the report is stored, the step is in its sending phase), a retried report is a
    duplicate, and once Twilio answers exactly one SMS was sent."""
    env = await make_env()
    twilio = HangingTwilio()
    env.sms.handler = twilio
    vid = await env.start()
    assert (await env.state(vid)).channel is ChannelName.TELEGRAM

    # Bounded: if the fallback send ran inside the request, no answer could come before release.
    resp = await asyncio.wait_for(post_tg(env, tg_body(vid, status="expired")), timeout=20)
    assert resp.status_code == 200 and resp.json() == {"ok": True, "outcome": "accepted"}
    assert not twilio.release.is_set()
    state = await env.state(vid)
    cur = state.current
    assert state.channel is ChannelName.SMS and cur is not None and cur.phase is AttemptPhase.SENDING

    # The send runs in the router's own task: it starts and waits, the webhook has long answered.
    await asyncio.wait_for(twilio.waiting.wait(), timeout=20)
    assert sms_sends(env) == 1
    # Telegram retries the report (say our answer was lost): a duplicate, and no second send.
    again = await asyncio.wait_for(post_tg(env, tg_body(vid, status="expired")), timeout=20)
    assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    assert webhook_count(registry, "telegram", "accepted") == 1

    twilio.release.set()
    await asyncio.wait_for(env.router.wait_idle(), timeout=20)
    state = await env.state(vid)
    cur = state.current
    assert state.status is Status.PENDING and cur is not None
    assert cur.channel is ChannelName.SMS and cur.phase is AttemptPhase.AWAITING and cur.ref == "SM1"
    assert sms_sends(env) == 1


async def test_closing_the_router_waits_for_a_follow_up_send(
    make_env: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """The follow-up task belongs to the router: aclose waits for it (store still open), so a clean
    shutdown never leaves a fallback send unrecorded."""
    env = await make_env()
    twilio = HangingTwilio()
    env.sms.handler = twilio
    vid = await env.start()
    resp = await asyncio.wait_for(post_tg(env, tg_body(vid, status="expired")), timeout=20)
    assert resp.status_code == 200
    await asyncio.wait_for(twilio.waiting.wait(), timeout=20)
    closing = asyncio.create_task(env.router.aclose())
    for _ in range(20):
        await asyncio.sleep(0)
    assert not closing.done(), "aclose returned while the follow-up send was still waiting"
    twilio.release.set()
    await asyncio.wait_for(closing, timeout=20)
    assert sms_sends(env) == 1
    # Its answer was written before the store closed (a write after it would have been logged).
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
