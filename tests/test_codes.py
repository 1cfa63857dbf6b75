"""Codes: generation, derivation, digests and shape checks."""

from __future__ import annotations

import pytest

from otp_router.codes import code_digest, codes_match, derive_code, generate_code, new_nonce, validate_code
from otp_router.errors import InvalidCode

SECRET = b"k" * 32


@pytest.mark.parametrize("length", [4, 6, 8])
def test_generated_and_derived_codes_have_the_length(length: int) -> None:
    """Codes are all digits with exactly the configured length, leading zeros kept."""
    for _ in range(200):
        for code in (generate_code(length), derive_code(SECRET, "v", new_nonce(), length)):
            assert len(code) == length and code.isdigit()


def test_derivation_is_stable_and_secret_bound() -> None:
    """The same secret, id and nonce give the same code; another secret gives another."""
    nonce = new_nonce()
    assert derive_code(SECRET, "v1", nonce, 6) == derive_code(SECRET, "v1", nonce, 6)
    others = {derive_code(bytes([i]) * 32, "v1", nonce, 8) for i in range(20)}
    assert len(others) > 15


def test_derived_codes_are_spread_over_the_digit_space() -> None:
    """Over many nonces each leading digit appears (no gross bias)."""
    firsts = {derive_code(SECRET, "v", new_nonce(), 6)[0] for _ in range(500)}
    assert firsts == set("0123456789")


def test_digest_binds_code_to_verification() -> None:
    """A digest matches only its own code and verification id."""
    digest = code_digest(SECRET, "v1", "123456")
    assert codes_match(SECRET, "v1", "123456", digest)
    assert not codes_match(SECRET, "v1", "123457", digest)
    assert not codes_match(SECRET, "v2", "123456", digest)
    assert "123456" not in digest


@pytest.mark.parametrize("bad", ["12345", "1234567", "12a456", "", " ", "١٢٣٤٥٦", "12 3456", None, 123456])
def test_malformed_codes_are_refused(bad: object) -> None:
    """Non-digit, wrong-length or non-string codes raise InvalidCode."""
    with pytest.raises(InvalidCode):
        validate_code(bad, 6)


def test_surrounding_whitespace_is_tolerated() -> None:
    """A pasted code with spaces around it is accepted as its digits."""
    assert validate_code(" 012345\n", 6) == "012345"
