"""Signed Telegram delivery reports and Twilio status callbacks: applied, refused, replayed."""

from __future__ import annotations

import logging
from urllib.parse import urlencode

import pytest
from prometheus_client import CollectorRegistry
from twilio.request_validator import RequestValidator
from webapp_helpers import (
    NOW,
    PUBLIC,
    TG_TOKEN,
    TW_TOKEN,
    US,
    Factory,
    post_tg,
    post_twilio,
    start_on_sms,
    telegram_handler,
    tg_body,
    twilio_form,
    twilio_signature,
    webhook_count,
)

from otp_router.config import TelegramSettings
from otp_router.providers.base import DeliveryState
from otp_router.providers.telegram import sign_report


async def test_telegram_report_is_applied(make_env: Factory, registry: CollectorRegistry) -> None:
    """A correctly signed delivery report marks the verification delivered."""
    env = await make_env()
    vid = await env.start()
    resp = await post_tg(env, tg_body(vid))
    assert resp.status_code == 200 and resp.json() == {"ok": True, "outcome": "accepted"}
    assert (await env.router.get(vid)).delivered
    assert webhook_count(registry, "telegram", "accepted") == 1


@pytest.mark.parametrize(
    ("case", "outcome"),
    [("forged", "invalid_signature"), ("tampered", "invalid_signature"), ("stale", "stale")],
)
async def test_telegram_refused_report_changes_nothing(
    make_env: Factory, registry: CollectorRegistry, case: str, outcome: str
) -> None:
    """A forged signature, a tampered body or a stale timestamp is a 403 and the state stays as it was."""
    env = await make_env()
    vid = await env.start()
    before = await env.record(vid)
    body = tg_body(vid)
    if case == "forged":
        resp = await post_tg(env, body, token="not-the-token")
    elif case == "tampered":
        signed = sign_report(TG_TOKEN, str(int(NOW)), tg_body(vid, status="sent"))
        resp = await post_tg(env, body, sig=signed)
    else:
        resp = await post_tg(env, body, ts=NOW - 301)
    assert resp.status_code == 403
    assert resp.json()["error"]["code"] == ("stale_webhook" if case == "stale" else "invalid_signature")
    assert await env.record(vid) == before
    assert webhook_count(registry, "telegram", outcome) == 1


async def test_telegram_missing_headers_are_refused(make_env: Factory) -> None:
    """A report without the signature headers is a 403."""
    env = await make_env()
    vid = await env.start()
    resp = await env.client.post("/webhooks/telegram", content=tg_body(vid))
    assert resp.status_code == 403


async def test_telegram_replayed_report_is_a_duplicate(
    make_env: Factory, registry: CollectorRegistry
) -> None:
    """The same report again (a Telegram retry or a replay in the window) is 200 and changes nothing."""
    env = await make_env()
    vid = await env.start()
    body = tg_body(vid)
    assert (await post_tg(env, body)).status_code == 200
    after_first = await env.record(vid)
    resp = await post_tg(env, body)
    assert resp.status_code == 200 and resp.json()["outcome"] == "duplicate"
    assert await env.record(vid) == after_first
    assert webhook_count(registry, "telegram", "duplicate") == 1


async def test_telegram_malformed_signed_body_is_400(make_env: Factory, registry: CollectorRegistry) -> None:
    """A correctly signed body that is not a RequestStatus is a 400 bad_request."""
    env = await make_env()
    resp = await post_tg(env, b"{not json")
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_request"
    assert webhook_count(registry, "telegram", "bad_request") == 1


@pytest.mark.parametrize(
    "body",
    [
        b'{"request_id": "req-1", "request_id": "req-2", "delivery_status": {"status": "delivered"}}',
        b'{"request_id": "req-1", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        b'{"request_id": "req-\xff", "delivery_status": {"status": "delivered"}}',
        b'{"request_id": "req-\\ud800", "delivery_status": {"status": "delivered"}}',
        b'{"request_id": "req-1", "request_cost": NaN, "delivery_status": {"status": "delivered"}}',
    ],
    ids=["repeated-key", "recursion", "invalid-utf8", "escaped-surrogate", "nan"],
)
async def test_telegram_hostile_signed_json_is_400_and_changes_nothing(
    make_env: Factory, registry: CollectorRegistry, body: bytes
) -> None:
    """A correctly signed report with a repeated key, absurd nesting, bytes that are not UTF-8, an
    unpaired surrogate or NaN is a 400 (never a 500): the verification is untouched."""
    env = await make_env()
    vid = await env.start()
    before = await env.record(vid)
    resp = await post_tg(env, body)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_request"
    assert webhook_count(registry, "telegram", "bad_request") == 1
    assert await env.record(vid) == before


@pytest.mark.parametrize("vid", ["v_unknown", None, "v_\x00", "v_\u2028" * 100])
async def test_telegram_unknown_verification_is_acknowledged(
    make_env: Factory, registry: CollectorRegistry, caplog: pytest.LogCaptureFixture, vid: str | None
) -> None:
    """A signed report for no known verification is 200 (retries cannot help), logged without the phone."""
    env = await make_env()
    with caplog.at_level(logging.DEBUG):
        resp = await post_tg(env, tg_body(vid))
    assert resp.status_code == 200 and resp.json()["outcome"] == "ignored"
    assert webhook_count(registry, "telegram", "bad_request") == 1
    assert "ignored" in caplog.text and US[2:] not in caplog.text


async def test_telegram_without_token_refuses_everything(make_env: Factory) -> None:
    """With no Telegram token configured, even a report signed with the empty token is refused."""
    env = await make_env(telegram=TelegramSettings())
    vid = await env.start()
    before = await env.record(vid)
    resp = await post_tg(env, tg_body(vid), token="")
    assert resp.status_code == 403
    assert await env.record(vid) == before


async def test_oversized_webhook_body_is_413(make_env: Factory) -> None:
    """A body beyond the webhook limit is refused before any signature work."""
    env = await make_env()
    resp = await post_tg(env, b"x" * (64 * 1024 + 1))
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "payload_too_large"


async def test_twilio_callback_is_applied(make_env: Factory, registry: CollectorRegistry) -> None:
    """A correctly signed status callback marks the SMS delivered."""
    env = await make_env(tg=telegram_handler(reachable=False))
    vid = await start_on_sms(env)
    resp = await post_twilio(env, vid, twilio_form())
    assert resp.status_code == 200 and resp.json()["outcome"] == "accepted"
    assert (await env.router.get(vid)).delivered
    assert webhook_count(registry, "twilio", "accepted") == 1


@pytest.mark.parametrize("case", ["forged", "tampered", "internal_url", "other_vid", "unsigned"])
async def test_twilio_refused_callback_changes_nothing(
    make_env: Factory, registry: CollectorRegistry, case: str
) -> None:
    """Forged, tampered, wrongly addressed or unsigned callbacks are 403 and change nothing."""
    env = await make_env(tg=telegram_handler(reachable=False), base_url="http://internal:8080")
    vid = await start_on_sms(env)
    before = await env.record(vid)
    form = twilio_form()
    if case == "forged":
        resp = await post_twilio(env, vid, form, token="not-the-token")
    elif case == "tampered":
        resp = await post_twilio(env, vid, form, signed_form=twilio_form(status="undelivered"))
    elif case == "internal_url":
        # Signed for the URL the app sees: the Host header must not be trusted.
        resp = await post_twilio(env, vid, form, sign_url="http://internal:8080/webhooks/twilio")
    elif case == "other_vid":
        # The verification id is part of the signed URL.
        url = f"{PUBLIC}/webhooks/twilio?vid=v_other"
        signature = RequestValidator(TW_TOKEN).compute_signature(url, form)
        resp = await env.client.post(
            f"/webhooks/twilio?vid={vid}", data=form, headers={"X-Twilio-Signature": signature}
        )
    else:
        resp = await env.client.post(f"/webhooks/twilio?vid={vid}", data=form)
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "invalid_signature"
    assert await env.record(vid) == before
    assert webhook_count(registry, "twilio", "invalid_signature") == 1


async def test_twilio_replayed_callback_changes_nothing(
    make_env: Factory, registry: CollectorRegistry
) -> None:
    """Replaying captured callbacks (the same one, or an older 'sent') is 200 and leaves the state alone."""
    env = await make_env(tg=telegram_handler(reachable=False))
    vid = await start_on_sms(env)
    sent, delivered = twilio_form(status="sent"), twilio_form(status="delivered")
    assert (await post_twilio(env, vid, sent)).json()["outcome"] == "accepted"
    assert (await post_twilio(env, vid, delivered)).json()["outcome"] == "accepted"
    after = await env.record(vid)
    for replay in (delivered, sent):
        resp = await post_twilio(env, vid, replay)
        assert resp.status_code == 200 and resp.json()["outcome"] == "duplicate"
    assert await env.record(vid) == after
    assert (await env.state(vid)).attempts[-1].delivery is DeliveryState.DELIVERED
    assert webhook_count(registry, "twilio", "duplicate") == 2


async def test_twilio_behind_a_proxy_validates_against_the_public_url(make_env: Factory) -> None:
    """The app sees an internal host but checks the signature against the configured public URL."""
    env = await make_env(
        tg=telegram_handler(reachable=False),
        base_url="http://10.0.0.7:8080",
        public_url="https://example.org/otp/",
    )
    vid = await start_on_sms(env)
    resp = await post_twilio(env, vid, twilio_form(), sign_url="https://example.org/otp/webhooks/twilio")
    assert resp.status_code == 200 and resp.json()["outcome"] == "accepted"


async def test_twilio_mounted_app_uses_its_own_relative_path(make_env: Factory) -> None:
    """Mounted under a prefix, the signed URL is public_url + the path inside the app."""
    env = await make_env(
        tg=telegram_handler(reachable=False),
        mount="/otp",
        app_kwargs={"public_url": "https://example.org/otp"},
    )
    vid = await start_on_sms(env)
    resp = await post_twilio(
        env,
        vid,
        twilio_form(),
        sign_url="https://example.org/otp/webhooks/twilio",
        path="/otp/webhooks/twilio",
    )
    assert resp.status_code == 200, resp.text


async def test_twilio_repeated_form_fields_are_all_signed(make_env: Factory) -> None:
    """Every value of a repeated field counts: the genuine callback passes, dropping a value fails."""
    env = await make_env(tg=telegram_handler(reachable=False))
    vid = await start_on_sms(env)
    pairs = [*twilio_form().items(), ("Tag", "a"), ("Tag", "b")]
    url = f"{PUBLIC}/webhooks/twilio?vid={vid}"
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    forged = twilio_signature(url, [p for p in pairs if p != ("Tag", "b")])
    resp = await env.client.post(
        f"/webhooks/twilio?vid={vid}",
        content=urlencode(pairs),
        headers={**headers, "X-Twilio-Signature": forged},
    )
    assert resp.status_code == 403
    genuine = twilio_signature(url, pairs)
    resp = await env.client.post(
        f"/webhooks/twilio?vid={vid}",
        content=urlencode(pairs),
        headers={**headers, "X-Twilio-Signature": genuine},
    )
    assert resp.status_code == 200 and resp.json()["outcome"] == "accepted"


async def test_twilio_signed_callback_without_sid_is_400(
    make_env: Factory, registry: CollectorRegistry
) -> None:
    """A signed form without MessageSid/MessageStatus is a 400."""
    env = await make_env()
    resp = await post_twilio(env, "v_x", {"AccountSid": "AC123"})
    assert resp.status_code == 400
    assert webhook_count(registry, "twilio", "bad_request") == 1


async def test_twilio_without_public_url_refuses(make_env: Factory) -> None:
    """Without a public URL there is nothing to check the signature against: 403."""
    env = await make_env(public_url=None)
    resp = await post_twilio(env, "v_x", twilio_form(), sign_url="http://testserver/webhooks/twilio")
    assert resp.status_code == 403
