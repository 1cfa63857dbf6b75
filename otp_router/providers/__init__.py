"""Channel adapters: one small protocol, one module per provider."""

from otp_router.providers.base import (
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

__all__ = [
    "Channel",
    "ChannelName",
    "DeliveryState",
    "FakeChannel",
    "ProbeResult",
    "SendRequest",
    "SendResult",
    "StatusResult",
    "SupportsLookup",
]
