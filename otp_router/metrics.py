"""Every Prometheus metric otp-router exports, in one module (prefix ``otp_router_``).

Importing this module has no side effects: nothing is registered and
``prometheus_client`` is not even imported until :func:`get_metrics` or
:class:`Metrics` is called. ``prometheus-client`` is the optional
``[metrics]`` extra; without it :func:`get_metrics` returns a
:class:`NullMetrics` whose methods do nothing.

Callers never touch a ``Counter`` directly. They call typed methods such as
:meth:`Metrics.send`, which clean every label value on the way in:

* ``country`` must be an ISO 3166-1 alpha-2 region; anything else becomes
  ``"ZZ"`` (:func:`sanitize_country`), so a phone number can never become a
  label value.
* Labels with a closed set of values (outcomes, statuses, reasons, channels)
  map an unknown value to ``"other"`` instead of creating a new series.
* Open-ended names (provider, method, error type, dead-letter reason, scope)
  must look like an identifier with fewer than 7 digits; otherwise ``"other"``.

Metrics never raise on bad input (except an impossible circuit state): a
metrics bug must not break a login.

:data:`METRICS` describes every family (name, type, labels, help text) and
:data:`METRIC_NAMES` maps each family name to its type. Counter family names
are given without the ``_total`` suffix that the exposition adds, exactly as
``prometheus_client`` names families; :attr:`MetricSpec.sample_names` lists the
series names that appear in PromQL.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, cast

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import Collector

__all__ = [
    "METRICS",
    "METRIC_NAMES",
    "MetricSpec",
    "Metrics",
    "NullMetrics",
    "get_metrics",
    "provider_outcome",
    "sanitize_country",
]

MetricType = Literal["counter", "gauge", "histogram"]

#: The value an unknown label value is replaced with.
OTHER = "other"
#: The country label of anything that is not an ISO 3166-1 alpha-2 region.
UNKNOWN_COUNTRY = "ZZ"

_COUNTRY = re.compile(r"[A-Z]{2}")
_TOKEN = re.compile(r"[A-Za-z][A-Za-z0-9_.\-]{0,63}")

# Closed label sets. Unknown values become OTHER.
CHANNELS = frozenset({"telegram", "sms", "none"})
VERIFICATION_OUTCOMES = frozenset({"verified", "expired", "canceled", "failed", "too_many_attempts"})
SEND_OUTCOMES = frozenset({"accepted", "unreachable", "rejected", "failed"})
#: Every ``otp_router.providers.base.DeliveryState`` value (a test keeps them in step).
DELIVERY_STATUSES = frozenset(
    {"pending", "sent", "delivered", "read", "expired", "revoked", "undelivered", "failed", "unknown"}
)
#: Every ``otp_router.core.FallbackReason`` value.
FALLBACK_REASONS = frozenset(
    {"ability_refused", "permanent_error", "retries_exhausted", "deadline", "expired", "revoked"}
    | {"undelivered", "circuit_open", "user_resend", "provider_error", "timeout", "rate_limited"}
    | {"not_created"}
)
CODE_CHECK_RESULTS = frozenset({"valid", "invalid", "expired", "too_many_attempts", "not_found"})
PROVIDER_OUTCOMES = frozenset({"ok", "transient_error", "permanent_error", "error"})
WEBHOOK_OUTCOMES = frozenset({"accepted", "duplicate", "invalid_signature", "stale", "bad_request"})
QUEUE_OUTCOMES = frozenset({"processed", "duplicate", "dead_letter", "reclaimed"})
FRAUD_SCOPES = frozenset({"number_type", "prefix_conversion", "country_conversion"})
CIRCUIT_STATES = (0, 1, 2)

# Histogram buckets, in seconds.
_CODE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600)
# Time to code is what a fallback deadline of 1..60 s is judged by: finer steps
# there (a p95 interpolated across a 30..45 s bucket would be a guess), coarse
# beyond. Fewer buckets below 1 s keep the per-country series count down.
_TIME_TO_CODE_BUCKETS: tuple[float, ...] = (0.5, 1, 1.5, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 35, 40)
_TIME_TO_CODE_BUCKETS += (50, 60, 75, 90, 120, 180, 300, 600)
_REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_LAG_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """Description of one exported metric family.

    Attributes:
        name: Family name (counters without ``_total``).
        type: ``"counter"``, ``"gauge"`` or ``"histogram"``.
        labels: Label names, in order.
        doc: What the metric counts (the Prometheus HELP text).
        buckets: Histogram bucket upper bounds in seconds; empty for other types.
    """

    name: str
    type: MetricType
    labels: tuple[str, ...]
    doc: str
    buckets: tuple[float, ...] = ()

    @property
    def sample_names(self) -> tuple[str, ...]:
        """Series names as they appear in PromQL (``_created`` series left out)."""
        if self.type == "counter":
            return (f"{self.name}_total",)
        if self.type == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


def _spec(kind: MetricType, name: str, labels: str, doc: str, buckets: tuple[float, ...] = ()) -> MetricSpec:
    return MetricSpec(f"otp_router_{name}", kind, tuple(labels.split()), doc, buckets)


_C: MetricType = "counter"
_G: MetricType = "gauge"
_H: MetricType = "histogram"

#: Every metric family otp-router exports.
METRICS: tuple[MetricSpec, ...] = (
    _spec(_C, "verifications_started", "country", "Verifications started (accepted start() calls)."),
    _spec(
        _C,
        "verifications_finished",
        "outcome channel country",
        "Verifications that reached a final state, by outcome and the channel of the last code.",
    ),
    _spec(
        _C,
        "sends",
        "channel provider outcome country",
        "Send attempts: accepted by the provider, unreachable (probe refused), rejected or failed.",
    ),
    _spec(_C, "deliveries", "channel status", "Delivery reports (webhook or polled) by delivery status."),
    _spec(_C, "fallbacks", "from_channel to_channel reason", "Moves to the next workflow step, by reason."),
    _spec(
        _H,
        "time_to_code_seconds",
        "channel country",
        "Seconds from start() to code delivered, by the channel that delivered it.",
        _TIME_TO_CODE_BUCKETS,
    ),
    _spec(_H, "time_to_verify_seconds", "channel", "Seconds from start() to code verified.", _CODE_BUCKETS),
    _spec(_C, "code_checks", "result", "Code checks by result."),
    _spec(_C, "provider_requests", "provider method outcome", "Provider API call attempts by outcome."),
    _spec(
        _H,
        "provider_request_duration_seconds",
        "provider method",
        "Seconds one provider API call attempt took.",
        _REQUEST_BUCKETS,
    ),
    _spec(_C, "provider_errors", "provider method error_type", "Failed provider calls by our error class."),
    _spec(_C, "provider_retries", "provider method error_type", "Provider calls retried, by error class."),
    _spec(_C, "cost_charged_usd", "channel country", "USD charged by providers (before refunds)."),
    _spec(_C, "cost_refunded_usd", "channel country", "USD refunded by providers (Telegram ttl refunds)."),
    _spec(_C, "cost_sms_only_usd", "country", "USD the started verifications would have cost on SMS alone."),
    _spec(
        _C,
        "paid_twice",
        "country",
        "Verifications that kept a Telegram charge (delivered) and paid another channel too.",
    ),
    _spec(
        _C,
        "paid_twice_usd",
        "country",
        "USD those verifications paid for other channels on top of the delivered Telegram message.",
    ),
    _spec(
        _G,
        "learned_deadline_seconds",
        "channel country",
        'Step deadline (seconds after the send) last chosen for deliver_within = "auto", by country.',
    ),
    _spec(_G, "telegram_balance_credits", "", "Telegram Gateway balance last reported, in credits."),
    _spec(_G, "circuit_state", "channel", "Circuit breaker state: 0 closed, 1 open, 2 half-open."),
    _spec(_C, "rate_limited", "scope", "start() calls refused by an abuse limit, by limit scope."),
    _spec(
        _C,
        "fraud_blocks",
        "scope",
        "start() calls refused by a toll-fraud defence: number_type, prefix_ or country_conversion.",
    ),
    _spec(_C, "webhooks", "provider outcome", "Provider callbacks received, by outcome."),
    _spec(_C, "queue_messages", "outcome", "Queue messages handled by the worker, by outcome."),
    _spec(_C, "dead_letters", "reason", "Queue messages moved to the dead-letter stream, by reason."),
    _spec(_G, "queue_depth", "", "Messages waiting in the queue, not yet delivered to a consumer."),
    _spec(_G, "queue_lag_seconds", "", "Age in seconds of the oldest message waiting in the queue."),
    _spec(_G, "inflight", "", "Queue messages this worker is processing right now."),
    _spec(_G, "worker_heartbeat_timestamp_seconds", "", "Unix time of the worker loop's last heartbeat."),
    _spec(_C, "deadlines_fired", "", "Scheduled deadlines claimed and fired."),
    _spec(
        _H, "deadline_lag_seconds", "", "Seconds between a deadline's due time and its firing.", _LAG_BUCKETS
    ),
)

#: Gauges that stay out of the exposition until first set: a Telegram balance
#: or a heartbeat of 0 before the first report would be false and fire alerts.
_UNSET_UNTIL_REPORTED = frozenset(
    {"otp_router_telegram_balance_credits", "otp_router_worker_heartbeat_timestamp_seconds"}
)

#: How a gauge's per-process values combine when several worker processes share one
#: ``PROMETHEUS_MULTIPROC_DIR`` (``otp-router worker --processes N``; prometheus-client's
#: modes: ``live*`` count processes still running only). Gauges absent here are only ever
#: set by one process's own reports (see :data:`_UNSET_UNTIL_REPORTED`).
_MULTIPROCESS_MODES: Mapping[str, str] = MappingProxyType(
    {
        "otp_router_learned_deadline_seconds": "mostrecent",  # every process learns the same cells
        "otp_router_circuit_state": "livemax",  # the worst state any live process is in
        "otp_router_queue_depth": "livemostrecent",  # one queue, read by every process
        "otp_router_queue_lag_seconds": "livemostrecent",
        "otp_router_inflight": "livesum",  # messages in flight across the processes
    }
)

#: Family name -> type, for every exported metric.
METRIC_NAMES: Mapping[str, MetricType] = MappingProxyType({spec.name: spec.type for spec in METRICS})


def sanitize_country(value: str | None) -> str:
    """Return ``value`` if it is an ISO 3166-1 alpha-2 code, else ``"ZZ"``.

    This is the one place a country label is cleaned, so a phone number (or
    anything else) passed by mistake can never become a label value.

    Args:
        value: Upper-case region code, e.g. ``"GB"``.

    Returns:
        ``value`` or ``"ZZ"``.
    """
    if isinstance(value, str) and _COUNTRY.fullmatch(value):
        return value
    return UNKNOWN_COUNTRY


def _closed(value: object, allowed: frozenset[str]) -> str:
    # str() turns a StrEnum member into its value.
    text = str(value)
    return text if text in allowed else OTHER


#: Values :func:`_token` accepted (provider, method and error names: a few dozen in practice).
_TOKENS: set[str] = set()
#: Most values remembered; past it each value is checked again (bounded memory whatever comes in).
_MAX_TOKENS = 4096


def _token(value: object) -> str:
    text = str(value)
    if text in _TOKENS:
        return text
    # An identifier with a handful of digits at most: a phone number cannot pass.
    if _TOKEN.fullmatch(text) and sum(ch.isdigit() for ch in text) < 7:
        if len(_TOKENS) < _MAX_TOKENS:
            _TOKENS.add(text)
        return text
    return OTHER


def _seconds(value: float) -> float | None:
    # Clock steps can make a duration negative; NaN would poison the sum.
    seconds = float(value)
    if math.isnan(seconds):
        return None
    return max(seconds, 0.0)


def _error_labels(provider: str, method: str, error_type: str) -> dict[str, str]:
    return {"provider": _token(provider), "method": _token(method), "error_type": _token(error_type)}


def provider_outcome(error: BaseException | None) -> str:
    """The ``outcome`` label of :meth:`Metrics.provider_request` for a call's result.

    Args:
        error: The exception the call raised, or None when it succeeded.

    Returns:
        ``"ok"``, ``"transient_error"``, ``"permanent_error"`` or ``"error"``
        (anything that is not an otp-router provider error).
    """
    from otp_router.errors import ProviderPermanentError, ProviderTransientError

    if error is None:
        return "ok"
    if isinstance(error, ProviderTransientError):
        return "transient_error"
    if isinstance(error, ProviderPermanentError):
        return "permanent_error"
    return "error"


class _ReportedGauge:
    """A label-less gauge that is absent from the exposition until first set."""

    def __init__(self, spec: MetricSpec) -> None:
        self._spec = spec
        self._value: float | None = None

    def set(self, value: float) -> None:
        # One reference assignment: atomic under the GIL, no lock needed.
        self._value = float(value)

    def describe(self) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        return [GaugeMetricFamily(self._spec.name, self._spec.doc)]

    def collect(self) -> list[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        value = self._value
        if value is None:
            return []
        return [GaugeMetricFamily(self._spec.name, self._spec.doc, value=value)]


class Metrics:
    """The metrics recorder: one typed method per thing worth counting.

    Args:
        registry: Where to register the metrics. None creates a private
            ``CollectorRegistry`` (tests); :func:`get_metrics` passes
            ``prometheus_client.REGISTRY``.

    Raises:
        ImportError: ``prometheus-client`` is not installed (use :func:`get_metrics`
            to get a :class:`NullMetrics` instead).
    """

    registry: CollectorRegistry | None

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        #: Labelled children by (family, label values), so the hot path skips prometheus-client's
        #: own label validation and lookup lock (a labelled child never changes once created).
        self._children: dict[tuple[str, tuple[tuple[str, str], ...]], Any] = {}
        #: Set when prometheus-client writes samples to per-process files (several worker
        #: processes): ``/metrics`` then reads every process's files, not this registry.
        self._multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self._exposition: CollectorRegistry | None = None
        self._counters: dict[str, Counter] = {}
        self._gauges: dict[str, Gauge] = {}
        self._histograms: dict[str, Histogram] = {}
        self._reported: dict[str, _ReportedGauge] = {}
        for spec in METRICS:
            if spec.name in _UNSET_UNTIL_REPORTED:
                self._reported[spec.name] = gauge = _ReportedGauge(spec)
                # Duck-typed collector: subclassing Collector would import prometheus_client at import time.
                self.registry.register(cast("Collector", gauge))
            elif spec.type == "counter":
                self._counters[spec.name] = Counter(spec.name, spec.doc, spec.labels, registry=self.registry)
            elif spec.type == "gauge":
                mode = _MULTIPROCESS_MODES.get(spec.name, "all")
                self._gauges[spec.name] = Gauge(
                    spec.name,
                    spec.doc,
                    spec.labels,
                    registry=self.registry,
                    multiprocess_mode=cast("Any", mode),
                )
            else:
                self._histograms[spec.name] = Histogram(
                    spec.name, spec.doc, spec.labels, registry=self.registry, buckets=spec.buckets
                )
        # Series of fully closed label sets exist from the start at 0, so that
        # increase() in alert rules also sees the very first increment.
        for result in CODE_CHECK_RESULTS:
            self._counters["otp_router_code_checks"].labels(result=result)
        for outcome in QUEUE_OUTCOMES:
            self._counters["otp_router_queue_messages"].labels(outcome=outcome)

    def _child(self, family: Any, name: str, labels: dict[str, str]) -> Any:
        """``family.labels(**labels)``, cached; label values are already cleaned by the callers.

        The key holds the names with the values: two call sites may pass the same labels in
        another order.
        """
        key = (name, tuple(labels.items()))
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(**labels)
        return child

    def _inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        counter = self._counters[name]
        (self._child(counter, name, labels) if labels else counter).inc(amount)

    def _observe(self, name: str, seconds: float, **labels: str) -> None:
        value = _seconds(seconds)
        if value is not None:
            histogram = self._histograms[name]
            (self._child(histogram, name, labels) if labels else histogram).observe(value)

    def _set(self, name: str, value: float, **labels: str) -> None:
        if name in self._reported:
            self._reported[name].set(value)
            return
        gauge = self._gauges[name]
        (self._child(gauge, name, labels) if labels else gauge).set(value)

    def render(self) -> tuple[bytes, str]:
        """Render this recorder's registry for a ``/metrics`` endpoint.

        Returns:
            ``(body, content_type)`` in the Prometheus text format.
        """
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        assert self.registry is not None  # always set by __init__
        return generate_latest(self._multiprocess_registry() or self.registry), CONTENT_TYPE_LATEST

    def _multiprocess_registry(self) -> CollectorRegistry | None:
        """In multiprocess mode, a registry reading every process's sample files (built once).

        Counters and histograms are summed over the processes (including
        exited ones, so totals never go back); gauges combine per
        :data:`_MULTIPROCESS_MODES`. The two report-only gauges (Telegram
        balance, worker heartbeat) are this serving process's own.
        """
        if self._multiprocess_dir is None:
            return None
        if self._exposition is None:
            from prometheus_client import CollectorRegistry
            from prometheus_client.multiprocess import MultiProcessCollector

            exposition = CollectorRegistry()
            MultiProcessCollector(exposition, path=self._multiprocess_dir)  # type: ignore[no-untyped-call]
            for gauge in self._reported.values():
                exposition.register(cast("Collector", gauge))
            self._exposition = exposition
        return self._exposition

    # -- verifications -------------------------------------------------

    def verification_started(self, country: str) -> None:
        """Count a started verification (``otp_router_verifications_started_total``)."""
        self._inc("otp_router_verifications_started", country=sanitize_country(country))

    def verification_finished(self, outcome: str, channel: str, country: str) -> None:
        """Count a verification reaching a final state (``otp_router_verifications_finished_total``).

        Args:
            outcome: verified, expired, canceled, failed or too_many_attempts.
            channel: Channel that carried the last code: telegram, sms, or none.
            country: ISO region of the number.
        """
        self._inc(
            "otp_router_verifications_finished",
            outcome=_closed(outcome, VERIFICATION_OUTCOMES),
            channel=_closed(channel, CHANNELS),
            country=sanitize_country(country),
        )

    def send(self, channel: str, provider: str, outcome: str, country: str) -> None:
        """Count a send attempt (``otp_router_sends_total``).

        Args:
            channel: telegram or sms.
            provider: Adapter name, e.g. telegram or twilio.
            outcome: accepted, unreachable (probe refused), rejected (permanent
                error) or failed (transient error, retries exhausted).
            country: ISO region of the number.
        """
        self._inc(
            "otp_router_sends",
            channel=_closed(channel, CHANNELS),
            provider=_token(provider),
            outcome=_closed(outcome, SEND_OUTCOMES),
            country=sanitize_country(country),
        )

    def delivery(self, channel: str, status: str) -> None:
        """Count a delivery report (``otp_router_deliveries_total``).

        Args:
            channel: telegram or sms.
            status: A ``DeliveryState`` value: delivered, read, expired,
                revoked, undelivered, failed (also sent, pending, unknown).
        """
        self._inc(
            "otp_router_deliveries",
            channel=_closed(channel, CHANNELS),
            status=_closed(status, DELIVERY_STATUSES),
        )

    def fallback(self, from_channel: str, to_channel: str, reason: str) -> None:
        """Count a move to the next workflow step (``otp_router_fallbacks_total``).

        Args:
            from_channel: Channel given up on.
            to_channel: Next channel, or none when the workflow is exhausted.
            reason: A ``otp_router.core.FallbackReason`` value.
        """
        self._inc(
            "otp_router_fallbacks",
            from_channel=_closed(from_channel, CHANNELS),
            to_channel=_closed(to_channel, CHANNELS),
            reason=_closed(reason, FALLBACK_REASONS),
        )

    def time_to_code(self, channel: str, seconds: float, country: str) -> None:
        """Observe start -> delivered (``otp_router_time_to_code_seconds``).

        Args:
            channel: Channel whose delivery report arrived.
            seconds: From ``start()`` to that report.
            country: ISO region of the number.
        """
        self._observe(
            "otp_router_time_to_code_seconds",
            seconds,
            channel=_closed(channel, CHANNELS),
            country=sanitize_country(country),
        )

    def learned_deadline(self, channel: str, country: str, seconds: float) -> None:
        """Set the deadline an ``auto`` step got for a country (``otp_router_learned_deadline_seconds``).

        Set each time a verification starts with a learned deadline, so the
        series shows what new verifications of that country use now.

        Args:
            channel: The step's channel (telegram).
            country: ISO region of the number.
            seconds: The deadline, seconds after the send is accepted.
        """
        self._set(
            "otp_router_learned_deadline_seconds",
            seconds,
            channel=_closed(channel, CHANNELS),
            country=sanitize_country(country),
        )

    def time_to_verify(self, channel: str, seconds: float) -> None:
        """Observe start -> code verified (``otp_router_time_to_verify_seconds``)."""
        self._observe("otp_router_time_to_verify_seconds", seconds, channel=_closed(channel, CHANNELS))

    def code_check(self, result: str) -> None:
        """Count a code check (``otp_router_code_checks_total``).

        Args:
            result: valid, invalid, expired, too_many_attempts or not_found.
        """
        self._inc("otp_router_code_checks", result=_closed(result, CODE_CHECK_RESULTS))

    # -- providers -------------------------------------------------------

    def provider_request(self, provider: str, method: str, outcome: str, seconds: float) -> None:
        """Count one provider API call attempt and observe its duration.

        Updates ``otp_router_provider_requests_total`` and
        ``otp_router_provider_request_duration_seconds``.

        Args:
            provider: telegram, twilio, ...
            method: API method, e.g. sendVerificationMessage or messages.create.
            outcome: See :func:`provider_outcome`.
            seconds: How long the attempt took.
        """
        provider, method = _token(provider), _token(method)
        self._inc(
            "otp_router_provider_requests",
            provider=provider,
            method=method,
            outcome=_closed(outcome, PROVIDER_OUTCOMES),
        )
        self._observe(
            "otp_router_provider_request_duration_seconds", seconds, provider=provider, method=method
        )

    def provider_error(self, provider: str, method: str, error_type: str) -> None:
        """Count a failed provider call attempt (``otp_router_provider_errors_total``).

        Args:
            provider: telegram, twilio, ...
            method: API method.
            error_type: Our exception class name, e.g. ``ProviderTimeout``.
        """
        self._inc("otp_router_provider_errors", 1.0, **_error_labels(provider, method, error_type))

    def provider_retry(self, provider: str, method: str, error_type: str) -> None:
        """Count a retried provider call (``otp_router_provider_retries_total``).

        Args:
            provider: telegram, twilio, ...
            method: API method.
            error_type: Class name of the error that caused the retry.
        """
        self._inc("otp_router_provider_retries", 1.0, **_error_labels(provider, method, error_type))

    def retry_hook(self, provider: str, method: str) -> Callable[[BaseException, int, float], None]:
        """A ``otp_router.retry.RetryHook`` that counts each retry of one call.

        Args:
            provider: telegram, twilio, ...
            method: API method.

        Returns:
            A callable for ``retrying(..., on_retry=...)``.
        """

        def hook(error: BaseException, attempt: int, delay: float) -> None:
            self.provider_retry(provider, method, type(error).__name__)

        return hook

    # -- cost --------------------------------------------------------------

    def cost(self, channel: str, country: str, amount: Decimal) -> None:
        """Record money charged (amount > 0) or refunded (amount < 0), in USD.

        Positive amounts go to ``otp_router_cost_charged_usd_total``, negative
        ones (as their absolute value) to ``otp_router_cost_refunded_usd_total``;
        net spend is charged minus refunded.

        Args:
            channel: telegram or sms.
            country: ISO region of the number.
            amount: USD; zero is ignored.
        """
        amount = Decimal(amount)
        if not amount.is_finite():
            return
        labels = {"channel": _closed(channel, CHANNELS), "country": sanitize_country(country)}
        if amount > 0:
            self._inc("otp_router_cost_charged_usd", float(amount), **labels)
        elif amount < 0:
            self._inc("otp_router_cost_refunded_usd", float(-amount), **labels)

    def sms_only_cost(self, country: str, amount: Decimal) -> None:
        """Add what a verification would have cost on SMS alone (``otp_router_cost_sms_only_usd_total``).

        Args:
            country: ISO region of the number.
            amount: Estimated SMS price in USD; non-positive amounts are ignored.
        """
        amount = Decimal(amount)
        if amount.is_finite() and amount > 0:
            self._inc("otp_router_cost_sms_only_usd", float(amount), country=sanitize_country(country))

    def paid_twice(self, country: str, extra: Decimal, *, new_user: bool = True) -> None:
        """Count a verification that paid twice and what it paid on top.

        Updates ``otp_router_paid_twice_total`` (when ``new_user``) and
        ``otp_router_paid_twice_usd_total``.

        Args:
            country: ISO region of the number.
            extra: USD paid for other channels on top of the delivered Telegram
                message; non-positive amounts add nothing.
            new_user: False to add only a later correction of ``extra`` (a final
                price replacing an estimate) for a verification already counted.
        """
        label = sanitize_country(country)
        if new_user:
            self._inc("otp_router_paid_twice", country=label)
        amount = Decimal(extra)
        if amount.is_finite() and amount > 0:
            self._inc("otp_router_paid_twice_usd", float(amount), country=label)

    def telegram_balance(self, value: Decimal | float) -> None:
        """Set the Telegram balance gauge (``otp_router_telegram_balance_credits``)."""
        self._set("otp_router_telegram_balance_credits", float(value))

    # -- state, limits, webhooks ---------------------------------------------

    def circuit_state(self, channel: str, state: int) -> None:
        """Set a channel's circuit breaker state (``otp_router_circuit_state``).

        Args:
            channel: telegram or sms.
            state: 0 closed, 1 open, 2 half-open.

        Raises:
            ValueError: ``state`` is not 0, 1 or 2.
        """
        if state not in CIRCUIT_STATES:
            raise ValueError(f"circuit state must be 0, 1 or 2, not {state!r}")
        self._set("otp_router_circuit_state", state, channel=_closed(channel, CHANNELS))

    def rate_limited(self, scope: str) -> None:
        """Count a start() refused by an abuse limit (``otp_router_rate_limited_total``).

        Args:
            scope: The limit's scope, e.g. phone or country (never the value itself).
        """
        self._inc("otp_router_rate_limited", scope=_token(scope))

    def fraud_block(self, scope: str) -> None:
        """Count a start() refused by a toll-fraud defence (``otp_router_fraud_blocks_total``).

        Args:
            scope: number_type, prefix_conversion or country_conversion.
        """
        self._inc("otp_router_fraud_blocks", scope=_closed(scope, FRAUD_SCOPES))

    def webhook(self, provider: str, outcome: str) -> None:
        """Count a provider callback (``otp_router_webhooks_total``).

        Args:
            provider: telegram or twilio.
            outcome: accepted, duplicate, invalid_signature, stale or bad_request.
        """
        self._inc(
            "otp_router_webhooks", provider=_token(provider), outcome=_closed(outcome, WEBHOOK_OUTCOMES)
        )

    # -- worker and queue ----------------------------------------------------

    def queue_message(self, outcome: str) -> None:
        """Count a queue message handled (``otp_router_queue_messages_total``).

        Args:
            outcome: processed, duplicate, dead_letter or reclaimed. A dead
                letter is counted here *and* by :meth:`dead_letter` (by reason).
        """
        self._inc("otp_router_queue_messages", outcome=_closed(outcome, QUEUE_OUTCOMES))

    def dead_letter(self, reason: str) -> None:
        """Count a message moved to the dead-letter stream (``otp_router_dead_letters_total``).

        Args:
            reason: Short identifier, e.g. bad_payload or max_deliveries.
        """
        self._inc("otp_router_dead_letters", reason=_token(reason))

    def queue_depth(self, depth: int) -> None:
        """Set the number of messages waiting (``otp_router_queue_depth``)."""
        self._set("otp_router_queue_depth", depth)

    def queue_lag(self, seconds: float) -> None:
        """Set the age of the oldest waiting message (``otp_router_queue_lag_seconds``)."""
        self._set("otp_router_queue_lag_seconds", _seconds(seconds) or 0.0)

    def inflight(self, count: int) -> None:
        """Set the number of messages being processed (``otp_router_inflight``)."""
        self._set("otp_router_inflight", count)

    def worker_heartbeat(self, timestamp: float | None = None) -> None:
        """Record a worker loop heartbeat (``otp_router_worker_heartbeat_timestamp_seconds``).

        Args:
            timestamp: Unix time; None means now.
        """
        now = time.time() if timestamp is None else timestamp
        self._set("otp_router_worker_heartbeat_timestamp_seconds", now)

    def deadline_fired(self, lag_seconds: float) -> None:
        """Count a fired deadline and how late it fired.

        Updates ``otp_router_deadlines_fired_total`` and ``otp_router_deadline_lag_seconds``.

        Args:
            lag_seconds: Seconds between the due time and now.
        """
        self._inc("otp_router_deadlines_fired")
        self._observe("otp_router_deadline_lag_seconds", lag_seconds)


class NullMetrics(Metrics):
    """A :class:`Metrics` that records nothing: used when prometheus-client is missing.

    It keeps every public method of :class:`Metrics` (and its label
    cleaning) but replaces the three primitives that touch
    ``prometheus_client`` with no-ops.
    """

    def __init__(self) -> None:
        self.registry = None

    def _inc(self, name: str, amount: float = 1.0, **labels: str) -> None:
        return None

    def _observe(self, name: str, seconds: float, **labels: str) -> None:
        return None

    def _set(self, name: str, value: float, **labels: str) -> None:
        return None

    def render(self) -> tuple[bytes, str]:
        """Return an empty exposition."""
        return b"", "text/plain; version=0.0.4; charset=utf-8"


_lock = threading.Lock()
_instance: Metrics | None = None


def get_metrics() -> Metrics:
    """The process-wide recorder, created on first call.

    It registers in ``prometheus_client.REGISTRY``, so the default exposition
    (``generate_latest()``, ``start_http_server``) includes it. Without
    prometheus-client installed this is a :class:`NullMetrics`.

    Returns:
        The same instance on every call.
    """
    global _instance
    # Double-checked so the common path takes no lock.
    if _instance is None:
        with _lock:
            if _instance is None:
                try:
                    from prometheus_client import REGISTRY
                except ImportError:
                    _instance = NullMetrics()
                else:
                    _instance = Metrics(REGISTRY)
    return _instance
