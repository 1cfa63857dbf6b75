"""The pytest plugin for users' own tests (``otp_router.testing``): used directly here, and by a
separate pytest run that finds it through its ``pytest11`` entry point."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from otp_router.harness import read_code
from otp_router.metrics import Metrics
from otp_router.policy import Policy
from otp_router.router import OtpRouter
from otp_router.testing import EmulatedProviders

PHONE = "+447400123456"


async def test_the_code_of_each_verification_even_when_an_earlier_sms_arrives_late(
    otp_providers: EmulatedProviders,
) -> None:
    """Two verifications for one SMS-only number; the earlier one's SMS arrives while the later one's
    is still on its way. The phone then shows the earlier code; sent_code(later id) waits for its own."""
    otp_providers.script.set(PHONE, telegram="absent", sms_delay=2.0)
    settings = otp_providers.settings()
    async with OtpRouter.from_settings(settings, metrics=Metrics(CollectorRegistry())) as router:
        first = await router.start(PHONE, idempotency_key="first")
        otp_providers.script.set(PHONE, telegram="absent", sms_delay=60.0)
        second = await router.start(PHONE, idempotency_key="second")
        assert first.channel == second.channel == "sms"
        code_first = await otp_providers.wait_code(first.id)
        assert code_first is not None
        # What a phone-keyed inbox offers now, while the second SMS is on its way: the first code.
        assert await read_code(otp_providers.pair, PHONE, wait=0.1) == code_first
        assert await otp_providers.wait_code(second.id, wait=0.1) is None
        code_second = await otp_providers.wait_code(second.id, wait=30)
        assert code_second is not None
        assert (await router.check(second.id, code_second)).valid
        assert (await router.check(first.id, code_first)).valid


async def test_no_code_before_delivery_and_none_for_an_unknown_id(otp_providers: EmulatedProviders) -> None:
    """A message that never arrives gives None, as does an id nobody started."""
    otp_providers.script.set(PHONE, telegram_never=True)
    async with OtpRouter.from_settings(
        otp_providers.settings(), metrics=Metrics(CollectorRegistry())
    ) as router:
        v = await router.start(PHONE)
        assert v.channel == "telegram"
        assert await otp_providers.wait_code(v.id, wait=0.3) is None
    assert otp_providers.sent_code("v_nobody_started_this_one", wait=0.1) is None


@pytest.mark.otp_time_scale(0.05)
def test_one_time_scale_for_emulators_and_router(otp_providers: EmulatedProviders) -> None:
    """The marker sets the emulators' scale, and the policy and delays the settings carry."""
    assert otp_providers.time_scale == otp_providers.script.time_scale == 0.05
    settings = otp_providers.settings()
    policy = Policy.load(settings.policy_file)
    default = Policy()
    assert [s.deliver_within for s in policy.steps] == [s.deliver_within * 0.05 for s in default.steps]
    assert settings.settle_delay == pytest.approx(15 * 0.05)
    assert otp_providers.environ()["OTP_ROUTER_POLICY_FILE"] == str(settings.policy_file)


USER_TESTS = """
import pytest
from otp_router import SyncOtpRouter

def test_login(otp_providers):
    with SyncOtpRouter(settings=otp_providers.settings()) as router:
        v = router.start("+447400123456")
        code = otp_providers.sent_code(v.id)
        assert router.check(v.id, code).valid

@pytest.mark.otp_time_scale(0.2)
def test_sms_fallback_from_the_environment(otp_environ):
    otp_environ.script.set("+4915123451234", telegram="absent")
    with SyncOtpRouter() as router:  # reads the OTP_ROUTER_* variables the fixture set
        v = router.start("+4915123451234")
        assert v.channel == "sms"
        wrong = router.check(v.id, "000000" if otp_environ.sent_code(v.id) != "000000" else "111111")
        assert not wrong.valid
        assert router.check(v.id, otp_environ.sent_code(v.id)).valid
"""


def test_a_users_suite_gets_the_fixtures_from_the_entry_point(tmp_path: Path) -> None:
    """A plain pytest run in a folder of its own (no conftest) finds the plugin and passes."""
    (tmp_path / "test_user_login.py").write_text(USER_TESTS, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_user_login.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 passed" in result.stdout
