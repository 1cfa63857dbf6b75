"""Every error otp-router raises, in one tree.

Provider adapters translate vendor errors (httpx, aiohttp, twilio) into these
classes at the boundary, so retry and fallback decisions only ever look at our
own types and no vendor exception reaches a caller::

    OtpRouterError
    ├── ConfigError                 a setting is missing or invalid
    ├── InputError                  the caller gave us something unusable (nothing sent, nothing stored)
    │   ├── InvalidPhoneNumber
    │   ├── UnsupportedCountry
    │   ├── UnsupportedNumberType   premium rate, toll free, VoIP… (toll-fraud policy)
    │   └── InvalidCode
    ├── VerificationNotFound
    ├── RateLimited                 an abuse limit on start(); carries retry_after and scope
    ├── IdempotencyConflict         same key reused for another phone number
    ├── WebhookError
    │   ├── InvalidSignature        forged or tampered callback
    │   └── StaleWebhook            timestamp outside the freshness window (replay)
    ├── StoreError
    │   └── ConcurrentUpdate        compare-and-set lost a race
    ├── ProviderError               raised by a channel adapter; has .provider
    │   ├── ProviderTransientError  may succeed later
    │   │   ├── ProviderTimeout
    │   │   ├── ProviderUnavailable 5xx, connection failures
    │   │   ├── ProviderRateLimited has .retry_after (HTTP 429, FLOOD_WAIT_N)
    │   │   └── ProviderResponseError  a body we could not understand
    │   └── ProviderPermanentError  will fail the same way again
    │       ├── ProviderRejected    account/configuration problem (bad token, no balance…)
    │       │   └── MessageAlreadySent  this request id already carried a message (the router: "sent")
    │       └── InvalidRecipient    the number cannot receive on this channel
    ├── AllProvidersFailed          start(): no channel could send; has .causes, .verification_id
    ├── CallTimeout                 a SyncOtpRouter call took longer than its timeout
    ├── RouterClosed                a SyncOtpRouter used after close()
    └── UnexpectedError             SyncOtpRouter: anything else, the original as __cause__

Transient errors also say whether the request *cannot have been performed*
(``not_performed``): only those are safe to retry for a send, because a send
that may have reached the provider could deliver a second message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otp_router.models import Verification

__all__ = [
    "AllProvidersFailed",
    "CallTimeout",
    "ConcurrentUpdate",
    "ConfigError",
    "IdempotencyConflict",
    "InputError",
    "InvalidCode",
    "InvalidPhoneNumber",
    "InvalidRecipient",
    "InvalidSignature",
    "MessageAlreadySent",
    "OtpRouterError",
    "ProviderError",
    "ProviderPermanentError",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderResponseError",
    "ProviderTimeout",
    "ProviderTransientError",
    "ProviderUnavailable",
    "RateLimited",
    "RouterClosed",
    "StaleWebhook",
    "StoreError",
    "UnexpectedError",
    "UnsupportedCountry",
    "UnsupportedNumberType",
    "VerificationNotFound",
    "WebhookError",
]


class OtpRouterError(Exception):
    """Root of every error raised by otp-router."""


class ConfigError(OtpRouterError):
    """A setting is missing or invalid; the message names the variable."""


class InputError(OtpRouterError, ValueError):
    """The caller's input is unusable. Raised before any provider call or write."""


class InvalidPhoneNumber(InputError):
    """The phone number cannot be parsed or is not a possible, valid number."""


class UnsupportedCountry(InputError):
    """The number is valid but its country is denied by the routing policy."""


class UnsupportedNumberType(InputError):
    """The number's type (premium rate, toll free, VoIP…) is not allowed on any channel.

    Senders of one-time codes are the target of toll fraud: codes requested for
    numbers that pay the attacker per message or call. Only the types allowed
    by ``OTP_ROUTER_FRAUD__ALLOWED_NUMBER_TYPES`` are sent to.

    Args:
        message: What was refused (never the number itself).
        number_type: The ``phonenumbers`` type in lower case, e.g. ``"premium_rate"``.
    """

    def __init__(self, message: str, *, number_type: str) -> None:
        super().__init__(message)
        self.number_type = number_type


class InvalidCode(InputError):
    """The entered code is not numeric or has the wrong length."""


class VerificationNotFound(OtpRouterError, LookupError):
    """No verification has this id."""


class RateLimited(OtpRouterError):
    """An abuse limit refused ``start()``.

    Args:
        message: What limit was hit (never the phone number).
        retry_after: Seconds until a new start would be accepted.
        scope: ``"phone"``, ``"prefix"`` or ``"country"`` (velocity), or
            ``"prefix_conversion"`` / ``"country_conversion"`` (conversion guard).
    """

    def __init__(self, message: str, *, retry_after: float, scope: str) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.scope = scope


class IdempotencyConflict(OtpRouterError):
    """An idempotency key was reused with a different phone number."""


class WebhookError(OtpRouterError):
    """A provider callback was refused; nothing was changed."""


class InvalidSignature(WebhookError):
    """The callback's signature does not match: forged or tampered."""


class StaleWebhook(WebhookError):
    """The callback's timestamp is outside the freshness window (likely a replay)."""


class StoreError(OtpRouterError):
    """The state store failed."""


class ConcurrentUpdate(StoreError):
    """A compare-and-set write lost to a concurrent writer; reload and retry."""


class ProviderError(OtpRouterError):
    """A channel adapter call failed.

    Args:
        message: Human readable detail (never a phone number or secret).
        provider: ``"telegram"`` or ``"twilio"`` (or a third-party adapter's name).
        code: The provider's own error code or string, if any (e.g. ``"FLOOD_WAIT_5"``, ``"21211"``).
    """

    def __init__(self, message: str, *, provider: str, code: str | None = None) -> None:
        super().__init__(message)
        self.provider = provider
        self.code = code

    @property
    def reason(self) -> str:
        """A short, low-cardinality reason for metrics and fallback records."""
        return type(self).__name__


class ProviderTransientError(ProviderError):
    """May succeed if tried again later.

    Args:
        not_performed: True when the provider certainly did not act on the
            request (connection refused before sending, HTTP 429, FLOOD_WAIT).
            Only such errors are retried for sends.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        code: str | None = None,
        not_performed: bool = False,
    ) -> None:
        super().__init__(message, provider=provider, code=code)
        self.not_performed = not_performed


class ProviderTimeout(ProviderTransientError):
    """The provider did not answer in time. A send may or may not have happened."""


class ProviderUnavailable(ProviderTransientError):
    """Connection failure or 5xx response."""


class ProviderRateLimited(ProviderTransientError):
    """The provider asked us to slow down (HTTP 429, ``FLOOD_WAIT_N``).

    Args:
        retry_after: Seconds the provider asked us to wait, if it said.
    """

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        code: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        # A rate-limited request was refused before being processed.
        super().__init__(message, provider=provider, code=code, not_performed=True)
        self.retry_after = retry_after


class ProviderResponseError(ProviderTransientError):
    """The provider answered with a body we could not parse or understand."""


class ProviderPermanentError(ProviderError):
    """Will fail the same way if retried; fall back to the next channel."""


class ProviderRejected(ProviderPermanentError):
    """The provider refused the request for an account or configuration reason."""


class MessageAlreadySent(ProviderRejected):
    """A message was already sent under this request's id (Telegram ``MESSAGE_ALREADY_SENT``).

    Not a failure when the id is ours: a send repeated with the same id (after
    a timeout or a crash) learns this way that the earlier one went through.
    """


class InvalidRecipient(ProviderPermanentError):
    """This number cannot receive on this channel (not on Telegram, landline, STOP…)."""


class AllProvidersFailed(OtpRouterError):
    """No channel could send the code: the verification ended ``failed`` inside ``start()``.

    The failed verification is stored (``get``/``check`` see it, its ledger is
    kept); only the return of ``start()`` changes, so a caller cannot mistake
    it for a code on its way. An idempotent repeat of such a ``start()``
    raises it again.

    Args:
        message: Summary (never the phone number).
        causes: Reason per channel, in the order tried (``{"telegram": "ability_refused", …}``).
        verification_id: The failed verification's id (for ``get`` and support), if one was stored.
        verification: The failed verification itself (a
            :class:`otp_router.models.Verification`), if one was stored.
    """

    def __init__(
        self,
        message: str,
        causes: Mapping[str, str],
        *,
        verification_id: str | None = None,
        verification: Verification | None = None,
    ) -> None:
        super().__init__(message)
        self.causes = dict(causes)
        self.verification_id = verification_id
        self.verification = verification


class CallTimeout(OtpRouterError, TimeoutError):
    """A blocking call (:class:`otp_router.SyncOtpRouter`) got no result in time.

    The operation was not cancelled and may still complete: repeat a
    ``start`` with the same idempotency key to learn its outcome.
    """


class RouterClosed(OtpRouterError, RuntimeError):
    """A :class:`otp_router.SyncOtpRouter` was used after ``close()``."""


class UnexpectedError(OtpRouterError):
    """An error outside this tree reached :class:`otp_router.SyncOtpRouter`; the original is ``__cause__``."""
