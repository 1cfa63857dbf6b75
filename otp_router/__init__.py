"""otp-router: login codes through the Telegram Gateway first, Twilio SMS when needed.

Typical use in a login flow::

    from otp_router import OtpRouter

    async with OtpRouter.from_settings() as router:
        verification = await router.start("+447911123456")
        ...
        result = await router.check(verification.id, "123456")
        if result.valid:
            ...
"""

from otp_router.config import Settings
from otp_router.core import CheckOutcome, FallbackReason, Status
from otp_router.errors import (
    AllProvidersFailed,
    CallTimeout,
    ConcurrentUpdate,
    ConfigError,
    IdempotencyConflict,
    InputError,
    InvalidCode,
    InvalidPhoneNumber,
    InvalidRecipient,
    InvalidSignature,
    MessageAlreadySent,
    OtpRouterError,
    ProviderError,
    ProviderPermanentError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderResponseError,
    ProviderTimeout,
    ProviderTransientError,
    ProviderUnavailable,
    RateLimited,
    RouterClosed,
    StaleWebhook,
    StoreError,
    UnexpectedError,
    UnsupportedCountry,
    UnsupportedNumberType,
    VerificationNotFound,
    WebhookError,
)
from otp_router.latency import LatencyDistribution, choose_deadline
from otp_router.models import CheckResult, FallbackInfo, Verification
from otp_router.phone import PhoneNumber, parse_phone
from otp_router.policy import AutoDeadline, CountryRule, Policy, Step
from otp_router.providers.base import (
    Capabilities,
    Channel,
    ChannelName,
    DeliveryState,
    FakeChannel,
    ProbeResult,
    SendRequest,
    SendResult,
    StatusResult,
    SupportsLookup,
)
from otp_router.providers.registry import AdapterContext, register_adapter
from otp_router.queue import Enqueued, enqueue
from otp_router.router import OtpRouter, ResendNotAllowed
from otp_router.sync import SyncOtpRouter

__version__ = "0.1.0"

__all__ = [
    "AdapterContext",
    "AllProvidersFailed",
    "AutoDeadline",
    "CallTimeout",
    "Capabilities",
    "Channel",
    "ChannelName",
    "CheckOutcome",
    "CheckResult",
    "ConcurrentUpdate",
    "ConfigError",
    "CountryRule",
    "DeliveryState",
    "Enqueued",
    "FakeChannel",
    "FallbackInfo",
    "FallbackReason",
    "IdempotencyConflict",
    "InputError",
    "InvalidCode",
    "InvalidPhoneNumber",
    "InvalidRecipient",
    "InvalidSignature",
    "LatencyDistribution",
    "MessageAlreadySent",
    "OtpRouter",
    "OtpRouterError",
    "PhoneNumber",
    "Policy",
    "ProbeResult",
    "ProviderError",
    "ProviderPermanentError",
    "ProviderRateLimited",
    "ProviderRejected",
    "ProviderResponseError",
    "ProviderTimeout",
    "ProviderTransientError",
    "ProviderUnavailable",
    "RateLimited",
    "ResendNotAllowed",
    "RouterClosed",
    "SendRequest",
    "SendResult",
    "Settings",
    "StaleWebhook",
    "Status",
    "StatusResult",
    "Step",
    "StoreError",
    "SupportsLookup",
    "SyncOtpRouter",
    "UnexpectedError",
    "UnsupportedCountry",
    "UnsupportedNumberType",
    "Verification",
    "VerificationNotFound",
    "WebhookError",
    "choose_deadline",
    "enqueue",
    "parse_phone",
    "register_adapter",
]
