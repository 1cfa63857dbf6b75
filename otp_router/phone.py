"""Phone number parsing with ``phonenumbers``: E.164 out, region kept.

A bad number is refused here, before any provider call or store write.
"""

from __future__ import annotations

from dataclasses import dataclass

import phonenumbers

from otp_router.errors import InvalidPhoneNumber

__all__ = ["PhoneNumber", "parse_phone"]


@dataclass(frozen=True, slots=True)
class PhoneNumber:
    """A validated phone number.

    Attributes:
        e164: The number in E.164 form, e.g. ``"+447911123456"``.
        region: ISO 3166-1 alpha-2 region (``"GB"``), or ``"ZZ"`` for non-geographic numbers.
    """

    e164: str
    region: str

    def __repr__(self) -> str:
        # Never print the full number: reprs end up in logs and tracebacks.
        return f"PhoneNumber(region={self.region!r}, e164='…{self.e164[-2:]}')"


def parse_phone(raw: str, *, default_region: str | None = None) -> PhoneNumber:
    """Parse and validate a phone number.

    Args:
        raw: What the user typed. International form (``+…``) unless
            ``default_region`` is given.
        default_region: Region to assume for national-format input.

    Returns:
        The validated number.

    Raises:
        InvalidPhoneNumber: Unparseable, impossible or invalid number. The
            message never repeats the number itself.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidPhoneNumber("phone number is empty")
    if len(raw) > 64:
        raise InvalidPhoneNumber("phone number is too long")
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPhoneNumber(f"phone number cannot be parsed: {exc._msg}") from None
    if not phonenumbers.is_possible_number(parsed):
        raise InvalidPhoneNumber("phone number has an impossible length for its country")
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidPhoneNumber("phone number is not a valid number in its country")
    region = phonenumbers.region_code_for_number(parsed) or "ZZ"
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    return PhoneNumber(e164=e164, region=region)
