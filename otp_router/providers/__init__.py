"""Channel adapters: one small protocol, one module per provider."""

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
    route_name,
)

__all__ = [
    "Capabilities",
    "Channel",
    "ChannelName",
    "DeliveryState",
    "FakeChannel",
    "ProbeResult",
    "SendRequest",
    "SendResult",
    "StatusResult",
    "SupportsLookup",
    "route_name",
]
