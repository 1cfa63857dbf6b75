"""Twilio Programmable Messaging as an SMS channel, through the official SDK.

The ``twilio`` SDK builds the requests and parses the responses; it sends
them through :class:`HttpxTwilioClient`, an adapter over the process's shared
``httpx.AsyncClient``, so timeouts, connection pooling and error mapping are
the same as for every other provider.

Errors are mapped at this boundary (no Twilio or httpx exception escapes).
Sync error codes met when creating a message:

=====  ======================================  ===================  ====================================
code   meaning                                 our class            why
=====  ======================================  ===================  ====================================
21211  invalid 'To' number                     InvalidRecipient     this number cannot get an SMS
21614  'To' is not a mobile number             InvalidRecipient     a property of the number
21610  recipient replied STOP                  InvalidRecipient     only this recipient is blocked
21612  cannot route this To/From combination   InvalidRecipient     depends on the destination
21635  'To' is a landline                      InvalidRecipient     a property of the number
21608  'To' not verified (trial account)       ProviderRejected     fixed by upgrading the account
21606  'From' cannot send to this destination  ProviderRejected     sender configuration
21408  Geo Permissions off for the region      ProviderRejected     console setting; an operator acts
20003  bad credentials / wrong account         ProviderRejected     configuration
20404  resource not found                      ProviderRejected     wrong SID or account
2160x  To/From/Body missing                    ProviderRejected     our request is wrong
20429  too many requests (HTTP 429)            ProviderRateLimited  never processed: safe to retry
5xx    Twilio failed                           ProviderUnavailable  may have been sent: no blind re-send
other  any other 4xx                           ProviderRejected     permanent unless Twilio says so
=====  ======================================  ===================  ====================================

A body that is not the JSON Twilio documents becomes ``ProviderResponseError``.

After an ambiguous send, :meth:`TwilioSmsChannel.find_sent` looks the message
up in Twilio's message list (``GET …/Messages.json`` filtered by ``To`` and,
with a sender number, ``From``). It matches on recipient, sender (number or
Messaging Service) and ``date_created`` only, never on the body, which holds
the code.
Error messages are built from the code and HTTP status only: Twilio's own
text may contain the phone number, which must never reach logs.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from twilio.base.exceptions import TwilioException, TwilioRestException, TwilioServiceException
from twilio.http import AsyncHttpClient
from twilio.http.response import Response
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from otp_router.config import RetrySettings, Settings, TwilioSettings
from otp_router.errors import (
    ConfigError,
    InvalidRecipient,
    InvalidSignature,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderResponseError,
    ProviderUnavailable,
    WebhookError,
)
from otp_router.phone import parse_phone
from otp_router.prices import SmsPrices
from otp_router.providers.base import (
    Capabilities,
    ChannelName,
    DeliveryState,
    ProbeResult,
    SendRequest,
    SendResult,
    StatusResult,
)
from otp_router.providers.transport import map_transport_error
from otp_router.providers.twilio_receiver import RECEIVER
from otp_router.retry import CallKind, RetryHook, retrying

if TYPE_CHECKING:
    from otp_router.providers.registry import AdapterContext

__all__ = [
    "HttpxTwilioClient",
    "TwilioSmsChannel",
    "map_twilio_status",
    "parse_status_callback",
    "verify_status_callback",
]

PROVIDER = "twilio"
#: Twilio's accepted ``ValidityPeriod`` range, in seconds.
VALIDITY_MIN, VALIDITY_MAX = 1, 36000

_logger = logging.getLogger("otp_router.twilio")
_T = TypeVar("_T")

_STATES: dict[str, DeliveryState] = {
    "queued": DeliveryState.PENDING,
    "accepted": DeliveryState.PENDING,
    "scheduled": DeliveryState.PENDING,
    "sending": DeliveryState.PENDING,
    "sent": DeliveryState.SENT,
    "delivered": DeliveryState.DELIVERED,
    "read": DeliveryState.READ,
    "undelivered": DeliveryState.UNDELIVERED,
    "failed": DeliveryState.FAILED,
    "canceled": DeliveryState.REVOKED,
}

_INVALID_RECIPIENT = frozenset({21211, 21610, 21612, 21614, 21635})
_RATE_LIMITED = 20429


def map_twilio_status(status: str | None) -> DeliveryState:
    """Map a Twilio message ``status`` to our :class:`DeliveryState`.

    Args:
        status: ``queued``, ``sent``, ``delivered``…; None or unknown values give ``UNKNOWN``.

    Returns:
        The provider-neutral state.
    """
    return _STATES.get((status or "").lower(), DeliveryState.UNKNOWN)


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date), if usable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _map_transport(exc: httpx.TransportError) -> ProviderError:
    """Map a transport failure (see :mod:`otp_router.providers.transport`).

    The message names only the exception class: an httpx error's text may hold the URL.
    """
    return map_transport_error(
        exc, provider=PROVIDER, message=f"twilio transport error: {type(exc).__name__}"
    )


class HttpxTwilioClient(AsyncHttpClient):  # type: ignore[misc]  # twilio is untyped
    """Lets the ``twilio`` SDK send through a shared ``httpx.AsyncClient``.

    The SDK calls :meth:`request` with the absolute URL, the form fields as a
    dict, a ``(username, password)`` Basic-auth tuple and (usually) no timeout.
    The adapter never closes the client it was given.

    Transport failures become our errors here (``raise … from exc``). HTTP 429
    is also raised here, as :class:`ProviderRateLimited`, because only here is
    the ``Retry-After`` header still visible (the SDK's exception drops headers).

    Args:
        client: The shared client (owned by the caller).
        timeout: Seconds for the whole request when the SDK gives none.
    """

    def __init__(self, client: httpx.AsyncClient, *, timeout: float | None = None) -> None:
        super().__init__(logger=_logger, is_async=True, timeout=timeout)
        self._client = client

    async def request(
        self,
        method: str,
        url: str,
        params: dict[str, object] | None = None,
        data: dict[str, object] | None = None,
        headers: dict[str, str] | None = None,
        auth: tuple[str, str] | None = None,
        timeout: float | None = None,  # noqa: ASYNC109  # the SDK's signature
        allow_redirects: bool = False,
    ) -> Response:
        """Send one request and return the SDK's response type.

        Args:
            method: HTTP method.
            url: Absolute URL.
            params: Query parameters.
            data: Form fields (lists become repeated keys).
            headers: Request headers (the SDK sets Accept, Content-Type, User-Agent).
            auth: Basic-auth ``(username, password)``.
            timeout: Seconds; overrides the adapter's default.
            allow_redirects: Follow redirects (the SDK passes False).

        Returns:
            ``twilio.http.response.Response`` with status, text and headers.

        Raises:
            ProviderUnavailable: Connection failure.
            ProviderTimeout: No answer in time.
            ProviderRateLimited: HTTP 429 with Twilio error 20429 (or no code).
        """
        seconds = timeout if timeout is not None else self.timeout
        request_timeout: Any = (
            httpx.Timeout(seconds, connect=self._client.timeout.connect)
            if seconds is not None
            else httpx.USE_CLIENT_DEFAULT
        )
        try:
            response = await self._client.request(
                method.upper(),
                url,
                params=params,  # type: ignore[arg-type]  # the SDK only sends str values
                data=data,
                headers=headers,
                auth=auth,
                timeout=request_timeout,
                follow_redirects=allow_redirects,
            )
        except httpx.TransportError as exc:
            raise _map_transport(exc) from exc
        if response.status_code == 429:
            code = _error_code(response.text)
            # Verify's 60202/60203 are also 429 but must not be retried: leave them to the SDK.
            if code in (None, _RATE_LIMITED):
                raise ProviderRateLimited(
                    "twilio error 20429 (HTTP 429): too many requests",
                    provider=PROVIDER,
                    code=str(_RATE_LIMITED),
                    retry_after=_retry_after(response.headers.get("retry-after")),
                )
        return Response(response.status_code, response.text, response.headers)


def _error_code(text: str) -> int | None:
    try:
        body = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly nested JSON
        return None
    code = body.get("code") if isinstance(body, dict) else None
    return code if isinstance(code, int) else None


def _map_twilio_error(exc: TwilioRestException | TwilioServiceException) -> ProviderError:
    status = int(getattr(exc, "status", 0) or 0)
    raw_code = getattr(exc, "code", None)
    code = raw_code if isinstance(raw_code, int) else status
    detail = f"twilio error {code} (HTTP {status})"
    if code == _RATE_LIMITED or status == 429:
        return ProviderRateLimited(detail, provider=PROVIDER, code=str(code))
    if status >= 500:
        # The message may have been queued before the failure: never re-send blindly.
        return ProviderUnavailable(detail, provider=PROVIDER, code=str(code), not_performed=False)
    if code in _INVALID_RECIPIENT:
        return InvalidRecipient(detail, provider=PROVIDER, code=str(code))
    return ProviderRejected(detail, provider=PROVIDER, code=str(code))


async def _call(make: Callable[[], Awaitable[_T]]) -> _T:
    """Run one SDK call, translating every SDK failure into our tree."""
    try:
        return await make()
    except (TwilioRestException, TwilioServiceException) as exc:
        raise _map_twilio_error(exc) from exc
    except TwilioException as exc:
        # A list page that is not HTTP 200 arrives as a bare TwilioException("Unable to
        # fetch page", response): map its status like any other error answer.
        answer = exc.args[1] if len(exc.args) > 1 else None
        status = getattr(answer, "status_code", None)
        if isinstance(status, int) and status >= 400:
            detail = f"twilio error {status} (HTTP {status})"
            if status >= 500:
                raise ProviderUnavailable(detail, provider=PROVIDER, code=str(status)) from exc
            raise ProviderRejected(detail, provider=PROVIDER, code=str(status)) from exc
        raise ProviderResponseError(
            f"twilio SDK error: {type(exc).__name__}", provider=PROVIDER, not_performed=False
        ) from exc
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError) as exc:
        # The SDK parses the body with json.loads and reads it with payload.get():
        # garbage, a non-object JSON body or absurd nesting surfaces as one of these.
        raise ProviderResponseError(
            "twilio answered with a body that is not a message resource",
            provider=PROVIDER,
            not_performed=False,
        ) from exc


def _price(value: Any) -> Decimal | None:
    if value is None or value == "":
        return None
    try:
        price = Decimal(str(value))
    except InvalidOperation:
        raise ProviderResponseError("twilio price is not a number", provider=PROVIDER) from None
    if not price.is_finite():
        raise ProviderResponseError("twilio price is not a number", provider=PROVIDER)
    # Twilio reports charges as negative amounts ("-0.00830").
    return abs(price)


def _region(phone: str) -> str:
    try:
        return parse_phone(phone).region
    except ValueError:
        return "ZZ"


class TwilioSmsChannel:
    """SMS through Twilio Programmable Messaging (implements :class:`~otp_router.providers.base.Channel`).

    Args:
        settings: Credentials, sender and message template.
        retry: Retry limits (sends retry only when nothing can have been sent).
        client: The shared HTTP client; not closed by :meth:`aclose`.
        prices: Price table for the cost estimate at send time (packaged table if None).
        on_retry: Called before each retry (metrics, logs).

    Raises:
        ConfigError: Missing account SID, auth token, or sender.
    """

    name = ChannelName.SMS
    provider = PROVIDER
    capabilities = Capabilities(
        probe=False,
        ttl_min=VALIDITY_MIN,
        ttl_max=VALIDITY_MAX,
        # A 5xx or a timeout after the request was written may have queued the message.
        timeout_maybe_sent=True,
        # The message list can tell whether an ambiguous send created one (find_sent).
        lookup=True,
    )
    #: SDK call per channel verb (metrics label calls by them).
    report_receiver = RECEIVER
    methods = MappingProxyType(
        {"send": "messages.create", "status": "messages.fetch", "find_sent": "messages.list"}
    )

    def __init__(
        self,
        settings: TwilioSettings,
        retry: RetrySettings,
        client: httpx.AsyncClient,
        *,
        prices: SmsPrices | None = None,
        on_retry: RetryHook | None = None,
    ) -> None:
        token = settings.auth_token.get_secret_value()
        if not settings.account_sid or not token:
            raise ConfigError(
                "OTP_ROUTER_TWILIO__ACCOUNT_SID and OTP_ROUTER_TWILIO__AUTH_TOKEN must be set for SMS"
            )
        if not settings.from_number and not settings.messaging_service_sid:
            raise ConfigError(
                "OTP_ROUTER_TWILIO__FROM_NUMBER or OTP_ROUTER_TWILIO__MESSAGING_SERVICE_SID"
                " must be set for SMS"
            )
        self._settings = settings
        self._retry = retry
        self._prices = prices if prices is not None else SmsPrices.load()
        self._on_retry = on_retry
        self.http = HttpxTwilioClient(client, timeout=settings.timeout)
        # twilio-python does `environment or os.environ`, so an empty dict still reads
        # TWILIO_EDGE/TWILIO_REGION (which rewrite the host name and break base_url).
        # A non-empty private mapping keeps the client hermetic.
        self.client = Client(
            settings.account_sid,
            token,
            account_sid=settings.account_sid,
            http_client=self.http,
            environment={"OTP_ROUTER_HERMETIC": "1"},
        )
        self.client.edge = None
        self.client.region = None
        self.client.api.base_url = settings.base_url

    @classmethod
    def from_settings(cls, settings: Settings, context: AdapterContext) -> TwilioSmsChannel | None:
        """The adapter for ``settings.twilio``, or None when it is disabled.

        Raises:
            ConfigError: Enabled without credentials or a sender.
        """
        if not settings.twilio.enabled:
            return None
        return cls(
            settings.twilio,
            settings.retry,
            context.client,
            prices=context.prices,
            on_retry=context.on_retry(PROVIDER),
        )

    @staticmethod
    def callback_url(base: str, payload: str) -> str:
        """Where Twilio posts status callbacks; the id rides in the query, which the signature covers."""
        return f"{base}/webhooks/twilio?vid={payload}"

    async def probe(self, phone: str) -> ProbeResult:
        """SMS has no free reachability check: always reachable, no I/O."""
        return ProbeResult(reachable=True)

    async def send(self, request: SendRequest) -> SendResult:
        """Create the message.

        Args:
            request: Number, code, ttl (→ ``ValidityPeriod``, clamped to 1..36000)
                and optional callback URL.

        Returns:
            The message SID, its first state and an *estimated* cost.

        Raises:
            InvalidRecipient: Twilio refuses this number (see the module table).
            ProviderRejected: Account or configuration problem.
            ProviderTransientError: Retries exhausted, or an outcome that may
                have sent the message (timeout, 5xx): not retried.
        """
        body = self._settings.message_template.replace("{code}", request.code)
        kwargs: dict[str, Any] = {
            "to": request.phone,
            "body": body,
            "validity_period": min(max(int(request.ttl), VALIDITY_MIN), VALIDITY_MAX),
            "attempt": request.attempt,
        }
        if self._settings.from_number:
            kwargs["from_"] = self._settings.from_number
        if self._settings.messaging_service_sid:
            kwargs["messaging_service_sid"] = self._settings.messaging_service_sid
        if request.callback_url:
            kwargs["status_callback"] = request.callback_url

        async for attempt in retrying(self._retry, CallKind.SEND, on_retry=self._on_retry):
            with attempt:
                message = await _call(lambda: self.client.messages.create_async(**kwargs))
                sid = getattr(message, "sid", None)
                if not isinstance(sid, str) or not sid:
                    raise ProviderResponseError(
                        "twilio accepted the message but returned no sid",
                        provider=PROVIDER,
                        not_performed=False,
                    )
                return SendResult(
                    ref=sid,
                    state=map_twilio_status(message.status),
                    # The region the router parsed at start: parsing the number again cost a
                    # quarter of a millisecond per SMS, about 4 % of a deadline fallback's CPU in a profile.
                    cost=self._prices.sms_cost(request.region or _region(request.phone), body),
                    cost_is_final=False,
                    cost_is_estimate=True,
                    currency=self._prices.currency,
                )
        raise AssertionError("unreachable: retrying() re-raises the last error")  # pragma: no cover

    async def status(self, ref: str) -> StatusResult:
        """Fetch the message (a read: retried on any transient error).

        Args:
            ref: Message SID.

        Returns:
            State, cost (``abs(price)`` once Twilio reports it) and error code.
        """
        async for attempt in retrying(self._retry, CallKind.READ, on_retry=self._on_retry):
            with attempt:
                message = await _call(lambda: self.client.messages(ref).fetch_async())
                return self._status_of(ref, message)
        raise AssertionError("unreachable: retrying() re-raises the last error")  # pragma: no cover

    def _status_of(self, ref: str, message: Any) -> StatusResult:
        state = map_twilio_status(message.status)
        cost = _price(message.price)
        final = state.is_delivered or state.is_failed
        error_code = message.error_code
        return StatusResult(
            ref=ref,
            state=state,
            cost=cost,
            cost_is_final=final and cost is not None,
            error_code=str(error_code) if error_code is not None else None,
            raw_status=message.status,
            currency=(message.price_unit or self._prices.currency).upper(),
        )

    async def find_sent(self, phone: str, since: float) -> StatusResult | None:
        """Look up the message an ambiguous send may have created (a read: retried).

        Lists the account's messages to ``phone`` and keeps those sent by our
        sender (``From`` number or Messaging Service), outbound, created at or
        after ``since`` minus ``lookup_skew``. The body is never read.

        Args:
            phone: E.164 number the send was for.
            since: Unix time the send began.

        Returns:
            The earliest matching message, or None when the listing is complete
            (it ended, or reached messages older than ``since``) and none matches.

        Raises:
            ProviderError: The answer is unknown: the list call failed, or the
                list is longer than ``lookup_max_pages`` pages.
        """
        settings = self._settings
        cutoff = since - settings.lookup_skew
        filters: dict[str, Any] = {"to": phone, "page_size": settings.lookup_page_size}
        if settings.from_number and not settings.messaging_service_sid:
            filters["from_"] = settings.from_number
        if settings.lookup_date_filter:
            # Day precision, as Twilio documents the filter (``DateSent>=YYYY-MM-DD``).
            filters["date_sent_after"] = datetime.fromtimestamp(cutoff, UTC).strftime("%Y-%m-%d")
        async for attempt in retrying(self._retry, CallKind.READ, on_retry=self._on_retry):
            with attempt:
                found, complete = await self._scan(filters, phone, cutoff)
        if found is not None:
            return self._status_of(found.sid, found)
        if not complete:
            raise ProviderResponseError(
                "twilio message list is longer than the lookup reads", provider=PROVIDER
            )
        return None

    async def _scan(self, filters: dict[str, Any], phone: str, cutoff: float) -> tuple[Any, bool]:
        """Read up to ``lookup_max_pages`` pages; returns (earliest match, listing complete)."""
        page = await _call(lambda: self.client.messages.page_async(**filters))
        best: Any = None
        for number in range(1, self._settings.lookup_max_pages + 1):
            reached_older = False
            for message in page:
                created = message.date_created
                if not isinstance(created, datetime):
                    return None, False  # cannot place it in time: the answer stays unknown
                if created.timestamp() < cutoff:
                    reached_older = True
                    continue
                # Newest first: on a tie (whole seconds) the later one in the list is the older.
                if self._ours(message, phone) and (best is None or created <= best.date_created):
                    best = message
            # Twilio lists newest first: a page reaching back before the send ends the search.
            if reached_older or page.next_page_url is None:
                return best, True
            if number < self._settings.lookup_max_pages:
                page = await _call(page.next_page_async)
        return best, False

    def _ours(self, message: Any, phone: str) -> bool:
        """Sent by this channel's sender to ``phone`` (the body, holding the code, is not read)."""
        settings = self._settings
        if message.to != phone or not str(message.direction or "").startswith("outbound"):
            return False
        by_number = bool(settings.from_number) and message.from_ == settings.from_number
        by_service = (
            bool(settings.messaging_service_sid)
            and message.messaging_service_sid == settings.messaging_service_sid
        )
        return by_number or by_service

    async def revoke(self, ref: str) -> bool:
        """An SMS cannot be recalled once sent; always False.

        (Twilio can cancel only *scheduled* messages, which the router never
        creates.)
        """
        return False

    async def report_code(self, ref: str, code: str) -> None:
        """Twilio Messaging has no conversion feedback for plain SMS: nothing to do."""

    async def aclose(self) -> None:
        """Nothing to release: the HTTP client belongs to the caller."""


def parse_status_callback(form: Mapping[str, str]) -> StatusResult:
    """Read a Twilio status callback (form fields) into a :class:`StatusResult`.

    Verify the signature first with :func:`verify_status_callback`.

    Args:
        form: The POSTed form fields (``MessageSid``, ``MessageStatus``, ``ErrorCode``…),
            or a call's (``CallSid``, ``CallStatus``): voice calls report to the same URL.

    Returns:
        The state it reports. Callbacks carry no price, so ``cost`` is None.

    Raises:
        WebhookError: No message SID or status in the form.
    """
    if form.get("CallSid") and not form.get("MessageSid"):
        from otp_router.providers.twilio_channels import parse_call_callback

        return parse_call_callback(form)
    ref = form.get("MessageSid") or form.get("SmsSid")
    raw = form.get("MessageStatus") or form.get("SmsStatus")
    if not ref or not raw:
        raise WebhookError("twilio status callback has no MessageSid or MessageStatus")
    error_code = form.get("ErrorCode") or None
    return StatusResult(ref=ref, state=map_twilio_status(raw), error_code=error_code, raw_status=raw)


def verify_status_callback(auth_token: str, url: str, params: Mapping[str, str], signature: str) -> None:
    """Check ``X-Twilio-Signature`` with the SDK's ``RequestValidator``.

    Args:
        auth_token: The account's Auth Token.
        url: The full public URL Twilio called (scheme, host, path, query), as
            configured in ``StatusCallback``, not the internal URL behind a proxy.
        params: Every POSTed form field (Twilio may add new ones; all are signed).
        signature: The ``X-Twilio-Signature`` header value.

    Raises:
        InvalidSignature: Missing or wrong signature (forged or tampered).
    """
    if not signature or not auth_token:
        raise InvalidSignature("twilio status callback is not signed")
    if not RequestValidator(auth_token).validate(url, dict(params), signature):
        raise InvalidSignature("twilio status callback signature does not match")
