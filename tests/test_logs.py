"""Structured logs: one event and its fields per line (JSON or logfmt), context bound once,
and no phone number, code or secret in any of it."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from test_worker import enqueue_all

from otp_router.config import Settings
from otp_router.emulators import EmulatorPair, Script
from otp_router.errors import ConfigError, ProviderUnavailable
from otp_router.harness import emulated_settings, provider_environ, sample_numbers
from otp_router.logs import StructuredFormatter, bind, event, logfmt
from otp_router.metrics import Metrics
from otp_router.providers.base import ChannelName, DeliveryState, FakeChannel, ProbeResult, SendResult
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore


def record_of(caplog: pytest.LogCaptureFixture, name: str) -> logging.LogRecord:
    [record] = [r for r in caplog.records if getattr(r, "otp_event", None) == name]
    return record


def test_an_event_renders_as_json_and_logfmt_with_its_bound_context(caplog: pytest.LogCaptureFixture) -> None:
    """Fields bound by an outer block appear on the event; the event's own fields win."""
    logger = logging.getLogger("otp_router.test")
    with caplog.at_level(logging.INFO, logger="otp_router.test"):
        with bind(verification="v_1", region="GB"), bind(channel="sms"):
            event(logger, logging.INFO, "sent", region="DE", ms=12.345, skipped=None)
        event(logger, logging.INFO, "outside")
    sent = record_of(caplog, "sent")
    as_json = json.loads(StructuredFormatter("json").format(sent))
    assert {
        k: as_json[k] for k in ("level", "logger", "event", "verification", "channel", "region", "ms")
    } == {
        "level": "info",
        "logger": "otp_router.test",
        "event": "sent",
        "verification": "v_1",
        "channel": "sms",
        "region": "DE",
        "ms": 12.345,
    }
    assert "skipped" not in as_json and as_json["ts"].endswith("Z")
    line = StructuredFormatter("logfmt").format(sent)
    assert " event=sent " in line and " ms=12.3" in line and "verification=v_1" in line
    assert sent.getMessage() == "event=sent verification=v_1 region=DE channel=sms ms=12.3"
    outside = json.loads(StructuredFormatter("json").format(record_of(caplog, "outside")))
    assert "verification" not in outside


def test_other_records_become_message_events_and_odd_values_are_quoted() -> None:
    """A plain log call is the event ``message``; values with spaces, quotes or '=' are JSON-quoted."""
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "plain %s", ("text",), None)
    assert json.loads(StructuredFormatter("json").format(record))["msg"] == "plain text"
    assert logfmt("e", {"a": 'b c"=', "n": 1, "none": None}) == 'event=e a="b c\\"=" n=1'
    with pytest.raises(ValueError):
        StructuredFormatter("xml")


def test_an_unknown_log_format_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTP_ROUTER_LOG_FORMAT", "xml")
    with pytest.raises(ConfigError, match="OTP_ROUTER_LOG_FORMAT"):
        Settings.load()


async def test_deadline_events_carry_the_verification_bound_once(caplog: pytest.LogCaptureFixture) -> None:
    """A status poll that fails at a deadline logs an event naming the verification and the channel,
    bound by the deadline handler and the poll, not passed along by hand."""
    now = [1_700_000_000.0]

    async def telegram(method: str, arg: Any) -> Any:
        if method == "probe":
            return ProbeResult(True, ref="r1")
        if method == "send":
            return SendResult(ref="r1", state=DeliveryState.SENT)
        if method == "status":
            raise ProviderUnavailable("down", provider="telegram")
        return None

    router = OtpRouter(
        store=MemoryStore(),
        channels={ChannelName.TELEGRAM: FakeChannel(ChannelName.TELEGRAM, telegram, provider="telegram")},
        settings=Settings(code_secret=SecretStr("s")),
        metrics=Metrics(CollectorRegistry()),
        clock=lambda: now[0],
        run_deadlines=False,
    )
    async with router:
        v = await router.start("+447400123456")
        now[0] += 3600
        with caplog.at_level(logging.INFO, logger="otp_router"):
            assert await router.fire_due() >= 1
    failed = record_of(caplog, "status_poll_failed")
    fields = failed.otp_fields  # type: ignore[attr-defined]
    assert fields["verification"] == v.id and fields["channel"] == "telegram"
    assert fields["error"] == "ProviderUnavailable"


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(default_delivery=0.05))


@pytest.mark.parametrize("style", ["json", "logfmt"])
async def test_the_worker_logs_one_event_per_line_without_phone_numbers_or_secrets(
    pair: EmulatorPair, tmp_path: Path, style: str
) -> None:
    """``otp-router worker --burst`` with OTP_ROUTER_LOG_FORMAT: every stderr line is one event; the
    processed message names its verification; no phone number, code or secret appears."""
    settings = emulated_settings(
        pair, store_url=f"sqlite:///{tmp_path / 'otp.db'}", code_secret=SecretStr("log-test-secret-value")
    )
    phones = sample_numbers("GB", 2, offset=3)
    pair.script.set(phones[1], telegram="absent")  # an SMS fallback too
    await enqueue_all(settings, phones, prefix="log")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("OTP_ROUTER_", "TWILIO_"))},
        **provider_environ(settings),
        "OTP_ROUTER_LOG_FORMAT": style,
        "OTP_ROUTER_LOG_LEVEL": "DEBUG",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "otp_router", "worker", "--burst", env=env, stdout=-1, stderr=-1
    )
    _, err = await proc.communicate()
    text = err.decode()
    assert proc.returncode == 0, text
    lines = [line for line in text.splitlines() if line.strip()]
    processed = []
    for line in lines:
        if style == "json":
            fields = json.loads(line)
        else:
            assert line.startswith("ts=") and " event=" in line, line
            fields = dict(part.split("=", 1) for part in line.split(" ") if "=" in part)
        assert fields["event"] and fields["level"], line
        if fields["event"] == "processed":
            processed.append(fields)
    assert len(processed) == 2 and all(str(p["verification"]).startswith("v_") for p in processed)
    assert all(p["message"] and "id" not in p for p in processed)  # bound once, not repeated
    codes = [c for phone in phones for c in pair.telegram.inbox(phone)]
    for secret in [*(p[1:] for p in phones), *(p[4:] for p in phones), "log-test-secret-value", *codes]:
        assert secret not in text
    assert settings.twilio.auth_token.get_secret_value() not in text
