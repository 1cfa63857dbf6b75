"""The web app mounts one report route per configured adapter's receiver, including a user's own."""

from __future__ import annotations

import hashlib
import hmac
import time
from decimal import Decimal
from typing import Any

import httpx
from prometheus_client import CollectorRegistry

from otp_router.config import Settings, VonageSettings
from otp_router.errors import InvalidSignature, WebhookError
from otp_router.metrics import Metrics
from otp_router.policy import Policy
from otp_router.providers.base import (
    DeliveryState,
    FakeChannel,
    InboundReport,
    Receive,
    ReceivedReport,
    ReceiverSpec,
    SendResult,
    StatusResult,
)
from otp_router.providers.vonage_sms import RECEIVER as VONAGE_RECEIVER
from otp_router.providers.vonage_sms import sign_params
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore
from otp_router.webapp import create_app

US = "+12025550143"
PUSH_SECRET = b"push-secret"


def _push_receiver(settings: Any) -> Receive:
    def receive(inbound: InboundReport, now: float) -> ReceivedReport:
        expected = hmac.new(PUSH_SECRET, inbound.body, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(inbound.headers.get("x-acme-signature", ""), expected):
            raise InvalidSignature("acme signature does not match")
        fields = dict(part.split("=", 1) for part in inbound.body.decode().split("&") if "=" in part)
        if "id" not in fields:
            raise WebhookError("no id")
        state = DeliveryState.DELIVERED if fields.get("state") == "ok" else DeliveryState.FAILED
        return ReceivedReport(fields.get("vid"), StatusResult(fields["id"], state))

    return receive


PUSH_RECEIVER = ReceiverSpec(
    provider="acme_push", path="/webhooks/acme", build=_push_receiver, operation_id="acmeReport"
)


async def _sent(method: str, arg: Any) -> Any:
    if method == "send":
        return SendResult(ref="P1", state=DeliveryState.PENDING, cost=Decimal("0.001"))
    return StatusResult(arg, DeliveryState.UNKNOWN)


async def _router(channels: dict[str, Any], steps: list[dict[str, Any]], **settings: Any) -> OtpRouter:
    router = OtpRouter(
        store=MemoryStore(),
        channels=channels,
        settings=Settings(code_secret="s", public_url="https://otp.example.com", **settings),
        policy=Policy.from_dict({"steps": steps}, routes=set(channels)),
        metrics=Metrics(CollectorRegistry()),
        run_deadlines=False,
    )
    await router.open()
    return router


async def test_a_user_adapter_brings_its_own_report_route() -> None:
    """A user's adapter declares a receiver: the app mounts it, checks the signature, applies the report."""
    push = FakeChannel("push", _sent, provider="acme_push")
    push.report_receiver = PUSH_RECEIVER  # type: ignore[attr-defined]
    router = await _router({"push": push}, [{"channel": "push", "deliver_within": 30}])
    app = create_app(router)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        spec = (await client.get("/openapi.json")).json()
        assert "/webhooks/acme" in spec["paths"] and "/webhooks/twilio" not in spec["paths"]
        v = await router.start(US)
        body = f"vid={v.id}&id=P1&state=ok".encode()
        forged = await client.post("/webhooks/acme", content=body, headers={"X-Acme-Signature": "nope"})
        assert forged.status_code == 403 and forged.json()["error"]["code"] == "invalid_signature"
        signature = hmac.new(PUSH_SECRET, body, hashlib.sha256).hexdigest()
        resp = await client.post("/webhooks/acme", content=body, headers={"X-Acme-Signature": signature})
        assert resp.status_code == 200 and resp.json() == {"ok": True, "outcome": "accepted"}
        unreadable = b"vid=x"
        signature = hmac.new(PUSH_SECRET, unreadable, hashlib.sha256).hexdigest()
        resp = await client.post(
            "/webhooks/acme", content=unreadable, headers={"X-Acme-Signature": signature}
        )
        assert resp.status_code == 400
    state = await router.get(v.id)
    assert state.channel == "push"
    await router.aclose()


async def test_vonage_receipts_arrive_by_post_or_get() -> None:
    """A signed Vonage receipt, as a form POST or a GET query, is applied; a forged one is refused."""
    sms = FakeChannel("sms_backup", _sent, provider="vonage")
    sms.report_receiver = VONAGE_RECEIVER  # type: ignore[attr-defined]
    vonage = VonageSettings(signature_secret="sig-secret")
    router = await _router(
        {"sms_backup": sms}, [{"channel": "sms_backup", "deliver_within": 30}], vonage=vonage
    )
    app = create_app(router)
    v = await router.start(US)
    params = {
        "messageId": "P1",
        "status": "delivered",
        "price": "0.00500000",
        "client-ref": v.id,
        "timestamp": str(int(time.time())),
    }
    signed = {**params, "sig": sign_params(params, "sig-secret", vonage.signature_method)}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        forged = await client.post("/webhooks/vonage", data={**signed, "status": "failed"})
        assert forged.status_code == 403
        resp = await client.get("/webhooks/vonage", params=signed)
        assert resp.status_code == 200 and resp.json()["outcome"] == "accepted"
        again = await client.post("/webhooks/vonage", data=signed)
        assert again.status_code == 200 and again.json()["outcome"] == "duplicate"
    await router.wait_idle()
    state = await router.get(v.id)
    assert state.status == "pending" and state.cost == Decimal("0.00500000")
    await router.aclose()
