"""The blocking facade runs the async router on its own loop thread."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from otp_router import SyncOtpRouter
from otp_router.config import Settings
from otp_router.errors import InvalidPhoneNumber
from otp_router.metrics import Metrics
from otp_router.providers.base import ChannelName, DeliveryState, FakeChannel, ProbeResult, SendResult
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore


def build() -> tuple[SyncOtpRouter, list[Any]]:
    sent: list[Any] = []

    async def telegram(method: str, arg: Any) -> Any:
        if method == "probe":
            return ProbeResult(True, ref="r1")
        if method == "send":
            sent.append(arg)
            return SendResult(ref="r1", state=DeliveryState.SENT)
        return None

    def factory() -> OtpRouter:
        return OtpRouter(
            store=MemoryStore(),
            channels={ChannelName.TELEGRAM: FakeChannel(ChannelName.TELEGRAM, telegram, provider="telegram")},
            settings=Settings(code_secret="s"),
            metrics=Metrics(CollectorRegistry()),
            run_deadlines=False,
        )

    return SyncOtpRouter(factory), sent


def test_blocking_start_and_check_from_several_threads() -> None:
    """Request threads share one facade: starts and checks block until done."""
    router, sent = build()
    with router:
        results: list[bool] = []

        def login(i: int) -> None:
            v = router.start(f"+4474001200{i:02d}")
            code = next(s.code for s in sent if s.payload == v.id)
            results.append(router.check(v.id, code).valid)

        threads = [threading.Thread(target=login, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [True] * 8


def test_errors_propagate_unchanged() -> None:
    """Typed errors from the async router reach the caller as the same types."""
    router, _ = build()
    with router, pytest.raises(InvalidPhoneNumber):
        router.start("12345")


def test_close_is_idempotent() -> None:
    """Closing twice is harmless."""
    router, _ = build()
    router.close()
    router.close()
