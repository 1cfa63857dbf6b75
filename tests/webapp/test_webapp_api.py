"""The /v1/verifications API: authentication, input rules, status codes and error bodies."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from webapp_helpers import API_TOKEN, AUTH, US, Factory

from otp_router.config import FraudSettings, LimitSettings
from otp_router.harness import sample_numbers


async def test_start_then_check_valid(make_env: Factory) -> None:
    """Start returns 201 with the verification; the code that was sent checks as valid."""
    env = await make_env()
    resp = await env.client.post("/v1/verifications", json={"phone": US}, headers=AUTH)
    assert resp.status_code == 201
    body = resp.json()
    assert body["status"] == "pending" and body["channel"] == "telegram" and body["region"] == "US"
    assert resp.headers["location"] == f"/v1/verifications/{body['id']}"
    assert US[2:] not in resp.text
    code = env.sent_code(env.tg)
    resp = await env.client.post(f"/v1/verifications/{body['id']}/check", json={"code": code}, headers=AUTH)
    assert resp.status_code == 200
    assert resp.json() == {"id": body["id"], "status": "valid", "valid": True, "attempts_left": 5}
    resp = await env.client.get(f"/v1/verifications/{body['id']}", headers=AUTH)
    assert resp.json()["status"] == "verified"


async def test_wrong_code_is_invalid_with_attempts_left(make_env: Factory) -> None:
    """A wrong code answers 200 invalid with the attempts that remain."""
    env = await make_env()
    vid = await env.start()
    wrong = "000000" if env.sent_code(env.tg) != "000000" else "111111"
    resp = await env.client.post(f"/v1/verifications/{vid}/check", json={"code": wrong}, headers=AUTH)
    assert resp.status_code == 200
    assert resp.json() == {"id": vid, "status": "invalid", "valid": False, "attempts_left": 4}


async def test_malformed_code_is_invalid_code(make_env: Factory) -> None:
    """A code that is not digits is a 400 invalid_code (no attempt used)."""
    env = await make_env()
    vid = await env.start()
    resp = await env.client.post(f"/v1/verifications/{vid}/check", json={"code": "12ab56"}, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_code"
    assert (await env.router.get(vid)).attempts_left == 5


async def test_check_unknown_id_is_not_found_status(make_env: Factory) -> None:
    """Checking an unknown id is a 200 whose status is not_found."""
    env = await make_env()
    resp = await env.client.post("/v1/verifications/v_nope/check", json={"code": "123456"}, headers=AUTH)
    assert resp.status_code == 200 and resp.json()["status"] == "not_found"


async def test_bad_phone_is_400_without_channel_calls(
    make_env: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    """A bad number is a 400 invalid_phone_number; nothing is sent; the number is not echoed or logged."""
    env = await make_env()
    with caplog.at_level(logging.DEBUG):
        resp = await env.client.post("/v1/verifications", json={"phone": "+1202555014"}, headers=AUTH)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "invalid_phone_number"
    assert env.tg.calls == [] and env.sms.calls == []
    assert "202555014" not in resp.text and "202555014" not in caplog.text


async def test_premium_rate_number_is_422_without_channel_calls(make_env: Factory) -> None:
    """A premium-rate number is a 422 unsupported_number_type naming the type; nothing sent or stored."""
    env = await make_env()
    resp = await env.client.post("/v1/verifications", json={"phone": "+449012345678"}, headers=AUTH)
    assert resp.status_code == 422
    error = resp.json()["error"]
    assert error["code"] == "unsupported_number_type" and "premium_rate" in error["message"]
    assert env.tg.calls == [] and env.sms.calls == []
    assert "9012345678" not in resp.text


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_TOKEN}"}],
    ids=["missing", "wrong", "not-bearer"],
)
async def test_missing_or_wrong_token_is_401(make_env: Factory, headers: dict[str, str]) -> None:
    """Without the right bearer token every API route is 401 and nothing is sent."""
    env = await make_env()
    resp = await env.client.post("/v1/verifications", json={"phone": US}, headers=headers)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    assert resp.headers["www-authenticate"].startswith("Bearer")
    assert (await env.client.get("/v1/verifications/v_x", headers=headers)).status_code == 401
    assert env.tg.calls == []


async def test_api_is_disabled_without_a_token(make_env: Factory) -> None:
    """With no OTP_ROUTER_API_TOKEN the API answers 404 and sends nothing."""
    env = await make_env(api_token=None)
    resp = await env.client.post("/v1/verifications", json={"phone": US}, headers=AUTH)
    assert resp.status_code == 404 and "disabled" in resp.json()["error"]["message"]
    assert env.tg.calls == []


async def test_get_variants_with_query_token(make_env: Factory) -> None:
    """GET start and GET check with query parameters work, with the token in the query."""
    env = await make_env()
    resp = await env.client.get("/v1/verifications/start", params={"phone": US, "token": API_TOKEN})
    assert resp.status_code == 201
    vid = resp.json()["id"]
    code = env.sent_code(env.tg)
    resp = await env.client.get(f"/v1/verifications/{vid}/check", params={"code": code, "token": API_TOKEN})
    assert resp.status_code == 200 and resp.json()["status"] == "valid"
    resp = await env.client.get("/v1/verifications/start", params={"phone": US, "token": "wrong"})
    assert resp.status_code == 401


async def test_form_encoded_bodies(make_env: Factory) -> None:
    """Form-encoded start and check bodies are accepted like JSON ones."""
    env = await make_env()
    resp = await env.client.post(
        "/v1/verifications", data={"phone": "(202) 555-0143", "default_region": "US"}, headers=AUTH
    )
    assert resp.status_code == 201
    vid = resp.json()["id"]
    resp = await env.client.post(
        f"/v1/verifications/{vid}/check", data={"code": env.sent_code(env.tg)}, headers=AUTH
    )
    assert resp.json()["status"] == "valid"


_JSON = {"Content-Type": "application/json"}
_FORM = {"Content-Type": "application/x-www-form-urlencoded"}


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"json": {"phone": US, "idempotency": "k"}}, "'idempotency'"),
        ({"json": {"phone": 12025550143}}, "'phone' must be a string"),
        ({"json": {"default_region": "US"}}, "missing field: 'phone'"),
        ({"json": [US]}, "JSON object"),
        ({"content": b'{"phone": "+1202', "headers": _JSON}, "not valid JSON"),
        (
            {"content": "phone=1&phone=2", "headers": _FORM},
            "more",
        ),
        (
            {"content": b'{"phone": "+12025550143", "phone": "+12025550144"}', "headers": _JSON},
            "repeated key",
        ),
        ({"content": b'{"phone": ' + b"[" * 5000 + b"]" * 5000 + b"}", "headers": _JSON}, "nested"),
        ({"content": b'{"phone": "+1202555\xff0143"}', "headers": _JSON}, "UTF-8"),
        (
            {"content": b'{"phone": "+12025550143", "idempotency_key": "\\udc80"}', "headers": _JSON},
            "surrogate",
        ),
        ({"content": b"phone=%2B12025550143&idempotency_key=%FF", "headers": _FORM}, "UTF-8"),
    ],
    ids=[
        "unknown",
        "not-string",
        "missing",
        "not-object",
        "bad-json",
        "repeated",
        "repeated-json-key",
        "recursion",
        "invalid-utf8",
        "escaped-surrogate",
        "form-invalid-utf8",
    ],
)
async def test_bad_fields_are_400_naming_the_problem(
    make_env: Factory, kwargs: dict[str, Any], needle: str
) -> None:
    """Unknown, non-string, missing or repeated fields and broken bodies are 400s that say what is wrong."""
    env = await make_env()
    kwargs.setdefault("headers", {})
    kwargs["headers"] = {**kwargs["headers"], **AUTH}
    resp = await env.client.post("/v1/verifications", **kwargs)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "bad_request" and needle in error["message"]
    assert "202555" not in resp.text
    assert env.tg.calls == []


async def test_unsupported_content_type_is_415(make_env: Factory) -> None:
    """A body that is neither JSON nor a form is a 415."""
    env = await make_env()
    resp = await env.client.post(
        "/v1/verifications", content=b"phone", headers={**AUTH, "Content-Type": "text/plain"}
    )
    assert resp.status_code == 415


async def test_idempotent_repeat_is_200_with_same_body(make_env: Factory) -> None:
    """The same idempotency key returns the first verification with 200; another number is a 409."""
    env = await make_env()
    first = await env.client.post(
        "/v1/verifications", json={"phone": US, "idempotency_key": "k1"}, headers=AUTH
    )
    assert first.status_code == 201
    env.clock.now += 1
    again = await env.client.post(
        "/v1/verifications", json={"phone": US, "idempotency_key": "k1"}, headers=AUTH
    )
    assert again.status_code == 200 and again.json() == first.json()
    assert [m for m, _ in env.tg.calls].count("send") == 1
    other = await env.client.post(
        "/v1/verifications", json={"phone": "+12025550144", "idempotency_key": "k1"}, headers=AUTH
    )
    assert other.status_code == 409 and other.json()["error"]["code"] == "idempotency_conflict"
    assert "202555014" not in other.text


async def test_rate_limit_is_429_with_retry_after(make_env: Factory) -> None:
    """Past the per-number limit, start is a 429 rate_limited with a Retry-After in whole seconds."""
    env = await make_env(limits=LimitSettings(per_phone=1, per_phone_window=600))
    await env.start()
    env.clock.now += 10.5
    resp = await env.client.post("/v1/verifications", json={"phone": US}, headers=AUTH)
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limited"
    assert int(resp.headers["retry-after"]) == 590


async def test_conversion_guard_block_is_429_with_retry_after(make_env: Factory) -> None:
    """Unverified starts in one prefix: past the minimum volume, a 429 naming the guard, no number."""
    # No grace: this is about how a block is answered, so the starts are judged at once
    # (tests/test_fraud.py covers the grace itself).
    fraud = FraudSettings(prefix_min_started=5, min_conversion=0.5, block_cooldown=900, conversion_grace=0)
    env = await make_env(limits=LimitSettings(per_prefix=0), fraud=fraud)
    numbers = sample_numbers("ID", 6)
    for phone in numbers[:5]:
        resp = await env.client.post("/v1/verifications", json={"phone": phone}, headers=AUTH)
        assert resp.status_code == 201, resp.text
    calls = len(env.tg.calls) + len(env.sms.calls)
    resp = await env.client.post("/v1/verifications", json={"phone": numbers[5]}, headers=AUTH)
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "rate_limited"
    assert "pumping" in resp.json()["error"]["message"]
    assert int(resp.headers["retry-after"]) == 900
    assert len(env.tg.calls) + len(env.sms.calls) == calls, "refused before any provider call"
    assert numbers[5][3:] not in resp.text


async def test_unknown_id_is_404(make_env: Factory) -> None:
    """GET, cancel and resend of an unknown id are 404 not_found; so is an unknown route."""
    env = await make_env()
    for method, path in [
        ("GET", "/v1/verifications/v_nope"),
        ("POST", "/v1/verifications/v_nope/cancel"),
        ("POST", "/v1/verifications/v_nope/resend"),
        ("GET", "/nowhere"),
    ]:
        resp = await env.client.request(method, path, headers=AUTH)
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "not_found", path


async def test_cancel_and_resend(make_env: Factory) -> None:
    """An early resend is 429 resend_not_allowed with Retry-After; cancel ends the verification."""
    env = await make_env()
    vid = await env.start()
    resp = await env.client.post(f"/v1/verifications/{vid}/resend", headers=AUTH)
    assert resp.status_code == 429 and resp.json()["error"]["code"] == "resend_not_allowed"
    assert int(resp.headers["retry-after"]) >= 1
    resp = await env.client.post(f"/v1/verifications/{vid}/cancel", headers=AUTH)
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"


async def test_resend_after_cooldown_moves_to_sms(make_env: Factory) -> None:
    """After the cooldown a resend is accepted and goes out by SMS."""
    env = await make_env()
    vid = await env.start()
    env.clock.now += 31
    resp = await env.client.post(f"/v1/verifications/{vid}/resend", headers=AUTH)
    assert resp.status_code == 200, resp.text
    assert resp.json()["channel"] == "sms"


@pytest.mark.parametrize(
    "query",
    [
        f"phone={US}",  # the plus typed as is (a no-code bot builder's URL)
        "phone=+1+202+555+0143",  # form encoding's spaces between groups: only the first + is a plus
        f"phone=%2B{US[1:]}",
        f"default_region=DE&phone={US}",
    ],
    ids=["literal-plus", "plus-spaces", "encoded", "with-region"],
)
async def test_get_start_reads_a_literal_plus_as_a_plus(make_env: Factory, query: str) -> None:
    """GET start with ?phone=+1202… (plus not encoded) starts a verification for that number."""
    env = await make_env()
    resp = await env.client.get(f"/v1/verifications/start?{query}&token={API_TOKEN}")
    assert resp.request.url.query == f"{query}&token={API_TOKEN}".encode()  # sent as typed
    assert resp.status_code == 201, resp.text
    assert resp.json()["region"] == "US"
    sent = env.tg.calls[-1][1]
    assert sent.phone == US


async def test_a_plus_elsewhere_in_a_query_is_still_a_space(make_env: Factory) -> None:
    """The literal plus rule is for phone fields only: an idempotency key keeps form encoding."""
    env = await make_env()
    first = await env.client.get(f"/v1/verifications/start?phone={US}&idempotency_key=a+b", headers=AUTH)
    again = await env.client.post(
        "/v1/verifications", json={"phone": US, "idempotency_key": "a b"}, headers=AUTH
    )
    assert first.status_code == 201 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
