"""Type-checked, never executed: the public API as users write it.

``mypy --strict tests/typing`` runs in CI (see scripts/test); a signature
change that breaks user code fails there even when every test still passes.
"""

from __future__ import annotations

from decimal import Decimal

from otp_router import (
    AutoDeadline,
    CheckOutcome,
    CheckResult,
    LatencyDistribution,
    OtpRouter,
    OtpRouterError,
    RateLimited,
    Settings,
    Status,
    SyncOtpRouter,
    Verification,
    choose_deadline,
    enqueue,
    parse_phone,
)


async def login_flow(phone: str, code: str) -> bool:
    async with OtpRouter.from_settings(Settings.load()) as router:
        try:
            v: Verification = await router.start(phone, idempotency_key="k", default_region="GB")
        except RateLimited as exc:
            wait: float = exc.retry_after
            return wait < 0
        except OtpRouterError:
            return False
        status: Status = v.status
        cost: Decimal = v.cost
        channel: str | None = v.channel
        result: CheckResult = await router.check(v.id, code)
        outcome: CheckOutcome = result.status
        left: int = result.attempts_left
        again: Verification = await router.resend(v.id)
        await router.cancel(again.id)
        return (
            result.valid
            and status is Status.PENDING
            and cost >= 0
            and channel != ""
            and left >= 0
            and (outcome is CheckOutcome.VALID)
        )


def blocking(phone: str) -> str:
    with SyncOtpRouter() as router:
        return router.start(phone).id


async def producer() -> str:
    region: str = parse_phone("+447400123456").region
    handle = await enqueue("redis://127.0.0.1:6379/0", "+447400123456", idempotency_key="login-1")
    return region + handle.verification_id + handle.message_id


def simulated_deadline(latencies: list[float | None], sms_price: float) -> float:
    # What a benchmark does: the router's deadline rule on a drawn population.
    return choose_deadline(
        LatencyDistribution.from_latencies(latencies),
        bounds=AutoDeadline(minimum=3.0, maximum=30.0),
        ttl=30,
        telegram_price=0.01,
        sms_price=sms_price,
        sms_latency=5.0,
        wait_cost_per_second=0.001,
        min_samples=50,
    )
