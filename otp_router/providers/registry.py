"""Adapters by name, and routes bound to them.

A *route* is an open name a workflow step uses (``telegram``, ``sms``,
``sms_backup``, ``whatsapp``, or anything else); configuration binds each
route to an *adapter* (``telegram``, ``twilio_sms``, a user's own class),
much like httpx's ``mounts`` bind URL patterns to transports::

    OTP_ROUTER_ROUTES='{"telegram": "telegram", "sms": "twilio_sms", "push": "myapp.push:PushChannel"}'

An adapter is a class implementing :class:`~otp_router.providers.base.Channel`
with a ``capabilities`` attribute and a ``from_settings(settings, context)``
class method (which may return None: "not configured, leave the route out").
Register one under a short name from Python, without editing this package::

    from otp_router.providers.registry import register_adapter

    register_adapter("push", PushChannel)

or name it in configuration as ``"package.module:Class"``. A router built
explicitly (``OtpRouter(channels={"push": PushChannel(...)})``) needs neither:
the channel instance is the binding.

Built-in adapters are imported only when used, so importing this module
loads no vendor SDK.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from otp_router.errors import ConfigError
from otp_router.providers.base import Capabilities, Channel, ReceiverSpec, route_name

if TYPE_CHECKING:
    import httpx

    from otp_router.config import Settings
    from otp_router.prices import SmsPrices
    from otp_router.retry import RetryHook

__all__ = [
    "DEFAULT_ROUTES",
    "AdapterContext",
    "SupportsFromSettings",
    "adapter_class",
    "build_channels",
    "builtin_receivers",
    "known_routes",
    "register_adapter",
    "report_receivers",
    "route_binding",
    "route_callback_url",
    "route_capabilities",
]

#: Built-in adapters: name -> "module:Class", imported on first use.
_BUILTIN: dict[str, str] = {
    "telegram": "otp_router.providers.telegram:TelegramChannel",
    "twilio_sms": "otp_router.providers.twilio_sms:TwilioSmsChannel",
    "vonage_sms": "otp_router.providers.vonage_sms:VonageSmsChannel",
    "twilio_whatsapp": "otp_router.providers.twilio_channels:TwilioWhatsAppChannel",
    "twilio_voice": "otp_router.providers.twilio_channels:TwilioVoiceChannel",
}
#: Adapters registered from Python (they win over built-in ones of the same name).
_REGISTERED: dict[str, type[Any]] = {}

#: The routes of the default configuration: route name -> adapter name.
DEFAULT_ROUTES: Mapping[str, str] = {"telegram": "telegram", "sms": "twilio_sms"}


@dataclass(frozen=True, slots=True)
class AdapterContext:
    """What the process shares with every adapter it builds.

    Attributes:
        client: The shared HTTP client (adapters never close it).
        prices: The price table (for cost estimates at send time).
        on_retry: Makes the retry hook of one provider (metrics, logs).
    """

    client: httpx.AsyncClient
    prices: SmsPrices
    on_retry: Callable[[str], RetryHook]


class SupportsFromSettings(Protocol):
    """An adapter class that can build itself from the settings."""

    capabilities: Capabilities

    @classmethod
    def from_settings(cls, settings: Settings, context: AdapterContext) -> Channel | None:
        """The adapter for ``settings``, or None when its section is not enabled."""
        ...


def register_adapter(name: str, cls: type[Any]) -> None:
    """Make ``cls`` available to configuration as adapter ``name``.

    Args:
        name: Adapter name, as used in ``OTP_ROUTER_ROUTES``.
        cls: The adapter class (a ``Channel`` with ``capabilities`` and ``from_settings``).

    Raises:
        TypeError: ``cls`` does not declare ``capabilities`` or ``from_settings``.
    """
    if not isinstance(getattr(cls, "capabilities", None), Capabilities):
        raise TypeError(f"adapter {name!r} must declare a Capabilities as `capabilities`")
    if not callable(getattr(cls, "from_settings", None)):
        raise TypeError(f"adapter {name!r} must have a from_settings(settings, context) class method")
    _REGISTERED[route_name(name)] = cls


def _unregister(name: str) -> None:
    """Forget a registered adapter (tests)."""
    _REGISTERED.pop(name, None)


def adapter_class(name: str) -> type[Any]:
    """The adapter class registered, built in or importable as ``name`` (``"module:Class"``).

    Raises:
        ConfigError: No such adapter.
    """
    if name in _REGISTERED:
        return _REGISTERED[name]
    target = _BUILTIN.get(name, name)
    module, sep, attr = target.partition(":")
    if not sep:
        known = ", ".join(sorted({*_BUILTIN, *_REGISTERED}))
        raise ConfigError(f"unknown adapter {name!r}; known: {known} (or 'package.module:Class')")
    try:
        cls: type[Any] = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot load adapter {name!r}: {exc}") from None
    return cls


def route_binding(route: str) -> tuple[str, Capabilities]:
    """Provider name and capabilities of the adapter the default configuration binds to ``route``.

    Used where no channel instance is at hand (a policy loaded on its own, a
    step built by hand); the router replaces them with those of the channel
    actually bound to the route. A route bound to nothing by default gets
    those of a registered adapter of the same name, else the route's own name
    as provider and the plainest capabilities (no probe, no revoke, a timeout
    may have sent).
    """
    adapter = DEFAULT_ROUTES.get(route, route)
    if adapter not in _REGISTERED and adapter not in _BUILTIN:
        return route, Capabilities()
    cls = adapter_class(adapter)
    caps = getattr(cls, "capabilities", None)
    provider = getattr(cls, "provider", None)
    return (
        provider if isinstance(provider, str) else adapter,
        caps if isinstance(caps, Capabilities) else Capabilities(),
    )


def known_routes() -> set[str]:
    """Routes of the default configuration, plus every registered adapter's name."""
    return {*DEFAULT_ROUTES, *_REGISTERED}


def route_callback_url(route: str, base: str, payload: str) -> str | None:
    """The callback URL the adapter the default configuration binds to ``route`` would use."""
    adapter = DEFAULT_ROUTES.get(route, route)
    if adapter not in _REGISTERED and adapter not in _BUILTIN:
        return None
    make = getattr(adapter_class(adapter), "callback_url", None)
    url = make(base, payload) if callable(make) else None
    return url if isinstance(url, str) else None


def route_capabilities(route: str) -> Capabilities:
    """The capabilities half of :func:`route_binding`."""
    return route_binding(route)[1]


def build_channels(
    routes: Mapping[str, str], settings: Settings, context: AdapterContext
) -> dict[str, Channel]:
    """Build the channel of every configured route.

    Args:
        routes: Route name -> adapter name (see the module docstring).
        settings: All settings; each adapter reads its own section.
        context: The shared client, prices and retry hooks.

    Returns:
        Channels by route, leaving out routes whose adapter is not enabled.

    Raises:
        ConfigError: Unknown adapter, bad route name, or an adapter's settings are incomplete.
    """
    channels: dict[str, Channel] = {}
    for route, adapter in routes.items():
        try:
            name = route_name(route)
        except ValueError as exc:
            raise ConfigError(f"OTP_ROUTER_ROUTES: {exc}") from None
        cls = adapter_class(adapter)
        channel = cls.from_settings(settings, context)
        if channel is not None:
            channels[name] = channel
    return channels


def report_receivers(channels: Mapping[str, Channel]) -> dict[str, ReceiverSpec]:
    """The delivery-report receivers of the adapters bound to ``channels``, one per path.

    A channel that declares none (a test double such as ``FakeChannel``) gets
    the receiver of the adapter its route is bound to by default.
    """
    specs: dict[str, ReceiverSpec] = {}
    for route, channel in channels.items():
        inner = getattr(channel, "inner", channel)  # unwrap InstrumentedChannel
        spec = getattr(inner, "report_receiver", None)
        if not isinstance(spec, ReceiverSpec) and route in DEFAULT_ROUTES:
            spec = getattr(adapter_class(DEFAULT_ROUTES[route]), "report_receiver", None)
        if isinstance(spec, ReceiverSpec):
            specs.setdefault(spec.path, spec)
    return specs


def builtin_receivers() -> dict[str, ReceiverSpec]:
    """The receivers of every built-in and registered adapter, one per path."""
    specs: dict[str, ReceiverSpec] = {}
    for name in (*_BUILTIN, *_REGISTERED):
        spec = getattr(adapter_class(name), "report_receiver", None)
        if isinstance(spec, ReceiverSpec):
            specs.setdefault(spec.path, spec)
    return specs
