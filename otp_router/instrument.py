"""Metrics around any channel, by composition (like an httpx transport wrapping another).

Each channel call is counted and timed under the provider's own API method
name, so dashboards read ``sendVerificationMessage`` or ``messages.create``
rather than our internal verbs. Retries inside a call are counted separately
by the retry hook (``otp_router_provider_retries_total``).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

from otp_router.metrics import Metrics, NullMetrics, provider_outcome
from otp_router.providers.base import (
    Capabilities,
    Channel,
    ProbeResult,
    SendRequest,
    SendResult,
    StatusResult,
    SupportsLookup,
)

__all__ = ["InstrumentedChannel", "method_names"]

_T = TypeVar("_T")


def method_names(channel: object) -> Mapping[str, str]:
    """Provider API method per channel verb, as the adapter declares them in ``methods``.

    A verb the adapter leaves out keeps its own name when it is recorded; the
    calls with no remote counterpart (``probe``, ``revoke``, ``report_code``)
    are recorded only when listed.
    """
    methods = getattr(channel, "methods", None)
    return methods if isinstance(methods, Mapping) else {}


class InstrumentedChannel:
    """A :class:`Channel` that records each call in the metrics, then delegates.

    Args:
        inner: The channel doing the work.
        metrics: Where to record.
    """

    def __init__(self, inner: Channel, metrics: Metrics | NullMetrics) -> None:
        self.inner = inner
        self.name: str = inner.name
        self.provider: str = inner.provider
        self._metrics = metrics
        self._methods = method_names(inner)
        caps = getattr(inner, "capabilities", None)
        if not isinstance(caps, Capabilities):
            # An adapter written before capabilities existed: those of its default route.
            from otp_router.providers.registry import route_capabilities

            caps = route_capabilities(inner.name)
        self.capabilities: Capabilities = caps

    def callback_url(self, base: str, payload: str) -> str | None:
        """The wrapped channel's delivery-report URL under ``base``, if it takes callbacks."""
        make = getattr(self.inner, "callback_url", None)
        return make(base, payload) if callable(make) else None

    async def _timed(self, verb: str, call: Callable[[], Awaitable[_T]], *, remote: bool = True) -> _T:
        if not remote:
            return await call()
        method = self._methods.get(verb, verb)
        began = time.perf_counter()
        try:
            result = await call()
        except Exception as exc:
            self._metrics.provider_request(
                self.provider, method, provider_outcome(exc), time.perf_counter() - began
            )
            self._metrics.provider_error(self.provider, method, type(exc).__name__)
            raise
        self._metrics.provider_request(self.provider, method, "ok", time.perf_counter() - began)
        return result

    async def probe(self, phone: str) -> ProbeResult:
        """Probe, recorded (SMS has no remote probe: nothing is recorded for it)."""
        return await self._timed("probe", lambda: self.inner.probe(phone), remote="probe" in self._methods)

    async def send(self, request: SendRequest) -> SendResult:
        """Send, recorded."""
        return await self._timed("send", lambda: self.inner.send(request))

    async def status(self, ref: str) -> StatusResult:
        """Status read, recorded."""
        return await self._timed("status", lambda: self.inner.status(ref))

    async def revoke(self, ref: str) -> bool:
        """Revoke, recorded when the provider has such a call."""
        return await self._timed("revoke", lambda: self.inner.revoke(ref), remote="revoke" in self._methods)

    async def report_code(self, ref: str, code: str) -> None:
        """Code report, recorded when the provider has such a call."""
        await self._timed(
            "report_code", lambda: self.inner.report_code(ref, code), remote="report_code" in self._methods
        )

    @property
    def supports_lookup(self) -> bool:
        """Whether the wrapped channel has :meth:`find_sent`."""
        return isinstance(self.inner, SupportsLookup)

    async def find_sent(self, phone: str, since: float) -> StatusResult | None:
        """Message lookup, recorded.

        Raises:
            NotImplementedError: The wrapped channel cannot look messages up
                (check :attr:`supports_lookup` first).
        """
        inner = self.inner
        if not isinstance(inner, SupportsLookup):
            raise NotImplementedError(f"{self.provider} cannot look up sent messages")
        return await self._timed("find_sent", lambda: inner.find_sent(phone, since))

    async def aclose(self) -> None:
        """Close the wrapped channel."""
        await self.inner.aclose()
