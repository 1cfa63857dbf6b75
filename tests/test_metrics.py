"""Tests for otp_router.metrics: every method, label hygiene, lazy import, no-op fallback."""

from __future__ import annotations

import inspect
import math
import re
import subprocess
import sys
import textwrap
from collections.abc import Callable
from decimal import Decimal

import pytest
from prometheus_client import CollectorRegistry

from otp_router import metrics as metrics_module
from otp_router.config import RetrySettings
from otp_router.errors import ProviderRejected, ProviderTimeout, ProviderUnavailable
from otp_router.metrics import (
    METRIC_NAMES,
    METRICS,
    Metrics,
    NullMetrics,
    provider_outcome,
    sanitize_country,
)
from otp_router.providers.base import DeliveryState
from otp_router.retry import CallKind, retrying

PHONE_LIKE = re.compile(r"^\+\d|(?:\d[\s().-]*){7,}")
PHONE = "+447911123456"


@pytest.fixture
def registry() -> CollectorRegistry:
    """A private registry, so tests never touch the process-wide one."""
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    """A Metrics recorder bound to the private registry."""
    return Metrics(registry)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """The current value of one sample, or None when the series does not exist."""
    return registry.get_sample_value(name, labels)


def public_methods(cls: type) -> set[str]:
    """Names of the public callables a class offers (inherited ones included)."""
    return {name for name, member in inspect.getmembers(cls, callable) if not name.startswith("_")}


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Run code in a fresh interpreter, so process-wide state is untouched."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=30
    )


# Each row: (call, sample name, labels, expected value after the call).
CASES: list[tuple[Callable[[Metrics], object], str, dict[str, str], float]] = [
    (
        lambda m: m.verification_started("GB"),
        "otp_router_verifications_started_total",
        {"country": "GB"},
        1,
    ),
    (
        lambda m: m.verification_finished("verified", "telegram", "DE"),
        "otp_router_verifications_finished_total",
        {"outcome": "verified", "channel": "telegram", "country": "DE"},
        1,
    ),
    (
        lambda m: m.send("sms", "twilio", "accepted", "US"),
        "otp_router_sends_total",
        {"channel": "sms", "provider": "twilio", "outcome": "accepted", "country": "US"},
        1,
    ),
    (
        lambda m: m.delivery("telegram", "expired"),
        "otp_router_deliveries_total",
        {"channel": "telegram", "status": "expired"},
        1,
    ),
    (
        lambda m: m.fallback("telegram", "sms", "ability_refused"),
        "otp_router_fallbacks_total",
        {"from_channel": "telegram", "to_channel": "sms", "reason": "ability_refused"},
        1,
    ),
    (
        lambda m: m.time_to_code("sms", 4.0, "BR"),
        "otp_router_time_to_code_seconds_sum",
        {"channel": "sms", "country": "BR"},
        4.0,
    ),
    (
        lambda m: m.time_to_code("sms", 4.0, "BR"),
        "otp_router_time_to_code_seconds_bucket",
        {"channel": "sms", "country": "BR", "le": "4.0"},
        1,
    ),
    (
        lambda m: m.time_to_code("telegram", 4.5, "BR"),
        "otp_router_time_to_code_seconds_bucket",
        {"channel": "telegram", "country": "BR", "le": "4.0"},
        0,
    ),
    (
        lambda m: m.paid_twice("ID", Decimal("0.3")),
        "otp_router_paid_twice_total",
        {"country": "ID"},
        1,
    ),
    (
        lambda m: m.paid_twice("ID", Decimal("0.3")),
        "otp_router_paid_twice_usd_total",
        {"country": "ID"},
        0.3,
    ),
    (
        lambda m: m.paid_twice("ID", Decimal("0.05"), new_user=False),
        "otp_router_paid_twice_usd_total",
        {"country": "ID"},
        0.05,
    ),
    (
        lambda m: m.time_to_verify("telegram", 12.5),
        "otp_router_time_to_verify_seconds_count",
        {"channel": "telegram"},
        1,
    ),
    (lambda m: m.code_check("invalid"), "otp_router_code_checks_total", {"result": "invalid"}, 1),
    (
        lambda m: m.provider_request("telegram", "sendVerificationMessage", "ok", 0.2),
        "otp_router_provider_requests_total",
        {"provider": "telegram", "method": "sendVerificationMessage", "outcome": "ok"},
        1,
    ),
    (
        lambda m: m.provider_request("twilio", "messages.create", "transient_error", 0.3),
        "otp_router_provider_request_duration_seconds_sum",
        {"provider": "twilio", "method": "messages.create"},
        0.3,
    ),
    (
        lambda m: m.provider_error("twilio", "messages.create", "ProviderTimeout"),
        "otp_router_provider_errors_total",
        {"provider": "twilio", "method": "messages.create", "error_type": "ProviderTimeout"},
        1,
    ),
    (
        lambda m: m.provider_retry("telegram", "checkSendAbility", "ProviderUnavailable"),
        "otp_router_provider_retries_total",
        {"provider": "telegram", "method": "checkSendAbility", "error_type": "ProviderUnavailable"},
        1,
    ),
    (
        lambda m: m.cost("telegram", "GB", Decimal("0.01")),
        "otp_router_cost_charged_usd_total",
        {"channel": "telegram", "country": "GB"},
        0.01,
    ),
    (
        lambda m: m.cost("telegram", "GB", Decimal("-0.01")),
        "otp_router_cost_refunded_usd_total",
        {"channel": "telegram", "country": "GB"},
        0.01,
    ),
    (
        lambda m: m.sms_only_cost("BR", Decimal("0.0502")),
        "otp_router_cost_sms_only_usd_total",
        {"country": "BR"},
        0.0502,
    ),
    (lambda m: m.telegram_balance(Decimal("42.5")), "otp_router_telegram_balance_credits", {}, 42.5),
    (lambda m: m.circuit_state("sms", 2), "otp_router_circuit_state", {"channel": "sms"}, 2),
    (
        lambda m: m.learned_deadline("telegram", "BR", 17.5),
        "otp_router_learned_deadline_seconds",
        {"channel": "telegram", "country": "BR"},
        17.5,
    ),
    (lambda m: m.rate_limited("phone"), "otp_router_rate_limited_total", {"scope": "phone"}, 1),
    (
        lambda m: m.fraud_block("prefix_conversion"),
        "otp_router_fraud_blocks_total",
        {"scope": "prefix_conversion"},
        1,
    ),
    (lambda m: m.fraud_block("+447911123456"), "otp_router_fraud_blocks_total", {"scope": "other"}, 1),
    (
        lambda m: m.webhook("telegram", "invalid_signature"),
        "otp_router_webhooks_total",
        {"provider": "telegram", "outcome": "invalid_signature"},
        1,
    ),
    (lambda m: m.queue_message("reclaimed"), "otp_router_queue_messages_total", {"outcome": "reclaimed"}, 1),
    (lambda m: m.dead_letter("bad_payload"), "otp_router_dead_letters_total", {"reason": "bad_payload"}, 1),
    (lambda m: m.queue_depth(17), "otp_router_queue_depth", {}, 17),
    (lambda m: m.queue_lag(3.5), "otp_router_queue_lag_seconds", {}, 3.5),
    (lambda m: m.inflight(4), "otp_router_inflight", {}, 4),
    (
        lambda m: m.worker_heartbeat(1_700_000_000.0),
        "otp_router_worker_heartbeat_timestamp_seconds",
        {},
        1_700_000_000.0,
    ),
    (lambda m: m.deadline_fired(0.7), "otp_router_deadlines_fired_total", {}, 1),
    (lambda m: m.deadline_fired(0.7), "otp_router_deadline_lag_seconds_sum", {}, 0.7),
]


@pytest.mark.parametrize(("call", "sample", "labels", "expected"), CASES)
def test_method_updates_its_series(
    metrics: Metrics,
    registry: CollectorRegistry,
    call: Callable[[Metrics], object],
    sample: str,
    labels: dict[str, str],
    expected: float,
) -> None:
    """Each typed method changes exactly the series its docstring names, by the right amount."""
    before = value(registry, sample, **labels) or 0.0
    call(metrics)
    after = value(registry, sample, **labels)
    assert after is not None
    if sample.endswith(("_total", "_sum", "_count", "_bucket")):
        assert after - before == pytest.approx(expected)
    else:
        assert after == pytest.approx(expected)


def test_every_metric_family_is_exercised_by_cases() -> None:
    """The table above covers every exported family, so a new metric cannot go untested."""
    covered = {sample for _, sample, _, _ in CASES}
    missing = {spec.name for spec in METRICS if not any(name in covered for name in spec.sample_names)}
    assert missing == set()


def test_metric_names_match_what_the_registry_exposes(metrics: Metrics, registry: CollectorRegistry) -> None:
    """METRIC_NAMES (used by the dashboard tests) lists exactly the families and types exposed."""
    exercise_everything(metrics)
    exposed = {family.name: family.type for family in registry.collect()}
    assert exposed == dict(METRIC_NAMES)
    assert all(name.startswith("otp_router_") for name in METRIC_NAMES)


def test_cost_splits_charges_and_refunds(metrics: Metrics, registry: CollectorRegistry) -> None:
    """Charges and refunds land in separate counters so that net spend is charged minus refunded."""
    metrics.cost("sms", "IN", Decimal("0.0832"))
    metrics.cost("telegram", "IN", Decimal("0.01"))
    metrics.cost("telegram", "IN", Decimal("-0.01"))
    metrics.cost("telegram", "IN", Decimal("0"))
    charged = value(registry, "otp_router_cost_charged_usd_total", channel="telegram", country="IN")
    refunded = value(registry, "otp_router_cost_refunded_usd_total", channel="telegram", country="IN")
    assert charged == pytest.approx(0.01)
    assert refunded == pytest.approx(0.01)
    assert value(registry, "otp_router_cost_refunded_usd_total", channel="sms", country="IN") is None


def test_sms_only_cost_ignores_non_positive_amounts(metrics: Metrics, registry: CollectorRegistry) -> None:
    """A zero, negative or NaN SMS estimate adds nothing instead of raising or creating a series."""
    for amount in (Decimal("0"), Decimal("-1"), Decimal("NaN")):
        metrics.sms_only_cost("US", amount)
    assert value(registry, "otp_router_cost_sms_only_usd_total", country="US") is None


@pytest.mark.parametrize("raw", [PHONE, "447911123456", "gb", "GBR", "G", "", "G1", "GB\n", None])
def test_country_not_an_iso_region_becomes_zz(raw: str | None) -> None:
    """Anything that is not two upper-case letters is reported as ZZ."""
    assert sanitize_country(raw) == "ZZ"


@pytest.mark.parametrize("region", ["GB", "US", "ZZ"])
def test_iso_region_is_kept(region: str) -> None:
    """A proper ISO 3166-1 alpha-2 code passes through unchanged."""
    assert sanitize_country(region) == region


def test_phone_number_as_country_is_reported_as_zz(metrics: Metrics, registry: CollectorRegistry) -> None:
    """Passing a phone number where a country belongs counts under ZZ and never under the number."""
    metrics.verification_started(PHONE)
    metrics.cost("sms", PHONE, Decimal("0.05"))
    assert value(registry, "otp_router_verifications_started_total", country="ZZ") == 1
    assert value(registry, "otp_router_verifications_started_total", country=PHONE) is None
    assert value(registry, "otp_router_cost_charged_usd_total", channel="sms", country="ZZ") == 0.05


def test_unknown_closed_label_values_become_other(metrics: Metrics, registry: CollectorRegistry) -> None:
    """A value outside a closed label set is counted as 'other' instead of opening a new series."""
    metrics.send("carrier-pigeon", "twilio", "maybe", "US")
    metrics.fallback("telegram", "sms", "mood")
    assert (
        value(
            registry,
            "otp_router_sends_total",
            channel="other",
            provider="twilio",
            outcome="other",
            country="US",
        )
        == 1
    )
    assert (
        value(
            registry, "otp_router_fallbacks_total", from_channel="telegram", to_channel="sms", reason="other"
        )
        == 1
    )


@pytest.mark.parametrize("bad", [PHONE, "a4479111234", "tw ilio", "", "9provider", "x" * 70])
def test_open_label_values_must_look_like_identifiers(
    metrics: Metrics, registry: CollectorRegistry, bad: str
) -> None:
    """Provider, method, error type, scope and reason values that are not short identifiers become 'other'."""
    metrics.provider_error(bad, bad, bad)
    assert (
        value(
            registry, "otp_router_provider_errors_total", provider="other", method="other", error_type="other"
        )
        == 1
    )


def test_negative_or_nan_durations_do_not_corrupt_histograms(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """A clock step (negative duration) counts as 0 s and a NaN is dropped, keeping _sum meaningful."""
    metrics.time_to_code("telegram", -3.0, "GB")
    metrics.time_to_code("telegram", math.nan, "GB")
    assert value(registry, "otp_router_time_to_code_seconds_count", channel="telegram", country="GB") == 1
    assert value(registry, "otp_router_time_to_code_seconds_sum", channel="telegram", country="GB") == 0


def test_a_paid_twice_correction_adds_cost_but_no_user(metrics: Metrics, registry: CollectorRegistry) -> None:
    """new_user=False (a final price replacing an estimate) adds USD without counting the user again."""
    metrics.paid_twice("ID", Decimal("0.30"))
    metrics.paid_twice("ID", Decimal("0.02"), new_user=False)
    metrics.paid_twice("ID", Decimal("-1"), new_user=False)
    assert value(registry, "otp_router_paid_twice_total", country="ID") == 1
    assert value(registry, "otp_router_paid_twice_usd_total", country="ID") == pytest.approx(0.32)


def test_impossible_circuit_state_is_refused(metrics: Metrics) -> None:
    """Only 0 (closed), 1 (open) and 2 (half-open) are valid circuit states."""
    with pytest.raises(ValueError, match="circuit state"):
        metrics.circuit_state("telegram", 3)


def test_reported_gauges_are_absent_until_first_set(metrics: Metrics, registry: CollectorRegistry) -> None:
    """Balance and heartbeat do not pretend to be 0 before the first report (that would fire alerts)."""
    assert value(registry, "otp_router_telegram_balance_credits") is None
    assert value(registry, "otp_router_worker_heartbeat_timestamp_seconds") is None
    metrics.telegram_balance(0)
    metrics.worker_heartbeat()
    assert value(registry, "otp_router_telegram_balance_credits") == 0
    assert (value(registry, "otp_router_worker_heartbeat_timestamp_seconds") or 0) > 1_600_000_000


def test_closed_queue_and_check_series_start_at_zero(registry: CollectorRegistry) -> None:
    """Dead-letter and code-check series exist at 0 from the start, so increase() sees the first event."""
    Metrics(registry)
    assert value(registry, "otp_router_queue_messages_total", outcome="dead_letter") == 0
    assert value(registry, "otp_router_code_checks_total", result="too_many_attempts") == 0


def test_delivery_statuses_cover_every_delivery_state() -> None:
    """The delivery status label set is exactly the provider-neutral DeliveryState values."""
    assert {state.value for state in DeliveryState} == metrics_module.DELIVERY_STATUSES


def test_label_sets_match_core_enums() -> None:
    """Fallback reasons, final outcomes and check results match the lifecycle core's enums."""
    try:
        from otp_router.core import CheckOutcome, FallbackReason, Status
    except ImportError as exc:  # the core is written in parallel
        pytest.skip(f"otp_router.core not importable yet: {exc}")
    assert {r.value for r in FallbackReason} == metrics_module.FALLBACK_REASONS
    assert {c.value for c in CheckOutcome} == metrics_module.CODE_CHECK_RESULTS
    assert {s.value for s in Status} - {"pending"} == metrics_module.VERIFICATION_OUTCOMES


@pytest.mark.parametrize(
    ("error", "outcome"),
    [
        (None, "ok"),
        (ProviderTimeout("t", provider="twilio"), "transient_error"),
        (ProviderRejected("r", provider="telegram"), "permanent_error"),
        (RuntimeError("bug"), "error"),
    ],
)
def test_provider_outcome_maps_errors(error: BaseException | None, outcome: str) -> None:
    """provider_outcome() turns a call's exception into the outcome label."""
    assert provider_outcome(error) == outcome


# retry.py passes tenacity's deprecated ``initial=``; that is retry.py's business, not this test's.
@pytest.mark.filterwarnings("ignore:The 'initial' parameter is deprecated:DeprecationWarning")
async def test_retry_hook_counts_each_retry(metrics: Metrics, registry: CollectorRegistry) -> None:
    """Plugged into retrying(), the hook counts one retry per failed attempt that is retried."""
    calls = 0
    settings = RetrySettings(backoff=False, attempts=3, timeout=10)
    async for attempt in retrying(
        settings, CallKind.READ, on_retry=metrics.retry_hook("telegram", "checkVerificationStatus")
    ):
        with attempt:
            calls += 1
            if calls < 3:
                raise ProviderUnavailable("502", provider="telegram")
    retries = value(
        registry,
        "otp_router_provider_retries_total",
        provider="telegram",
        method="checkVerificationStatus",
        error_type="ProviderUnavailable",
    )
    assert retries == 2


def exercise_everything(m: Metrics) -> set[str]:
    """Call every public method with realistic and hostile inputs; return the method names called."""
    for country in ("GB", "US", PHONE, "447911123456", "gb"):
        m.verification_started(country)
        m.verification_finished("verified", "telegram", country)
        m.send("sms", "twilio", "accepted", country)
        m.cost("sms", country, Decimal("0.0079"))
        m.cost("telegram", country, Decimal("-0.01"))
        m.sms_only_cost(country, Decimal("0.0079"))
    for hostile in (PHONE, "+1 (415) 555-0100", "447911123456"):
        m.send(hostile, hostile, hostile, hostile)
        m.delivery(hostile, hostile)
        m.fallback(hostile, hostile, hostile)
        m.provider_request(hostile, hostile, hostile, 0.1)
        m.provider_error(hostile, hostile, hostile)
        m.provider_retry(hostile, hostile, hostile)
        m.rate_limited(hostile)
        m.fraud_block(hostile)
        m.webhook(hostile, hostile)
        m.queue_message(hostile)
        m.dead_letter(hostile)
        m.code_check(hostile)
        m.time_to_code(hostile, 1.0, hostile)
        m.learned_deadline(hostile, hostile, 5.0)
        m.paid_twice(hostile, Decimal("0.01"))
        m.time_to_verify(hostile, 1.0)
        m.circuit_state(hostile, 0)
    timeout = ProviderTimeout("t", provider="telegram")
    realistic: dict[str, Callable[[], object]] = {
        "verification_started": lambda: m.verification_started("IN"),
        "verification_finished": lambda: m.verification_finished("too_many_attempts", "sms", "IN"),
        "send": lambda: m.send("telegram", "telegram", "unreachable", "IN"),
        "cost": lambda: m.cost("sms", "IN", Decimal("0.0832")),
        "sms_only_cost": lambda: m.sms_only_cost("IN", Decimal("0.0832")),
        "delivery": lambda: m.delivery("telegram", "delivered"),
        "fallback": lambda: m.fallback("telegram", "sms", "deadline"),
        "time_to_code": lambda: m.time_to_code("telegram", 2.1, "IN"),
        "learned_deadline": lambda: m.learned_deadline("telegram", "IN", 12.7),
        "paid_twice": lambda: m.paid_twice("IN", Decimal("0.0832")),
        "time_to_verify": lambda: m.time_to_verify("sms", 35.0),
        "code_check": lambda: m.code_check("valid"),
        "provider_request": lambda: m.provider_request("twilio", "messages.create", "ok", 0.12),
        "provider_error": lambda: m.provider_error("telegram", "checkSendAbility", "InvalidRecipient"),
        "provider_retry": lambda: m.provider_retry("twilio", "messages.fetch", "ProviderTimeout"),
        "retry_hook": lambda: m.retry_hook("telegram", "sendVerificationMessage")(timeout, 1, 0.0),
        "telegram_balance": lambda: m.telegram_balance(Decimal("99.5")),
        "circuit_state": lambda: m.circuit_state("telegram", 1),
        "rate_limited": lambda: m.rate_limited("country"),
        "fraud_block": lambda: m.fraud_block("number_type"),
        "webhook": lambda: m.webhook("twilio", "accepted"),
        "queue_message": lambda: m.queue_message("processed"),
        "dead_letter": lambda: m.dead_letter("max_deliveries"),
        "queue_depth": lambda: m.queue_depth(3),
        "queue_lag": lambda: m.queue_lag(1.5),
        "inflight": lambda: m.inflight(2),
        "worker_heartbeat": lambda: m.worker_heartbeat(),
        "deadline_fired": lambda: m.deadline_fired(0.05),
        "render": lambda: m.render(),
    }
    for call in realistic.values():
        call()
    return set(realistic)


def test_no_label_value_ever_looks_like_a_phone_number(metrics: Metrics, registry: CollectorRegistry) -> None:
    """After every method is fed realistic and phone-number inputs, no label value is a phone number."""
    called = exercise_everything(metrics)
    assert called == public_methods(Metrics)
    label_values = {
        label_value
        for family in registry.collect()
        for sample in family.samples
        for label_name, label_value in sample.labels.items()
        if label_name != "le"
    }
    assert "ZZ" in label_values and "other" in label_values  # the hostile inputs did arrive
    assert [v for v in label_values if PHONE_LIKE.search(v)] == []


def test_null_metrics_offers_every_method_and_records_nothing() -> None:
    """NullMetrics has the full Metrics interface with the same signatures, and every call is a no-op."""
    null = NullMetrics()
    assert public_methods(NullMetrics) == public_methods(Metrics)
    for name in public_methods(Metrics):
        assert inspect.signature(getattr(NullMetrics, name)) == inspect.signature(getattr(Metrics, name))
    assert exercise_everything(null) == public_methods(Metrics)
    assert null.registry is None
    assert null.render()[0] == b""


def test_importing_the_module_registers_and_imports_nothing() -> None:
    """Importing otp_router.metrics neither imports prometheus_client nor registers any metric."""
    result = run_python(
        """
        import sys
        import otp_router.metrics
        assert "prometheus_client" not in sys.modules, "prometheus_client imported eagerly"
        from prometheus_client import REGISTRY
        names = [f.name for f in REGISTRY.collect()]
        assert not [n for n in names if n.startswith("otp_router")], names
        print("clean")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_get_metrics_is_one_instance_in_the_default_registry() -> None:
    """get_metrics() returns the same Metrics every time, registered in prometheus_client.REGISTRY."""
    result = run_python(
        """
        from otp_router.metrics import Metrics, NullMetrics, get_metrics
        from prometheus_client import REGISTRY
        first = get_metrics()
        assert type(first) is Metrics and get_metrics() is first
        first.verification_started("FR")
        print(REGISTRY.get_sample_value("otp_router_verifications_started_total", {"country": "FR"}))
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "1.0"


def test_get_metrics_without_prometheus_client_is_a_no_op() -> None:
    """Without prometheus-client installed, get_metrics() is a NullMetrics and calls succeed silently."""
    result = run_python(
        """
        import sys
        sys.modules["prometheus_client"] = None  # makes any import of it fail, as if not installed
        from decimal import Decimal
        from otp_router.metrics import Metrics, NullMetrics, get_metrics
        m = get_metrics()
        assert isinstance(m, NullMetrics)
        m.verification_started("GB")
        m.cost("sms", "GB", Decimal("0.01"))
        m.worker_heartbeat()
        try:
            Metrics()
        except ImportError:
            print("null")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "null"


def test_labelled_children_are_cached_by_name_and_value() -> None:
    """The same label values passed in another order, or under other names, reach their own series."""
    metrics = Metrics(CollectorRegistry())
    metrics._inc("otp_router_webhooks", provider="telegram", outcome="ok")
    metrics._inc("otp_router_webhooks", outcome="ok", provider="telegram")
    metrics._inc("otp_router_webhooks", provider="ok", outcome="telegram")
    registry = metrics.registry
    assert registry is not None
    sample = registry.get_sample_value
    assert sample("otp_router_webhooks_total", {"provider": "telegram", "outcome": "ok"}) == 2
    assert sample("otp_router_webhooks_total", {"provider": "ok", "outcome": "telegram"}) == 1
