"""``enqueue()`` hands the producer the verification id the worker will use, on Redis and SQLite."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry
from test_worker import make_worker, settings_for, store_url, telegram_sends

from otp_router import enqueue
from otp_router.emulators import EmulatorPair, Script
from otp_router.harness import read_code, sample_numbers
from otp_router.ids import keyed_id, producer_id
from otp_router.metrics import Metrics
from otp_router.queue import QueueMessage, open_queue, queue_url_for
from otp_router.router import OtpRouter

__all__ = ["store_url"]  # the fixture, imported for its parametrisation


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(default_delivery=0.1))


async def test_the_handle_checks_after_the_worker_ran(pair: EmulatorPair, store_url: str) -> None:
    """Enqueue, let a worker start it, then check the code under the handle's id; enqueueing the same
    key again gives the same id and sends nothing more."""
    settings = settings_for(pair, store_url)
    phone, other = sample_numbers("GB", 2, offset=7)
    handle = await enqueue(settings, phone, idempotency_key="login-1")
    again = await enqueue(settings, phone, idempotency_key="login-1")
    # By URL, without the code secret: still an id of its own, deterministic.
    by_url = await enqueue(queue_url_for(settings), other, idempotency_key="login-2")
    assert handle.verification_id == again.verification_id
    assert handle.message_id != again.message_id
    assert by_url.verification_id == producer_id("login-2") != handle.verification_id
    assert await make_worker(settings, "w1", burst=True).run() == 0
    assert telegram_sends(pair) == {phone: 1, other: 1}
    router = OtpRouter.from_settings(settings, metrics=Metrics(CollectorRegistry()), run_deadlines=False)
    async with router:
        for number, vid in ((phone, handle.verification_id), (other, by_url.verification_id)):
            code = await read_code(pair, number)
            assert code is not None
            assert (await router.check(vid, code)).valid


async def test_a_message_without_an_id_still_works(pair: EmulatorPair, store_url: str) -> None:
    """A message from before ids were carried (or from another language) gets the router's own id."""
    settings = settings_for(pair, store_url)
    [phone] = sample_numbers("GB", 1, offset=11)
    queue = open_queue(queue_url_for(settings))
    try:
        await queue.enqueue(json.dumps({"phone": phone, "idempotency_key": "old-style"}))
    finally:
        await queue.aclose()
    assert await make_worker(settings, "w1", burst=True).run() == 0
    assert settings.code_secret is not None
    expected = keyed_id(settings.code_secret.get_secret_value().encode(), "old-style")
    router = OtpRouter.from_settings(settings, metrics=Metrics(CollectorRegistry()), run_deadlines=False)
    async with router:
        assert (await router.get(expected)).created_at > 0


def test_a_malformed_carried_id_is_refused_by_the_schema() -> None:
    """The carried id must look like one of ours; anything else is an invalid message."""
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        QueueMessage(phone="+447400123456", idempotency_key="k", verification_id="v_../../etc")


async def test_router_refuses_a_given_id_without_a_key_or_of_the_wrong_shape() -> None:
    """A given id needs a key (or a repeat could not find it) and must look like one of ours."""
    from otp_router.config import Settings
    from otp_router.errors import InputError
    from otp_router.providers.base import ChannelName, FakeChannel
    from otp_router.store.memory import MemoryStore

    async def never(method: str, arg: object) -> object:
        raise AssertionError("nothing may be sent")

    router = OtpRouter(
        store=MemoryStore(),
        channels={ChannelName.TELEGRAM: FakeChannel(ChannelName.TELEGRAM, never)},
        settings=Settings(code_secret="s"),
        metrics=Metrics(CollectorRegistry()),
        run_deadlines=False,
    )
    async with router:
        with pytest.raises(InputError, match="idempotency_key"):
            await router.start("+447400123456", verification_id=producer_id("k"))
        with pytest.raises(InputError, match="verification_id"):
            await router.start("+447400123456", idempotency_key="k", verification_id="v_short")
