"""Phone parsing with phonenumbers: E.164 out, region kept, clear errors."""

from __future__ import annotations

import pytest

from otp_router.errors import InvalidPhoneNumber
from otp_router.phone import parse_phone


@pytest.mark.parametrize(
    ("raw", "e164", "region"),
    [
        ("+1 202-555-0143", "+12025550143", "US"),
        ("+44 20 7946 0958", "+442079460958", "GB"),
        ("+49 30 901820", "+4930901820", "DE"),
        ("+91 98765 43210", "+919876543210", "IN"),
    ],
)
def test_valid_numbers(raw: str, e164: str, region: str) -> None:
    """International input normalises to E.164 with its region."""
    number = parse_phone(raw)
    assert (number.e164, number.region) == (e164, region)


def test_national_format_with_default_region() -> None:
    """A national number parses when a default region is given."""
    assert parse_phone("020 7946 0958", default_region="GB").e164 == "+442079460958"


@pytest.mark.parametrize("raw", ["", "   ", "abc", "12345", "+1 202 555", "+999 123456789", "+1" + "2" * 70])
def test_invalid_numbers(raw: str) -> None:
    """Unparseable, impossible and invalid numbers raise InvalidPhoneNumber."""
    with pytest.raises(InvalidPhoneNumber):
        parse_phone(raw)


def test_errors_and_repr_never_show_the_number() -> None:
    """Neither the error message nor the repr carries the full number."""
    with pytest.raises(InvalidPhoneNumber) as info:
        parse_phone("+1 202 555")
    assert "202" not in str(info.value)
    assert "2025550143" not in repr(parse_phone("+12025550143"))
