"""Configuration errors are reported all at once: every invalid value and every missing
credential in one message, before anything is built or sent."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from otp_router.config import Settings, TelegramSettings, TwilioSettings
from otp_router.errors import ConfigError
from otp_router.router import OtpRouter

INVALID = {
    "OTP_ROUTER_CODE_LENGTH": "3",
    "OTP_ROUTER_HTTP_PORT": "99999",
    "OTP_ROUTER_RETRY__ATTEMPTS": "many",
    "OTP_ROUTER_STORE_URL": "ftp://x",
}
MISSING = [
    "OTP_ROUTER_TELEGRAM__TOKEN",
    "OTP_ROUTER_TWILIO__ACCOUNT_SID",
    "OTP_ROUTER_TWILIO__AUTH_TOKEN",
    "OTP_ROUTER_TWILIO__FROM_NUMBER",
]


def named(message: str) -> set[str]:
    """The variables a message names, one per ``NAME: why`` part."""
    return {part.split(":", 1)[0].strip() for part in message.removeprefix("invalid settings: ").split("; ")}


def test_every_invalid_value_and_missing_credential_in_one_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Invalid values elsewhere do not hide the missing credentials, nor the other way round."""
    for name, value in INVALID.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as raised:
        Settings.load(require_providers=True)
    assert named(str(raised.value)) == set(INVALID) | set(MISSING)
    # Without require_providers only the invalid values count.
    with pytest.raises(ConfigError) as raised:
        Settings.load()
    assert named(str(raised.value)) == set(INVALID)


def test_valid_settings_missing_credentials_are_all_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Valid values but no credentials: every missing one is named, and Settings() alone still works."""
    monkeypatch.setenv("OTP_ROUTER_TWILIO__ACCOUNT_SID", "AC1")
    assert Settings.load().telegram.token.get_secret_value() == ""
    with pytest.raises(ConfigError) as raised:
        Settings.load(require_providers=True)
    assert named(str(raised.value)) == set(MISSING) - {"OTP_ROUTER_TWILIO__ACCOUNT_SID"}


def test_from_settings_names_every_missing_credential(tmp_path: Path) -> None:
    """Building a router reports every missing credential and missing file at once."""
    settings = Settings(
        store_url="memory://",
        telegram=TelegramSettings(token=""),
        twilio=TwilioSettings(account_sid="AC1", auth_token=""),
        policy_file=tmp_path / "nope.toml",
    )
    with pytest.raises(ConfigError) as raised:
        OtpRouter.from_settings(settings)
    assert named(str(raised.value)) == {
        "OTP_ROUTER_TELEGRAM__TOKEN",
        "OTP_ROUTER_TWILIO__AUTH_TOKEN",
        "OTP_ROUTER_TWILIO__FROM_NUMBER",
        "OTP_ROUTER_POLICY_FILE",
    }


def test_a_disabled_channel_needs_no_credentials() -> None:
    """SMS only: Telegram's token is not asked for; no channel at all is a problem of its own."""
    sms_only = Settings(
        telegram=TelegramSettings(enabled=False),
        twilio=TwilioSettings(account_sid="AC1", auth_token="t", from_number="+15005550006"),
    )
    assert sms_only.router_problems() == []
    neither = Settings(telegram=TelegramSettings(enabled=False), twilio=TwilioSettings(enabled=False))
    [problem] = neither.router_problems()
    assert "no channel is enabled" in problem


def cli(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "otp_router", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_exits_2_naming_each_variable_before_anything_runs(tmp_path: Path) -> None:
    """``send`` with bad and missing settings: exit 2, one line naming each variable, no store created.
    Commands that build no router (``assets``, ``worker --check``) do not ask for credentials."""
    import os

    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTP_ROUTER_", "TWILIO_"))}
    store = tmp_path / "never.db"
    env = {**base, **INVALID, "OTP_ROUTER_STORE_URL": f"sqlite:///{store}"}
    result = cli("send", "+447400123456", env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    [line] = result.stderr.strip().splitlines()
    assert named(line.removeprefix("otp-router: ")) == (set(INVALID) - {"OTP_ROUTER_STORE_URL"}) | set(
        MISSING
    )
    assert not store.exists()
    # No credentials needed to print an asset.
    assert cli("assets", "list", env=base, cwd=tmp_path).returncode == 0
    check = cli("worker", "--check", env={**base, "OTP_ROUTER_STORE_URL": "memory://"}, cwd=tmp_path)
    assert "TELEGRAM__TOKEN" not in check.stderr


def test_only_the_adapters_of_configured_routes_need_credentials() -> None:
    """Routes that use no Telegram adapter ask for no Telegram token, even with its section enabled."""
    twilio = TwilioSettings(account_sid="AC1", auth_token="t", from_number="+15005550006")
    assert Settings(routes={"sms": "twilio_sms"}, twilio=twilio).router_problems() == []
    [problem] = Settings(routes={"sms": "twilio_sms"}).router_problems()[:1]
    assert problem.startswith("OTP_ROUTER_TWILIO__ACCOUNT_SID")


def test_a_routed_vonage_section_reports_its_missing_credentials_too() -> None:
    """An enabled Vonage adapter on a route names each of its missing variables with the others."""
    from otp_router.config import VonageSettings

    settings = Settings(
        routes={"telegram": "telegram", "sms": "vonage_sms"},
        telegram=TelegramSettings(token=""),
        vonage=VonageSettings(enabled=True, api_key="k"),
    )
    assert named("; ".join(settings.router_problems())) == {
        "OTP_ROUTER_TELEGRAM__TOKEN",
        "OTP_ROUTER_VONAGE__API_SECRET",
        "OTP_ROUTER_VONAGE__FROM_NUMBER",
    }
