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

__all__ = ["code_digest", "codes_match", "derive_code", "generate_code", "new_nonce", "validate_code"]


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


def new_nonce() -> str:
    """A fresh random nonce (128 bits) to derive one verification's code from."""
    return secrets.token_hex(16)


def derive_code(secret: bytes, verification_id: str, nonce: str, length: int) -> str:
    """The code of a verification, recomputed from the secret and its random nonce.

    Why derive instead of store: a fallback may fire minutes later in another
    process, which must send the *same* code by SMS. Deriving it means the
    store never holds the code (only the nonce and an HMAC digest), yet any
    worker holding ``OTP_ROUTER_CODE_SECRET`` can re-create it. The nonce is
    drawn with :mod:`secrets`, so the code is as unpredictable as a direct
    ``secrets`` draw to anyone without the secret. The modulo bias over a
    256-bit HMAC is far below 2**-200.
    """
    if not 4 <= length <= 8:
        raise ValueError("code length must be 4..8 (Telegram Gateway's range)")
    mac = hmac.new(secret, f"code:{verification_id}:{nonce}".encode(), hashlib.sha256).digest()
    return f"{int.from_bytes(mac, 'big') % 10**length:0{length}d}"
