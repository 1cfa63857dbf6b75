"""The Telegram Gateway channel: typed wire models, a low-level client, the adapter.

Three layers, smallest first:

* :class:`RequestStatus` (with :class:`DeliveryStatus` and
  :class:`VerificationStatus`): pydantic models of the Gateway's result and
  delivery-report objects. Unknown fields are kept and unknown status strings
  map to :attr:`DeliveryState.UNKNOWN` instead of failing, because Telegram
  adds values (``delivered`` and ``expired`` arrived in February 2025).
* :class:`TelegramGatewayClient`: one method per API method, parameter checks
  before any I/O, retries from :mod:`otp_router.retry` and the mapping of
  every failure into :mod:`otp_router.errors`.
* :class:`TelegramChannel`: the :class:`~otp_router.providers.base.Channel`
  the router uses.

Delivery reports are checked with :func:`verify_report_signature` (hex
HMAC-SHA256 keyed with the raw SHA-256 digest of the token over
``timestamp + "\\n" + raw body``) and parsed with :func:`parse_report`.

Local parameter checks raise :class:`~otp_router.errors.InputError` (a
``ValueError``), or :class:`~otp_router.errors.InvalidCode` for a malformed
code: the caller's input was unusable and nothing was sent or charged.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from otp_router.config import RetrySettings, Settings, TelegramSettings
from otp_router.errors import (
    ConfigError,
    InputError,
    InvalidCode,
    InvalidRecipient,
    InvalidSignature,
    MessageAlreadySent,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderResponseError,
    ProviderUnavailable,
    StaleWebhook,
    WebhookError,
)
from otp_router.inputs import JsonInputError, decode_json
from otp_router.logs import event
from otp_router.providers import transport
from otp_router.providers.base import (
    Capabilities,
    ChannelName,
    DeliveryState,
    InboundReport,
    ProbeResult,
    Receive,
    ReceivedReport,
    ReceiverSpec,
    SendRequest,
    SendResult,
    StatusResult,
)
from otp_router.retry import CallKind, RetryHook, retrying

if TYPE_CHECKING:
    from otp_router.providers.registry import AdapterContext

__all__ = [
    "DeliveryStatus",
    "RequestStatus",
    "TelegramChannel",
    "TelegramGatewayClient",
    "VerificationStatus",
    "error_from_string",
    "map_transport_error",
    "parse_report",
    "sign_report",
    "verify_report_signature",
]

PROVIDER = "telegram"
TTL_MIN = 30
TTL_MAX = 3600
CODE_MIN_LENGTH = 4
CODE_MAX_LENGTH = 8
PAYLOAD_MAX_BYTES = 128
CALLBACK_URL_MAX_BYTES = 256
#: Largest delivery report parsed (the web app refuses larger bodies before the signature check).
REPORT_MAX_BYTES = 64 * 1024

_log = logging.getLogger(__name__)

_DELIVERY_STATES = {
    "sent": DeliveryState.SENT,
    "delivered": DeliveryState.DELIVERED,
    "read": DeliveryState.READ,
    "expired": DeliveryState.EXPIRED,
    "revoked": DeliveryState.REVOKED,
}
# After these the price can no longer change: delivered in time is never
# refunded, expired is refunded, revoked is never refunded.
_FINAL_STATES = frozenset(
    {DeliveryState.DELIVERED, DeliveryState.READ, DeliveryState.EXPIRED, DeliveryState.REVOKED}
)
# The number cannot receive codes on Telegram: the router falls back to SMS.
_RECIPIENT_ERRORS = frozenset(
    {"PHONE_NUMBER_NOT_FOUND", "PHONE_NUMBER_NOT_AVAILABLE", "PHONE_NUMBER_INVALID"}
)
_REJECTED_ERRORS = frozenset(
    {
        "BALANCE_NOT_ENOUGH",
        "CALLBACK_URL_INVALID",
        "TTL_INVALID",
        "PAYLOAD_INVALID",
        "UNKNOWN_METHOD",
        "PHONE_NUMBER_MISMATCH",
    }
)
_REJECTED_PREFIXES = ("ACCESS_TOKEN_", "SENDER_", "CODE_", "REQUEST_ID_")
_FLOOD_PREFIX = "FLOOD_WAIT_"


def _to_decimal(value: Any) -> Any:
    """Turn JSON numbers into exact decimals; ``str`` first so 0.01 stays 0.01."""
    if isinstance(value, bool):
        return value  # let pydantic refuse it
    if isinstance(value, float | int):
        return Decimal(str(value))
    return value


class _Wire(BaseModel):
    # Tolerant reader: Telegram may add fields; we keep them rather than fail.
    model_config = ConfigDict(extra="allow", frozen=True)


class DeliveryStatus(_Wire):
    """``DeliveryStatus``: where the message is.

    Attributes:
        status: The raw value (``sent``, ``delivered``, ``read``, ``expired``,
            ``revoked`` or anything newer).
        updated_at: Unix time of the last change.
    """

    status: str
    updated_at: int | None = None

    @property
    def state(self) -> DeliveryState:
        """The provider-neutral state; :attr:`DeliveryState.UNKNOWN` for values we do not know."""
        return _DELIVERY_STATES.get(self.status, DeliveryState.UNKNOWN)


class VerificationStatus(_Wire):
    """``VerificationStatus``: the result of checking an entered code.

    Attributes:
        status: Raw value: ``code_valid``, ``code_invalid``,
            ``code_max_attempts_exceeded``, ``expired`` (or anything newer).
        updated_at: Unix time of this status.
        code_entered: The code the user entered (hidden from the repr).
    """

    status: str
    updated_at: int | None = None
    code_entered: str | None = Field(default=None, repr=False)

    @property
    def is_valid(self) -> bool:
        """True when Telegram accepted the code."""
        return self.status == "code_valid"


class RequestStatus(_Wire):
    """``RequestStatus``: the result of every method but revoke, and the body of a delivery report.

    Money fields are :class:`~decimal.Decimal`, converted from the JSON number
    through its decimal text so that ``0.01`` is exactly ``Decimal("0.01")``.

    Attributes:
        request_id: The verification request.
        phone_number: E.164 number (hidden from the repr).
        request_cost: What the request cost, in account credits.
        is_refunded: True once the fee was refunded (not delivered within ttl).
        remaining_balance: Balance after a charging call; absent otherwise.
        delivery_status: Present once a message was sent.
        verification_status: Present once a code was checked.
        payload: Our payload echoed back.
    """

    request_id: str
    phone_number: str = Field(repr=False)
    request_cost: Decimal
    is_refunded: bool = False
    remaining_balance: Decimal | None = None
    delivery_status: DeliveryStatus | None = None
    verification_status: VerificationStatus | None = None
    payload: str | None = None

    _money = field_validator("request_cost", "remaining_balance", mode="before")(_to_decimal)

    @property
    def state(self) -> DeliveryState:
        """Delivery state; :attr:`DeliveryState.PENDING` while no message was sent."""
        return self.delivery_status.state if self.delivery_status else DeliveryState.PENDING


# --------------------------------------------------------------------------- errors


def error_from_string(error: str, *, method: str, http_status: int = 200) -> ProviderError:
    """Map a Gateway ``error`` string to our exception; the string is kept in ``.code``.

    Args:
        error: The ``error`` field of an ``ok: false`` answer.
        method: API method, for the message.
        http_status: Status of the answer. An *unknown* error string on a 5xx
            is treated as transient; on anything else as a rejection.

    Returns:
        The exception to raise (the caller raises it).
    """
    message = f"Telegram Gateway {method} failed: {error}"
    if error.startswith(_FLOOD_PREFIX):
        wait = error.removeprefix(_FLOOD_PREFIX)
        # N is assumed to be seconds (UNCONFIRMED); an unparsable N still means "slow down".
        retry_after = float(wait) if wait.isascii() and wait.isdigit() else None
        return ProviderRateLimited(message, provider=PROVIDER, code=error, retry_after=retry_after)
    if error in _RECIPIENT_ERRORS:
        return InvalidRecipient(message, provider=PROVIDER, code=error)
    if error == "MESSAGE_ALREADY_SENT":
        # Our own request id already carried a message: the router reads this as "sent".
        return MessageAlreadySent(message, provider=PROVIDER, code=error)
    if error in _REJECTED_ERRORS or error.startswith(_REJECTED_PREFIXES):
        return ProviderRejected(message, provider=PROVIDER, code=error)
    if http_status >= 500:
        return ProviderUnavailable(message, provider=PROVIDER, code=error)
    return ProviderRejected(message, provider=PROVIDER, code=error)


def map_transport_error(exc: Exception, *, method: str) -> ProviderError:
    """Map an httpx/aiohttp failure of one Gateway call (see :mod:`otp_router.providers.transport`).

    Args:
        exc: An ``httpx.HTTPError``/``httpx.InvalidURL`` or ``aiohttp.ClientError``.
        method: API method, for the message.

    Returns:
        The exception to raise ``from exc``.
    """
    # First line only: enough to debug, and bodies or headers never ride along.
    detail = str(exc).split("\n", 1)[0][:200]
    message = f"Telegram Gateway {method}: {type(exc).__name__} {detail}".rstrip()
    return transport.map_transport_error(exc, provider=PROVIDER, message=message)


def _parse_envelope(method: str, response: httpx.Response) -> Any:
    """Return ``result`` of an ``ok: true`` envelope or raise the mapped error."""
    status = response.status_code
    try:
        # parse_float=Decimal keeps money exact from the first byte.
        body = json.loads(response.content, parse_float=Decimal)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        body = None
    if not isinstance(body, dict) or not isinstance(body.get("ok"), bool):
        if status >= 500:
            raise ProviderUnavailable(
                f"Telegram Gateway {method}: HTTP {status} without a JSON envelope",
                provider=PROVIDER,
                code=f"HTTP_{status}",
            )
        if status == 429:
            raise ProviderRateLimited(
                f"Telegram Gateway {method}: HTTP 429",
                provider=PROVIDER,
                code="HTTP_429",
                retry_after=_retry_after_header(response),
            )
        raise ProviderResponseError(
            f"Telegram Gateway {method}: HTTP {status} with a body that is not a Gateway envelope",
            provider=PROVIDER,
        )
    if body["ok"]:
        if "result" not in body:
            raise ProviderResponseError(f"Telegram Gateway {method}: ok without result", provider=PROVIDER)
        return body["result"]
    error = body.get("error")
    if not isinstance(error, str) or not error:
        raise ProviderResponseError(
            f"Telegram Gateway {method}: ok is false without an error string", provider=PROVIDER
        )
    raise error_from_string(error, method=method, http_status=status)


def _retry_after_header(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after", "")
    return float(value) if value.isascii() and value.isdigit() else None


def _request_status(method: str, result: Any) -> RequestStatus:
    try:
        return RequestStatus.model_validate(result)
    except ValidationError as exc:
        # Only field locations: pydantic's own text repeats input values (phone numbers).
        where = ", ".join(".".join(str(p) for p in err["loc"]) or "result" for err in exc.errors())
        # from None: the ValidationError would carry the phone number into tracebacks.
        raise ProviderResponseError(
            f"Telegram Gateway {method}: malformed result ({where})", provider=PROVIDER
        ) from None


# --------------------------------------------------------------------------- client


class TelegramGatewayClient:
    """Low-level Gateway API client: one method per API method.

    Every call POSTs JSON to ``{base_url}/{method}`` with ``Authorization:
    Bearer``, through the shared ``httpx.AsyncClient`` (never its own), and is
    retried per :mod:`otp_router.retry`.

    Args:
        settings: Token, base URL, timeout.
        retry: Retry limits.
        client: The process's shared HTTP client; not closed by this class.
        on_retry: Called before each retry (metrics/logging).
    """

    def __init__(
        self,
        settings: TelegramSettings,
        retry: RetrySettings,
        client: httpx.AsyncClient,
        *,
        on_retry: RetryHook | None = None,
    ) -> None:
        self._settings = settings
        self._retry = retry
        self._client = client
        self._on_retry = on_retry
        self._timeout = httpx.Timeout(settings.timeout, connect=client.timeout.connect)

    async def check_send_ability(self, phone_number: str) -> RequestStatus:
        """``checkSendAbility``: can this number receive codes? Charges one message when it can.

        Retried only when the request cannot have been performed: a probe
        that timed out may already have charged, and a second probe would
        start a new request with a second fee.

        Raises:
            InvalidRecipient: ``PHONE_NUMBER_NOT_FOUND`` and friends.
            ProviderError: Any other failure.
        """
        result = await self._call("checkSendAbility", {"phone_number": phone_number}, CallKind.SEND)
        return _request_status("checkSendAbility", result)

    async def send_verification_message(
        self,
        phone_number: str,
        *,
        request_id: str | None = None,
        sender_username: str | None = None,
        code: str | None = None,
        code_length: int | None = None,
        callback_url: str | None = None,
        payload: str | None = None,
        ttl: int | None = None,
    ) -> RequestStatus:
        """``sendVerificationMessage``. Free when ``request_id`` comes from a probe.

        Retried only when the request cannot have been performed (connection
        refused, ``FLOOD_WAIT_N``): anything else might send a second code.

        Raises:
            InvalidCode: ``code`` is not 4 to 8 digits.
            InputError: ``ttl``, ``code_length``, ``payload`` or ``callback_url`` out of range.
            ProviderError: The Gateway or the network failed.
        """
        _check_send_params(code, code_length, ttl, payload, callback_url)
        params = {
            "phone_number": phone_number,
            "request_id": request_id,
            "sender_username": sender_username,
            "code": code,
            "code_length": code_length,
            "callback_url": callback_url,
            "payload": payload,
            "ttl": ttl,
        }
        result = await self._call("sendVerificationMessage", params, CallKind.SEND)
        return _request_status("sendVerificationMessage", result)

    async def check_verification_status(self, request_id: str, code: str | None = None) -> RequestStatus:
        """``checkVerificationStatus``, optionally checking the ``code`` the user entered (a read)."""
        params = {"request_id": request_id, "code": code}
        result = await self._call("checkVerificationStatus", params, CallKind.READ)
        return _request_status("checkVerificationStatus", result)

    async def revoke_verification_message(self, request_id: str) -> bool:
        """``revokeVerificationMessage``: True when the request was received (idempotent, a read)."""
        result = await self._call("revokeVerificationMessage", {"request_id": request_id}, CallKind.READ)
        if not isinstance(result, bool):
            raise ProviderResponseError(
                "Telegram Gateway revokeVerificationMessage: result is not a boolean", provider=PROVIDER
            )
        return result

    async def _call(self, method: str, params: dict[str, Any], kind: CallKind) -> Any:
        body = {name: value for name, value in params.items() if value is not None}
        async for attempt in retrying(self._retry, kind, on_retry=self._on_retry):
            with attempt:
                return await self._request(method, body)
        raise AssertionError("unreachable: tenacity re-raises the last error")  # pragma: no cover

    async def _request(self, method: str, body: dict[str, Any]) -> Any:
        token = self._settings.token.get_secret_value()
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            response = await self._client.post(
                f"{self._settings.base_url}/{method}", json=body, headers=headers, timeout=self._timeout
            )
        except (httpx.HTTPError, httpx.InvalidURL, aiohttp.ClientError) as exc:
            # aiohttp's ClientResponseError repr carries the request headers (our token): drop the chain.
            chained = None if isinstance(exc, aiohttp.ClientResponseError) else exc
            raise map_transport_error(exc, method=method) from chained
        return _parse_envelope(method, response)


def _check_send_params(
    code: str | None,
    code_length: int | None,
    ttl: int | None,
    payload: str | None,
    callback_url: str | None,
) -> None:
    if code is not None and not (
        code.isascii() and code.isdigit() and CODE_MIN_LENGTH <= len(code) <= CODE_MAX_LENGTH
    ):
        raise InvalidCode(f"code must be {CODE_MIN_LENGTH} to {CODE_MAX_LENGTH} digits")
    if code_length is not None and not CODE_MIN_LENGTH <= code_length <= CODE_MAX_LENGTH:
        raise InputError(f"code_length must be {CODE_MIN_LENGTH} to {CODE_MAX_LENGTH}")
    if ttl is not None and not TTL_MIN <= ttl <= TTL_MAX:
        raise InputError(f"ttl must be {TTL_MIN} to {TTL_MAX} seconds")
    if payload is not None and len(payload.encode("utf-8")) > PAYLOAD_MAX_BYTES:
        raise InputError(f"payload must be at most {PAYLOAD_MAX_BYTES} bytes")
    if callback_url is not None and len(callback_url.encode("utf-8")) > CALLBACK_URL_MAX_BYTES:
        raise InputError(f"callback_url must be at most {CALLBACK_URL_MAX_BYTES} bytes")


# --------------------------------------------------------------------------- channel


def _status_result(status: RequestStatus) -> StatusResult:
    state = status.state
    return StatusResult(
        ref=status.request_id,
        state=state,
        # What was charged; ``refunded`` says it was given back.
        cost=status.request_cost,
        refunded=status.is_refunded,
        cost_is_final=status.is_refunded or state in _FINAL_STATES,
        raw_status=status.delivery_status.status if status.delivery_status else None,
        updated_at=status.delivery_status.updated_at if status.delivery_status else None,
    )


def parse_report(body: bytes) -> tuple[StatusResult, str | None]:
    """Parse a delivery report (the raw POST body) after its signature was verified.

    Args:
        body: Raw request body, a ``RequestStatus`` JSON object.

    Returns:
        The status and the ``payload`` we sent with the message (our verification id).

    Raises:
        WebhookError: The body is not a ``RequestStatus``.
    """
    try:
        data = decode_json(body, max_bytes=REPORT_MAX_BYTES, parse_float=Decimal)
    except JsonInputError as exc:
        raise WebhookError(f"Telegram delivery report is not acceptable JSON: {exc}") from None
    try:
        status = RequestStatus.model_validate(data)
    except ValidationError:
        raise WebhookError("Telegram delivery report is not a RequestStatus") from None
    return _status_result(status), status.payload


def _receiver(settings: Settings) -> Receive:
    """The delivery-report checker for ``settings.telegram`` (see :data:`RECEIVER`)."""
    telegram = settings.telegram
    token = telegram.token.get_secret_value()

    def receive(inbound: InboundReport, now: float) -> ReceivedReport:
        if not token:
            # An empty key would let anyone sign: refuse rather than accept everything.
            raise InvalidSignature("OTP_ROUTER_TELEGRAM__TOKEN is not set")
        verify_report_signature(
            token,
            inbound.headers.get("x-request-timestamp", ""),
            inbound.headers.get("x-request-signature", ""),
            inbound.body,
            max_age=telegram.callback_max_age,
            now=now,
        )
        report, payload = parse_report(inbound.body)
        return ReceivedReport(payload, report)

    return receive


def _header(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "header",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


#: The Gateway's delivery reports: signed JSON ``RequestStatus`` bodies (our payload is the verification id).
RECEIVER = ReceiverSpec(
    provider=PROVIDER,
    path="/webhooks/telegram",
    build=_receiver,
    operation_id="telegramReport",
    summary="Telegram Gateway delivery report, signed with X-Request-Signature.",
    bad_request="bad_request: signed, but not a RequestStatus.",
    openapi_extra={
        "parameters": [
            _header("X-Request-Timestamp", "Unix time the report was signed at."),
            _header("X-Request-Signature", "HMAC-SHA256 of timestamp and body (hex)."),
        ],
        "requestBody": {"required": True, "content": {"application/json": {"schema": {"type": "object"}}}},
    },
)


class TelegramChannel:
    """The Telegram Gateway as a :class:`~otp_router.providers.base.Channel`.

    Args:
        settings: Token, base URL, timeout, sender username.
        retry: Retry limits.
        client: The shared HTTP client (not closed by :meth:`aclose`).
        on_retry: Called before each retry.
    """

    name = ChannelName.TELEGRAM
    provider = PROVIDER
    capabilities = Capabilities(
        # checkSendAbility: free when the number cannot receive, charged in advance when it can.
        probe=True,
        probe_charged=True,
        # One message per request_id (MESSAGE_ALREADY_SENT): a repeat with it is safe.
        idempotent_ref=True,
        revoke=True,
        report_code=True,
        # Not delivered within the ttl: refunded.
        refunds_undelivered=True,
        ttl_min=TTL_MIN,
        ttl_max=TTL_MAX,
        timeout_maybe_sent=True,
        lookup=False,
    )
    #: Gateway API method per channel verb (metrics label calls by them).
    methods = MappingProxyType(
        {
            "probe": "checkSendAbility",
            "send": "sendVerificationMessage",
            "status": "checkVerificationStatus",
            "revoke": "revokeVerificationMessage",
            "report_code": "checkVerificationStatus",
        }
    )
    #: Where delivery reports arrive and how they are checked.
    report_receiver = RECEIVER
    #: Parse a delivery report body (see :func:`parse_report`).
    parse_report = staticmethod(parse_report)

    def __init__(
        self,
        settings: TelegramSettings,
        retry: RetrySettings,
        client: httpx.AsyncClient,
        *,
        on_retry: RetryHook | None = None,
    ) -> None:
        self._settings = settings
        self.client = TelegramGatewayClient(settings, retry, client, on_retry=on_retry)

    @classmethod
    def from_settings(cls, settings: Settings, context: AdapterContext) -> TelegramChannel | None:
        """The adapter for ``settings.telegram``, or None when it is disabled.

        Raises:
            ConfigError: Enabled without a token.
        """
        if not settings.telegram.enabled:
            return None
        if not settings.telegram.token.get_secret_value():
            raise ConfigError(
                "OTP_ROUTER_TELEGRAM__TOKEN is empty: set it, "
                "or OTP_ROUTER_TELEGRAM__ENABLED=false for SMS only"
            )
        return cls(settings.telegram, settings.retry, context.client, on_retry=context.on_retry(PROVIDER))

    @staticmethod
    def callback_url(base: str, payload: str) -> str:
        """Where the Gateway posts delivery reports (they carry our payload in the body)."""
        return f"{base}/webhooks/telegram"

    async def probe(self, phone: str) -> ProbeResult:
        """``checkSendAbility``. A number that cannot receive is a result, not an error.

        Returns:
            Reachable with the ``request_id`` to send with (and the fee charged in
            advance), or unreachable with the Gateway's error string as reason.
        """
        try:
            status = await self.client.check_send_ability(phone)
        except InvalidRecipient as exc:
            return ProbeResult(reachable=False, reason=exc.code)
        return ProbeResult(
            reachable=True,
            ref=status.request_id,
            cost=status.request_cost,
            remaining_balance=status.remaining_balance,
        )

    async def send(self, request: SendRequest) -> SendResult:
        """``sendVerificationMessage`` with our code, the probe's request_id and a clamped ttl.

        The cost is not final: it is refunded if the message is not delivered within ttl.
        """
        ttl = max(TTL_MIN, min(TTL_MAX, int(request.ttl)))
        status = await self.client.send_verification_message(
            request.phone,
            request_id=request.probe_ref,
            sender_username=self._settings.sender_username,
            code=request.code,
            callback_url=request.callback_url,
            payload=request.payload,
            ttl=ttl,
        )
        return SendResult(
            ref=status.request_id,
            state=status.state,
            cost=status.request_cost,
            cost_is_final=False,
            remaining_balance=status.remaining_balance,
        )

    async def status(self, ref: str) -> StatusResult:
        """``checkVerificationStatus`` mapped to a :class:`StatusResult`.

        :attr:`DeliveryState.PENDING` means no message was ever sent under this
        ``request_id`` (a probe only): a send that timed out did not happen and
        may be made again with the same id.
        """
        return _status_result(await self.client.check_verification_status(ref))

    async def revoke(self, ref: str) -> bool:
        """``revokeVerificationMessage`` (a delivered message stays, and revoked is never refunded)."""
        return await self.client.revoke_verification_message(ref)

    async def report_code(self, ref: str, code: str) -> None:
        """Tell Telegram the entered code for its conversion statistics; best effort, never raises."""
        try:
            await self.client.check_verification_status(ref, code)
        except ProviderError as exc:
            event(_log, logging.DEBUG, "report_code_failed", reason=exc.reason, code=exc.code)

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client is shared and owned by the caller."""


# --------------------------------------------------------------------------- report integrity


def sign_report(token: str, timestamp: str, body: bytes) -> str:
    """Sign a delivery report as the Gateway does.

    Args:
        token: The API token.
        timestamp: The ``X-Request-Timestamp`` header value, as sent.
        body: The raw body bytes, as sent.

    Returns:
        Lowercase hex HMAC-SHA256 keyed with the raw SHA-256 digest of the token
        over ``timestamp + "\\n" + body``.
    """
    key = hashlib.sha256(token.encode("utf-8")).digest()
    return hmac.new(key, timestamp.encode("utf-8") + b"\n" + body, hashlib.sha256).hexdigest()


def verify_report_signature(
    token: str,
    timestamp: str,
    signature: str,
    body: bytes,
    *,
    max_age: float = 300,
    now: float | None = None,
) -> None:
    """Check a delivery report's integrity and freshness.

    The signature is checked before the age, so a forged report is always
    :class:`InvalidSignature` and only a genuine old one is :class:`StaleWebhook`.

    Args:
        token: The API token.
        timestamp: ``X-Request-Timestamp`` header.
        signature: ``X-Request-Signature`` header.
        body: Raw body bytes exactly as received (never re-serialised JSON).
        max_age: Largest accepted distance from ``now``, in seconds, either way.
        now: Current Unix time (defaults to the clock).

    Raises:
        InvalidSignature: Mismatch, or a timestamp that is not a plain integer
            (a malformed header cannot come from the Gateway).
        StaleWebhook: A valid signature on a timestamp outside ``max_age``.
    """
    # Twenty digits bound the int-to-float conversion below; real values have ten.
    if not (timestamp.isascii() and timestamp.isdigit() and len(timestamp) <= 20):
        raise InvalidSignature("X-Request-Timestamp is not an integer")
    expected = sign_report(token, timestamp, body).encode("ascii")
    if not hmac.compare_digest(expected, signature.strip().lower().encode("utf-8")):
        raise InvalidSignature("Telegram delivery report signature does not match")
    current = time.time() if now is None else now
    age = abs(current - int(timestamp))
    if age > max_age:
        raise StaleWebhook(f"Telegram delivery report is {age:.0f} s from now (limit {max_age:.0f} s)")
