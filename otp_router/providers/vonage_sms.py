"""SMS through the Vonage SMS API, a second SMS carrier (official ``vonage`` SDK).

Same channel kind as Twilio SMS, different carrier: a policy can route
``sms`` to Twilio and ``sms_backup`` to Vonage, and fall over to Vonage when
Twilio refuses, fails or its circuit is open (see docs/providers.md).

The SDK (``vonage-sms`` over ``vonage-http-client``) is synchronous and uses
``requests``; each call runs in a worker thread. The adapter mounts its own
``requests`` transport on the SDK's session so that

* the base URL is configurable (the emulator, a proxy): the SDK itself always
  builds ``https://{rest_host}/...``;
* nothing is re-sent behind our back: the SDK re-issues a request whose
  connection was dropped (``RemoteDisconnected``) as many times as its pool
  size, which for a send may deliver a second SMS. The SDK's pool size is set
  to 1 (one try) and our transport has no retries; our retry policy decides.

Send answers (``POST /sms/json``) carry a ``status`` per message: ``"0"`` is
accepted; the others are mapped below. Delivery receipts (DLRs) are parsed by
:func:`parse_receipt`, which refuses unsigned or stale ones.

Status codes (developer.vonage.com/messaging/sms/guides/troubleshooting-sms)::

    1 Throttled                          ProviderRateLimited
    5 Internal Error                     ProviderUnavailable (may have been queued: not re-sent)
    6 Invalid Message (unknown prefix)   InvalidRecipient
    7 Number Barred                      InvalidRecipient
    29 Non-Whitelisted Destination       InvalidRecipient
    33 Number de-activated (UNCONFIRMED) InvalidRecipient
    anything else                        ProviderRejected (credentials, balance, sender…)
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

import requests
import requests.adapters

from otp_router.config import RetrySettings, Settings, VonageSettings
from otp_router.errors import (
    ConfigError,
    InvalidRecipient,
    InvalidSignature,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderResponseError,
    ProviderUnavailable,
    StaleWebhook,
    WebhookError,
)
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
from otp_router.providers.transport import map_requests_error
from otp_router.retry import CallKind, RetryHook, retrying

if TYPE_CHECKING:
    from otp_router.providers.registry import AdapterContext

__all__ = ["RECEIVER", "VonageSmsChannel", "map_receipt_status", "parse_receipt", "sign_params"]

PROVIDER = "vonage"
#: The SDK's ``SmsMessage.ttl`` accepts 20 000..604 800 000 ms.
TTL_MIN, TTL_MAX = 20, 604800
#: The SDK's ``SmsMessage.callback`` accepts at most 100 characters.
CALLBACK_MAX = 100

_T = TypeVar("_T")

_RECIPIENT_STATUSES = frozenset({"6", "7", "29", "33"})
_THROTTLED, _INTERNAL = "1", "5"

_STATES: dict[str, DeliveryState] = {
    "delivered": DeliveryState.DELIVERED,
    "accepted": DeliveryState.SENT,  # handed to the downstream carrier
    "buffered": DeliveryState.PENDING,
    "expired": DeliveryState.EXPIRED,
    "failed": DeliveryState.FAILED,
    "rejected": DeliveryState.UNDELIVERED,
    "unknown": DeliveryState.UNKNOWN,
}


def map_receipt_status(status: str | None) -> DeliveryState:
    """A DLR ``status`` as our :class:`DeliveryState` (unknown values: ``UNKNOWN``)."""
    return _STATES.get((status or "").lower(), DeliveryState.UNKNOWN)


class _DropRequestLogs(logging.Filter):
    """Keeps the SDK's debug and warning lines (request data: numbers, message text) out of logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


_FILTER = _DropRequestLogs()


class _BaseUrlTransport(requests.adapters.HTTPAdapter):
    """Sends the SDK's ``https://{host}{path}`` requests to ``base_url`` + path, never retrying."""

    def __init__(self, base_url: str, *, pool_size: int = 20) -> None:
        super().__init__(pool_connections=1, pool_maxsize=pool_size, max_retries=0)
        self._base = base_url.rstrip("/")

    def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
        """Rewrite the scheme and host, then send."""
        split = urlsplit(request.url or "")
        request.url = self._base + split.path + (f"?{split.query}" if split.query else "")
        return super().send(request, *args, **kwargs)


def sign_params(params: Mapping[str, str], secret: str, method: str) -> str:
    """Vonage's signature of form parameters: HMAC over ``&key=value`` in key order.

    ``&`` and ``=`` inside values are replaced by ``_`` first, and ``sig`` is
    left out; the hex digest is compared case-insensitively. This is the
    scheme the SDK's ``Auth.sign_params`` implements (used here so that the
    emulator and tests can sign without SDK state).

    Args:
        params: Every parameter of the request (``sig`` ignored).
        secret: The account's signature secret.
        method: ``md5``, ``sha1``, ``sha256`` or ``sha512``.
    """
    mac = hmac.new(secret.encode(), digestmod=method)
    for key in sorted(params):
        if key == "sig":
            continue
        value = str(params[key]).replace("&", "_").replace("=", "_")
        mac.update(f"&{key}={value}".encode())
    return mac.hexdigest()


def _decimal(value: object, factor: float) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        amount = Decimal(str(value))
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0:
        return None
    return amount * Decimal(str(factor)) if factor != 1.0 else amount


def _receipt_time(value: str | None) -> float | None:
    """``message-timestamp`` (``YYYY-MM-DD HH:MM:SS``, UTC: UNCONFIRMED) as Unix time."""
    if not value:
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def parse_receipt(
    params: Mapping[str, str], settings: VonageSettings, *, now: float | None = None
) -> tuple[str | None, StatusResult]:
    """Check and parse one delivery receipt (query string, form or JSON fields, as a flat mapping).

    Args:
        params: The receipt's fields (``messageId``, ``status``, ``err-code``,
            ``price``, ``client-ref``, ``message-timestamp``, ``timestamp``, ``sig``…).
        settings: The signature secret and method, the price factor, the allowed clock skew.
        now: Unix time (default: the clock).

    Returns:
        ``(client_ref, status)``: our payload (the verification id) if the
        receipt carries it, and the message's state.

    Raises:
        InvalidSignature: No signature secret configured, no ``sig``, or a wrong one.
        StaleWebhook: ``timestamp`` further from ``now`` than ``callback_max_age``.
        WebhookError: No ``messageId``.
    """
    secret = settings.signature_secret.get_secret_value()
    if not secret:
        # An unsigned receipt could be forged to stop a fallback or to force one.
        raise InvalidSignature("vonage receipts are refused without OTP_ROUTER_VONAGE__SIGNATURE_SECRET")
    sig = params.get("sig", "")
    expected = sign_params(params, secret, settings.signature_method)
    if not sig or not hmac.compare_digest(sig.lower(), expected):
        raise InvalidSignature("vonage receipt signature does not match")
    try:
        stamp = float(params.get("timestamp", ""))
    except ValueError:
        raise StaleWebhook("vonage receipt without a usable timestamp") from None
    current = time.time() if now is None else now
    if abs(current - stamp) > settings.callback_max_age:
        raise StaleWebhook("vonage receipt timestamp is outside the freshness window")
    ref = params.get("messageId") or params.get("message-id")
    if not ref:
        raise WebhookError("vonage receipt without messageId")
    state = map_receipt_status(params.get("status"))
    final = state.is_delivered or state.is_failed
    cost = _decimal(params.get("price"), settings.price_to_usd)
    err = params.get("err-code")
    return params.get("client-ref") or None, StatusResult(
        ref=ref,
        state=state,
        cost=cost,
        cost_is_final=final and cost is not None,
        error_code=err if err not in (None, "", "0") else None,
        raw_status=params.get("status"),
        updated_at=_receipt_time(params.get("message-timestamp")),
    )


def _receipt_fields(inbound: InboundReport) -> dict[str, str]:
    """The receipt's fields, whichever method the dashboard chose (GET query, POST form, POST JSON)."""
    if inbound.body.lstrip().startswith(b"{"):
        try:
            data = json.loads(inbound.body)
        except ValueError:
            raise WebhookError("vonage receipt body is not JSON") from None
        if not isinstance(data, dict):
            raise WebhookError("vonage receipt body is not a JSON object")
        return {str(k): str(v) for k, v in data.items() if v is not None}
    try:
        text = inbound.body.decode("utf-8") if inbound.body else inbound.query
        return dict(parse_qsl(text, keep_blank_values=True, max_num_fields=100))
    except ValueError:  # includes UnicodeDecodeError
        raise InvalidSignature("vonage receipt is not a form") from None


def _receiver(settings: Settings) -> Receive:
    """The receipt checker for ``settings.vonage`` (see :func:`parse_receipt`)."""
    vonage = settings.vonage

    def receive(inbound: InboundReport, now: float) -> ReceivedReport:
        vid, report = parse_receipt(_receipt_fields(inbound), vonage, now=now)
        return ReceivedReport(vid, report)

    return receive


#: Delivery receipts (DLRs), signed with the account's signature secret.
RECEIVER = ReceiverSpec(
    provider=PROVIDER,
    path="/webhooks/vonage",
    build=_receiver,
    methods=("GET", "POST"),
    operation_id="vonageDeliveryReceipt",
    summary="Vonage SMS delivery receipt (GET query, POST form or POST JSON), signed with sig.",
    bad_request="bad_request: signed, but no messageId.",
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/x-www-form-urlencoded": {"schema": {"type": "object"}},
                "application/json": {"schema": {"type": "object"}},
            },
        }
    },
)


def _error_for_status(status: str, text: str) -> ProviderError:
    detail = f"vonage status {status}: {text[:120]}"
    if status == _THROTTLED:
        return ProviderRateLimited(detail, provider=PROVIDER, code=status)
    if status == _INTERNAL:
        # "An error has occurred in the platform whilst processing this message": it may
        # have been queued, so the router must not send it again blindly.
        return ProviderUnavailable(detail, provider=PROVIDER, code=status, not_performed=False)
    if status in _RECIPIENT_STATUSES:
        return InvalidRecipient(detail, provider=PROVIDER, code=status)
    return ProviderRejected(detail, provider=PROVIDER, code=status)


def _retry_after(response: Any) -> float | None:
    value = getattr(getattr(response, "headers", None), "get", lambda _k: None)("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _map_sdk_error(exc: Exception) -> ProviderError:
    """Map an exception of the SDK or of ``requests`` to our tree."""
    from vonage_http_client.errors import (
        AuthenticationError,
        ForbiddenError,
        HttpRequestError,
        RateLimitedError,
        ServerError,
    )
    from vonage_sms.errors import SmsError

    name = type(exc).__name__
    if isinstance(exc, requests.RequestException):
        return map_requests_error(exc, provider=PROVIDER, message=f"vonage transport error: {name}")
    if isinstance(exc, RateLimitedError):
        response = getattr(exc, "response", None)
        return ProviderRateLimited(
            "vonage HTTP 429", provider=PROVIDER, code="HTTP_429", retry_after=_retry_after(response)
        )
    if isinstance(exc, ServerError):
        status = getattr(getattr(exc, "response", None), "status_code", 500)
        return ProviderUnavailable(
            f"vonage HTTP {status}", provider=PROVIDER, code=f"HTTP_{status}", not_performed=False
        )
    if isinstance(exc, AuthenticationError | ForbiddenError):
        return ProviderRejected(f"vonage {name}", provider=PROVIDER, code="AUTH")
    if isinstance(exc, HttpRequestError):
        status = getattr(getattr(exc, "response", None), "status_code", 0)
        return ProviderRejected(f"vonage HTTP {status}", provider=PROVIDER, code=f"HTTP_{status}")
    if isinstance(exc, SmsError):
        # The SDK folds the status into its message: "... failed with error code 7: Number barred".
        match = re.search(r"error code (\d+)", str(exc))
        return _error_for_status(match.group(1) if match else "unknown", str(exc).rsplit(":", 1)[-1].strip())
    return ProviderResponseError(f"vonage SDK error: {name}", provider=PROVIDER, not_performed=False)


class VonageSmsChannel:
    """SMS through Vonage (implements :class:`~otp_router.providers.base.Channel`).

    Args:
        settings: Credentials, sender, template, base URL.
        retry: Retry limits (sends retry only when nothing can have been sent).
        on_retry: Called before each retry.

    Raises:
        ConfigError: Missing API key, secret or sender, or the SDK is not installed.
    """

    name = ChannelName.SMS
    provider = PROVIDER
    capabilities = Capabilities(
        probe=False,
        ttl_min=TTL_MIN,
        ttl_max=TTL_MAX,
        # A timeout or a dropped connection after writing may have queued the message.
        timeout_maybe_sent=True,
        # The SMS API has no per-recipient message search: an ambiguous send stays unknown.
        lookup=False,
    )
    methods = MappingProxyType({"send": "sms.send"})
    report_receiver = RECEIVER

    def __init__(
        self, settings: VonageSettings, retry: RetrySettings, *, on_retry: RetryHook | None = None
    ) -> None:
        api_secret = settings.api_secret.get_secret_value()
        if not settings.api_key or not api_secret:
            raise ConfigError(
                "OTP_ROUTER_VONAGE__API_KEY and OTP_ROUTER_VONAGE__API_SECRET must be set for Vonage SMS"
            )
        if not settings.from_number:
            raise ConfigError("OTP_ROUTER_VONAGE__FROM_NUMBER must be set for Vonage SMS")
        try:
            from vonage_http_client import Auth, HttpClient
            from vonage_sms import Sms
        except ImportError:
            raise ConfigError("Vonage SMS needs the SDK: pip install 'otp-router[vonage]'") from None
        self._settings = settings
        self._retry = retry
        self._on_retry = on_retry
        # Sends authenticate with the API secret, never signed: the SDK signs the message's
        # None-valued fields too, which the form encoding then drops, so the signature
        # cannot match what arrives (seen with vonage-sms 1.2 / vonage-http-client 1.5).
        auth = Auth(api_key=settings.api_key, api_secret=api_secret)
        # pool_maxsize=1: the SDK's RemoteDisconnected loop then tries once (see the module docstring).
        client = HttpClient(
            auth,
            {"rest_host": "rest.nexmo.com", "timeout": settings.timeout, "pool_maxsize": 1, "max_retries": 0},
        )
        session = getattr(client, "_session", None)
        if not isinstance(session, requests.Session):
            raise ConfigError("unsupported vonage-http-client version: no requests session to mount on")
        self._session = session
        session.mount("https://", _BaseUrlTransport(settings.base_url))
        self._sms = Sms(client)
        logging.getLogger("vonage").addFilter(_FILTER)

    @classmethod
    def from_settings(cls, settings: Settings, context: AdapterContext) -> VonageSmsChannel | None:
        """The adapter for ``settings.vonage``, or None when it is disabled."""
        if not settings.vonage.enabled:
            return None
        return cls(settings.vonage, settings.retry, on_retry=context.on_retry(PROVIDER))

    @staticmethod
    def callback_url(base: str, payload: str) -> str:
        """Where Vonage posts delivery receipts (they carry our payload as ``client-ref``)."""
        return f"{base}/webhooks/vonage"

    async def _call(self, fn: Callable[[], _T]) -> _T:
        try:
            return await asyncio.to_thread(fn)
        except Exception as exc:  # the SDK raises its own classes and requests'; map them all
            raise _map_sdk_error(exc) from exc

    async def probe(self, phone: str) -> ProbeResult:
        """No reachability check: always "try it"."""
        return ProbeResult(reachable=True)

    async def send(self, request: SendRequest) -> SendResult:
        """Send the code (``POST /sms/json``).

        Returns:
            The ``message-id`` and the price Vonage quoted (``message-price``,
            times ``price_to_usd``; final only with the receipt).

        Raises:
            InvalidRecipient: Vonage refuses this number (see the module table).
            ProviderRejected: Account or configuration problem.
            ProviderTransientError: Retries exhausted, or an outcome that may have
                sent the message (timeout, 5xx, status 5): not retried.
        """
        from vonage_sms import SmsMessage

        fields: dict[str, Any] = {
            "to": request.phone.lstrip("+"),
            "from_": self._settings.from_number,
            "text": self._settings.message_template.replace("{code}", request.code),
            "type": "text",
            "ttl": min(max(int(request.ttl), TTL_MIN), TTL_MAX) * 1000,
        }
        if request.payload:
            fields["client_ref"] = request.payload[:100]
        if request.callback_url and len(request.callback_url) <= CALLBACK_MAX:
            fields["status_report_req"] = True
            fields["callback"] = request.callback_url
        message = SmsMessage(**fields)
        async for attempt in retrying(self._retry, CallKind.SEND, on_retry=self._on_retry):
            with attempt:
                response = await self._call(lambda: self._sms.send(message))
                try:
                    first = response.messages[0]
                except (AttributeError, IndexError):
                    raise ProviderResponseError(
                        "vonage answered without a message", provider=PROVIDER, not_performed=False
                    ) from None
                ref = first.message_id
                if not ref:
                    raise ProviderResponseError(
                        "vonage accepted the message but returned no message-id",
                        provider=PROVIDER,
                        not_performed=False,
                    )
                return SendResult(
                    ref=ref,
                    state=DeliveryState.PENDING,
                    cost=_decimal(first.message_price, self._settings.price_to_usd),
                    cost_is_final=False,
                )
        raise AssertionError("unreachable: retrying() re-raises the last error")  # pragma: no cover

    async def status(self, ref: str) -> StatusResult:
        """The SMS API cannot be asked about one message: the state stays unknown (receipts tell)."""
        return StatusResult(ref, DeliveryState.UNKNOWN)

    async def revoke(self, ref: str) -> bool:
        """An SMS cannot be withdrawn."""
        return False

    async def report_code(self, ref: str, code: str) -> None:
        """Nothing to report (the conversion API needs an account feature; not used)."""

    async def aclose(self) -> None:
        """Close the SDK's connection pool."""
        await asyncio.to_thread(self._session.close)
