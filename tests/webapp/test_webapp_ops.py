"""/openapi.json, /metrics, /healthz, provider pings, log redaction and the missing-extra hint."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from typing import Any

import httpx
import pytest
from openapi_schema_validator import OAS31Validator
from openapi_spec_validator import validate as validate_spec
from webapp_helpers import (
    API_TOKEN,
    AUTH,
    PUBLIC,
    US,
    Factory,
    telegram_handler,
)

from otp_router.errors import InvalidRecipient
from otp_router.metrics import NullMetrics
from otp_router.providers.base import ProbeResult
from otp_router.webapp import RedactQuery, provider_pings


async def test_openapi_document_is_valid(make_env: Factory) -> None:
    """/openapi.json is a valid OpenAPI 3.1 document, and real responses match its schemas."""
    env = await make_env()
    doc = (await env.client.get("/openapi.json")).json()
    validate_spec(doc)
    assert doc["openapi"].startswith("3.1") and doc["servers"] == [{"url": PUBLIC}]

    def check(schema_name: str, instance: Any) -> None:
        root = {"$ref": f"#/components/schemas/{schema_name}", "components": doc["components"]}
        OAS31Validator(root).validate(instance)

    started = await env.client.post("/v1/verifications", json={"phone": US}, headers=AUTH)
    check("Verification", started.json())
    vid = started.json()["id"]
    check(
        "CheckResult",
        (await env.client.get(f"/v1/verifications/{vid}/check?code=000000", headers=AUTH)).json(),
    )
    check("Error", (await env.client.get("/v1/verifications/v_nope", headers=AUTH)).json())
    check("Health", (await env.client.get("/healthz")).json())
    for path in ["/v1/verifications", "/v1/verifications/{id}/check", "/webhooks/twilio", "/healthz"]:
        assert path in doc["paths"]
    # Generated from the routes: every status the start endpoint can answer is documented.
    start = doc["paths"]["/v1/verifications"]["post"]
    assert set(start["responses"]) == {
        "200",
        "201",
        "400",
        "401",
        "404",
        "409",
        "413",
        "415",
        "422",
        "429",
        "502",
        "503",
    }
    assert start["responses"]["502"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Error"
    }
    assert {"bearer": []} in start["security"] and {"queryToken": []} in start["security"]


async def test_a_502_matches_the_documented_error_schema(make_env: Factory) -> None:
    """No channel can send: the 502 all_providers_failed body (with the failed verification's id and
    the causes) is an instance of the document's Error schema."""

    async def refuse_sms(method: str, arg: Any) -> Any:
        if method == "send":
            raise InvalidRecipient("landline", provider="twilio", code="21614")
        return ProbeResult(True)

    env = await make_env(tg=telegram_handler(reachable=False))
    env.sms.handler = refuse_sms
    doc = (await env.client.get("/openapi.json")).json()
    resp = await env.client.post("/v1/verifications", json={"phone": US}, headers=AUTH)
    assert resp.status_code == 502, resp.text
    error = resp.json()["error"]
    assert error["code"] == "all_providers_failed" and error["verification_id"].startswith("v_")
    assert set(error["causes"]) == {"telegram", "sms"}
    OAS31Validator({"$ref": "#/components/schemas/Error", "components": doc["components"]}).validate(
        resp.json()
    )


async def test_metrics_endpoint(make_env: Factory) -> None:
    """/metrics serves the Prometheus exposition with otp_router_ metrics."""
    env = await make_env()
    await env.start()
    resp = await env.client.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    assert "otp_router_verifications_started_total" in resp.text


async def test_metrics_without_prometheus_is_503(make_env: Factory) -> None:
    """With NullMetrics, /metrics is a 503 that says what to install."""
    env = await make_env(metrics=NullMetrics())
    resp = await env.client.get("/metrics")
    assert resp.status_code == 503 and "otp-router[metrics]" in resp.text


async def test_healthz_ok_and_failing(make_env: Factory) -> None:
    """/healthz is 200 when every ping answers and 500 naming the failing (or hanging) ones."""

    async def fine() -> None:
        return None

    async def broken() -> None:
        raise ConnectionError("queue down")

    async def hangs() -> None:
        await asyncio.Event().wait()

    env = await make_env(app_kwargs={"pings": {"queue": fine}})
    resp = await env.client.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"ok": ["store", "queue"], "failing": {}}

    env = await make_env(app_kwargs={"pings": {"queue": broken, "twilio": hangs}, "ping_timeout": 0.05})
    resp = await env.client.get("/healthz")
    assert resp.status_code == 500
    body = resp.json()
    assert body["ok"] == ["store"]
    assert body["failing"]["queue"] == "ConnectionError('queue down')"
    assert body["failing"]["twilio"].startswith("PingTimeout(")


async def test_provider_pings_are_reachability_checks(make_env: Factory) -> None:
    """Provider pings GET each base URL; any HTTP answer passes, a transport failure fails."""
    seen: list[str] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        if request.url.host == "api.twilio.com":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(404)

    env = await make_env()
    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
        pings = provider_pings(env.router, client=client)
        assert sorted(pings) == ["telegram", "twilio"]
        await pings["telegram"]()
        with pytest.raises(httpx.ConnectError):
            await pings["twilio"]()
    assert sorted(seen) == ["https://api.twilio.com/", "https://gatewayapi.telegram.org/"]
    for method, _ in env.tg.calls + env.sms.calls:
        assert method not in ("send", "probe")


def test_redact_query_filter() -> None:
    """The access-log filter drops query strings (phone numbers, tokens) from uvicorn records."""
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("1.2.3.4:5", "GET", f"/v1/verifications/start?phone={US}&token={API_TOKEN}", "1.1", 201),
        None,
    )
    assert RedactQuery().filter(record)
    message = record.getMessage()
    assert US not in message and API_TOKEN not in message and "/v1/verifications/start" in message


@pytest.mark.parametrize("module", ["fastapi", "starlette"])
def test_create_app_without_fastapi_names_the_extra(module: str) -> None:
    """Without FastAPI (or its Starlette) installed, create_app raises ConfigError with the pip command;
    importing otp_router.webapp itself needs neither."""
    code = (
        f"import sys; sys.modules[{module!r}] = None\n"
        "from otp_router.errors import ConfigError\n"
        "from otp_router.webapp import create_app\n"
        "try:\n    create_app(None)\nexcept ConfigError as exc:\n    print(exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30)
    assert "pip install 'otp-router[server]'" in out.stdout
