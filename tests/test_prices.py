"""The SMS price table and segment counting."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest

from otp_router.config import Settings
from otp_router.errors import ConfigError
from otp_router.prices import SmsPrices, sms_segments


def test_packaged_table_has_exact_decimal_prices() -> None:
    """The packaged table loads exact decimals for listed countries and Telegram."""
    prices = SmsPrices.load()
    assert prices.sms("US") == Decimal("0.0083")
    assert prices.sms("GB") == Decimal("0.0463")
    assert prices.sms("ID") == Decimal("0.4023")
    assert prices.telegram == Decimal("0.01")
    assert prices.currency == "USD"
    assert len(prices.sms_by_region) >= 30


def test_unknown_region_uses_default_and_case_is_ignored() -> None:
    """Unlisted regions (and ZZ) fall back to the default; region case does not matter."""
    prices = SmsPrices.load()
    assert prices.sms("ZZ") == prices.sms_default
    assert prices.sms("XK") == prices.sms_default
    assert prices.sms("de") == prices.sms("DE") == Decimal("0.0894")


def test_user_file_overrides_only_its_entries(tmp_path: Path) -> None:
    """A user table replaces the entries it lists and keeps the packaged rest."""
    path = tmp_path / "prices.toml"
    path.write_text("[telegram]\nprice = 0.02\n[sms]\nUS = 0.5\ndefault = 0.2\nxk = 0.3\n", encoding="utf-8")
    prices = SmsPrices.load(path)
    assert prices.sms("US") == Decimal("0.5")
    assert prices.sms("GB") == Decimal("0.0463")
    assert prices.sms("XK") == Decimal("0.3")
    assert prices.sms("AQ") == Decimal("0.2")
    assert prices.telegram == Decimal("0.02")


def test_settings_prices_file_is_the_override(tmp_path: Path) -> None:
    """``Settings.prices_file`` (OTP_ROUTER_PRICES_FILE) is what load() takes."""
    path = tmp_path / "p.toml"
    path.write_text("[sms]\nFR = 1.25\n", encoding="utf-8")
    settings = Settings(prices_file=path, store_url="memory://")
    assert SmsPrices.load(settings.prices_file).sms("FR") == Decimal("1.25")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("[sms]\nUS = -1\n", "non-negative"),
        ('[sms]\nUS = "cheap"\n', "not a number"),
        ("[sms]\nUS = true\n", "must be a number"),
        ("[sms]\nUSA = 0.1\n", "2-letter"),
        ('currency = "dollars"\n', "ISO 4217"),
        ("sms = 3\n", "must be tables"),
        ("[sms\n", "p.toml"),
    ],
)
def test_bad_tables_are_config_errors(tmp_path: Path, content: str, fragment: str) -> None:
    """Every malformed table is refused with a ConfigError that says what is wrong."""
    path = tmp_path / "p.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=fragment):
        SmsPrices.load(path)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    """A prices file that does not exist is a ConfigError, not an OSError."""
    with pytest.raises(ConfigError, match="cannot be read"):
        SmsPrices.load(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("text", "segments"),
    [
        ("", 1),
        ("Your login code is 123456", 1),
        ("a" * 160, 1),
        ("a" * 161, 2),
        ("a" * 306, 2),
        ("a" * 307, 3),
        ("€" * 80, 1),  # extension characters take two septets
        ("€" * 81, 2),
        ("ж" * 70, 1),  # Cyrillic forces UCS-2
        ("ж" * 71, 2),
        ("ж" * 134, 2),
        ("ж" * 135, 3),
        ("🙂" * 35, 1),  # outside the BMP: two UTF-16 units each
        ("🙂" * 36, 2),
    ],
)
def test_sms_segments(text: str, segments: int) -> None:
    """Segments follow GSM-7 (160/153) and UCS-2 (70/67) limits."""
    assert sms_segments(text) == segments


def test_sms_cost_is_price_times_segments() -> None:
    """The estimate multiplies the per-segment price by the segment count."""
    prices = SmsPrices.load()
    assert prices.sms_cost("US", "a" * 161) == Decimal("0.0166")
