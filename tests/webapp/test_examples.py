"""The example login apps in examples/, run against the emulators as a user would run them.

Each app reads its settings from ``OTP_ROUTER_*`` (pointing at the emulators)
when it starts, never at import. The code is read from the emulator's inbox
(what reached the phone), with a number of its own per test, so no other
verification's message can be read as this one's.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from webapp_helpers import served

from otp_router import SyncOtpRouter
from otp_router.emulators import (
    DEFAULT_ACCOUNT_SID,
    DEFAULT_AUTH_TOKEN,
    DEFAULT_TELEGRAM_TOKEN,
    EmulatorPair,
    Script,
)
from otp_router.errors import ConfigError
from otp_router.harness import FROM_NUMBER

EXAMPLES = Path(__file__).parents[2] / "examples"
#: Distinct German mobile numbers, one per flow.
OK, WRONG, FAILING = "+4915123450101", "+4915123450102", "+4915123450103"


def load(name: str) -> ModuleType:
    """Import examples/<name>.py by path (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (Pydantic looks its module up there)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
async def emulators(
    make_emulators: Callable[[Script], Awaitable[EmulatorPair]], monkeypatch: pytest.MonkeyPatch
) -> EmulatorPair:
    """Both emulators, fast, with FAILING unreachable everywhere; OTP_ROUTER_* points at them."""
    script = Script(time_scale=0.01)
    script.set(FAILING, telegram="absent", sms_invalid=True)
    pair = await make_emulators(script)
    for name, value in {
        "STORE_URL": "memory://",
        "CODE_SECRET": "example-secret",
        "API_TOKEN": "example-api-token",
        "RETRY__BACKOFF": "false",
        "TELEGRAM__BASE_URL": pair.telegram_url,
        "TELEGRAM__TOKEN": DEFAULT_TELEGRAM_TOKEN,
        "TWILIO__BASE_URL": pair.twilio_url,
        "TWILIO__ACCOUNT_SID": DEFAULT_ACCOUNT_SID,
        "TWILIO__AUTH_TOKEN": DEFAULT_AUTH_TOKEN,
        "TWILIO__FROM_NUMBER": FROM_NUMBER,
    }.items():
        monkeypatch.setenv("OTP_ROUTER_" + name, value)
    return pair


async def code_for(pair: EmulatorPair, phone: str) -> str:
    """The code that reached ``phone`` on Telegram (bounded wait, no timing assertion)."""
    for _ in range(2000):
        codes = pair.telegram.inbox(phone)
        if codes:
            assert len(codes) == 1
            return codes[0]
        await asyncio.sleep(0.01)
    raise AssertionError("no code reached the phone")


def other_than(code: str) -> str:
    return "0" * len(code) if code != "0" * len(code) else "1" * len(code)


def test_importing_the_examples_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an invalid OTP_ROUTER_* variable both modules import; only building the Flask app reads it."""
    monkeypatch.setenv("OTP_ROUTER_CODE_LENGTH", "99")
    assert load("fastapi_login").app.title == "Example login"
    flask_login = load("flask_login")
    with pytest.raises(ConfigError, match="OTP_ROUTER_CODE_LENGTH"):
        flask_login.create_app()


async def test_fastapi_example(emulators: EmulatorPair) -> None:
    """start → the code from the inbox → check logs in; a wrong code is a 401 with attempts left; a
    number no channel can reach is a 502; otp-router's own API is mounted under /otp."""
    app = load("fastapi_login").app
    async with served(app) as client:
        resp = await client.post("/login/start", json={"phone": OK})
        assert resp.status_code == 201, resp.text
        started = resp.json()
        assert started["channel"] == "telegram"
        code = await code_for(emulators, OK)
        resp = await client.post(
            "/login/check", json={"verification_id": started["verification_id"], "code": code}
        )
        assert resp.status_code == 200 and resp.json() == {"logged_in": True}

        wrong = (await client.post("/login/start", json={"phone": WRONG})).json()
        other = other_than(await code_for(emulators, WRONG))
        resp = await client.post(
            "/login/check", json={"verification_id": wrong["verification_id"], "code": other}
        )
        assert resp.status_code == 401
        assert resp.json()["detail"] == {"status": "invalid", "attempts_left": 4}

        resp = await client.post("/login/start", json={"phone": FAILING})
        assert resp.status_code == 502 and "could not send" in resp.json()["detail"]
        assert emulators.telegram.inbox(FAILING) == [] and emulators.twilio.inbox(FAILING) == []

        resp = await client.get(
            f"/otp/v1/verifications/{wrong['verification_id']}",
            headers={"Authorization": "Bearer example-api-token"},
        )
        assert resp.status_code == 200 and resp.json()["attempts_left"] == 4


async def test_flask_example(emulators: EmulatorPair) -> None:
    """The same flows through the Flask app and its SyncOtpRouter (requests run in threads, as under
    a WSGI server, while the emulators answer on this loop)."""
    flask_login = load("flask_login")
    otp = await asyncio.to_thread(SyncOtpRouter)
    try:
        client = flask_login.create_app(otp).test_client()

        async def post(path: str, body: dict[str, str]) -> tuple[int, Any]:
            resp = await asyncio.to_thread(client.post, path, json=body)
            return resp.status_code, resp.get_json()

        status, started = await post("/login/start", {"phone": OK})
        assert status == 201 and started["channel"] == "telegram"
        code = await code_for(emulators, OK)
        assert await post("/login/check", {"verification_id": started["verification_id"], "code": code}) == (
            200,
            {"logged_in": True},
        )

        _, wrong = await post("/login/start", {"phone": WRONG})
        other = other_than(await code_for(emulators, WRONG))
        status, body = await post(
            "/login/check", {"verification_id": wrong["verification_id"], "code": other}
        )
        assert (status, body) == (401, {"status": "invalid", "attempts_left": 4})

        status, body = await post("/login/start", {"phone": FAILING})
        assert status == 502 and "could not send" in body["error"]
    finally:
        await asyncio.to_thread(otp.close)


@pytest.fixture(autouse=True)
def _no_stray_modules() -> Iterator[None]:
    # load() imports by path under example_* names; keep them out of sys.modules between tests.
    yield
    for name in [n for n in sys.modules if n.startswith("example_")]:
        del sys.modules[name]
