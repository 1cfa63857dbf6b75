"""One-time codes: generated with :mod:`secrets`, stored only as an HMAC digest.

The digest binds the code to its verification id, so a digest copied from
one record cannot be replayed against another, and the store never holds a
code in clear. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from otp_router.errors import InvalidCode

__all__ = ["code_digest", "codes_match", "generate_code", "validate_code"]


def generate_code(length: int) -> str:
    """Return a uniformly random numeric code of ``length`` digits (leading zeros allowed)."""
    if not 4 <= length <= 8:
        raise ValueError("code length must be 4..8 (Telegram Gateway's range)")
    return f"{secrets.randbelow(10**length):0{length}d}"


def validate_code(code: object, length: int) -> str:
    """Check the *shape* of an entered code before it costs an attempt.

    Raises:
        InvalidCode: Not a string of exactly ``length`` ASCII digits.
    """
    if not isinstance(code, str):
        raise InvalidCode("code must be a string of digits")
    stripped = code.strip()
    if not (stripped.isascii() and stripped.isdigit()):
        raise InvalidCode("code must contain digits only")
    if len(stripped) != length:
        raise InvalidCode(f"code must have exactly {length} digits")
    return stripped


def code_digest(secret: bytes, verification_id: str, code: str) -> str:
    """HMAC-SHA256 of ``verification_id:code`` keyed by the code secret, hex encoded."""
    message = f"{verification_id}:{code}".encode()
    return hmac.new(secret, message, hashlib.sha256).hexdigest()


def codes_match(secret: bytes, verification_id: str, code: str, digest: str) -> bool:
    """Constant-time check of an entered code against the stored digest."""
    return hmac.compare_digest(code_digest(secret, verification_id, code), digest)
