"""Pydantic models of the HTTP API's requests and responses: the source of the OpenAPI document.

The request models list the fields each endpoint takes (unknown ones are a
400) and are checked against the parsed input; the response models describe
what :meth:`otp_router.models.Verification.to_dict`,
:meth:`otp_router.models.CheckResult.to_dict` and the error helpers of
:mod:`otp_router.webapp.common` return. FastAPI turns them into the
``components/schemas`` of ``/openapi.json``; a property-based test
(``tests/webapp/test_webapp_schema.py``) checks real answers against them.

Class names are the schema names in the document.
"""

from __future__ import annotations

from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ERROR_CODES",
    "CheckRequest",
    "CheckResult",
    "Error",
    "ErrorDetail",
    "Fallback",
    "Health",
    "NoFields",
    "StartRequest",
    "Verification",
    "WebhookAck",
]

ErrorCode = Literal[
    "bad_request",
    "invalid_phone_number",
    "invalid_code",
    "unauthorized",
    "not_found",
    "method_not_allowed",
    "idempotency_conflict",
    "payload_too_large",
    "unsupported_media_type",
    "unsupported_country",
    "unsupported_number_type",
    "rate_limited",
    "resend_not_allowed",
    "invalid_signature",
    "stale_webhook",
    "all_providers_failed",
    "store_unavailable",
    "internal_error",
]

#: Every ``error.code`` the app answers with.
ERROR_CODES: tuple[str, ...] = get_args(ErrorCode)


class _Request(BaseModel):
    # strict: a number or a list where a string belongs is refused, never converted.
    model_config = ConfigDict(extra="forbid", strict=True)


class StartRequest(_Request):
    """Start a verification: send a code to ``phone``."""

    phone: str = Field(
        description=(
            "The number, in international form (+4915123456789) unless default_region is given. "
            "In a query string a literal + that starts the value and is followed by a digit is a plus "
            "sign (phone=+4915123456789 works as typed); %2B always is."
        ),
        examples=["+4915123456789"],
    )
    idempotency_key: str | None = Field(
        default=None,
        max_length=200,
        description="Same key, same verification: a repeated start sends nothing new. Empty means none.",
    )
    default_region: str | None = Field(
        default=None,
        description="ISO 3166-1 region for numbers in national form (e.g. DE). Empty means none.",
        examples=["DE"],
    )


class CheckRequest(_Request):
    """Check the code the user entered."""

    code: str = Field(
        description="The entered code: digits only, of the configured length (no attempt is used otherwise).",
        json_schema_extra={"pattern": "^[0-9]+$"},
        examples=["123456"],
    )


class NoFields(_Request):
    """No fields: an empty body (or an empty JSON object or form)."""


class Fallback(BaseModel):
    """One move to the next channel."""

    from_: str = Field(alias="from", description="Channel left (telegram, sms).")
    to: str | None = Field(description="Channel moved to; null when none was left.")
    reason: str = Field(description="Why (ability_refused, deadline, expired, user_resend …).")
    at: float = Field(description="Unix time.")


class Verification(BaseModel):
    """A verification. Never contains the phone number or the code."""

    id: str
    status: Literal["pending", "verified", "expired", "canceled", "failed", "too_many_attempts"]
    channel: Literal["telegram", "sms"] | None = Field(description="Channel in use; null before the first.")
    region: str = Field(description="ISO 3166-1 alpha-2 region of the number.")
    created_at: float = Field(description="Unix time.")
    expires_at: float = Field(description="Unix time after which the code is refused.")
    attempts_left: int = Field(ge=0, description="Code checks left.")
    cost: str = Field(description="Net cost so far, USD, as a decimal string (refunds deducted).")
    delivered: bool = Field(description="Whether any channel reported the code delivered.")
    fallbacks: list[Fallback]
    time_to_code: float | None = Field(
        description="Seconds from creation to the first delivery report; null before one."
    )
    paid_twice: bool = Field(description="A delivered (charged) Telegram message and a charged SMS.")
    paid_twice_extra: str = Field(
        description="USD paid for other channels on top of that Telegram message (decimal string)."
    )


class CheckResult(BaseModel):
    """The outcome of a check. An unknown id is ``not_found`` here, not a 404."""

    id: str
    status: Literal["valid", "invalid", "expired", "too_many_attempts", "not_found"]
    valid: bool
    attempts_left: int = Field(ge=0)


class ErrorDetail(BaseModel):
    """``code`` is stable and meant for programs; ``message`` is for people and may change."""

    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    message: str
    verification_id: str | None = Field(
        default=None, description="all_providers_failed: the stored, failed verification (if any)."
    )
    causes: dict[str, str] | None = Field(
        default=None, description="all_providers_failed: reason per channel, in the order tried."
    )


class Error(BaseModel):
    """Every error answer of the app has this shape."""

    model_config = ConfigDict(extra="forbid")

    error: ErrorDetail


class WebhookAck(BaseModel):
    """A delivery report was taken (also for duplicates and unknown verifications)."""

    ok: Literal[True]
    outcome: Literal["accepted", "duplicate", "ignored"]


class Health(BaseModel):
    """Dependency pings: names that answered, and the failing ones with the exception."""

    ok: list[str]
    failing: dict[str, str]
