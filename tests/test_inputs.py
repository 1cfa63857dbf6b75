"""Hostile bytes, one class at a time: the strict JSON decoder, text checks, and each entry point
that used to fail on them (queue rows that blocked the SQLite queue, nesting that raised
RecursionError, a repeated key whose last value won, unpaired surrogates in ids and keys)."""

from __future__ import annotations

import json
import sqlite3
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

from otp_router.config import RetrySettings, Settings
from otp_router.errors import ConfigError, InputError, InvalidPhoneNumber
from otp_router.inputs import MAX_JSON_DEPTH, JsonInputError, check_text, decode_json
from otp_router.metrics import Metrics
from otp_router.providers.base import ChannelName, DeliveryState, FakeChannel, ProbeResult, SendResult
from otp_router.queue import DeadLetterReason, PoisonMessage, QueueMessage, open_queue, parse_message
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore
from otp_router.worker import Worker

GB = "+447400123456"
GOOD = QueueMessage(phone=GB, idempotency_key="good").to_json()


def nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


# --- the decoder ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        (b'{"phone": "+1", "phone": "+2"}', "duplicate_key"),
        (b'{"a": {"b": 1, "b": 2}}', "duplicate_key"),
        (nested(MAX_JSON_DEPTH + 1).encode(), "too_deep"),
        (b"[" * 200_000 + b"]" * 200_000, "too_deep"),  # RecursionError inside the C decoder
        (b'{"phone": "\xff\xfe"}', "encoding"),
        (b'{"phone": "\xed\xa0\x80"}', "encoding"),  # a UTF-8-encoded surrogate
        (b'{"phone": "\\ud800"}', "encoding"),  # an escaped unpaired surrogate
        (b'{"\\udfff": 1}', "encoding"),
        (b'{"n": NaN}', "not_finite"),
        (b'{"n": -Infinity}', "not_finite"),
        (b'{"n": 1e999}', "not_finite"),
        (b'{"n": ' + b"9" * 5000 + b"}", "syntax"),  # past Python's integer digit limit
        (b'{"phone": "+447400123456"', "syntax"),
        (b"x" * 2000, "too_large"),
    ],
)
def test_decode_json_refuses_with_a_reason(document: bytes, reason: str) -> None:
    """Each hostile form is an InputError with its reason, never a RecursionError or a UnicodeError,
    and the message never quotes the document."""
    with pytest.raises(JsonInputError) as caught:
        decode_json(document, max_bytes=1024 if reason == "too_large" else 1_000_000)
    assert caught.value.reason == reason
    assert isinstance(caught.value, InputError)
    assert "447400123456" not in str(caught.value)


def test_decode_json_accepts_what_it_should() -> None:
    """Nesting up to the limit, paired surrogate escapes (an emoji) and Decimal floats decode normally."""
    assert decode_json(nested(MAX_JSON_DEPTH).encode(), max_bytes=10_000)["a"]["a"]
    assert decode_json('{"k": "\\ud83d\\ude00"}', max_bytes=100) == {"k": "\U0001f600"}
    assert decode_json(b'{"c": 0.01}', max_bytes=100, parse_float=Decimal) == {"c": Decimal("0.01")}


def test_decode_json_refuses_text_with_lone_surrogates() -> None:
    """Text handed over with surrogateescape (how queues read undecodable bytes) is an encoding error."""
    with pytest.raises(JsonInputError) as caught:
        decode_json(b'{"phone": "\xff"}'.decode("utf-8", "surrogateescape"), max_bytes=100)
    assert caught.value.reason == "encoding"


@pytest.mark.parametrize("value", ["a\x00b", "\ud800", "line\nbreak", "\x7f", "x" * 201, "", 42, None])
def test_check_text_refuses(value: Any) -> None:
    """Control characters, lone surrogates, wrong lengths and non-strings are InputErrors
    whose message does not repeat the value."""
    with pytest.raises(InputError) as caught:
        check_text(value, name="idempotency_key", max_length=200)
    assert "idempotency_key" in str(caught.value)
    if isinstance(value, str) and value:
        assert value not in str(caught.value)


def test_check_text_keeps_unicode() -> None:
    """Ordinary non-ASCII text (accents, CJK, emoji) is fine."""
    assert check_text("clé-登录-\U0001f600", name="k", max_length=20) == "clé-登录-\U0001f600"


# --- the library ---------------------------------------------------------------------


async def ok_handler(method: str, arg: Any) -> Any:
    if method == "probe":
        return ProbeResult(True, ref="req-1", cost=Decimal("0.01"))
    if method == "send":
        return SendResult(ref="req-1", state=DeliveryState.SENT, cost=Decimal("0.01"))
    return True


def library(store: MemoryStore | None = None) -> tuple[OtpRouter, FakeChannel]:
    telegram = FakeChannel(ChannelName.TELEGRAM, ok_handler)
    router = OtpRouter(
        store=store or MemoryStore(),
        channels={ChannelName.TELEGRAM: telegram},
        settings=Settings(
            store_url="memory://", code_secret=SecretStr("s"), retry=RetrySettings(backoff=False)
        ),
        metrics=Metrics(CollectorRegistry()),
        run_deadlines=False,
    )
    return router, telegram


@pytest.mark.parametrize(
    "kwargs",
    [
        {"idempotency_key": "key-\udcff"},
        {"idempotency_key": "key\x00"},
        {"default_region": "G\udcffB"},
        {"phone": GB + "\udcff"},
        {"phone": GB[:5] + "\x00" + GB[5:]},
        {"phone": b"+447400123456"},
    ],
    ids=["key-surrogate", "key-nul", "region-surrogate", "phone-surrogate", "phone-nul", "phone-bytes"],
)
async def test_start_refuses_undecodable_text_before_anything_happens(kwargs: dict[str, Any]) -> None:
    """Lone surrogates (what undecodable CLI or environment bytes become) and NULs in any argument
    of start() are InputErrors: no provider call, no verification stored."""
    store = MemoryStore()
    router, telegram = library(store)
    async with router:
        with pytest.raises(InputError):
            await router.start(kwargs.pop("phone", GB), **kwargs)
        assert telegram.calls == []
        assert store._records == {} and store._hits == {}  # nothing stored at all


@pytest.mark.parametrize("bad_id", ["v_\udcff", "v_\x00", "v_" + "x" * 200, 17])
async def test_every_id_taking_call_refuses_a_non_id(bad_id: Any) -> None:
    """get/check/cancel/resend answer an id that cannot be one of ours with an InputError,
    never a store encoding error."""
    router, telegram = library()
    async with router:
        with pytest.raises(InputError):
            await router.get(bad_id)
        with pytest.raises(InputError):
            await router.check(bad_id, "123456")
        with pytest.raises(InputError):
            await router.cancel(bad_id)
        with pytest.raises(InputError):
            await router.resend(bad_id)
    assert telegram.calls == []


async def test_surrogate_ids_are_input_errors_on_redis_too(redis_url: str) -> None:
    """On Redis a lone surrogate used to fail inside the driver's encoder (a StoreError, a 503)."""
    from otp_router.store import open_store

    telegram = FakeChannel(ChannelName.TELEGRAM, ok_handler)
    router = OtpRouter(
        store=open_store(redis_url),
        channels={ChannelName.TELEGRAM: telegram},
        settings=Settings(store_url=redis_url, code_secret=SecretStr("s")),
        metrics=Metrics(CollectorRegistry()),
        run_deadlines=False,
    )
    async with router:
        with pytest.raises(InputError):
            await router.get("v_\udcff")
        with pytest.raises(InputError):
            await router.start(GB, idempotency_key="\udcff")
    assert telegram.calls == []


# --- queue rows ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ('{"phone": "+447400123456", "phone": "+447400123457"}', DeadLetterReason.BAD_JSON),
        ("[" * 30_000 + "]" * 30_000, DeadLetterReason.BAD_JSON),
        (nested(MAX_JSON_DEPTH + 1), DeadLetterReason.BAD_JSON),
        ('{"phone": "\\ud800"}', DeadLetterReason.BAD_ENCODING),
        ('{"phone": "\udcff"}', DeadLetterReason.BAD_ENCODING),
        ('{"phone": NaN}', DeadLetterReason.BAD_JSON),
    ],
    ids=["repeated-key", "recursion", "too-deep", "escaped-surrogate", "undecodable-byte", "nan"],
)
def test_parse_message_makes_hostile_json_poison(data: str, reason: DeadLetterReason) -> None:
    """A message that can never be valid is poison at once (dead-lettered, not retried)."""
    with pytest.raises(PoisonMessage) as caught:
        parse_message(data)
    assert caught.value.reason == reason


def fake_worker(tmp_path: Path, telegram: FakeChannel, **overrides: Any) -> Worker:
    settings = Settings(
        store_url="memory://",
        queue_url=f"sqlite:///{tmp_path / 'q.db'}",
        code_secret=SecretStr("s"),
        retry=RetrySettings(backoff=False),
        queue_visibility_timeout=0.3,
        **overrides,
    )
    router = OtpRouter(
        store=MemoryStore(),
        channels={ChannelName.TELEGRAM: telegram},
        settings=settings,
        metrics=Metrics(CollectorRegistry()),
    )
    return Worker(settings, router=router, name="w", serve_http=False, burst=True, heartbeat_interval=0.1)


def insert_rows(path: Path, rows: list[tuple[str, Any]]) -> None:
    """Rows written by another program, with plain SQL and whatever types it chose."""
    conn = sqlite3.connect(path)
    try:
        with conn:
            for sql, args in rows:
                conn.execute(sql, args)
    finally:
        conn.close()


async def test_hostile_sqlite_rows_are_dead_lettered_and_never_block_the_queue(tmp_path: Path) -> None:
    """Invalid UTF-8 text, a BLOB holding valid JSON, absurd nesting and a non-numeric timestamp,
    each ahead of a good row: every bad row is dead-lettered on its first delivery with its reason
    (the bytes kept as they were), and the good row is processed. Reading a row that was not UTF-8
    used to fail every claim, so nothing behind it was ever processed."""
    telegram = FakeChannel(ChannelName.TELEGRAM, ok_handler)
    worker = fake_worker(tmp_path, telegram, queue_max_deliveries=3)
    queue = open_queue(f"sqlite:///{tmp_path / 'q.db'}")
    try:
        await queue.depth()  # creates the schema
        bad_text = b'{"phone": "+447400123456\xff"}'
        insert_rows(
            tmp_path / "q.db",
            [
                ("INSERT INTO queue (data) VALUES (CAST(? AS TEXT))", (bad_text,)),
                ("INSERT INTO queue (data) VALUES (?)", (GOOD.encode(),)),  # a BLOB
                ("INSERT INTO queue (data) VALUES (?)", ("[" * 20_000 + "]" * 20_000,)),
                ("INSERT INTO queue (data, enqueued_at) VALUES (?, 'yesterday')", ("{oops",)),
                ("INSERT INTO queue (data) VALUES (?)", (GOOD,)),
            ],
        )
        assert await worker.run() == 0
        dead = await queue.dead_letters()
        assert await queue.depth() == 0 and await queue.pending() == 0
    finally:
        await queue.aclose()
    assert [(d.reason, d.attempts) for d in dead] == [
        ("bad_encoding", 1),
        ("bad_encoding", 1),
        ("bad_json", 1),
        ("bad_json", 1),
    ]
    conn = sqlite3.connect(tmp_path / "q.db")
    try:
        stored = conn.execute("SELECT CAST(data AS BLOB) FROM dead_letters ORDER BY id").fetchall()
    finally:
        conn.close()
    assert stored[0][0] == bad_text and stored[1][0] == GOOD.encode()
    assert [m for m, _ in telegram.calls].count("send") == 1


async def test_undecodable_redis_entry_is_dead_lettered_with_its_bytes(
    tmp_path: Path, redis_url: str
) -> None:
    """A stream entry whose bytes are not UTF-8 is dead-lettered as bad_encoding (bytes kept),
    the good entry after it processed; a strict decoder would fail every read that includes it."""
    import redis.asyncio as aioredis

    from otp_router.queue import RedisStreamQueue

    telegram = FakeChannel(ChannelName.TELEGRAM, ok_handler)
    settings = Settings(store_url="memory://", queue_url=redis_url, code_secret=SecretStr("s"))
    router = OtpRouter(
        store=MemoryStore(),
        channels={ChannelName.TELEGRAM: telegram},
        settings=settings,
        metrics=Metrics(CollectorRegistry()),
    )
    worker = Worker(settings, router=router, name="w", serve_http=False, burst=True, heartbeat_interval=0.1)
    raw = aioredis.Redis.from_url(redis_url.split("?", 1)[0])
    queue = open_queue(redis_url)
    assert isinstance(queue, RedisStreamQueue)
    keys = queue.keys
    try:
        await queue.depth()
        bad = b'{"phone": "\xff\xfe"}'
        await raw.xadd(keys.stream, {b"data": bad})
        await raw.xadd(keys.stream, {b"data": GOOD.encode()})
        assert await worker.run() == 0
        [dead] = await queue.dead_letters()
        entries = await raw.xrange(keys.dead_letters)
    finally:
        await queue.aclose()
        await raw.aclose()
    assert dead.reason == "bad_encoding" and dead.attempts == 1
    assert [fields[b"data"] for _, fields in entries] == [bad]
    assert [m for m, _ in telegram.calls].count("send") == 1


def test_enqueue_refuses_text_no_queue_can_store() -> None:
    """The library's enqueue refuses a lone surrogate up front instead of failing inside a driver."""
    from otp_router.queue.base import message_text

    with pytest.raises(InputError):
        message_text('{"phone": "\udcff"}')
    assert json.loads(message_text(GOOD))["phone"] == GB


# --- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTP_ROUTER_PUBLIC_URL", "otp.example.com"),
        ("OTP_ROUTER_PUBLIC_URL", "http://[::1"),
        ("OTP_ROUTER_PUBLIC_URL", "https://"),
        ("OTP_ROUTER_TELEGRAM__BASE_URL", "gatewayapi.telegram.org"),
        ("OTP_ROUTER_TWILIO__BASE_URL", "ftp://api.twilio.com"),
        ("OTP_ROUTER_STORE_URL", "redis://localhost:99999999"),
        ("OTP_ROUTER_QUEUE_URL", "amqp://localhost"),
        ("OTP_ROUTER_RETRY__TIMEOUT", "inf"),
        ("OTP_ROUTER_CODE_TTL", "nan"),
        ("OTP_ROUTER_SETTLE_DELAY", "-Infinity"),
        ("OTP_ROUTER_TWILIO__TIMEOUT", "1e308"),
        ("OTP_ROUTER_LOG_LEVEL", "LOUD"),
        ("OTP_ROUTER_TELEGRAM", "{not json"),
        ("OTP_ROUTER_API_TOKEN", "tok\udcffen"),
        ("OTP_ROUTER_TWILIO__FROM_NUMBER", "+1500\x1b[2J555"),
    ],
)
def test_invalid_configuration_is_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    """Unparsable URLs, non-finite or absurd durations, undecodable bytes: a ConfigError naming
    the variable, on one line, without the (possibly secret) value."""
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError) as caught:
        Settings.load()
    message = str(caught.value)
    assert name in message and "\n" not in message
    if len(value) > 4:
        assert value not in message


def test_policy_and_price_files_that_are_not_utf8_or_too_deep(tmp_path: Path) -> None:
    """Both files answer bytes that are not UTF-8, absurd nesting and non-finite numbers with ConfigError."""
    from otp_router.policy import Policy
    from otp_router.prices import SmsPrices

    cases = {
        "binary.toml": b"resend_cooldown = 30\n\xff\xfe\n",
        "deep.toml": b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n",
        "inf.toml": b"resend_cooldown = inf\n",
        "huge.toml": b"max_resends = 1e999\n",
    }
    for name, content in cases.items():
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(ConfigError):
            Policy.load(path)
        if name in ("binary.toml", "deep.toml"):
            with pytest.raises(ConfigError):
                SmsPrices.load(path)


def test_phone_with_an_extension_is_refused() -> None:
    """A code cannot reach an extension: refused rather than silently dropped."""
    from otp_router.phone import parse_phone

    with pytest.raises(InvalidPhoneNumber):
        parse_phone("+1 202-555-0143 ext. 12")


def _settings_of(*kinds: Any) -> list[str]:
    """The environment variable of every setting of one of these types, nested sections included."""
    from pydantic import BaseModel

    names: list[str] = []
    for name, info in Settings.model_fields.items():
        kind = info.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            names += [
                f"OTP_ROUTER_{name}__{sub}".upper()
                for sub, sub_info in kind.model_fields.items()
                if sub_info.annotation in kinds
            ]
        elif kind in kinds:
            names.append(f"OTP_ROUTER_{name}".upper())
    return names


def _float_settings() -> list[str]:
    return _settings_of(float)


def _text_settings() -> list[str]:
    return _settings_of(str, SecretStr, str | None, SecretStr | None)


def test_every_float_setting_is_covered() -> None:
    """The list below is not empty and includes nested sections (so the next test means something)."""
    names = _float_settings()
    assert "OTP_ROUTER_CODE_TTL" in names and "OTP_ROUTER_RETRY__TIMEOUT" in names
    assert len(names) >= 20


@pytest.mark.parametrize("name", _float_settings())
def test_no_float_setting_accepts_a_non_finite_or_absurd_value(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """inf, nan and 1e308 are refused for every float setting, today's and any added later
    (a new section that does not derive from the checked base fails here)."""
    for value in ("inf", "-inf", "nan", "1e308"):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=name):
            Settings.load()


@pytest.mark.parametrize("name", _text_settings())
def test_no_text_setting_accepts_control_characters_or_undecodable_bytes(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    """An escape sequence or a byte that is not UTF-8 (a lone surrogate in os.environ) is refused
    for every text setting, secrets included, with the variable named and the value not shown."""
    assert len(_text_settings()) >= 10
    for value in ("https://x.example/{code}\x1b[2J", "https://x.example/{code}\udcff"):
        monkeypatch.setenv(name, value)
        with pytest.raises(ConfigError, match=name) as caught:
            Settings.load()
        assert value not in str(caught.value)
