"""The example login apps in examples/, run against the emulators as a user would test them.

The emulators and the ``OTP_ROUTER_*`` environment pointing at them come from
otp-router's own pytest plugin (``otp_environ``, :mod:`otp_router.testing`);
each app reads that environment when it starts, never at import. The code is
the one the plugin saw reach the phone for that verification id.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from webapp_helpers import served

from otp_router import SyncOtpRouter
from otp_router.errors import ConfigError
from otp_router.testing import EmulatedProviders

EXAMPLES = Path(__file__).parents[2] / "examples"
OK = WRONG = "+4915123450101"  # one number: codes are told apart by verification id
FAILING = "+4915123450103"


def load(name: str) -> ModuleType:
    """Import examples/<name>.py by path (the folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # as an import would (Pydantic looks its module up there)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def providers(otp_environ: EmulatedProviders, monkeypatch: pytest.MonkeyPatch) -> EmulatedProviders:
    """The plugin's emulators and environment, with FAILING unreachable on every channel and the
    HTTP API enabled."""
    otp_environ.script.set(FAILING, telegram="absent", sms_invalid=True)
    monkeypatch.setenv("OTP_ROUTER_API_TOKEN", "example-api-token")
    return otp_environ


async def code_for(providers: EmulatedProviders, verification_id: str) -> str:
    code = await providers.wait_code(verification_id)
    assert code is not None, "no code reached the phone"
    return code


def other_than(code: str) -> str:
    return "0" * len(code) if code != "0" * len(code) else "1" * len(code)


def test_importing_the_examples_reads_no_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With an invalid OTP_ROUTER_* variable both modules import; only building the Flask app reads it."""
    monkeypatch.setenv("OTP_ROUTER_CODE_LENGTH", "99")
    assert load("fastapi_login").app.title == "Example login"
    flask_login = load("flask_login")
    with pytest.raises(ConfigError, match="OTP_ROUTER_CODE_LENGTH"):
        flask_login.create_app()


async def test_fastapi_example(providers: EmulatedProviders) -> None:
    """start → the code from the inbox → check logs in; a wrong code is a 401 with attempts left; a
    number no channel can reach is a 502; otp-router's own API is mounted under /otp."""
    app = load("fastapi_login").app
    async with served(app) as client:
        resp = await client.post("/login/start", json={"phone": OK})
        assert resp.status_code == 201, resp.text
        started = resp.json()
        assert started["channel"] == "telegram"
        code = await code_for(providers, started["verification_id"])
        resp = await client.post(
            "/login/check", json={"verification_id": started["verification_id"], "code": code}
        )
        assert resp.status_code == 200 and resp.json() == {"logged_in": True}

        wrong = (await client.post("/login/start", json={"phone": WRONG})).json()
        other = other_than(await code_for(providers, wrong["verification_id"]))
        resp = await client.post(
            "/login/check", json={"verification_id": wrong["verification_id"], "code": other}
        )
        assert resp.status_code == 401
        assert resp.json()["detail"] == {"status": "invalid", "attempts_left": 4}

        resp = await client.post("/login/start", json={"phone": FAILING})
        assert resp.status_code == 502 and "could not send" in resp.json()["detail"]
        assert providers.pair.telegram.inbox(FAILING) == [] and providers.pair.twilio.inbox(FAILING) == []

        resp = await client.get(
            f"/otp/v1/verifications/{wrong['verification_id']}",
            headers={"Authorization": "Bearer example-api-token"},
        )
        assert resp.status_code == 200 and resp.json()["attempts_left"] == 4


def test_flask_example(providers: EmulatedProviders) -> None:
    """The same flows through the Flask app and its SyncOtpRouter, in a plain (sync) test."""
    flask_login = load("flask_login")
    with SyncOtpRouter() as otp:
        client = flask_login.create_app(otp).test_client()

        def post(path: str, body: dict[str, str]) -> tuple[int, Any]:
            resp = client.post(path, json=body)
            return resp.status_code, resp.get_json()

        status, started = post("/login/start", {"phone": OK})
        assert status == 201 and started["channel"] == "telegram"
        code = providers.sent_code(started["verification_id"])
        assert code is not None
        login = {"verification_id": started["verification_id"], "code": code}
        assert post("/login/check", login) == (200, {"logged_in": True})

        _, wrong = post("/login/start", {"phone": WRONG})
        sent = providers.sent_code(wrong["verification_id"])
        assert sent is not None
        login = {"verification_id": wrong["verification_id"], "code": other_than(sent)}
        assert post("/login/check", login) == (401, {"status": "invalid", "attempts_left": 4})

        status, body = post("/login/start", {"phone": FAILING})
        assert status == 502 and "could not send" in body["error"]


@pytest.fixture(autouse=True)
def _no_stray_modules() -> Iterator[None]:
    # load() imports by path under example_* names; keep them out of sys.modules between tests.
    yield
    for name in [n for n in sys.modules if n.startswith("example_")]:
        del sys.modules[name]
