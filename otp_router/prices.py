"""Estimated message prices: a per-country SMS table and the Telegram price.

The packaged table (``otp_router/data/sms-prices.toml``) holds list prices
per SMS segment. They are *estimates*: the router records them at send time
(``cost_is_final=False``) and replaces them with the amount Twilio reports in
the message's ``price`` once the status is final. A user table given by
``OTP_ROUTER_PRICES_FILE`` is laid over the packaged one, so it only needs the
entries it changes.

File format::

    currency = "USD"

    [telegram]
    price = 0.01

    [sms]
    default = 0.10
    US = 0.0083
    GB = 0.0463
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from importlib import resources
from pathlib import Path
from typing import Any

from otp_router.errors import ConfigError

__all__ = ["SmsPrices", "sms_segments"]

_PACKAGED = "sms-prices.toml"

# GSM 03.38 default alphabet; any other character forces UCS-2 encoding.
_GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension table characters take two septets (escape + character).
_GSM7_EXTENDED = frozenset("^{}\\[~]|€\f")


def sms_segments(text: str) -> int:
    """Number of SMS segments ``text`` is billed as.

    GSM-7 text fits 160 septets in one segment and 153 per segment when
    concatenated; anything else is UCS-2 with 70 and 67 characters.

    Args:
        text: The message body.

    Returns:
        At least 1 (an empty body still costs one segment).
    """
    septets = 0
    for char in text:
        if char in _GSM7_BASIC:
            septets += 1
        elif char in _GSM7_EXTENDED:
            septets += 2
        else:
            # UCS-2 counts UTF-16 code units: characters outside the BMP take two.
            units = len(text.encode("utf-16-le")) // 2
            return 1 if units <= 70 else -(-units // 67)
    return 1 if septets <= 160 else -(-septets // 153)


def _decimal(value: Any, where: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise ConfigError(f"price table: {where} must be a number")
    try:
        price = Decimal(str(value))
    except ArithmeticError:
        raise ConfigError(f"price table: {where} is not a number") from None
    if not price.is_finite() or price < 0:
        raise ConfigError(f"price table: {where} must be a non-negative number")
    return price


def _where(path: Path | None) -> str:
    return f"OTP_ROUTER_PRICES_FILE={path}" if path is not None else _PACKAGED


def _read(path: Path | None) -> dict[str, Any]:
    try:
        if path is None:
            text = resources.files("otp_router").joinpath("data", _PACKAGED).read_text(encoding="utf-8")
        else:
            text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"price table {_where(path)}: cannot be read ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"price table {_where(path)}: not UTF-8") from None
    try:
        # parse_float=Decimal keeps 0.0083 exact instead of a binary float.
        return tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"price table {_where(path)}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"price table {_where(path)}: nested too deeply") from None


@dataclass(frozen=True, slots=True)
class SmsPrices:
    """Estimated prices per message.

    Attributes:
        sms_by_region: ISO region (upper case) → USD per SMS segment.
        sms_default: Price for regions not in the table.
        telegram: Telegram Gateway price per delivered code.
        currency: ISO 4217 code of every price.
    """

    sms_by_region: Mapping[str, Decimal] = field(default_factory=dict)
    sms_default: Decimal = Decimal("0.10")
    telegram: Decimal = Decimal("0.01")
    currency: str = "USD"

    @classmethod
    def load(cls, path: Path | None = None) -> SmsPrices:
        """Load the packaged table, with ``path`` (if given) laid over it.

        Args:
            path: A TOML table in the format of the module docstring. Its
                entries replace the packaged ones; others are kept.

        Returns:
            The merged table.

        Raises:
            ConfigError: The file is missing, not TOML, or has a bad price.
        """
        prices = cls._from_data(_read(None), cls())
        if path is not None:
            prices = cls._from_data(_read(path), prices)
        return prices

    @classmethod
    def _from_data(cls, data: dict[str, Any], base: SmsPrices) -> SmsPrices:
        currency = data.get("currency", base.currency)
        if not isinstance(currency, str) or len(currency) != 3:
            raise ConfigError("price table: currency must be a 3-letter ISO 4217 code")
        telegram_table = data.get("telegram", {})
        sms_table = data.get("sms", {})
        if not isinstance(telegram_table, dict) or not isinstance(sms_table, dict):
            raise ConfigError("price table: [telegram] and [sms] must be tables")
        telegram = base.telegram
        if "price" in telegram_table:
            telegram = _decimal(telegram_table["price"], "telegram.price")
        by_region = dict(base.sms_by_region)
        default = base.sms_default
        for key, value in sms_table.items():
            if key == "default":
                default = _decimal(value, "sms.default")
            elif len(key) == 2 and key.isalpha():
                by_region[key.upper()] = _decimal(value, f"sms.{key}")
            else:
                raise ConfigError(f"price table: sms.{key} is not a 2-letter region code")
        return cls(sms_by_region=by_region, sms_default=default, telegram=telegram, currency=currency.upper())

    def sms(self, region: str) -> Decimal:
        """Estimated price of one SMS segment to ``region``.

        Args:
            region: ISO 3166-1 alpha-2 code (any case); unknown or ``"ZZ"`` gives the default.

        Returns:
            Price per segment in :attr:`currency`.
        """
        return self.sms_by_region.get(region.upper(), self.sms_default)

    def sms_cost(self, region: str, body: str) -> Decimal:
        """Estimated price of sending ``body`` to ``region`` (price times segments).

        Args:
            region: ISO 3166-1 alpha-2 code.
            body: The message text.

        Returns:
            Total estimated price in :attr:`currency`.
        """
        return self.sms(region) * sms_segments(body)
