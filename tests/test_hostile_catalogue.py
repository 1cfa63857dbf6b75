"""The hostile-input catalogue: every entry point fed input meant to break it.

Each entry names the input and the answer it must get: an error of our tree
(library), a 4xx JSON body (HTTP API, webhooks), a one-line message and exit
status (command line, configuration) or a dead letter with its reason on the
first delivery (queue rows). Every entry also asserts that no provider was
called (the fake channels, or a loopback sentinel standing in for both
provider APIs, record zero calls) and that nothing was stored.

The README's reliability section quotes the catalogue's size;
:func:`test_the_catalogue_is_large_and_the_readme_quotes_its_size` keeps the two equal.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from prometheus_client import CollectorRegistry
from pydantic import SecretStr
from twilio.request_validator import RequestValidator

from otp_router import cli
from otp_router.config import RetrySettings, Settings, TelegramSettings, TwilioSettings
from otp_router.errors import InputError, InvalidCode, InvalidPhoneNumber, OtpRouterError
from otp_router.metrics import Metrics
from otp_router.providers.base import (
    ChannelName,
    DeliveryState,
    FakeChannel,
    ProbeResult,
    SendResult,
    StatusResult,
)
from otp_router.providers.telegram import sign_report
from otp_router.queue import open_queue
from otp_router.router import OtpRouter
from otp_router.store.memory import MemoryStore
from otp_router.webapp import create_app
from otp_router.worker import Worker

README = Path(__file__).parents[1] / "README.md"
GB = "+447400123456"
US = "+12025550143"
API_TOKEN, TG_TOKEN, TW_TOKEN = "api-secret", "tg-token", "tw-token"
PUBLIC = "https://otp.example.com"
AUTH = {"Authorization": f"Bearer {API_TOKEN}"}
NOW = 1_700_000_000.0
JSON = {"Content-Type": "application/json"}
FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def deep(levels: int) -> bytes:
    return b'{"phone": ' + b"[" * levels + b"]" * levels + b"}"


def obj(text: str) -> bytes:
    return text.encode("utf-8")


# --- the catalogue ---------------------------------------------------------------------


@dataclass(frozen=True)
class Api:
    """One HTTP request to the verification API. ``{vid}`` in the path is an existing verification."""

    method: str
    path: str
    status: int
    code: str
    content: bytes | None = None
    headers: dict[str, Any] = field(default_factory=lambda: dict(AUTH))


def _post(
    body: bytes, status: int = 400, code: str = "bad_request", headers: dict[str, Any] | None = None
) -> Api:
    return Api("POST", "/v1/verifications", status, code, body, {**AUTH, **(headers if headers else JSON)})


def _check(body: bytes, status: int = 400, code: str = "invalid_code") -> Api:
    return Api("POST", "/v1/verifications/{vid}/check", status, code, body, {**AUTH, **JSON})


API: dict[str, Api] = {
    # JSON bodies that are not plain JSON objects of strings
    "json-repeated-phone": _post(obj(f'{{"phone": "{US}", "phone": "+12025550144"}}')),
    "json-repeated-key": _post(obj(f'{{"phone": "{US}", "idempotency_key": "a", "idempotency_key": "b"}}')),
    "json-recursion": _post(deep(5000)),
    "json-too-deep": _post(deep(33)),
    "json-invalid-utf8": _post(b'{"phone": "+1202555\xff0143"}'),
    "json-utf8-encoded-surrogate": _post(b'{"phone": "+1202555\xed\xa0\x800143"}'),
    "json-overlong-utf8": _post(b'{"phone": "\xc0\xaf12025550143"}'),
    "json-escaped-high-surrogate": _post(b'{"phone": "+12025550143\\ud800"}'),
    "json-escaped-low-surrogate-in-key": _post(obj(f'{{"phone": "{US}", "idempotency_key": "\\udc80"}}')),
    "json-escaped-surrogate-field-name": _post(obj(f'{{"phone": "{US}", "\\udfff": "x"}}')),
    "json-nan": _post(obj(f'{{"phone": "{US}", "x": NaN}}')),
    "json-infinity": _post(obj(f'{{"phone": "{US}", "x": -Infinity}}')),
    "json-1e999": _post(obj(f'{{"phone": "{US}", "x": 1e999}}')),
    "json-5000-digit-int": _post(obj(f'{{"phone": "{US}", "x": {"9" * 5000}}}')),
    "json-truncated": _post(b'{"phone": "+12025550143"'),
    "json-trailing-garbage": _post(obj(f'{{"phone": "{US}"}} x')),
    "json-two-objects": _post(obj(f'{{"phone": "{US}"}}{{"phone": "{US}"}}')),
    "json-utf16": _post(f'{{"phone": "{US}"}}'.encode("utf-16")),
    "json-utf8-bom": _post(b"\xef\xbb\xbf" + obj(f'{{"phone": "{US}"}}')),
    "json-array": _post(obj(f'["{US}"]')),
    "json-string": _post(obj(f'"{US}"')),
    "json-null": _post(b"null"),
    "phone-int": _post(b'{"phone": 12025550143}'),
    "phone-list": _post(obj(f'{{"phone": ["{US}"]}}')),
    "phone-object": _post(obj(f'{{"phone": {{"number": "{US}"}}}}')),
    "phone-null": _post(b'{"phone": null}'),
    "phone-bool": _post(b'{"phone": true}'),
    "phone-nul": _post(b'{"phone": "+1202555\\u00000143"}', code="invalid_phone_number"),
    "phone-ansi-escape": _post(b'{"phone": "+1202555\\u001b[2J0143"}', code="invalid_phone_number"),
    "phone-rtl-override": _post(b'{"phone": "+1202555\\u202e0143"}', code="invalid_phone_number"),
    "phone-65-chars": _post(obj(f'{{"phone": "{US}{" " * 53}"}}'), code="invalid_phone_number"),
    "phone-extension": _post(b'{"phone": "+1 202 555 0143 ext. 9"}', code="invalid_phone_number"),
    "phone-letters-toll-free": _post(b'{"phone": "+1-800-FLOWERS"}', 422, "unsupported_number_type"),
    "key-201-chars": _post(obj(f'{{"phone": "{US}", "idempotency_key": "{"k" * 201}"}}')),
    "key-nul": _post(obj(f'{{"phone": "{US}", "idempotency_key": "a\\u0000b"}}')),
    "key-newline": _post(obj(f'{{"phone": "{US}", "idempotency_key": "a\\nb"}}')),
    "key-int": _post(obj(f'{{"phone": "{US}", "idempotency_key": 42}}')),
    "region-nul": _post(b'{"phone": "2025550143", "default_region": "U\\u0000S"}'),
    "region-long": _post(obj(f'{{"phone": "2025550143", "default_region": "{"Z" * 9}"}}')),
    "region-unknown": _post(b'{"phone": "2025550143", "default_region": "XX"}', code="invalid_phone_number"),
    "field-name-nul": _post(obj(f'{{"phone": "{US}", "phone\\u0000": "x"}}')),
    # forms and query strings
    "form-invalid-utf8-escape": _post(b"phone=%2B12025550143&idempotency_key=%FF", headers=FORM),
    "form-raw-invalid-utf8": _post(b"phone=%2B12025550143&idempotency_key=\xff\xfe", headers=FORM),
    "form-nul": _post(b"phone=%2B1202555%000143", code="invalid_phone_number", headers=FORM),
    "form-too-many-fields": _post(b"&".join(b"f%d=1" % n for n in range(30)), headers=FORM),
    "form-repeated-field": _post(b"phone=%2B12025550143&phone=%2B12025550144", headers=FORM),
    "body-too-large": _post(b'{"phone": "' + b"1" * 17_000 + b'"}', status=413, code="payload_too_large"),
    "content-type-text": _post(
        obj(f'{{"phone": "{US}"}}'), 415, "unsupported_media_type", {"Content-Type": "text/plain"}
    ),
    "content-type-json-utf16": _post(
        f'{{"phone": "{US}"}}'.encode("utf-16-le"),
        headers={"Content-Type": "application/json; charset=utf-16"},
    ),
    "post-with-query": Api(
        "POST", "/v1/verifications?phone=%2B12025550143", 400, "bad_request", b"", {**AUTH}
    ),
    "get-start-invalid-utf8": Api("GET", "/v1/verifications/start?phone=%FF", 400, "bad_request"),
    "get-start-nul": Api(
        "GET", "/v1/verifications/start?phone=%2B1202555%000143", 400, "invalid_phone_number"
    ),
    "get-start-repeated": Api("GET", f"/v1/verifications/start?phone={US}&phone={US}", 400, "bad_request"),
    "get-start-surrogate-utf8": Api("GET", "/v1/verifications/start?phone=%ED%A0%80", 400, "bad_request"),
    # checks
    "code-fullwidth-digits": _check(obj('{"code": "１２３４５６"}')),
    "code-nul": _check(b'{"code": "12345\\u0000"}'),
    "code-escaped-surrogate": _check(b'{"code": "12345\\udc80"}', code="bad_request"),
    "code-int": _check(b'{"code": 123456}', code="bad_request"),
    "code-10000-digits": _check(obj(f'{{"code": "{"1" * 10_000}"}}')),
    "code-signed": _check(b'{"code": "+12345"}'),
    "code-repeated": _check(b'{"code": "123456", "code": "654321"}', code="bad_request"),
    "check-id-nul": Api(
        "POST", "/v1/verifications/v_%00/check", 400, "bad_request", b'{"code": "123456"}', {**AUTH, **JSON}
    ),
    "check-id-300-chars": Api(
        "POST",
        "/v1/verifications/v_" + "x" * 300 + "/check",
        400,
        "bad_request",
        b'{"code": "123456"}',
        {**AUTH, **JSON},
    ),
    # ids in the path
    "get-id-nul": Api("GET", "/v1/verifications/v_%00", 400, "bad_request"),
    "get-id-invalid-utf8": Api("GET", "/v1/verifications/v_%FF%FE", 404, "not_found"),
    "get-id-escape-sequence": Api("GET", "/v1/verifications/v_%1B%5B2J", 400, "bad_request"),
    "cancel-id-newline": Api(
        "POST", "/v1/verifications/v_%0Aforged/cancel", 400, "bad_request", b"", {**AUTH}
    ),
    "resend-unknown-field": Api(
        "POST", "/v1/verifications/{vid}/resend", 400, "bad_request", b'{"x": "1"}', {**AUTH, **JSON}
    ),
    "resend-repeated-key": Api(
        "POST",
        "/v1/verifications/{vid}/resend",
        400,
        "bad_request",
        b'{"a": "1", "a": "2"}',
        {**AUTH, **JSON},
    ),
    "cancel-deep-body": Api(
        "POST", "/v1/verifications/{vid}/cancel", 400, "bad_request", deep(5000), {**AUTH, **JSON}
    ),
    # authentication
    "auth-invalid-utf8": Api(
        "GET", "/v1/verifications/{vid}", 401, "unauthorized", headers={"Authorization": b"Bearer \xff\xfe"}
    ),
    "auth-huge": Api(
        "GET",
        "/v1/verifications/{vid}",
        401,
        "unauthorized",
        headers={"Authorization": "Bearer " + "a" * 8000},
    ),
    "auth-query-invalid-utf8": Api(
        "GET", "/v1/verifications/{vid}?token=%FF", 401, "unauthorized", headers={}
    ),
}


@dataclass(frozen=True)
class Telegram:
    """One POST to the Telegram webhook, signed with the right token unless ``timestamp`` or
    ``signature`` say otherwise."""

    body: bytes
    status: int
    code: str | None = None  # the error code, or None for a 200 acknowledgement that changes nothing
    timestamp: str | None = None
    signature: str | None = None


def _report(**changes: Any) -> bytes:
    fields = {
        "request_id": '"req-1"',
        "phone_number": f'"{US}"',
        "request_cost": "0.01",
        "delivery_status": '{"status": "delivered", "updated_at": 1700000001}',
        "payload": '"{vid}"',
    }
    fields.update(changes)
    return obj("{" + ", ".join(f'"{k}": {v}' for k, v in fields.items() if v is not None) + "}")


TELEGRAM: dict[str, Telegram] = {
    "repeated-key": Telegram(_report()[:-1] + b', "request_id": "req-2"}', 400, "bad_request"),
    "repeated-payload": Telegram(_report()[:-1] + b', "payload": "v_other"}', 400, "bad_request"),
    "recursion": Telegram(_report(extra="[" * 5000 + "]" * 5000), 400, "bad_request"),
    "too-deep": Telegram(_report(extra="[" * 40 + "]" * 40), 400, "bad_request"),
    "invalid-utf8": Telegram(
        _report(request_id='"req-\xff"').replace(b"\xc3\xbf", b"\xff"), 400, "bad_request"
    ),
    "escaped-surrogate": Telegram(_report(request_id='"req-\\ud800"'), 400, "bad_request"),
    "nan-cost": Telegram(_report(request_cost="NaN"), 400, "bad_request"),
    "infinite-cost": Telegram(_report(request_cost="Infinity"), 400, "bad_request"),
    "huge-cost": Telegram(_report(request_cost="1e999"), 400, "bad_request"),
    "cost-as-text": Telegram(_report(request_cost='"cheap"'), 400, "bad_request"),
    "array": Telegram(b"[]", 400, "bad_request"),
    "empty": Telegram(b"", 400, "bad_request"),
    "utf16": Telegram(_report().decode().encode("utf-16"), 400, "bad_request"),
    "payload-int": Telegram(_report(payload="42"), 400, "bad_request"),
    "payload-nul": Telegram(_report(payload='"v_\\u0000"'), 200),
    "payload-escape-sequence": Telegram(_report(payload='"v_\\u001b[2J"'), 200),
    "payload-10000-chars": Telegram(_report(payload='"' + "v" * 10_000 + '"'), 200),
    "timestamp-nan": Telegram(_report(), 403, "invalid_signature", timestamp="nan"),
    "timestamp-1e999": Telegram(_report(), 403, "invalid_signature", timestamp="1e999"),
    "timestamp-30-digits": Telegram(_report(), 403, "invalid_signature", timestamp="9" * 30),
    "timestamp-unicode-digits": Telegram(_report(), 403, "invalid_signature", timestamp="١٧٠٠٠٠٠٠٠٠"),
    "signature-not-ascii": Telegram(_report(), 403, "invalid_signature", signature="\xff" * 64),
    "too-large": Telegram(b'{"x": "' + b"a" * 70_000 + b'"}', 413, "payload_too_large"),
}


@dataclass(frozen=True)
class Twilio:
    """One POST to the Twilio webhook; ``form`` is signed unless ``raw`` (sent unsigned) is given."""

    status: int
    code: str | None = None
    form: dict[str, str] | None = None
    vid: str = "{vid}"
    raw: bytes | None = None


TWILIO: dict[str, Twilio] = {
    "raw-invalid-utf8": Twilio(403, "invalid_signature", raw=b"MessageSid=SM1&MessageStatus=\xff\xfe"),
    "raw-too-many-fields": Twilio(403, "invalid_signature", raw=b"&".join(b"f%d=1" % n for n in range(300))),
    "raw-too-large": Twilio(413, "payload_too_large", raw=b"MessageSid=" + b"S" * 70_000),
    "signed-vid-nul": Twilio(200, vid="v_%00"),
    "signed-vid-300-chars": Twilio(200, vid="v_" + "x" * 300),
    "signed-vid-escape-sequence": Twilio(200, vid="v_%1B%5B2J"),
    "signed-no-status": Twilio(400, "bad_request", form={"MessageSid": "SM1", "AccountSid": "AC123"}),
}


@dataclass(frozen=True)
class Call:
    """One library call on an opened router holding one verification (``VID`` stands for its id)."""

    method: str
    args: tuple[Any, ...]
    error: type[OtpRouterError]
    kwargs: dict[str, Any] = field(default_factory=dict)


VID = object()
REPORT = StatusResult(ref="req-1", state=DeliveryState.DELIVERED)

LIBRARY: dict[str, Call] = {
    "start-phone-none": Call("start", (None,), InvalidPhoneNumber),
    "start-phone-int": Call("start", (12025550143,), InvalidPhoneNumber),
    "start-phone-bytes": Call("start", (b"+12025550143",), InvalidPhoneNumber),
    "start-phone-list": Call("start", ([US],), InvalidPhoneNumber),
    "start-phone-surrogate": Call("start", (US + "\udcff",), InvalidPhoneNumber),
    "start-phone-nul": Call("start", ("+1202555\x000143",), InvalidPhoneNumber),
    "start-key-bytes": Call("start", (US,), InputError, {"idempotency_key": b"key"}),
    "start-key-int": Call("start", (US,), InputError, {"idempotency_key": 42}),
    "start-key-empty": Call("start", (US,), InputError, {"idempotency_key": ""}),
    "start-key-surrogate": Call("start", (US,), InputError, {"idempotency_key": "k\ud800"}),
    "start-region-int": Call("start", ("2025550143",), InputError, {"default_region": 1}),
    "start-region-nul": Call("start", ("2025550143",), InputError, {"default_region": "U\x00S"}),
    "check-code-none": Call("check", (VID, None), InvalidCode),
    "check-code-int": Call("check", (VID, 123456), InvalidCode),
    "check-code-bytes": Call("check", (VID, b"123456"), InvalidCode),
    "check-code-surrogate": Call("check", (VID, "12345\udcff"), InvalidCode),
    "check-id-none": Call("check", (None, "123456"), InputError),
    "get-id-bytes": Call("get", (b"v_x",), InputError),
    "get-id-surrogate": Call("get", ("v_\udcff",), InputError),
    "cancel-id-empty": Call("cancel", ("",), InputError),
    "resend-id-surrogate": Call("resend", ("v_\ud800",), InputError),
    "apply-report-id-nul": Call("apply_report", ("v_\x00", REPORT), InputError),
}


#: ``otp_router.enqueue`` keyword arguments (phone defaults to a good number): each an InputError.
ENQUEUE: dict[str, dict[str, Any]] = {
    "phone-undecodable": {"phone": GB + "\udcff"},
    "phone-bytes": {"phone": GB.encode()},
    "key-nul": {"idempotency_key": "k\x00"},
    "key-undecodable": {"idempotency_key": "k\udcff"},
    "key-201-chars": {"idempotency_key": "k" * 201},
    "region-three-letters": {"phone": "7400123456", "default_region": "GBR"},
    "metadata-not-a-mapping": {"metadata": [1, 2]},
    "metadata-unpaired-surrogate": {"metadata": {"note": "\ud800"}},
    "metadata-too-deep": {"metadata": {"a": json.loads("[" * 40 + "]" * 40)}},
    "metadata-not-json": {"metadata": {"when": object()}},
    "too-large": {"metadata": {"blob": "x" * 70_000}},
}


@dataclass(frozen=True)
class Row:
    """One row another program wrote into the SQLite queue, and the dead-letter reason it must get."""

    reason: str
    data: Any
    sql: str = "INSERT INTO queue (data) VALUES (?)"


def _msg(**fields: str) -> str:
    return "{" + ", ".join(f'"{k}": {v}' for k, v in fields.items()) + "}"


GOOD_PHONE = f'"{GB}"'
SQLITE_ROWS: dict[str, Row] = {
    "invalid-utf8-text": Row(
        "bad_encoding",
        obj(_msg(phone=GOOD_PHONE, idempotency_key='"k"')) + b"\xff",
        "INSERT INTO queue (data) VALUES (CAST(? AS TEXT))",
    ),
    "utf8-encoded-surrogate": Row(
        "bad_encoding", b'{"phone": "\xed\xa0\x80"}', "INSERT INTO queue (data) VALUES (CAST(? AS TEXT))"
    ),
    "blob-valid-json": Row("bad_encoding", obj(_msg(phone=GOOD_PHONE, idempotency_key='"k"'))),
    "blob-binary": Row("bad_encoding", bytes(range(256))),
    "escaped-surrogate": Row("bad_encoding", _msg(phone='"\\ud800"', idempotency_key='"k"')),
    "repeated-key": Row(
        "bad_json", _msg(phone=GOOD_PHONE, idempotency_key='"k"')[:-1] + ', "phone": "+447400123457"}'
    ),
    "recursion": Row("bad_json", "[" * 20_000 + "]" * 20_000),
    "too-deep": Row(
        "bad_json", _msg(phone=GOOD_PHONE, idempotency_key='"k"', metadata='{"a":' * 40 + "1" + "}" * 40)
    ),
    "nan": Row("bad_json", _msg(phone=GOOD_PHONE, idempotency_key='"k"', metadata='{"n": NaN}')),
    "1e999": Row("bad_json", _msg(phone=GOOD_PHONE, idempotency_key='"k"', metadata='{"n": 1e999}')),
    "array": Row("bad_json", f'["{GB}"]'),
    "empty": Row("bad_json", ""),
    "null": Row("bad_json", None),
    "integer": Row("bad_json", 42),
    "too-large": Row("too_large", _msg(phone=GOOD_PHONE, idempotency_key='"' + "k" * 70_000 + '"')),
    "phone-number": Row("invalid_message", _msg(phone="447400123456", idempotency_key='"k"')),
    "unknown-field": Row(
        "invalid_message", _msg(phone=GOOD_PHONE, idempotency_key='"k"', phone_number=GOOD_PHONE)
    ),
    "key-too-long": Row("invalid_message", _msg(phone=GOOD_PHONE, idempotency_key='"' + "k" * 201 + '"')),
    "phone-nul": Row("invalid_phone", _msg(phone='"+447400\\u0000123456"', idempotency_key='"k"')),
    "phone-rtl-override": Row("invalid_phone", _msg(phone='"+447400\\u202e123456"', idempotency_key='"k"')),
    "key-nul": Row("invalid_input", _msg(phone=GOOD_PHONE, idempotency_key='"k\\u0000"')),
    "garbage-timestamp": Row(
        "bad_json", "{oops", "INSERT INTO queue (data, enqueued_at) VALUES (?, 'yesterday')"
    ),
}

REDIS_ENTRIES: dict[str, tuple[str, dict[bytes, bytes]]] = {
    "invalid-utf8": ("bad_encoding", {b"data": b'{"phone": "\xff\xfe", "idempotency_key": "k"}'}),
    "recursion": ("bad_json", {b"data": b"[" * 20_000 + b"]" * 20_000}),
    "repeated-key": (
        "bad_json",
        {b"data": b'{"phone": "+447400123456", "idempotency_key": "a", "idempotency_key": "b"}'},
    ),
    "no-data-field": ("bad_json", {b"\xff": b"\xfe"}),
}


@dataclass(frozen=True)
class Command:
    """One ``otp-router`` invocation (in process) with valid settings, and its exit status."""

    argv: tuple[str, ...]
    status: int
    files: dict[str, bytes] = field(default_factory=dict)  # written to the working folder first
    usage: bool = False  # refused by argparse: its usage lines, then one error line


CLI: dict[str, Command] = {
    "send-phone-undecodable": Command(("send", GB + "\udcff"), 1),
    "send-phone-escape-sequence": Command(("send", "+447400\x1b[2J123456"), 1),
    "send-key-undecodable": Command(("send", GB, "--idempotency-key", "k\udcfe"), 1),
    "send-key-201-chars": Command(("send", GB, "--idempotency-key", "k" * 201), 1),
    "send-region-undecodable": Command(("send", "7400123456", "--region", "G\udcffB"), 1),
    "status-id-undecodable": Command(("status", "v_\udcc3"), 1),
    "status-id-escape-sequence": Command(("status", "v_\x1b]0;pwned\x07"), 1),
    "check-id-undecodable": Command(("check", "v_\udced\udca0\udc80", "123456"), 1),
    "check-code-undecodable": Command(("check", "v_x", "12345\udcff"), 1),
    "check-code-fullwidth": Command(("check", "v_x", "１２３４５６"), 1),
    "emulate-time-scale-nan": Command(("emulate", "--time-scale", "nan"), 2),
    "emulate-time-scale-inf": Command(("emulate", "--time-scale", "inf"), 2),
    "emulate-port-out-of-range": Command(("emulate", "--telegram-port", "99999"), 2),
    "emulate-host-undecodable": Command(
        ("emulate", "--host", "a\udcff", "--telegram-port", "0", "--twilio-port", "0"), 2
    ),
    "emulate-script-repeated-number": Command(
        ("emulate", "--script", "s.json"), 2, {"s.json": b'{"+1": {}, "+1": {}}'}
    ),
    "emulate-script-not-utf8": Command(("emulate", "--script", "s.json"), 2, {"s.json": b'{"+1\xff": {}}'}),
    "emulate-script-recursion": Command(
        ("emulate", "--script", "s.json"), 2, {"s.json": b"[" * 20_000 + b"]" * 20_000}
    ),
    "worker-name-undecodable": Command(("worker", "--burst", "--name", "w\udcff"), 2),
    "demo-time-scale-nan": Command(("demo", "--time-scale", "nan"), 2),
    "demo-users-not-a-number": Command(("demo", "--users", "many"), 2, usage=True),
}

#: Environment variable (or ``.env`` file) → value; each alone makes ``otp-router send`` exit 2 naming it.
CONFIG: dict[str, tuple[str, str | bytes]] = {
    "public-url-no-scheme": ("OTP_ROUTER_PUBLIC_URL", "otp.example.com"),
    "public-url-unparsable": ("OTP_ROUTER_PUBLIC_URL", "http://[::1"),
    "public-url-no-host": ("OTP_ROUTER_PUBLIC_URL", "https://"),
    "telegram-url-no-scheme": ("OTP_ROUTER_TELEGRAM__BASE_URL", "127.0.0.1:8081"),
    "twilio-url-wrong-scheme": ("OTP_ROUTER_TWILIO__BASE_URL", "file:///etc/passwd"),
    "store-url-bad-port": ("OTP_ROUTER_STORE_URL", "redis://localhost:99999999"),
    "queue-url-unknown-scheme": ("OTP_ROUTER_QUEUE_URL", "amqp://localhost"),
    "retry-timeout-inf": ("OTP_ROUTER_RETRY__TIMEOUT", "inf"),
    "code-ttl-nan": ("OTP_ROUTER_CODE_TTL", "nan"),
    "settle-delay-minus-infinity": ("OTP_ROUTER_SETTLE_DELAY", "-Infinity"),
    "twilio-timeout-1e308": ("OTP_ROUTER_TWILIO__TIMEOUT", "1e308"),
    "grace-1e999": ("OTP_ROUTER_SHUTDOWN_GRACE", "1e999"),
    "code-length-text": ("OTP_ROUTER_CODE_LENGTH", "six"),
    "http-port-out-of-range": ("OTP_ROUTER_HTTP_PORT", "99999"),
    "log-level-unknown": ("OTP_ROUTER_LOG_LEVEL", "LOUD"),
    "nested-section-not-json": ("OTP_ROUTER_TELEGRAM", "{not json"),
    "token-undecodable": ("OTP_ROUTER_TELEGRAM__TOKEN", "tok\udcffen"),
    "from-number-escape-sequence": ("OTP_ROUTER_TWILIO__FROM_NUMBER", "+1500\x1b[2J555"),
    "policy-file-not-utf8": ("OTP_ROUTER_POLICY_FILE", b"resend_cooldown = 30\n\xff\n"),
    "policy-file-recursion": ("OTP_ROUTER_POLICY_FILE", b"x = " + b"[" * 5000 + b"]" * 5000 + b"\n"),
    "policy-file-inf": ("OTP_ROUTER_POLICY_FILE", b"resend_cooldown = inf\n"),
    "prices-file-not-utf8": ("OTP_ROUTER_PRICES_FILE", b"[sms]\nGB = 0.04\xff\n"),
    "dotenv-not-utf8": (".env", b"OTP_ROUTER_CODE_LENGTH=6\xff\n"),
}

CATALOGUE = {
    **{f"api/{k}": v for k, v in API.items()},
    **{f"telegram-webhook/{k}": v for k, v in TELEGRAM.items()},
    **{f"twilio-webhook/{k}": v for k, v in TWILIO.items()},
    **{f"library/{k}": v for k, v in LIBRARY.items()},
    **{f"library/enqueue-{k}": v for k, v in ENQUEUE.items()},
    **{f"sqlite-queue/{k}": v for k, v in SQLITE_ROWS.items()},
    **{f"redis-queue/{k}": v for k, v in REDIS_ENTRIES.items()},
    **{f"cli/{k}": v for k, v in CLI.items()},
    **{f"config/{k}": v for k, v in CONFIG.items()},
}


def test_the_catalogue_is_large_and_the_readme_quotes_its_size() -> None:
    """At least 100 hostile inputs, across every entry point; the README states the exact number."""
    assert len(CATALOGUE) >= 100
    assert {name.split("/")[0] for name in CATALOGUE} == {
        "api",
        "telegram-webhook",
        "twilio-webhook",
        "library",
        "sqlite-queue",
        "redis-queue",
        "cli",
        "config",
    }
    quoted = re.search(r"(\d+) hostile inputs", README.read_text(encoding="utf-8"))
    assert quoted is not None, "the README's reliability section must say how many hostile inputs are tried"
    assert int(quoted.group(1)) == len(CATALOGUE)


# --- HTTP: API and webhooks --------------------------------------------------------------


def store_state(store: MemoryStore) -> Any:
    """Everything the memory store holds (its private maps: the test wants all of it)."""
    return (
        dict(store._records),
        dict(store._deadlines),
        dict(store._idempotency),
        dict(store._ledger),
        {key: (value[0], list(value[1])) for key, value in store._hits.items()},
    )


@dataclass
class App:
    """The web app over a router with fake channels and a memory store, one verification started."""

    router: OtpRouter
    store: MemoryStore
    tg: FakeChannel
    sms: FakeChannel
    client: httpx.AsyncClient
    vid: str = ""

    def calls(self) -> int:
        return len(self.tg.calls) + len(self.sms.calls)


async def _sms(method: str, arg: Any) -> Any:
    if method == "send":
        return SendResult(
            ref="SM1", state=DeliveryState.PENDING, cost=Decimal("0.0083"), cost_is_estimate=True
        )
    return ProbeResult(True) if method == "probe" else False


@pytest.fixture
async def app() -> AsyncIterator[App]:
    store = MemoryStore()
    tg = FakeChannel(ChannelName.TELEGRAM, _ok, provider="telegram")
    sms = FakeChannel(ChannelName.SMS, _sms, provider="twilio")
    router = OtpRouter(
        store=store,
        channels={ChannelName.TELEGRAM: tg, ChannelName.SMS: sms},
        settings=Settings(
            store_url="memory://",
            code_secret=SecretStr("s"),
            api_token=SecretStr(API_TOKEN),
            public_url=PUBLIC,
            telegram=TelegramSettings(token=SecretStr(TG_TOKEN), callback_max_age=300),
            twilio=TwilioSettings(account_sid="AC123", auth_token=SecretStr(TW_TOKEN)),
        ),
        metrics=Metrics(CollectorRegistry()),
        clock=lambda: NOW,
        run_deadlines=False,
    )
    async with router:
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=create_app(router)), base_url="http://testserver"
        )
        async with client:
            made = App(router, store, tg, sms, client)
            resp = await client.post("/v1/verifications", json={"phone": US}, headers=AUTH)
            assert resp.status_code == 201, resp.text
            made.vid = resp.json()["id"]
            yield made


class Witness:
    """Provider calls and stored state around one hostile request."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.calls = app.calls()
        self.state = store_state(app.store)

    def assert_untouched(self) -> None:
        assert self.app.calls() == self.calls, "a provider was called"
        assert store_state(self.app.store) == self.state, "something was stored"


@pytest.mark.parametrize("case", API.values(), ids=API.keys())
async def test_api(app: App, case: Api) -> None:
    vid = app.vid
    witness = Witness(app)
    resp = await app.client.request(
        case.method, case.path.replace("{vid}", vid), content=case.content, headers=case.headers
    )
    assert resp.status_code == case.status, resp.text
    assert resp.json()["error"]["code"] == case.code
    assert "2025550143" not in resp.text
    witness.assert_untouched()


@pytest.mark.parametrize("case", TELEGRAM.values(), ids=TELEGRAM.keys())
async def test_telegram_webhook(app: App, case: Telegram) -> None:
    witness = Witness(app)
    body = case.body.replace(b"{vid}", app.vid.encode())
    timestamp = case.timestamp or str(int(NOW))
    headers = {
        "X-Request-Timestamp": timestamp.encode("utf-8"),
        "X-Request-Signature": (case.signature or sign_report(TG_TOKEN, timestamp, body)).encode("latin-1"),
    }
    resp = await app.client.post("/webhooks/telegram", content=body, headers=headers)
    assert resp.status_code == case.status, resp.text
    if case.code is None:
        assert resp.json() == {"ok": True, "outcome": "ignored"}
    else:
        assert resp.json()["error"]["code"] == case.code
    witness.assert_untouched()


@pytest.mark.parametrize("case", TWILIO.values(), ids=TWILIO.keys())
async def test_twilio_webhook(app: App, case: Twilio) -> None:
    witness = Witness(app)
    query = "?vid=" + case.vid.replace("{vid}", app.vid)
    if case.raw is not None:
        resp = await app.client.post(
            "/webhooks/twilio" + query, content=case.raw, headers={**FORM, "X-Twilio-Signature": "x"}
        )
    else:
        form = case.form or {"MessageSid": "SM1", "MessageStatus": "delivered", "AccountSid": "AC123"}
        signature = RequestValidator(TW_TOKEN).compute_signature(PUBLIC + "/webhooks/twilio" + query, form)
        resp = await app.client.post(
            "/webhooks/twilio" + query,
            content=urlencode(form),
            headers={**FORM, "X-Twilio-Signature": signature},
        )
    assert resp.status_code == case.status, resp.text
    if case.code is None:
        assert resp.json() == {"ok": True, "outcome": "ignored"}
    else:
        assert resp.json()["error"]["code"] == case.code
    witness.assert_untouched()


# --- the library -------------------------------------------------------------------------


async def _ok(method: str, arg: Any) -> Any:
    if method == "probe":
        return ProbeResult(True, ref="req-1", cost=Decimal("0.01"))
    if method == "send":
        return SendResult(ref="req-1", state=DeliveryState.SENT, cost=Decimal("0.01"))
    return True


@pytest.mark.parametrize("case", LIBRARY.values(), ids=LIBRARY.keys())
async def test_library(case: Call) -> None:
    store = MemoryStore()
    telegram = FakeChannel(ChannelName.TELEGRAM, _ok)
    router = OtpRouter(
        store=store,
        channels={ChannelName.TELEGRAM: telegram},
        settings=Settings(
            store_url="memory://", code_secret=SecretStr("s"), retry=RetrySettings(backoff=False)
        ),
        metrics=Metrics(CollectorRegistry()),
        run_deadlines=False,
    )
    async with router:
        vid = (await router.start(GB)).id
        calls, state = len(telegram.calls), store_state(store)
        args = tuple(vid if a is VID else a for a in case.args)
        with pytest.raises(case.error):
            await getattr(router, case.method)(*args, **case.kwargs)
        assert len(telegram.calls) == calls and store_state(store) == state


@pytest.mark.parametrize("case", ENQUEUE.values(), ids=ENQUEUE.keys())
async def test_enqueue(tmp_path: Path, case: dict[str, Any]) -> None:
    """The producer side refuses what the worker would dead-letter: an InputError, nothing queued."""
    from otp_router.queue import enqueue

    url = f"sqlite:///{tmp_path / 'q.db'}"
    kwargs = {"phone": GB, "idempotency_key": "k", **case}
    with pytest.raises(InputError):
        await enqueue(url, kwargs.pop("phone"), **kwargs)
    queue = open_queue(url)
    try:
        assert (await queue.depth(), await queue.pending()) == (0, 0)
    finally:
        await queue.aclose()


# --- queue rows ----------------------------------------------------------------------------


def _worker(settings: Settings) -> tuple[Worker, FakeChannel, MemoryStore]:
    store = MemoryStore()
    telegram = FakeChannel(ChannelName.TELEGRAM, _ok)
    router = OtpRouter(
        store=store,
        channels={ChannelName.TELEGRAM: telegram},
        settings=settings,
        metrics=Metrics(CollectorRegistry()),
    )
    worker = Worker(settings, router=router, name="w", serve_http=False, burst=True, heartbeat_interval=0.1)
    return worker, telegram, store


@pytest.mark.parametrize("case", SQLITE_ROWS.values(), ids=SQLITE_ROWS.keys())
async def test_sqlite_queue_row(tmp_path: Path, case: Row) -> None:
    """Dead-lettered on its first delivery with its reason; nothing sent; no verification stored."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    settings = Settings(
        store_url="memory://", queue_url=url, code_secret=SecretStr("s"), queue_visibility_timeout=0.3
    )
    worker, telegram, store = _worker(settings)
    queue = open_queue(url)
    try:
        await queue.depth()
        conn = sqlite3.connect(tmp_path / "q.db")
        try:
            with conn:
                conn.execute(case.sql, (case.data,))
        finally:
            conn.close()
        assert await asyncio.wait_for(worker.run(), 20) == 0
        dead = await queue.dead_letters()
        assert (await queue.depth(), await queue.pending()) == (0, 0)
    finally:
        await queue.aclose()
    assert [(d.reason, d.attempts) for d in dead] == [(case.reason, 1)]
    assert telegram.calls == [] and store._records == {}


@pytest.mark.parametrize("case", REDIS_ENTRIES.values(), ids=REDIS_ENTRIES.keys())
async def test_redis_queue_entry(redis_url: str, case: tuple[str, dict[bytes, bytes]]) -> None:
    """The same for a stream entry written by another program."""
    import redis.asyncio as aioredis

    from otp_router.queue import RedisStreamQueue

    reason, entry = case
    settings = Settings(store_url="memory://", queue_url=redis_url, code_secret=SecretStr("s"))
    worker, telegram, store = _worker(settings)
    raw = aioredis.Redis.from_url(redis_url.split("?", 1)[0])
    queue = open_queue(redis_url)
    try:
        assert isinstance(queue, RedisStreamQueue)
        await queue.depth()
        await raw.xadd(queue.keys.stream, entry)  # type: ignore[arg-type]
        assert await asyncio.wait_for(worker.run(), 20) == 0
        dead = await queue.dead_letters()
        assert (await queue.depth(), await queue.pending()) == (0, 0)
    finally:
        await queue.aclose()
        await raw.aclose()
    assert [(d.reason, d.attempts) for d in dead] == [(reason, 1)]
    assert telegram.calls == [] and store._records == {}


# --- command line and configuration ------------------------------------------------------


class Sentinel(ThreadingHTTPServer):
    """Stands in for both provider APIs on 127.0.0.1: records every request, answers 503."""

    def __init__(self) -> None:
        self.requests: list[str] = []
        sentinel = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                sentinel.requests.append(f"{self.command} {self.path}")
                self.send_response(503)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_POST = _any

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@pytest.fixture
def sentinel(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Sentinel]:
    """A valid configuration whose providers are the sentinel and whose store is a file in tmp_path."""
    server = Sentinel()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    env = {
        "OTP_ROUTER_TELEGRAM__TOKEN": "tg-token",
        "OTP_ROUTER_TELEGRAM__BASE_URL": server.url,
        "OTP_ROUTER_TWILIO__ACCOUNT_SID": "AC123",
        "OTP_ROUTER_TWILIO__AUTH_TOKEN": "tw-token",
        "OTP_ROUTER_TWILIO__FROM_NUMBER": "+15005550006",
        "OTP_ROUTER_TWILIO__BASE_URL": server.url,
        "OTP_ROUTER_STORE_URL": f"sqlite:///{tmp_path / 'store.db'}",
        "OTP_ROUTER_QUEUE_URL": f"sqlite:///{tmp_path / 'queue.db'}",
        "OTP_ROUTER_CODE_SECRET": "s",
        "OTP_ROUTER_RETRY__ATTEMPTS": "1",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def nothing_stored(tmp_path: Path) -> bool:
    db = tmp_path / "store.db"
    if not db.exists():
        return True
    conn = sqlite3.connect(db)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return "records" not in tables or conn.execute("SELECT COUNT(*) FROM records").fetchone() == (0,)
    finally:
        conn.close()


def run_cli(argv: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        status = cli.main(list(argv))
    except SystemExit as exc:  # argparse refusing an argument it cannot convert
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


@pytest.mark.parametrize("case", CLI.values(), ids=CLI.keys())
def test_cli(sentinel: Sentinel, tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Command) -> None:
    """Exit 1 (bad input) or 2 (bad usage or setting); the message is one line, never a traceback."""
    for name, content in case.files.items():
        (tmp_path / name).write_bytes(content)
    status, out, err = run_cli(case.argv, capsys)
    assert status == case.status, err
    assert out == ""
    last = err.strip().splitlines()[-1]
    assert last.startswith("otp-router"), err
    assert "Traceback" not in err
    if case.usage:
        assert ": error: " in last
    else:
        assert len(err.strip().splitlines()) == 1
    assert sentinel.requests == [] and nothing_stored(tmp_path)


@pytest.mark.parametrize("case", CONFIG.values(), ids=CONFIG.keys())
def test_config(
    sentinel: Sentinel,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    case: tuple[str, str | bytes],
) -> None:
    """Exit 2 before anything is sent, one line naming the variable (or the .env file)."""
    name, value = case
    if isinstance(value, bytes):
        path = tmp_path / (".env" if name == ".env" else "file.toml")
        path.write_bytes(value)
        if name != ".env":
            monkeypatch.setenv(name, str(path))
    else:
        monkeypatch.setenv(name, value)
    status, out, err = run_cli(("send", GB), capsys)
    assert status == 2, err
    assert out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (name if name != ".env" else ".env") in err
    if isinstance(value, str) and len(value) > 4:
        assert value not in err
    assert sentinel.requests == [] and nothing_stored(tmp_path)
