"""The demo's summary agrees with the router's metrics and ledger for the same run."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from otp_router.demo import make_population, run_demo
from otp_router.metrics import Metrics


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    out = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                out += sample.value
    return out


def test_population_is_reproducible() -> None:
    """The same seed draws the same users; numbers are distinct."""
    a, b = make_population(120, 5), make_population(120, 5)
    assert a == b
    phones = [u.phone for u in a.users if u.kind != "bad_number"]
    assert len(phones) == len(set(phones))
    assert {u.kind for u in a.users} >= {"telegram", "absent", "bad_number"}


async def test_summary_matches_metrics_and_ledger(tmp_path: Path) -> None:
    """Counts, fallbacks and costs printed by the demo equal the metrics and the ledger of that run."""
    registry = CollectorRegistry()
    summary = await run_demo(users=60, seed=3, workdir=tmp_path, metrics=Metrics(registry), progress=None)
    assert summary.started + summary.refused_input == summary.users == 60
    assert summary.verified > summary.started * 0.8
    assert total(registry, "otp_router_verifications_started_total") == summary.started
    assert total(registry, "otp_router_verifications_finished_total", outcome="verified") == summary.verified
    for reason, count in summary.fallbacks.items():
        assert total(registry, "otp_router_fallbacks_total", reason=reason) == count, reason
    assert sum(summary.fallbacks.values()) == total(registry, "otp_router_fallbacks_total")
    for channel, count in summary.delivered.items():
        assert total(registry, "otp_router_time_to_code_seconds_count", channel=channel) == count, channel
    charged = total(registry, "otp_router_cost_charged_usd_total")
    refunded = total(registry, "otp_router_cost_refunded_usd_total")
    assert charged - refunded == pytest.approx(float(summary.cost_router), abs=1e-9)
    assert total(registry, "otp_router_cost_sms_only_usd_total") == pytest.approx(
        float(summary.cost_sms_only), abs=1e-9
    )
    assert summary.cost_router < summary.cost_sms_only
    assert summary.cost_router > Decimal(0)
    assert summary.paid_twice == 0, "ttl == deadline: no user keeps a Telegram charge and pays for SMS"
