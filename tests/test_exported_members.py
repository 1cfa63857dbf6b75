"""The package's front door: a sorted, importable __all__."""

from __future__ import annotations

import otp_router


def test_all_is_sorted_and_importable() -> None:
    """Every name in __all__ exists, sorted with classes first then functions (isort style)."""
    names = otp_router.__all__
    assert names == sorted(names, key=lambda n: (n[0].islower(), n))
    for name in names:
        assert hasattr(otp_router, name), name


def test_no_private_modules_needed_for_the_api() -> None:
    """The router, results and errors are reachable from the package root."""
    for name in ["OtpRouter", "Verification", "CheckResult", "Settings", "InvalidPhoneNumber", "parse_phone"]:
        assert name in otp_router.__all__
