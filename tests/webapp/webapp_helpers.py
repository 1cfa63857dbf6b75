"""Shared helpers for the web app tests: a router over fake channels, signing and posting callbacks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Any

import httpx
from prometheus_client import CollectorRegistry
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from twilio.request_validator import RequestValidator

from otp_router.core import VerificationState
from otp_router.providers.base import (
    DeliveryState,
    FakeChannel,
    ProbeResult,
    SendRequest,
    SendResult,
)
from otp_router.providers.telegram import sign_report
from otp_router.router import OtpRouter

US = "+12025550143"
TG_TOKEN = "tg-token"
TW_TOKEN = "tw-auth-token"
API_TOKEN = "api-secret"
PUBLIC = "https://otp.example.com"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
NOW = 1_700_000_000.0

Handler = Callable[[str, Any], Awaitable[Any]]


class Clock:
    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> float:
        return self.now


def telegram_handler(*, reachable: bool = True) -> Handler:
    async def handle(method: str, arg: Any) -> Any:
        if method == "probe":
            if not reachable:
                return ProbeResult(False, reason="PHONE_NUMBER_NOT_FOUND")
            return ProbeResult(True, ref="req-1", cost=Decimal("0.01"))
        if method == "send":
            return SendResult(ref=arg.probe_ref or "req-x", state=DeliveryState.SENT, cost=Decimal("0.01"))
        return True

    return handle


async def sms_handler(method: str, arg: Any) -> Any:
    if method == "probe":
        return ProbeResult(True)
    if method == "send":
        return SendResult(
            ref="SM1", state=DeliveryState.PENDING, cost=Decimal("0.0083"), cost_is_estimate=True
        )
    return False


class Env:
    """One router, its fake channels, the app and a client talking to it."""

    def __init__(
        self, router: OtpRouter, tg: FakeChannel, sms: FakeChannel, client: httpx.AsyncClient, clock: Clock
    ) -> None:
        self.router, self.tg, self.sms, self.client, self.clock = router, tg, sms, client, clock
        self.prefix = ""

    async def record(self, vid: str) -> tuple[int, str]:
        rec = await self.router.store.get(vid)
        assert rec is not None
        return rec.version, rec.data

    async def state(self, vid: str) -> VerificationState:
        return VerificationState.model_validate_json((await self.record(vid))[1])

    async def start(self) -> str:
        resp = await self.client.post(f"{self.prefix}/v1/verifications", json={"phone": US}, headers=AUTH)
        assert resp.status_code == 201, resp.text
        vid: str = resp.json()["id"]
        return vid

    def sent_code(self, channel: FakeChannel) -> str:
        request: SendRequest = next(arg for method, arg in channel.calls if method == "send")
        return request.code


Factory = Callable[..., Awaitable[Env]]


def webhook_count(registry: CollectorRegistry, provider: str, outcome: str) -> float:
    value = registry.get_sample_value("otp_router_webhooks_total", {"provider": provider, "outcome": outcome})
    return value or 0.0


def tg_body(vid: str | None, status: str = "delivered", request_id: str = "req-1") -> bytes:
    report: dict[str, Any] = {
        "request_id": request_id,
        "phone_number": US,
        "request_cost": 0.01,
        "delivery_status": {"status": status, "updated_at": int(NOW) + 1},
    }
    if vid is not None:
        report["payload"] = vid
    return json.dumps(report).encode()


async def post_tg(
    env: Env, body: bytes, *, ts: float | None = None, sig: str | None = None, token: str = TG_TOKEN
) -> httpx.Response:
    timestamp = str(int(NOW if ts is None else ts))
    signature = sign_report(token, timestamp, body) if sig is None else sig
    headers = {"X-Request-Timestamp": timestamp, "X-Request-Signature": signature}
    return await env.client.post("/webhooks/telegram", content=body, headers=headers)


async def start_on_sms(env: Env) -> str:
    """Start a verification that goes to SMS (Telegram refuses the number)."""
    vid = await env.start()
    assert (await env.router.get(vid)).channel == "sms"
    return vid


def twilio_form(status: str = "delivered", sid: str = "SM1") -> dict[str, str]:
    return {
        "MessageSid": sid,
        "MessageStatus": status,
        "AccountSid": "AC123",
        "From": "+15005550006",
        "To": US,
        "ApiVersion": "2010-04-01",
        "ErrorCode": "",
    }


async def post_twilio(
    env: Env,
    vid: str,
    form: dict[str, str],
    *,
    sign_url: str | None = None,
    signed_form: dict[str, str] | None = None,
    token: str = TW_TOKEN,
    path: str = "/webhooks/twilio",
) -> httpx.Response:
    query = f"?vid={vid}"
    url = (sign_url or PUBLIC + "/webhooks/twilio") + query
    signature = RequestValidator(token).compute_signature(url, signed_form or form)
    return await env.client.post(path + query, data=form, headers={"X-Twilio-Signature": signature})


def twilio_signature(url: str, pairs: list[tuple[str, str]]) -> str:
    """Twilio's algorithm written out: URL, then each name with each of its distinct sorted values."""
    data = url
    for name in sorted({n for n, _ in pairs}):
        for value in sorted({v for n, v in pairs if n == name}):
            data += name + value
    digest = hmac.new(TW_TOKEN.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@asynccontextmanager
async def served(app: ASGIApp) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan, and a client whose requests carry its lifespan state (as uvicorn
    copies it into every request)."""
    state: dict[str, Any] = {}
    inbox: asyncio.Queue[Message] = asyncio.Queue()
    outbox: asyncio.Queue[Message] = asyncio.Queue()
    scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": state}
    lifespan = asyncio.create_task(app(scope, inbox.get, outbox.put))
    await inbox.put({"type": "lifespan.startup"})
    assert (await asyncio.wait_for(outbox.get(), 20))["type"] == "lifespan.startup.complete"

    async def with_state(scope: Scope, receive: Receive, send: Send) -> None:
        await app({**scope, "state": dict(state)}, receive, send)

    try:
        transport = httpx.ASGITransport(app=with_state)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            yield client
    finally:
        await inbox.put({"type": "lifespan.shutdown"})
        assert (await asyncio.wait_for(outbox.get(), 20))["type"] == "lifespan.shutdown.complete"
        await asyncio.wait_for(lifespan, 20)
