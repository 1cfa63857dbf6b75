"""Wire-level pieces of the Telegram Gateway emulator.

Parameter reading and validation, the per-request record that renders the
``RequestStatus`` JSON, and the request log entry. Kept apart from
:mod:`otp_router.emulators.telegram` so that module holds only behaviour
(billing, delivery, reports, admin).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from dataclasses import asdict, dataclass
from decimal import Decimal
from typing import Any

import phonenumbers
from aiohttp import web

__all__ = [
    "CANONICAL_METHODS",
    "ApiError",
    "BadGateway",
    "Garbage",
    "LogEntry",
    "RequestRecord",
    "SendParams",
    "is_e164",
    "parse_send_params",
    "read_params",
    "str_param",
]

#: Lower-cased method name → the documented spelling (names are case-insensitive).
CANONICAL_METHODS = {
    name.lower(): name
    for name in (
        "checkSendAbility",
        "sendVerificationMessage",
        "checkVerificationStatus",
        "revokeVerificationMessage",
    )
}
_SENDER_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]{3,31}")


class ApiError(Exception):
    """Answer ``{"ok": false, "error": error}``.

    Args:
        error: The Gateway error string.
    """

    def __init__(self, error: str) -> None:
        super().__init__(error)
        self.error = error


class BadGateway(Exception):
    """Answer a scripted HTTP 502 with a non-JSON body."""


class Garbage(Exception):
    """Answer a scripted HTTP 200 whose body is not JSON."""


@functools.lru_cache(maxsize=65536)
def is_e164(phone: str) -> bool:
    """True when ``phone`` is written in E.164 (``+`` and digits, a possible length).

    Format, not validity: fictional test numbers (``+1 555…``) pass as long as
    they are E.164. Cached, since benchmarks repeat numbers.
    """
    if not phone.startswith("+"):
        return False
    try:
        parsed = phonenumbers.parse(phone, None)
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_possible_number(parsed) and (
        phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164) == phone
    )


def str_param(params: dict[str, Any], name: str, error: str) -> str | None:
    """A string parameter (JSON integers accepted); ``error`` when it has another type."""
    value = params.get(name)
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ApiError(error)


def _int_param(params: dict[str, Any], name: str, error: str) -> int | None:
    value = params.get(name)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    # Query strings and forms carry numbers as text.
    if isinstance(value, str) and value.isascii() and value.lstrip("-").isdigit():
        return int(value)
    raise ApiError(error)


async def read_params(request: web.Request) -> dict[str, Any]:
    """Merge query-string, form and JSON parameters (the body wins).

    Raises:
        ApiError: ``REQUEST_INVALID`` for a JSON body that is not an object
            (an emulator-only string: the real one is undocumented).
    """
    params: dict[str, Any] = dict(request.query)
    if not request.can_read_body:
        return params
    content_type = request.content_type
    if content_type == "application/json":
        raw = await request.read()
        if raw.strip():
            try:
                data = json.loads(raw)
            except ValueError:
                raise ApiError("REQUEST_INVALID") from None
            if not isinstance(data, dict):
                raise ApiError("REQUEST_INVALID")
            params.update(data)
    elif content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
        form = await request.post()
        params.update({key: value for key, value in form.items() if isinstance(value, str)})
    return params


@dataclass(frozen=True, slots=True)
class SendParams:
    """The validated optional parameters of ``sendVerificationMessage``."""

    code: str | None
    code_length: int | None
    ttl: int | None
    payload: str | None
    callback_url: str | None
    request_id: str | None


def parse_send_params(params: dict[str, Any]) -> SendParams:
    """Validate ``sendVerificationMessage`` parameters against the documented ranges.

    Raises:
        ApiError: ``CODE_INVALID``, ``CODE_LENGTH_REQUIRED``, ``CODE_LENGTH_INVALID``,
            ``TTL_INVALID``, ``PAYLOAD_INVALID``, ``CALLBACK_URL_INVALID``,
            ``SENDER_USERNAME_INVALID`` or ``REQUEST_ID_INVALID``.
    """
    code = str_param(params, "code", "CODE_INVALID")
    code_length = _int_param(params, "code_length", "CODE_LENGTH_INVALID")
    if code is not None:
        if not (code.isascii() and code.isdigit() and 4 <= len(code) <= 8):
            raise ApiError("CODE_INVALID")
    elif code_length is None:
        # Neither code nor code_length: Telegram would have nothing to send (UNCONFIRMED string).
        raise ApiError("CODE_LENGTH_REQUIRED")
    elif not 4 <= code_length <= 8:
        raise ApiError("CODE_LENGTH_INVALID")
    ttl = _int_param(params, "ttl", "TTL_INVALID")
    if ttl is not None and not 30 <= ttl <= 3600:
        raise ApiError("TTL_INVALID")
    payload = str_param(params, "payload", "PAYLOAD_INVALID")
    if payload is not None and len(payload.encode("utf-8")) > 128:
        raise ApiError("PAYLOAD_INVALID")
    callback_url = str_param(params, "callback_url", "CALLBACK_URL_INVALID")
    if callback_url is not None and (
        len(callback_url.encode("utf-8")) > 256 or not callback_url.startswith(("https://", "http://"))
    ):
        raise ApiError("CALLBACK_URL_INVALID")
    sender = str_param(params, "sender_username", "SENDER_USERNAME_INVALID")
    if sender is not None and not _SENDER_RE.fullmatch(sender):
        raise ApiError("SENDER_USERNAME_INVALID")
    request_id = str_param(params, "request_id", "REQUEST_ID_INVALID")
    return SendParams(code, code_length, ttl, payload, callback_url, request_id)


@dataclass(frozen=True, slots=True)
class LogEntry:
    """One API request the emulator received.

    Attributes:
        seq: 1, 2, 3… in arrival order.
        time: Clock time of arrival.
        method: Canonical method name, or the path as requested when unknown.
        phone_number: The number concerned, when known (from the request or its request_id).
        request_id: The request concerned, when known.
        outcome: ``"ok"``, the error string, ``"HTTP_502"`` or ``"GARBAGE"``; a
            request that took effect but got no answer is ``"CONNECTION_RESET"``
            or ``"NO_ANSWER"``.
        http_status: Status answered; 0 when no answer was sent.
        charged: Amount this call charged, as a decimal string; None when free.
    """

    seq: int
    time: float
    method: str
    phone_number: str | None
    request_id: str | None
    outcome: str
    http_status: int
    charged: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(slots=True)
class RequestRecord:
    """Everything the emulator knows about one ``request_id``.

    ``cost`` is what the request was charged; ``sent`` turns True at the one
    send it allows. ``delivery``/``verification`` hold the raw status strings.
    """

    request_id: str
    phone: str
    cost: Decimal
    sent: bool = False
    code: str | None = None
    ttl: int | None = None
    callback_url: str | None = None
    payload: str | None = None
    delivery: str | None = None
    delivery_at: int = 0
    refunded: bool = False
    verification: str | None = None
    verification_at: int = 0
    code_entered: str | None = None
    wrong_codes: int = 0
    timer: asyncio.TimerHandle | None = None

    def status(self, balance: Decimal | None = None) -> dict[str, Any]:
        """The ``RequestStatus`` JSON object; ``balance`` only after a charging call."""
        out: dict[str, Any] = {
            "request_id": self.request_id,
            "phone_number": self.phone,
            "request_cost": float(self.cost),
        }
        if self.sent:
            out["is_refunded"] = self.refunded
        if balance is not None:
            out["remaining_balance"] = float(balance)
        if self.delivery is not None:
            out["delivery_status"] = {"status": self.delivery, "updated_at": self.delivery_at}
        if self.verification is not None:
            verification: dict[str, Any] = {"status": self.verification, "updated_at": self.verification_at}
            if self.code_entered is not None:
                verification["code_entered"] = self.code_entered
            out["verification_status"] = verification
        if self.payload is not None:
            out["payload"] = self.payload
        return out
