"""Routing policy: defaults, per-country overrides, TOML loading and its errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from otp_router.errors import ConfigError, UnsupportedCountry
from otp_router.policy import Policy, Step
from otp_router.providers.base import ChannelName

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "policy.example.toml"


def test_default_is_telegram_then_sms() -> None:
    """The built-in workflow probes Telegram with a 30 s deadline, then SMS."""
    steps = Policy().steps_for("GB")
    assert [s.channel for s in steps] == [ChannelName.TELEGRAM, ChannelName.SMS]
    assert steps[0].probe and steps[0].ttl == 30


def test_example_file_overrides() -> None:
    """The example policy reorders, skips and blocks per country."""
    policy = Policy.load(EXAMPLE)
    assert [s.channel for s in policy.steps_for("US")] == [ChannelName.SMS]
    assert [s.channel for s in policy.steps_for("NG")] == [ChannelName.TELEGRAM]
    assert [s.channel for s in policy.steps_for("DE")] == [ChannelName.TELEGRAM, ChannelName.SMS]
    with pytest.raises(UnsupportedCountry):
        policy.steps_for("KP")


def test_telegram_ttl_is_clamped_to_its_range() -> None:
    """Telegram's ttl stays within 30..3600 whatever the step deadline."""
    assert Step(ChannelName.TELEGRAM, 5).ttl == 30
    assert Step(ChannelName.TELEGRAM, 90).ttl == 90
    assert Step(ChannelName.TELEGRAM, 7200).ttl == 3600
    assert Step(ChannelName.SMS, 5).ttl == 5


@pytest.mark.parametrize(
    "text",
    [
        '[[steps]]\nchannel = "pigeon"\n',
        "[countries.usa]\nblocked = true\n",
        '[[steps]]\nchannel = "sms"\ndeliver_within = -1\n',
        "surprise = 1\n",
        "not toml [",
    ],
)
def test_bad_policy_names_the_setting(tmp_path: Path, text: str) -> None:
    """A broken policy file is a ConfigError naming OTP_ROUTER_POLICY_FILE."""
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="OTP_ROUTER_POLICY_FILE"):
        Policy.load(path)
