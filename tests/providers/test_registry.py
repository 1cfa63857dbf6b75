"""Routes are open names bound to adapters; the core reads the adapters' capabilities only."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import httpx
import pytest

from otp_router import (
    AdapterContext,
    Capabilities,
    ConfigError,
    OtpRouter,
    Policy,
    ProbeResult,
    SendRequest,
    SendResult,
    Settings,
    StatusResult,
    Step,
    register_adapter,
)
from otp_router.core import (
    Cancel,
    CodeEntered,
    DeadlineReached,
    Probe,
    ReportCode,
    Revoke,
    Send,
    SendOk,
    Start,
)
from otp_router.lifecycle import apply, new_state
from otp_router.metrics import NullMetrics
from otp_router.prices import SmsPrices
from otp_router.providers.base import ChannelName, DeliveryState, FakeChannel
from otp_router.providers.registry import (
    _unregister,
    adapter_class,
    build_channels,
    route_binding,
    route_capabilities,
)
from otp_router.store.memory import MemoryStore

US = "+12025550143"


class PushChannel:
    """A user's own adapter, defined outside the package: a push notification with a code."""

    name = "push"
    provider = "acme_push"
    capabilities = Capabilities(revoke=True, ttl_min=10, ttl_max=600, timeout_maybe_sent=True)
    sent: list[SendRequest]

    def __init__(self, *, fail: bool = False) -> None:
        self.sent = []
        self.revoked: list[str] = []
        self.fail = fail

    @classmethod
    def from_settings(cls, settings: Settings, context: AdapterContext) -> PushChannel:
        return cls()

    async def probe(self, phone: str) -> ProbeResult:
        return ProbeResult(True)

    async def send(self, request: SendRequest) -> SendResult:
        self.sent.append(request)
        return SendResult(ref=f"push-{len(self.sent)}", state=DeliveryState.SENT, cost=Decimal("0.001"))

    async def status(self, ref: str) -> StatusResult:
        return StatusResult(ref, DeliveryState.SENT)

    async def revoke(self, ref: str) -> bool:
        self.revoked.append(ref)
        return True

    async def report_code(self, ref: str, code: str) -> None:
        raise AssertionError("push does not take codes back")

    def callback_url(self, base: str, payload: str) -> str:
        return f"{base}/hooks/push/{payload}"

    async def aclose(self) -> None:
        pass


@pytest.fixture
def push_registered() -> Iterator[None]:
    register_adapter("push", PushChannel)
    yield
    _unregister("push")


def _context() -> AdapterContext:
    return AdapterContext(
        httpx.AsyncClient(), SmsPrices.load(), lambda provider: NullMetrics().retry_hook(provider, "call")
    )


class Clock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_a_registered_adapter_is_a_workflow_step(push_registered: None) -> None:
    """A user adapter registered from Python is built from configuration and routed to, then falls back."""
    settings = Settings(
        routes={"push": "push", "sms": "twilio_sms"},
        telegram={"enabled": False},
        twilio={"enabled": False},
        code_secret="s",
        public_url="https://otp.example.com",
    )
    channels: dict[str, Any] = build_channels(settings.routes, settings, _context())
    assert list(channels) == ["push"] and isinstance(channels["push"], PushChannel)
    sms = FakeChannel(ChannelName.SMS, _sms)
    channels["sms"] = sms
    policy = Policy.from_dict(
        {"steps": [{"channel": "push", "deliver_within": 20}, {"channel": "sms", "deliver_within": 60}]},
        routes=channels,
    )
    clock = Clock()
    router = OtpRouter(
        store=MemoryStore(),
        channels=channels,
        settings=settings,
        policy=policy,
        metrics=NullMetrics(),
        clock=clock,
        run_deadlines=False,
    )
    await router.open()
    v = await router.start(US)
    push = channels["push"]
    assert v.channel == "push" and len(push.sent) == 1
    assert push.sent[0].callback_url == f"https://otp.example.com/hooks/push/{v.id}"
    assert push.sent[0].ttl == 20
    clock.now += 21
    assert await router.fire_due() == 1
    after = await router.get(v.id)
    assert after.channel == "sms" and [f.reason for f in after.fallbacks] == ["deadline"]
    assert [m for m, _ in sms.calls] == ["send"]
    await router.aclose()


async def _sms(method: str, arg: Any) -> Any:
    if method == "send":
        return SendResult(ref="SM1", state=DeliveryState.PENDING)
    return StatusResult(arg, DeliveryState.SENT)


async def test_an_adapter_named_by_import_path(push_registered: None) -> None:
    """``"module:Class"`` in the routes setting loads an adapter that was never registered."""
    assert adapter_class(f"{__name__}:PushChannel") is PushChannel
    with pytest.raises(ConfigError, match="unknown adapter 'nope'"):
        adapter_class("nope")
    with pytest.raises(ConfigError, match="cannot load adapter"):
        adapter_class(f"{__name__}:Missing")


def test_registration_needs_capabilities_and_from_settings() -> None:
    """A class without capabilities or from_settings is refused at registration."""

    class Bare:
        pass

    with pytest.raises(TypeError, match="Capabilities"):
        register_adapter("bare", Bare)


def test_a_policy_refuses_a_route_that_is_not_configured() -> None:
    """A step naming a route nobody configured is a ConfigError that lists the configured ones."""
    with pytest.raises(ConfigError, match=r"unknown route 'pigeon'; configured: sms, telegram"):
        Policy.from_dict({"steps": [{"channel": "pigeon"}]})
    with pytest.raises(ConfigError, match="route name"):
        Policy.from_dict({"steps": [{"channel": "Bad Name"}]}, routes={"Bad Name"})


def test_ttl_range_and_probe_come_from_the_route_capabilities(push_registered: None) -> None:
    """The registered adapter's ttl range bounds a step's ttl; its default probe is its capability."""
    with pytest.raises(ConfigError, match=r"steps\[0\].ttl must be 10..600 seconds for push"):
        Policy.from_dict({"steps": [{"channel": "push", "ttl": 5}]})
    step = Policy.from_dict({"steps": [{"channel": "push", "deliver_within": 2}]}).steps[0]
    assert (step.ttl, step.probe, step.provider) == (10, False, "acme_push")
    assert route_binding("push") == ("acme_push", PushChannel.capabilities)
    # An unknown route gets the plainest capabilities and its own name as provider.
    assert route_binding("carrier_pigeon") == ("carrier_pigeon", Capabilities())


def test_default_routes_bind_the_built_in_adapters() -> None:
    """telegram probes, resends by request id, revokes and takes codes back; sms looks messages up."""
    tg, sms = route_capabilities("telegram"), route_capabilities("sms")
    assert tg.probe and tg.probe_charged and tg.idempotent_ref and tg.revoke and tg.report_code
    assert (tg.ttl_min, tg.ttl_max) == (30, 3600)
    assert sms.lookup and not (sms.probe or sms.revoke or sms.report_code or sms.idempotent_ref)


def test_capabilities_refuse_nonsense() -> None:
    """A ttl range upside down, or idempotent sends without a probe to give the reference, is refused."""
    with pytest.raises(ValueError, match="ttl_min"):
        Capabilities(ttl_min=10, ttl_max=5)
    with pytest.raises(ValueError, match="idempotent_ref"):
        Capabilities(idempotent_ref=True)


# --- the core reads capabilities, not names ---------------------------------------------------

RESUMABLE = Capabilities(probe=True, idempotent_ref=True, report_code=True)
PLAIN = Capabilities()


def _state(*steps: Step) -> Any:
    return new_state(
        verification_id="v1",
        phone=US,
        region="US",
        code_digest="d",
        steps=steps,
        now=0.0,
        code_ttl=600,
        max_attempts=5,
    )


@pytest.mark.parametrize(("caps", "resumed"), [(RESUMABLE, True), (PLAIN, False)])
def test_an_interrupted_send_is_resumed_only_by_an_idempotent_route(
    caps: Capabilities, resumed: bool
) -> None:
    """Any route with idempotent sends (not just telegram) is re-sent with its probe ref after a crash."""
    state = _state(Step("custom", 30, probe=True, caps=caps, provider="acme"))
    t = apply(state, Start(), 0.0)
    assert t.effects == (Probe(0, "custom"),)
    from otp_router.core import ProbeDone

    t = apply(t.state, ProbeDone(0, True, ref="r-1"), 1.0)
    assert isinstance(t.effects[0], Send)
    # The process dies during the send; the I/O lease runs out.
    assert t.state.deadline is not None
    t = apply(t.state, DeadlineReached(), t.state.deadline)
    sends = [e for e in t.effects if isinstance(e, Send)]
    assert bool(sends) is resumed
    if resumed:
        assert sends[0].resume and sends[0].probe_ref == "r-1"
    else:
        assert t.state.attempts[0].reason == "send_unconfirmed"
    assert t.state.attempts[0].provider == "acme"


@pytest.mark.parametrize("caps", [Capabilities(revoke=True, report_code=True), PLAIN])
def test_revoke_and_code_report_follow_capabilities(caps: Capabilities) -> None:
    """Cancel revokes and a check reports the code only where the route's adapter can."""
    state = _state(Step("custom", 30, caps=caps))
    t = apply(state, Start(), 0.0)
    sent = apply(t.state, SendOk(0, "m-1"), 1.0).state
    checked = apply(sent, CodeEntered(matches=False), 2.0)
    reports = [e for e in checked.effects if isinstance(e, ReportCode)]
    assert reports == ([ReportCode("custom", "m-1")] if caps.report_code else [])
    canceled = apply(checked.state, Cancel(), 3.0)
    revokes = [e for e in canceled.effects if isinstance(e, Revoke)]
    assert revokes == ([Revoke(0, "custom", "m-1")] if caps.revoke else [])


def test_a_learned_deadline_needs_a_refunding_route() -> None:
    """deliver_within = "auto" is refused for a route whose adapter does not refund undelivered messages."""
    with pytest.raises(ConfigError, match="only for routes that refund undelivered messages"):
        Policy.from_dict({"steps": [{"channel": "sms", "deliver_within": "auto"}]})


def test_stored_steps_keep_their_binding() -> None:
    """A step read back from the store keeps the capabilities it was bound to, not today's defaults."""
    state = _state(Step("telegram", 30, probe=True, caps=PLAIN, provider="other"))
    again = type(state).model_validate_json(state.model_dump_json())
    assert again.steps[0].caps == PLAIN and again.steps[0].provider == "other"
    assert again.steps[0].channel is ChannelName.TELEGRAM
