"""The channel protocol every provider adapter implements.

A channel does I/O and error mapping, nothing else: it never decides to fall
back. It raises only :mod:`otp_router.errors` classes. Retries and metrics
wrap a channel by composition (see :mod:`otp_router.retry`).
"""

from __future__ import annotations

import enum
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "Capabilities",
    "Channel",
    "ChannelName",
    "DeliveryState",
    "FakeChannel",
    "InboundReport",
    "ProbeResult",
    "Receive",
    "ReceivedReport",
    "ReceiverSpec",
    "SendRequest",
    "SendResult",
    "StatusResult",
    "SupportsLookup",
    "route_name",
]


class ChannelName(enum.StrEnum):
    """The route names of the default configuration.

    Routes are open names (any ``route_name``); these two are the ones the
    default workflow uses, kept as constants for readability.
    """

    TELEGRAM = "telegram"
    SMS = "sms"


_ROUTE_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


def route_name(value: str) -> str:
    """Check a route name and return it, as the :class:`ChannelName` member when it is one.

    Routes are open names chosen in configuration (``sms_backup``,
    ``whatsapp``, a user's own). The default ones come back as enum members,
    so a name read back from the store is the same object as the constant.

    Raises:
        ValueError: Not 1 to 32 lowercase letters, digits or ``_``, starting with a letter.
    """
    if not isinstance(value, str) or not _ROUTE_NAME.fullmatch(value):
        raise ValueError(f"route name {value!r} must be lowercase letters, digits or _ (a letter first)")
    try:
        return ChannelName(value)
    except ValueError:
        return value


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What an adapter can do: the only thing the lifecycle core knows about a channel.

    The core never branches on a route's or a provider's name; it reads these.

    Attributes:
        probe: The channel can check reachability before sending (a step
            probes by default when it can).
        probe_charged: A positive probe is charged in advance and makes the
            following send free (its fee is booked with the probe).
        idempotent_ref: A send carrying the probe's reference cannot create a
            second message, so an interrupted send is safely re-issued with it.
        revoke: An undelivered message can be withdrawn (done on cancel).
        report_code: The provider wants the entered code back (conversion statistics).
        refunds_undelivered: A message not delivered within its ttl is refunded;
            only such a step may have a learned (``auto``) deadline, and only its
            kept charge can make a user "paid twice".
        ttl_min: Shortest validity the provider accepts, seconds.
        ttl_max: Longest validity the provider accepts (or we ask for), seconds.
        timeout_maybe_sent: A timeout or dropped answer after the request was
            written may have sent the message (never re-sent blindly).
        lookup: The adapter can find the message an ambiguous send may have
            created (implements :class:`SupportsLookup`).
    """

    probe: bool = False
    probe_charged: bool = False
    idempotent_ref: bool = False
    revoke: bool = False
    report_code: bool = False
    refunds_undelivered: bool = False
    ttl_min: int = 1
    ttl_max: int = 36000
    timeout_maybe_sent: bool = True
    lookup: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.ttl_min <= self.ttl_max:
            raise ValueError("capabilities need 1 <= ttl_min <= ttl_max")
        if self.idempotent_ref and not self.probe:
            raise ValueError("idempotent_ref needs a probe: the reference comes from it")

    def clamp_ttl(self, seconds: float) -> int:
        """``seconds`` rounded and brought into ``ttl_min..ttl_max``."""
        return min(max(round(seconds), self.ttl_min), self.ttl_max)


class DeliveryState(enum.StrEnum):
    """Provider-neutral delivery state of one sent message.

    Unknown provider values map to :attr:`UNKNOWN` instead of failing.
    """

    PENDING = "pending"  # accepted, not yet handed to the recipient's network
    SENT = "sent"
    DELIVERED = "delivered"
    READ = "read"
    EXPIRED = "expired"  # Telegram: not delivered within ttl, refunded
    REVOKED = "revoked"
    UNDELIVERED = "undelivered"  # SMS carrier said no
    FAILED = "failed"
    UNKNOWN = "unknown"

    @property
    def is_delivered(self) -> bool:
        """The recipient has the code."""
        return self in (DeliveryState.DELIVERED, DeliveryState.READ)

    @property
    def is_failed(self) -> bool:
        """The message will never arrive."""
        return self in (
            DeliveryState.EXPIRED,
            DeliveryState.REVOKED,
            DeliveryState.UNDELIVERED,
            DeliveryState.FAILED,
        )


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """Outcome of a pre-send reachability check.

    Attributes:
        reachable: False means "do not send on this channel" (a fallback reason, not an error).
        ref: Provider reference to pass to :meth:`Channel.send` (Telegram ``request_id``).
        cost: What the probe charged (Telegram charges in advance when reachable).
        reason: Why unreachable, e.g. ``"PHONE_NUMBER_NOT_FOUND"``.
        remaining_balance: Account balance the provider reported, if any.
    """

    reachable: bool
    ref: str | None = None
    cost: Decimal | None = None
    reason: str | None = None
    remaining_balance: Decimal | None = None


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One message to send.

    Attributes:
        phone: E.164 number.
        code: The numeric code.
        ttl: Seconds the message may take to be delivered (Telegram refunds after it).
        probe_ref: Reference from :meth:`Channel.probe`, if one was made.
        callback_url: Where the provider should report delivery, if we have a public URL.
        payload: Opaque value echoed back in reports (the verification id).
        attempt: 1 for the first send of this verification, counted across channels.
        region: The number's ISO region when the caller knows it (the router parsed the
            number at start); a channel that prices by region then need not parse it again.
        locale: The user's language (BCP 47, e.g. ``fr-FR``) if the caller gave one: a
            voice call reads the code in it where it can.
    """

    phone: str
    code: str
    ttl: int
    probe_ref: str | None = None
    callback_url: str | None = None
    payload: str | None = None
    attempt: int = 1
    region: str | None = None
    locale: str | None = None

    def __repr__(self) -> str:
        return f"SendRequest(ttl={self.ttl}, probe_ref={self.probe_ref!r}, payload={self.payload!r})"


@dataclass(frozen=True, slots=True)
class SendResult:
    """A send the provider accepted.

    Attributes:
        ref: Provider reference (Telegram ``request_id``, Twilio ``sid``).
        state: State right after the send.
        cost: Amount charged so far (None when the provider does not say yet).
        cost_is_final: False when ``cost`` may still change (refund, SMS before the final status).
        cost_is_estimate: True when ``cost`` is our price-table estimate, not the provider's figure.
        currency: ISO 4217 code of ``cost``.
        remaining_balance: Account balance reported by the provider, if any.
    """

    ref: str
    state: DeliveryState
    cost: Decimal | None = None
    cost_is_final: bool = False
    cost_is_estimate: bool = False
    currency: str = "USD"
    remaining_balance: Decimal | None = None


@dataclass(frozen=True, slots=True)
class StatusResult:
    """Current state of a sent message, from polling or a callback.

    Attributes:
        ref: Provider reference.
        state: Delivery state.
        cost: Amount charged (Telegram ``request_cost``; Twilio ``abs(price)``), if known.
        refunded: Telegram ``is_refunded``.
        cost_is_final: True once the price can no longer change.
        error_code: Provider error code for failed/undelivered messages.
        raw_status: The provider's own status string, for logs.
        updated_at: Unix time the provider says the state was reached (Telegram's
            ``delivery_status.updated_at``, whole seconds), if it says; lets a
            poll long after the delivery still date it right.
    """

    ref: str
    state: DeliveryState
    cost: Decimal | None = None
    refunded: bool = False
    cost_is_final: bool = False
    error_code: str | None = None
    raw_status: str | None = None
    currency: str = "USD"
    updated_at: float | None = None


@dataclass(frozen=True, slots=True)
class InboundReport:
    """One delivery-report request as the web app received it (framework-free).

    Attributes:
        body: The raw body (already size-limited).
        query: The raw query string, without ``?``.
        headers: Request headers, names in lower case.
        url: The public URL the provider called (``OTP_ROUTER_PUBLIC_URL`` +
            the receiver's path + ``?query``), or None without a public URL.
            Never built from ``Host``: that header is the caller's to forge.
    """

    body: bytes
    query: str
    headers: Mapping[str, str]
    url: str | None


@dataclass(frozen=True, slots=True)
class ReceivedReport:
    """What a receiver read from a checked report: the verification it names and the status."""

    verification_id: str | None
    report: StatusResult


#: Checks one report and reads it. Raises InvalidSignature or StaleWebhook (refused: 403)
#: or another WebhookError (signed but unreadable: 400).
Receive = Callable[[InboundReport, float], ReceivedReport]


@dataclass(frozen=True, slots=True)
class ReceiverSpec:
    """An adapter's delivery-report receiver: where it listens and how it checks and reads.

    The web app mounts one route per spec of the configured adapters; it knows
    nothing else about providers.

    Attributes:
        provider: Metric label (``webhook`` outcomes) and log name.
        path: Route path, relative to where the web app's routes are included.
        build: Makes the checker from the settings (the secrets live there).
        methods: HTTP methods the provider uses.
        operation_id: OpenAPI operation id.
        summary: OpenAPI summary.
        openapi_extra: OpenAPI parameters and request body.
        bad_request: What a 400 means for this provider (OpenAPI).
    """

    provider: str
    path: str
    build: Callable[[Any], Receive]
    methods: tuple[str, ...] = ("POST",)
    operation_id: str = ""
    summary: str = ""
    openapi_extra: Mapping[str, Any] = field(default_factory=dict)
    bad_request: str = "signed, but not a report."


@runtime_checkable
class Channel(Protocol):
    """What the router needs from a delivery channel."""

    #: The route this adapter serves by default (configuration may bind it to another name).
    name: str
    #: Provider name for metrics and errors (``"telegram"``, ``"twilio"``).
    provider: str
    #: What the channel can do (read by the core through the workflow's steps).
    capabilities: Capabilities

    async def probe(self, phone: str) -> ProbeResult:
        """Check whether ``phone`` can receive on this channel (may be free or charged)."""
        ...

    async def send(self, request: SendRequest) -> SendResult:
        """Send the code. Raises a :class:`~otp_router.errors.ProviderError` on failure."""
        ...

    async def status(self, ref: str) -> StatusResult:
        """Fetch the current delivery state (a read: always safe to retry)."""
        ...

    async def revoke(self, ref: str) -> bool:
        """Ask the provider to withdraw an undelivered message. True if accepted."""
        ...

    async def report_code(self, ref: str, code: str) -> None:
        """Tell the provider which code the user entered (conversion statistics)."""
        ...

    async def aclose(self) -> None:
        """Release resources owned by the adapter (not the shared HTTP client)."""
        ...


@runtime_checkable
class SupportsLookup(Protocol):
    """A channel that can tell whether an ambiguous send created a message.

    Optional: a channel without ``find_sent`` leaves an ambiguous send
    unresolved (the verification waits, and the user may ask for a resend).
    """

    async def find_sent(self, phone: str, since: float) -> StatusResult | None:
        """Find the message sent to ``phone`` by a send that began at ``since`` (Unix time).

        Returns:
            Its status when found; None when the provider's listing is complete
            and holds no such message.

        Raises:
            ProviderError: The answer is unknown (the lookup itself failed).
        """
        ...


Handler = Callable[[str, Any], Awaitable[Any]]


class FakeChannel:
    """A channel whose every call goes to ``handler(method, argument)``.

    Like ``httpx.MockTransport``: tests and examples script behaviour with a
    plain async function instead of patching.

    Args:
        name: Route it serves.
        handler: ``async (method, arg) -> result`` where method is one of
            ``probe``, ``send``, ``status``, ``revoke``, ``report_code``.
        provider: Provider name for metrics.
        capabilities: What it claims to do; default: those of the adapter the
            default configuration binds to ``name`` (see
            :func:`otp_router.providers.registry.route_capabilities`).
    """

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        provider: str = "fake",
        capabilities: Capabilities | None = None,
    ) -> None:
        from otp_router.providers.registry import route_capabilities

        self.name = route_name(name)
        self.provider = provider
        self.capabilities = capabilities if capabilities is not None else route_capabilities(self.name)
        self.handler = handler
        self.calls: list[tuple[str, Any]] = []

    async def _call(self, method: str, arg: Any) -> Any:
        self.calls.append((method, arg))
        return await self.handler(method, arg)

    async def probe(self, phone: str) -> ProbeResult:
        """Delegate to the handler."""
        result: ProbeResult = await self._call("probe", phone)
        return result

    async def send(self, request: SendRequest) -> SendResult:
        """Delegate to the handler."""
        result: SendResult = await self._call("send", request)
        return result

    async def status(self, ref: str) -> StatusResult:
        """Delegate to the handler."""
        result: StatusResult = await self._call("status", ref)
        return result

    async def revoke(self, ref: str) -> bool:
        """Delegate to the handler."""
        return bool(await self._call("revoke", ref))

    async def report_code(self, ref: str, code: str) -> None:
        """Delegate to the handler."""
        await self._call("report_code", (ref, code))

    def callback_url(self, base: str, payload: str) -> str | None:
        """The callback URL of the adapter the default configuration binds to this route."""
        from otp_router.providers.registry import route_callback_url

        return route_callback_url(self.name, base, payload)

    async def aclose(self) -> None:
        """Nothing to release."""
