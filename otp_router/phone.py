"""Phone number parsing with ``phonenumbers``: E.164 out, region kept.

A bad number is refused here, before any provider call or store write. The
number's type (mobile, fixed line, premium rate…) and its prefix are kept for
the toll-fraud defences in :mod:`otp_router.router`.
"""

from __future__ import annotations

from dataclasses import dataclass

import phonenumbers

from otp_router.errors import InvalidPhoneNumber
from otp_router.inputs import is_text

__all__ = ["NUMBER_TYPES", "PhoneNumber", "number_prefix", "parse_phone"]

#: ``phonenumbers``' number type constants by their lower-case name ("mobile", "premium_rate"…).
_TYPE_NAMES: dict[int, str] = {
    value: name.lower()
    for name, value in vars(phonenumbers.PhoneNumberType).items()
    if name.isupper() and isinstance(value, int)
}
#: Every number type name ``phonenumbers`` can return, for validating settings.
NUMBER_TYPES: frozenset[str] = frozenset(_TYPE_NAMES.values())


@dataclass(frozen=True, slots=True)
class PhoneNumber:
    """A validated phone number.

    Attributes:
        e164: The number in E.164 form, e.g. ``"+447911123456"``.
        region: ISO 3166-1 alpha-2 region (``"GB"``), or ``"ZZ"`` for non-geographic numbers.
        number_type: ``phonenumbers``' type in lower case: ``"mobile"``,
            ``"fixed_line_or_mobile"`` (regions such as US/CA that do not tell
            them apart), ``"fixed_line"``, ``"premium_rate"``, ``"toll_free"``…
        country_code: The calling code, e.g. ``44``.
    """

    e164: str
    region: str
    number_type: str = "unknown"
    country_code: int = 0

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
    if not isinstance(raw, str):
        raise InvalidPhoneNumber("phone number must be a string")
    if not raw.strip():
        raise InvalidPhoneNumber("phone number is empty")
    if len(raw) > 64:
        raise InvalidPhoneNumber("phone number is too long")
    if not is_text(raw.strip()):
        # phonenumbers would skip a NUL or a lone surrogate and parse the rest: refuse garbage instead.
        raise InvalidPhoneNumber("phone number contains control characters or invalid text")
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidPhoneNumber(f"phone number cannot be parsed: {exc._msg}") from None
    if parsed.extension:
        raise InvalidPhoneNumber("phone number has an extension; a code cannot reach one")
    if not phonenumbers.is_possible_number(parsed):
        raise InvalidPhoneNumber("phone number has an impossible length for its country")
    # number_type() matches the number against its region's patterns once; is_valid_number()
    # is exactly "that match found a type" and would run the same matching a second time.
    kind = phonenumbers.number_type(parsed)
    if kind == phonenumbers.PhoneNumberType.UNKNOWN:
        raise InvalidPhoneNumber("phone number is not a valid number in its country")
    region = phonenumbers.region_code_for_number(parsed) or "ZZ"
    e164 = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
    number_type = _TYPE_NAMES.get(kind, "unknown")
    code = parsed.country_code or 0
    return PhoneNumber(e164=e164, region=region, number_type=number_type, country_code=code)


def number_prefix(number: PhoneNumber, digits: int) -> str:
    """The calling code and the first ``digits`` digits of the national number.

    Numbers of one prefix share an operator range: SMS pumping attacks walk
    through such a range, so velocity and conversion limits are kept per prefix.

    Args:
        number: A parsed number.
        digits: How many digits of the national significant number to keep.

    Returns:
        E.g. ``"+44 7911"`` for ``+447911123456`` and 4 digits. The national
        part is cut short so the result never is a whole number.
    """
    code = str(number.country_code)
    national = number.e164[1 + len(code) :]
    return f"+{code} {national[: max(0, min(digits, len(national) - 2))]}"
