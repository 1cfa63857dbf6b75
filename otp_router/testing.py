"""Testing helpers for applications that use otp-router: a pytest plugin.

Installed with the package (entry point ``pytest11``), so a project that
depends on otp-router gets these fixtures without any ``conftest.py``:

``otp_providers``
    The Telegram Gateway and Twilio emulators, serving on loopback in a
    background thread (so sync tests, Flask or Django ones, can use them as
    well as async ones). ``otp_providers.settings()`` gives settings that point
    a router at them; ``otp_providers.sent_code(verification_id)`` is the code
    the user of that verification received.
``otp_environ``
    The same, with the ``OTP_ROUTER_*`` environment set (for an app that
    reads its settings from the environment, e.g. ``SyncOtpRouter()``).

Example::

    def test_login(otp_providers):
        with SyncOtpRouter(settings=otp_providers.settings()) as router:
            v = router.start("+447400123456")
            assert router.check(v.id, otp_providers.sent_code(v.id)).valid

**Codes by verification, not by phone.** ``sent_code`` reads the
verification's own sends from the store (their Telegram request ids and
Twilio SIDs) and returns the code of the newest one that reached the phone.
A late SMS from an earlier verification of the same number is never taken
for the current code. The store must be one the helper can open too: the
SQLite file :meth:`~EmulatedProviders.settings` sets by default, or Redis.
(With a ``memory://`` store only Telegram codes are found, by the message
payload, which carries the verification id.)

**One time scale.** ``@pytest.mark.otp_time_scale(0.05)`` (default: the
``otp_router_time_scale`` ini option, else 0.1) makes the emulators' delays
and ttls run that much faster, and the settings and policy returned here
scale the router's own deadlines and delays by the same factor, so a
fallback to SMS takes 3 s of wall-clock time at 0.1 instead of 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import threading
from collections.abc import Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from otp_router.config import Settings

if TYPE_CHECKING:
    from otp_router.emulators import EmulatorPair, Script
    from otp_router.policy import Policy
    from otp_router.store.base import Store

__all__ = ["EmulatedProviders", "otp_environ", "otp_providers"]

_T = TypeVar("_T")

#: Time scale when neither the marker nor the ini option gives one.
DEFAULT_TIME_SCALE = 0.1
_DIGITS = re.compile(r"\b(\d{4,8})\b")


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))  # a route name or "auto" (str() of a StrEnum is its value)


class EmulatedProviders:
    """Both emulators, serving on loopback from a thread of their own.

    Args:
        workdir: Where the default SQLite store and the scaled policy file go.
        time_scale: Emulated provider seconds per real second (0.1: ten times faster).
        script: Behaviour per number (default: every number reachable, prompt delivery).
    """

    def __init__(
        self, workdir: Path, *, time_scale: float = DEFAULT_TIME_SCALE, script: Script | None = None
    ):
        from otp_router.emulators import Script

        if not 0 < time_scale <= 1:
            raise ValueError("time_scale must be in (0, 1]")
        self.workdir = workdir
        self.time_scale = time_scale
        self.script = script if script is not None else Script(time_scale=time_scale)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="otp-emulators", daemon=True)
        self._thread.start()
        self._stores: dict[str, Store] = {}
        try:
            self.pair: EmulatorPair = self._call(self._serve())
        except BaseException:
            self._stop_loop()
            raise
        self.telegram_url = self.pair.telegram_url
        self.twilio_url = self.pair.twilio_url
        self._store_url = f"sqlite:///{workdir / 'otp-router.db'}"
        self._secret = secrets.token_hex(16)

    async def _serve(self) -> EmulatorPair:
        from otp_router.emulators import serve_emulators

        return await serve_emulators(
            Settings.model_construct(), host="127.0.0.1", telegram_port=0, twilio_port=0, script=self.script
        )

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float = 30.0) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout)

    # --- configuring the router under test ------------------------------------------

    def policy(self, policy: Policy | None = None) -> Policy:
        """``policy`` (default: the built-in one) with its deadlines scaled to this time scale."""
        from otp_router.demo import scaled_policy
        from otp_router.policy import Policy

        return scaled_policy(policy or Policy(), self.time_scale)

    def policy_file(self) -> Path:
        """The built-in policy, scaled, as a TOML file (for ``OTP_ROUTER_POLICY_FILE``)."""
        from otp_router.policy import _raw_step

        policy = self.policy()
        lines = [
            f"resend_cooldown = {policy.resend_cooldown!r}",
            f"max_resends = {policy.max_resends!r}",
            f"wait_cost_per_second = {policy.wait_cost_per_second!r}",
            f"auto_min_samples = {policy.auto_min_samples!r}",
            f"sms_latency = {policy.sms_latency!r}",
        ]
        for step in policy.steps:
            lines.append("\n[[steps]]")
            for key, value in _raw_step(step).items():
                lines.append(f"{key} = {_toml_value(value)}")
        path = self.workdir / "otp-router-policy.toml"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def settings(self, base: Settings | None = None, **overrides: Any) -> Settings:
        """Settings for a router that talks to these emulators.

        Defaults: a SQLite store in the test's folder (shared with
        :meth:`sent_code`), a fixed code secret, no retry backoff, and the
        router's own delays (settle, latency refresh, SMS lookups) and the
        built-in policy's deadlines scaled to the time scale. ``overrides``
        win over all of them.
        """
        from otp_router.config import RetrySettings, SmsLookupSettings
        from otp_router.harness import emulated_settings

        scale = self.time_scale
        values: dict[str, Any] = {
            "store_url": self._store_url,
            "code_secret": self._secret,
            "retry": RetrySettings(backoff=False),
            "policy_file": self.policy_file(),
            "settle_delay": max(0.2, 15 * scale),
            "latency_refresh": max(0.5, 60 * scale),
            "sms_lookup": SmsLookupSettings(
                delays=tuple(d * scale for d in (2.0, 10.0, 30.0)), grace=30 * scale
            ),
            "deadline_call_timeout": max(1.0, 15 * scale),
        }
        values.update(overrides)
        if isinstance(values["store_url"], str) and values["store_url"] != self._store_url:
            self._store_url = values["store_url"]
        return emulated_settings(self.pair, base, **values)

    def environ(self, **overrides: Any) -> dict[str, str]:
        """The ``OTP_ROUTER_*`` variables that give an app :meth:`settings`."""
        from otp_router.harness import provider_environ

        settings = self.settings(**overrides)
        env = {
            **provider_environ(settings),
            "OTP_ROUTER_RETRY__BACKOFF": "false",
            "OTP_ROUTER_POLICY_FILE": str(settings.policy_file),
            "OTP_ROUTER_SETTLE_DELAY": repr(settings.settle_delay),
            "OTP_ROUTER_LATENCY_REFRESH": repr(settings.latency_refresh),
            "OTP_ROUTER_SMS_LOOKUP__DELAYS": ",".join(repr(d) for d in settings.sms_lookup.delays),
            "OTP_ROUTER_SMS_LOOKUP__GRACE": repr(settings.sms_lookup.grace),
            "OTP_ROUTER_DEADLINE_CALL_TIMEOUT": repr(settings.deadline_call_timeout),
        }
        return env

    # --- what the user received ----------------------------------------------------

    def sent_code(self, verification_id: str, *, wait: float = 10.0) -> str | None:
        """The code the user of ``verification_id`` received (newest send first); None if none
        arrived within ``wait`` seconds.

        Blocks the calling thread while it waits; in an async test, ``await``
        :meth:`wait_code` instead so the router on the test's loop keeps running.
        """
        return self._call(self._poll_code(verification_id, wait), timeout=wait + 30)

    async def wait_code(self, verification_id: str, *, wait: float = 10.0) -> str | None:
        """:meth:`sent_code` for async tests: waits without blocking the caller's loop."""
        future = asyncio.run_coroutine_threadsafe(self._poll_code(verification_id, wait), self._loop)
        return await asyncio.wrap_future(future)

    async def _poll_code(self, verification_id: str, wait: float) -> str | None:
        """On the emulators' loop: look until a code is there or ``wait`` seconds passed."""
        until = self._loop.time() + wait
        while True:
            code = await self._code_now(verification_id)
            if code is not None or self._loop.time() >= until:
                return code
            await asyncio.sleep(0.02)

    async def _code_now(self, verification_id: str) -> str | None:
        from otp_router.core import VerificationState

        refs: list[tuple[str, str]] = []
        store = await self._store()
        if store is not None:
            with contextlib.suppress(Exception):
                record = await store.get(verification_id)
                if record is not None:
                    state = VerificationState.model_validate_json(record.data)
                    refs = [(a.provider, a.ref) for a in state.attempts if a.ref is not None]
        for provider, ref in reversed(refs):
            if provider == "telegram":
                code = self.pair.telegram.delivered_code(ref)
            elif provider == "twilio":
                body = self.pair.twilio.delivered_body(ref)
                match = _DIGITS.search(body) if body is not None else None
                code = match.group(1) if match else None
            else:
                continue  # an adapter of the application's own: not emulated here
            if code is not None:
                return code
        # A store this helper cannot open (memory://): Telegram's payload carries the id.
        codes = self.pair.telegram.delivered_codes_for_payload(verification_id)
        return codes[-1] if codes else None

    async def _store(self) -> Store | None:
        from otp_router.store import open_store

        url = self._store_url
        if url.startswith("memory:"):
            return None
        if url not in self._stores:
            self._stores[url] = open_store(url)
        return self._stores[url]

    # --- lifetime ----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the emulators and their thread."""
        if self._loop.is_closed():
            return

        async def stop() -> None:
            for store in self._stores.values():
                with contextlib.suppress(Exception):
                    await store.aclose()
            await self.pair.aclose()

        try:
            self._call(stop())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        if not self._thread.is_alive():
            self._loop.close()


def _time_scale(request: pytest.FixtureRequest) -> float:
    marker = request.node.get_closest_marker("otp_time_scale")
    if marker is not None:
        return float(marker.args[0])
    configured = request.config.getini("otp_router_time_scale")
    return float(configured) if configured else DEFAULT_TIME_SCALE


@pytest.fixture
def otp_providers(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[EmulatedProviders]:
    """The Telegram Gateway and Twilio emulators on loopback, and the codes they delivered."""
    providers = EmulatedProviders(tmp_path, time_scale=_time_scale(request))
    try:
        yield providers
    finally:
        providers.close()


@pytest.fixture
def otp_environ(otp_providers: EmulatedProviders, monkeypatch: pytest.MonkeyPatch) -> EmulatedProviders:
    """:func:`otp_providers` with ``OTP_ROUTER_*`` set, for apps that read the environment."""
    for name, value in otp_providers.environ().items():
        monkeypatch.setenv(name, value)
    return otp_providers


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addini(
        "otp_router_time_scale",
        "otp-router emulators: emulated seconds per real second (default 0.1)",
        default="",
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "otp_time_scale(scale): time scale of the otp-router emulators and settings for this test"
    )
