"""`otp-router send/check/status` as separate processes sharing one SQLite store, against the emulators."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from pydantic import SecretStr

from otp_router.emulators import (
    EmulatorPair,
    Script,
)
from otp_router.harness import emulated_settings, provider_environ, read_code

CLI = [sys.executable, "-m", "otp_router"]


@pytest.fixture
async def pair(make_emulators: Callable[[Script], Awaitable[EmulatorPair]]) -> EmulatorPair:
    return await make_emulators(Script(time_scale=0.05))


@pytest.fixture
def env(pair: EmulatorPair, tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("OTP_ROUTER_", "TWILIO_"))}
    return {
        **base,
        **provider_environ(
            emulated_settings(
                pair, store_url=f"sqlite:///{tmp_path / 'cli.db'}", code_secret=SecretStr("cli-test-secret")
            )
        ),
    }


async def run(env: dict[str, str], *args: str) -> tuple[int, dict[str, object] | None, str]:
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    text = out.decode().strip()
    return proc.returncode, json.loads(text) if text else None, err.decode()


async def test_send_check_status_share_state(env: dict[str, str], pair: EmulatorPair) -> None:
    """send, check (wrong, then right) and status run as separate processes on one store."""
    phone = "+447400123456"
    code, sent, _ = await run(env, "send", phone)
    assert code == 0 and sent is not None
    assert sent["status"] == "pending" and sent["channel"] == "telegram" and str(sent["id"]).startswith("v_")
    vid = str(sent["id"])
    received = await read_code(pair, phone)
    assert received is not None
    wrong = f"{(int(received) + 1) % 1_000_000:06d}"
    code, result, _ = await run(env, "check", vid, wrong)
    assert code == 1 and result is not None and result["status"] == "invalid"
    code, result, _ = await run(env, "check", vid, received)
    assert code == 0 and result is not None and result["status"] == "valid"
    code, status, _ = await run(env, "status", vid)
    assert code == 0 and status is not None and status["status"] == "verified"


async def test_send_falls_back_within_the_invocation(env: dict[str, str], pair: EmulatorPair) -> None:
    """A number Telegram refuses is sent by SMS before `send` returns."""
    phone = "+4915123451234"
    pair.script.set(phone, telegram="absent")
    code, sent, _ = await run(env, "send", phone)
    assert code == 0 and sent is not None and sent["channel"] == "sms"
    assert len(pair.twilio.messages_to(phone)) == 1


@pytest.mark.parametrize("phone", ["12345", "+1 202 555", "not-a-number"])
async def test_bad_phone_is_one_line_and_costs_nothing(
    env: dict[str, str], pair: EmulatorPair, phone: str
) -> None:
    """A bad number prints one line on stderr, exits non-zero and makes no provider call."""
    code, out, err = await run(env, "send", phone)
    assert code == 1 and out is None
    assert len(err.strip().splitlines()) == 1 and "phone number" in err
    assert pair.telegram.log == [] and pair.twilio.log == []


async def test_toll_free_number_is_one_line_and_costs_nothing(
    env: dict[str, str], pair: EmulatorPair
) -> None:
    """A toll-free number prints one line naming its type, exits non-zero and makes no provider call."""
    code, out, err = await run(env, "send", "+18005551212")
    assert code == 1 and out is None
    assert len(err.strip().splitlines()) == 1 and "toll_free" in err
    assert pair.telegram.log == [] and pair.twilio.log == []


async def test_bad_code_and_unknown_id(env: dict[str, str]) -> None:
    """A malformed code is a one-line error; an unknown id checks as not_found; status of it fails."""
    code, out, err = await run(env, "check", "v_nope", "12ab56")
    assert code == 1 and out is None and "digits" in err
    code, out, _ = await run(env, "check", "v_nope", "123456")
    assert code == 1 and out is not None and out["status"] == "not_found"
    code, out, err = await run(env, "status", "v_nope")
    assert code == 1 and out is None and "no verification" in err


async def test_invalid_setting_is_named(env: dict[str, str]) -> None:
    """An invalid setting fails at start-up naming the variable, exit 2."""
    code, _, err = await run({**env, "OTP_ROUTER_CODE_LENGTH": "3"}, "status", "v_x")
    assert code == 2 and "OTP_ROUTER_CODE_LENGTH" in err


async def run_bytes(env: dict[str, str], *args: bytes) -> tuple[int, bytes, bytes]:
    """Run with raw argument bytes, as a shell would pass a mistyped or binary argument."""
    proc = await asyncio.create_subprocess_exec(
        *CLI, *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err


@pytest.mark.parametrize(
    "args",
    [
        (b"send", b"+4474001234\xff56"),
        (b"send", b"+447400123456", b"--idempotency-key", b"key-\xff\xfe"),
        (b"send", b"+447400123456", b"--idempotency-key", b"key-\x1b[2J"),
        (b"send", b"7400123456", b"--region", b"G\xffB"),
        (b"status", b"v_\xc3"),
        (b"check", b"v_\xed\xa0\x80", b"123456"),
        (b"check", b"v_x", b"12345\xff"),
    ],
    ids=["phone", "key", "key-escape", "region", "status-id", "check-id", "check-code"],
)
async def test_undecodable_arguments_are_one_line_errors(
    env: dict[str, str], pair: EmulatorPair, tmp_path: Path, args: tuple[bytes, ...]
) -> None:
    """Argument bytes that are not UTF-8 (or hold control characters) are a one-line error, exit 1:
    no traceback, no provider call, nothing stored."""
    code, out, err = await run_bytes(env, *args)
    assert code == 1 and out == b""
    assert err.startswith(b"otp-router: ") and len(err.strip().splitlines()) == 1
    assert b"Traceback" not in err
    assert pair.telegram.log == [] and pair.twilio.log == []
    db = tmp_path / "cli.db"
    if db.exists():
        conn = sqlite3.connect(db)
        try:
            assert conn.execute("SELECT COUNT(*) FROM records").fetchone() == (0,)
        finally:
            conn.close()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("OTP_ROUTER_TELEGRAM__BASE_URL", "127.0.0.1:1"),
        ("OTP_ROUTER_RETRY__TIMEOUT", "nan"),
        ("OTP_ROUTER_TWILIO__AUTH_TOKEN", "tok\udcffen"),  # the byte 0xff in the real environment
    ],
)
async def test_invalid_setting_stops_before_any_send(
    env: dict[str, str], pair: EmulatorPair, name: str, value: str
) -> None:
    """A scheme-less URL, a non-finite duration or undecodable bytes: exit 2 naming the variable,
    one line, before anything is sent."""
    code, out, err = await run({**env, name: value}, "send", "+447400123456")
    assert code == 2 and out is None
    assert name in err and len(err.strip().splitlines()) == 1
    assert pair.telegram.log == [] and pair.twilio.log == []
