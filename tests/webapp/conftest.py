"""Fixtures for the web app tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import Mount
from webapp_helpers import (
    API_TOKEN,
    PUBLIC,
    TG_TOKEN,
    TW_TOKEN,
    Clock,
    Env,
    Factory,
    Handler,
    sms_handler,
    telegram_handler,
)

from otp_router.config import Settings, TelegramSettings, TwilioSettings
from otp_router.metrics import Metrics
from otp_router.providers.base import ChannelName, FakeChannel
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore
from otp_router.webapp import create_app


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
async def make_env(registry: CollectorRegistry) -> AsyncIterator[Factory]:
    """Factory for an opened router behind the app; closes everything afterwards."""
    opened: list[tuple[OtpRouter, httpx.AsyncClient]] = []
    shared = Metrics(registry)

    async def make(
        *,
        tg: Handler | None = None,
        metrics: Metrics | None = None,
        base_url: str = "http://testserver",
        app_kwargs: dict[str, Any] | None = None,
        mount: str | None = None,
        **settings: Any,
    ) -> Env:
        clock = Clock()
        telegram = FakeChannel(ChannelName.TELEGRAM, tg or telegram_handler(), provider="telegram")
        twilio = FakeChannel(ChannelName.SMS, sms_handler, provider="twilio")
        settings.setdefault("code_secret", "test-secret")
        settings.setdefault("api_token", API_TOKEN)
        settings.setdefault("public_url", PUBLIC)
        settings.setdefault("telegram", TelegramSettings(token=TG_TOKEN, callback_max_age=300))
        settings.setdefault("twilio", TwilioSettings(account_sid="AC123", auth_token=TW_TOKEN))
        router = OtpRouter(
            store=MemoryStore(),
            channels={ChannelName.TELEGRAM: telegram, ChannelName.SMS: twilio},
            settings=Settings(**settings),
            metrics=metrics if metrics is not None else shared,
            clock=clock,
            run_deadlines=False,
        )
        await router.open()
        app = create_app(router, **(app_kwargs or {}))
        if mount is not None:
            app = Starlette(routes=[Mount(mount, app=app)])
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=base_url)
        opened.append((router, client))
        env = Env(router, telegram, twilio, client, clock)
        env.prefix = mount or ""
        return env

    yield make
    for router, client in opened:
        await client.aclose()
        await router.aclose()
