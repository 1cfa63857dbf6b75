"""The three ways to serve the API: included in a FastAPI app, the worker's own app, mounted in Starlette.

The user's apps here run their lifespan (:func:`served`, which drives the
ASGI lifespan protocol and copies the lifespan state into each request the way
uvicorn does), which opens the router and hands it to the routes as lifespan
state. No exception handler of ours is installed in them: the error
bodies come from the routes themselves.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import Mount
from webapp_helpers import (
    API_TOKEN,
    AUTH,
    PUBLIC,
    TG_TOKEN,
    TW_TOKEN,
    US,
    served,
    sms_handler,
    telegram_handler,
)

from otp_router.config import Settings, TelegramSettings, TwilioSettings
from otp_router.metrics import Metrics
from otp_router.providers.base import ChannelName, FakeChannel
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore
from otp_router.webapp import create_app
from otp_router.webapp.api import get_otp_router, verification_router
from otp_router.webapp.ops import ops_router
from otp_router.webapp.webhooks import webhook_router


def make_router(**settings: Any) -> tuple[OtpRouter, FakeChannel]:
    telegram = FakeChannel(ChannelName.TELEGRAM, telegram_handler(), provider="telegram")
    sms = FakeChannel(ChannelName.SMS, sms_handler, provider="twilio")
    settings.setdefault("code_secret", "test-secret")
    settings.setdefault("api_token", API_TOKEN)
    settings.setdefault("public_url", PUBLIC + "/auth")
    settings.setdefault("telegram", TelegramSettings(token=TG_TOKEN))
    settings.setdefault("twilio", TwilioSettings(account_sid="AC123", auth_token=TW_TOKEN))
    router = OtpRouter(
        store=MemoryStore(),
        channels={ChannelName.TELEGRAM: telegram, ChannelName.SMS: sms},
        settings=Settings(**settings),
        metrics=Metrics(CollectorRegistry()),
        run_deadlines=False,
    )
    return router, telegram


def sent_code(channel: FakeChannel) -> str:
    return str(next(arg for method, arg in channel.calls if method == "send").code)


class Lifespan:
    """A user's lifespan: opens a router over fake channels and yields it as lifespan state."""

    def __init__(self, **settings: Any) -> None:
        self.router, self.telegram = make_router(**settings)

    @asynccontextmanager
    async def __call__(self, app: Any) -> AsyncIterator[dict[str, Any]]:
        async with self.router:
            yield {"otp_router": self.router}


@pytest.fixture
def lifespan() -> Lifespan:
    return Lifespan()


async def login_flow(client: httpx.AsyncClient, telegram: FakeChannel, prefix: str) -> None:
    resp = await client.post(f"{prefix}/v1/verifications", json={"phone": US}, headers=AUTH)
    assert resp.status_code == 201, resp.text
    vid = resp.json()["id"]
    assert resp.headers["location"] == f"{prefix}/v1/verifications/{vid}"
    resp = await client.post(
        f"{prefix}/v1/verifications/{vid}/check", json={"code": sent_code(telegram)}, headers=AUTH
    )
    assert resp.json()["status"] == "valid"


async def test_included_in_a_fastapi_app_with_the_router_from_the_lifespan(lifespan: Lifespan) -> None:
    """include_router(prefix=…): the routes take the router from the lifespan state; Location has
    the prefix; errors keep the JSON shape in an app with no handler of ours."""
    app = FastAPI(lifespan=lifespan)
    app.include_router(verification_router(), prefix="/auth")
    async with served(app) as client:
        await login_flow(client, lifespan.telegram, "/auth")
        resp = await client.post("/auth/v1/verifications", json={"phone": US})
        assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
        resp = await client.post(
            "/auth/v1/verifications",
            content=b'{"phone": "1", "phone": "2"}',
            headers={**AUTH, "Content-Type": "application/json"},
        )
        assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_request"
        resp = await client.get("/auth/v1/verifications/v_nope", headers=AUTH)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found"
        doc = (await client.get("/openapi.json")).json()
    assert "/auth/v1/verifications" in doc["paths"]
    assert set(doc["paths"]["/auth/v1/verifications"]["post"]["responses"]) >= {"201", "400", "413", "502"}


async def test_the_router_dependency_can_be_overridden() -> None:
    """app.dependency_overrides[get_otp_router] supplies the router instead of the lifespan."""
    router, telegram = make_router()

    @asynccontextmanager
    async def own(app: Any) -> AsyncIterator[None]:
        async with router:
            yield

    app = FastAPI(lifespan=own)
    app.include_router(verification_router())
    app.dependency_overrides[get_otp_router] = lambda: router
    async with served(app) as client:
        await login_flow(client, telegram, "")


async def test_without_a_router_the_answer_is_a_500_json_error() -> None:
    """An app that never provides the router answers 500 internal_error (and logs what is missing)."""
    app = FastAPI()
    app.include_router(verification_router())
    async with served(app) as client:
        resp = await client.get("/v1/verifications/v_x", headers=AUTH)
    assert resp.status_code == 500 and resp.json()["error"]["code"] == "internal_error"


async def test_webhooks_included_under_a_prefix_check_twilio_signatures_against_the_public_url(
    lifespan: Lifespan,
) -> None:
    """Included with prefix="/auth", the Twilio URL signed is OTP_ROUTER_PUBLIC_URL (which has the
    prefix) + /webhooks/twilio, as the router builds its StatusCallback."""
    from twilio.request_validator import RequestValidator
    from webapp_helpers import twilio_form

    app = FastAPI(lifespan=lifespan)
    app.include_router(webhook_router(), prefix="/auth")
    async with served(app) as client:
        form = twilio_form()
        signed = RequestValidator(TW_TOKEN).compute_signature(f"{PUBLIC}/auth/webhooks/twilio?vid=v_x", form)
        resp = await client.post(
            "/auth/webhooks/twilio?vid=v_x", data=form, headers={"X-Twilio-Signature": signed}
        )
        assert resp.status_code == 200 and resp.json() == {"ok": True, "outcome": "ignored"}
        resp = await client.post(
            "/auth/webhooks/twilio?vid=v_x", data=form, headers={"X-Twilio-Signature": "x"}
        )
        assert resp.status_code == 403 and resp.json()["error"]["code"] == "invalid_signature"


async def test_mounted_in_starlette_with_the_router_from_its_lifespan(lifespan: Lifespan) -> None:
    """Starlette (or Django behind Starlette): Mount("/auth", create_app()) reads the outer lifespan state."""
    app = Starlette(routes=[Mount("/auth", app=create_app())], lifespan=lifespan)
    async with served(app) as client:
        await login_flow(client, lifespan.telegram, "/auth")
        assert (await client.get("/auth/healthz")).json() == {"ok": ["store"], "failing": {}}
        assert (await client.get("/auth/nowhere")).json()["error"]["code"] == "not_found"


@pytest.fixture
def ops_lifespan() -> Iterator[Lifespan]:
    yield Lifespan(ops_token="ops-secret")


async def test_ops_token_guards_metrics_and_healthz(ops_lifespan: Lifespan) -> None:
    """With OTP_ROUTER_OPS_TOKEN, /metrics and /healthz want it as a bearer token (not the API token,
    not in the query); the API is unaffected."""
    app = FastAPI(lifespan=ops_lifespan)
    app.include_router(ops_router())
    app.include_router(verification_router())
    async with served(app) as client:
        for path in ("/metrics", "/healthz"):
            for headers, params in [({}, {}), (AUTH, {}), ({}, {"token": "ops-secret"})]:
                resp = await client.get(path, headers=headers, params=params)
                assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized", path
                assert resp.headers["www-authenticate"].startswith("Bearer")
            resp = await client.get(path, headers={"Authorization": "Bearer ops-secret"})
            assert resp.status_code == 200, path
        assert (await client.post("/v1/verifications", json={"phone": US}, headers=AUTH)).status_code == 201


async def test_ops_endpoints_can_leave_the_main_app(lifespan: Lifespan) -> None:
    """create_app(ops=False) serves no /metrics or /healthz; create_ops_app serves only those."""
    from otp_router.webapp import create_ops_app

    main = Starlette(routes=[Mount("/", app=create_app(ops=False))], lifespan=lifespan)
    async with served(main) as client:
        assert (await client.get("/metrics")).status_code == 404
        assert (await client.get("/healthz")).status_code == 404
        assert (await client.get("/openapi.json")).json()["paths"].get("/healthz") is None
    ops = Starlette(routes=[Mount("/", app=create_ops_app())], lifespan=Lifespan())
    async with served(ops) as client:
        assert (await client.get("/healthz")).status_code == 200
        assert "otp_router_" in (await client.get("/metrics")).text
        assert (await client.post("/v1/verifications", json={"phone": US}, headers=AUTH)).status_code == 404
