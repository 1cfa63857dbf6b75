"""Settings: environment names, nesting, secrets and start-up errors."""

from __future__ import annotations

import pytest

from otp_router.config import Settings
from otp_router.errors import ConfigError


def test_nested_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTP_ROUTER_ prefix and __ nesting reach the nested models."""
    monkeypatch.setenv("OTP_ROUTER_TELEGRAM__TOKEN", "tg-secret")
    monkeypatch.setenv("OTP_ROUTER_TELEGRAM__BASE_URL", "http://127.0.0.1:9/")
    monkeypatch.setenv("OTP_ROUTER_TWILIO__ACCOUNT_SID", "AC123")
    monkeypatch.setenv("OTP_ROUTER_TWILIO__AUTH_TOKEN", "tw-secret")
    monkeypatch.setenv("OTP_ROUTER_TWILIO__FROM_NUMBER", "+15005550006")
    monkeypatch.setenv("OTP_ROUTER_TWILIO__BASE_URL", "http://127.0.0.1:10")
    monkeypatch.setenv("OTP_ROUTER_STORE_URL", "memory://")
    monkeypatch.setenv("OTP_ROUTER_PUBLIC_URL", "https://otp.example.com/")
    monkeypatch.setenv("OTP_ROUTER_CODE_SECRET", "code-secret")
    s = Settings.load()
    assert s.telegram.token.get_secret_value() == "tg-secret"
    assert s.telegram.base_url == "http://127.0.0.1:9"
    assert s.twilio.base_url == "http://127.0.0.1:10"
    assert s.public_url == "https://otp.example.com"
    assert s.code_secret is not None and s.code_secret.get_secret_value() == "code-secret"


def test_secrets_never_print(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reprs of settings hide tokens and the code secret."""
    monkeypatch.setenv("OTP_ROUTER_TELEGRAM__TOKEN", "tg-secret")
    monkeypatch.setenv("OTP_ROUTER_TWILIO__AUTH_TOKEN", "tw-secret")
    monkeypatch.setenv("OTP_ROUTER_CODE_SECRET", "code-secret")
    text = repr(Settings.load()) + str(Settings.load().model_dump())
    assert "tg-secret" not in text and "tw-secret" not in text and "code-secret" not in text


def test_dotenv_is_read(tmp_path: object) -> None:
    """A .env file in the working directory is read."""
    with open(".env", "w") as fh:
        fh.write("OTP_ROUTER_CODE_LENGTH=8\n")
    assert Settings.load().code_length == 8


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTP_ROUTER_CODE_LENGTH", "12"),
        ("OTP_ROUTER_STORE_URL", "mongodb://x"),
        ("OTP_ROUTER_TELEGRAM__TIMEOUT", "-1"),
        ("OTP_ROUTER_TWILIO__MESSAGE_TEMPLATE", "no placeholder"),
        ("OTP_ROUTER_HTTP_PORT", "http"),
        ("OTP_ROUTER_FRAUD__CONVERSION_GRACE", "3600"),
        ("OTP_ROUTER_FRAUD__CONVERSION_GRACE", "nan"),
        ("OTP_ROUTER_CIRCUIT__MAX_WAIT", "-1"),
    ],
)
def test_invalid_setting_names_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    """An invalid value fails at start-up with the variable's name in the message."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        Settings.load()


def test_ops_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """OTP_ROUTER_OPS_PORT/_HOST/_TOKEN are read; an ops port equal to the HTTP port is refused by name."""
    monkeypatch.setenv("OTP_ROUTER_OPS_PORT", "9100")
    monkeypatch.setenv("OTP_ROUTER_OPS_HOST", "10.0.0.5")
    monkeypatch.setenv("OTP_ROUTER_OPS_TOKEN", "scrape-me")
    settings = Settings.load()
    assert (settings.ops_port, settings.ops_host) == (9100, "10.0.0.5")
    assert settings.ops_token is not None and settings.ops_token.get_secret_value() == "scrape-me"
    assert "scrape-me" not in repr(settings)
    monkeypatch.setenv("OTP_ROUTER_OPS_PORT", "8080")
    with pytest.raises(ConfigError, match="OTP_ROUTER_OPS_PORT"):
        Settings.load()
