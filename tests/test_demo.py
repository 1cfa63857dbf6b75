"""The demo's summary agrees with the router's metrics and ledger for the same run."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from otp_router.demo import run_demo
from otp_router.metrics import Metrics
from otp_router.policy import Policy, Step
from otp_router.providers.base import ChannelName


def total(registry: CollectorRegistry, name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    out = 0.0
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                out += sample.value
    return out


async def test_summary_matches_metrics_and_ledger(tmp_path: Path) -> None:
    """Counts, fallbacks, costs and paid-twice users printed by the demo equal the metrics and the ledger."""
    registry = CollectorRegistry()
    # A 5 s deadline under the 30 s ttl: users whose Telegram message lands in between pay twice.
    policy = Policy(steps=(Step(ChannelName.TELEGRAM, 5.0, probe=True), Step(ChannelName.SMS, 120.0)))
    summary = await run_demo(
        users=60, seed=3, workdir=tmp_path, metrics=Metrics(registry), progress=None, policy=policy
    )
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
    assert summary.paid_twice > 0
    assert total(registry, "otp_router_paid_twice_total") == summary.paid_twice
    # The metric adds estimates when a user starts paying twice; the summary reads final prices.
    assert total(registry, "otp_router_paid_twice_usd_total") >= float(summary.paid_twice_extra) - 1e-9
    assert summary.paid_twice_extra > 0


def test_scaled_policy_scales_a_learned_deadline() -> None:
    """At 20x, an auto step's bounds, assumed SMS latency and price of waiting move to wall-clock seconds."""
    from otp_router.demo import scaled_policy

    policy = Policy(wait_cost_per_second=0.002, sms_latency=6.0)
    scaled = scaled_policy(policy, 0.05)
    tg = scaled.steps[0]
    assert tg.auto is not None
    assert (tg.auto.minimum, tg.auto.maximum) == (pytest.approx(0.15), pytest.approx(1.5))
    assert tg.deliver_within == pytest.approx(1.5) and tg.ttl == 30  # the emulator scales the ttl itself
    assert scaled.wait_cost_per_second == pytest.approx(0.04)
    assert scaled.sms_latency == pytest.approx(0.3)
