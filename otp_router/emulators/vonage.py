"""A local Vonage SMS API server that speaks the real wire format.

What it serves::

    POST /sms/json           send → 200 + {"message-count", "messages": [...]} (form-encoded request)
    POST /_emulator/script   merge a JSON script ({"+1555…": {"vonage_status": 7}})
    GET  /_emulator/log      every send attempt: to, message id, time, outcome
    GET  /_emulator/inbox    ?phone=+1555…: texts delivered to that number
    POST /_emulator/reset    forget messages and the log (the script is kept)

Credentials: HTTP Basic ``api_key:api_secret`` (what the SDK sends), the same
two as ``api_key``/``api_secret`` form fields, or ``api_key`` plus a ``sig``
signed with the signature secret. Like the real API, a refusal is HTTP 200
with a non-zero ``status`` and an ``error-text`` in the message object; bad
credentials are status 4; a missing ``to``/``from``/``text`` status 2; a
``to`` that is not a number status 3 (UNCONFIRMED which of 3 and 6 Vonage
answers for it). Scripted ``vonage_5xx`` answers HTTP 500 before anything is
sent (UNCONFIRMED: the body of Vonage's 5xx answers is not documented).

With ``status-report-req`` and a ``callback`` URL, the final delivery receipt
(``delivered``, ``failed``, ``expired`` or ``rejected``) is POSTed form-encoded
after ``vonage_delay * time_scale`` seconds, with ``messageId``, ``msisdn``,
``to``, ``network-code``, ``price``, ``status``, ``scts``, ``err-code``,
``api-key``, ``client-ref``, ``message-timestamp`` and, with a signature
secret, ``timestamp`` and ``sig`` (see :func:`otp_router.providers.vonage_sms.sign_params`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import itertools
import logging
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import aiohttp
import phonenumbers
from aiohttp import web

from otp_router.emulators.script import Script
from otp_router.emulators.serving import query_phone, serve_app
from otp_router.prices import SmsPrices
from otp_router.providers.vonage_sms import sign_params

__all__ = ["VonageEmulator", "VonageLogEntry"]

_logger = logging.getLogger("otp_router.emulators.vonage")
_CALLBACK_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
_ERROR_TEXT = {
    2: "Missing Parameters",
    3: "Invalid Parameters",
    4: "Invalid Credentials",
    5: "Internal Error",
    6: "Invalid Message",
    7: "Number Barred",
    8: "Partner Account Barred",
    9: "Partner Quota Violation",
    29: "Non-Whitelisted Destination",
}
_NETWORK = "23410"


@dataclass(frozen=True, slots=True)
class VonageLogEntry:
    """One send attempt as the emulator saw it."""

    to: str
    message_id: str | None
    time: float
    outcome: str  # "accepted", "status_<n>", "http_500"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def _e164(to: str) -> str | None:
    try:
        number = phonenumbers.parse("+" + to.lstrip("+"))
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


class VonageEmulator:
    """The emulator: an ``aiohttp.web`` application plus its scripted state.

    Args:
        api_key: The only key it serves.
        api_secret: Its secret (Basic auth or form field).
        script: Per-number behaviour, shared with the other emulators.
        signature_secret: Signs receipts (and checks signed sends); empty: receipts unsigned.
        signature_method: HMAC digest of the signatures.
        prices: Price table for ``message-price`` (packaged table if None).
    """

    def __init__(
        self,
        api_key: str,
        api_secret: str,
        script: Script,
        *,
        signature_secret: str = "",
        signature_method: str = "sha256",
        prices: SmsPrices | None = None,
    ) -> None:
        self.api_key = api_key
        self._secret = api_secret
        self.signature_secret = signature_secret
        self.signature_method = signature_method
        self.script = script
        self.prices = prices if prices is not None else SmsPrices.load()
        self.log: list[VonageLogEntry] = []
        self.delivered: dict[str, list[str]] = {}
        self.receipts_sent = 0
        self._ids = itertools.count(1)
        self._sends: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._url: str | None = None
        self.app = web.Application()
        self.app.router.add_post("/sms/json", self._send)
        self.app.router.add_post("/_emulator/script", self._admin_script)
        self.app.router.add_get("/_emulator/log", self._admin_log)
        self.app.router.add_get("/_emulator/inbox", self._admin_inbox)
        self.app.router.add_post("/_emulator/reset", self._admin_reset)
        self.app.on_shutdown.append(self._on_cleanup)
        self.app.on_cleanup.append(self._on_cleanup)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on ``host:port`` (0: any free port); returns the bound port."""
        self._runner = await serve_app(self.app, host, port, handle_signals=False, shutdown_timeout=0.25)
        bound = int(self._runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        self._url = f"http://{url_host}:{bound}"
        return bound

    @property
    def url(self) -> str:
        """Base URL once started (for ``OTP_ROUTER_VONAGE__BASE_URL``).

        Raises:
            RuntimeError: :meth:`start` has not been called.
        """
        if self._url is None:
            raise RuntimeError("the Vonage emulator is not started")
        return self._url

    async def stop(self) -> None:
        """Stop serving and cancel pending receipts."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        else:
            await self._shutdown()

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def reset(self) -> None:
        """Forget messages, the log and the scripted counters (the script is kept)."""
        for task in list(self._tasks):
            task.cancel()
        self.log.clear()
        self.delivered.clear()
        self._sends.clear()
        self.receipts_sent = 0

    async def settle(self) -> None:
        """Wait until every scheduled receipt has been sent (or dropped)."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    def inbox(self, phone: str) -> list[str]:
        """Texts delivered to ``phone`` (E.164), oldest first."""
        return list(self.delivered.get(phone, ()))

    def _authorized(self, request: web.Request, form: Any) -> bool:
        key, secret = str(form.get("api_key", "")), str(form.get("api_secret", ""))
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() == "basic":
            try:
                key, _, secret = base64.b64decode(encoded, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                return False
        if not hmac.compare_digest(key.encode(), self.api_key.encode()):
            return False
        sig = str(form.get("sig", ""))
        if sig and self.signature_secret:
            fields = {k: str(v) for k, v in form.items()}
            expected = sign_params(fields, self.signature_secret, self.signature_method)
            return hmac.compare_digest(sig.lower(), expected)
        return bool(self._secret) and hmac.compare_digest(secret.encode(), self._secret.encode())

    def _answer(self, to: str, status: int, message_id: str | None = None, price: str = "") -> web.Response:
        self.log.append(
            VonageLogEntry(
                to=to,
                message_id=message_id,
                time=time.time(),
                outcome="accepted" if not status else f"status_{status}",
            )
        )
        message: dict[str, str] = {"to": to.lstrip("+"), "status": str(status)}
        if status:
            message["error-text"] = _ERROR_TEXT.get(status, "Error")
        else:
            assert message_id is not None
            message |= {
                "message-id": message_id,
                "remaining-balance": "10.00000000",
                "message-price": price,
                "network": _NETWORK,
            }
        return web.json_response({"message-count": "1", "messages": [message]})

    async def _send(self, request: web.Request) -> web.Response:
        form = await request.post()
        raw_to = str(form.get("to", ""))
        if not self._authorized(request, form):
            return self._answer(raw_to, 4)
        to = _e164(raw_to) if raw_to else None
        behaviour = self.script.behaviour(to or "")
        count = self._sends.get(to or "", 0)
        self._sends[to or ""] = count + 1
        if count < behaviour.vonage_5xx:
            self.log.append(
                VonageLogEntry(to=to or raw_to, message_id=None, time=time.time(), outcome="http_500")
            )
            return web.json_response({"type": "about:blank", "title": "Internal Server Error"}, status=500)
        if not raw_to or not form.get("from") or not form.get("text"):
            return self._answer(raw_to, 2)
        if to is None:
            return self._answer(raw_to, 3)
        if behaviour.vonage_status:
            return self._answer(to, behaviour.vonage_status)
        text = str(form.get("text"))
        region = phonenumbers.region_code_for_number(phonenumbers.parse(to)) or "ZZ"
        price = self.prices.sms_cost(region, text)
        message_id = f"{next(self._ids):016X}"
        callback = str(form.get("callback", ""))
        if callback and str(form.get("status-report-req", "")).lower() in ("true", "1"):
            task = asyncio.get_running_loop().create_task(
                self._receipt(callback, to, message_id, price, str(form.get("client-ref", "")), text)
            )
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif behaviour.vonage_final == "delivered":
            self.delivered.setdefault(to, []).append(text)
        return self._answer(to, 0, message_id, f"{price:.8f}")

    async def _receipt(
        self, url: str, to: str, message_id: str, price: Decimal, client_ref: str, text: str
    ) -> None:
        behaviour = self.script.behaviour(to)
        await asyncio.sleep(behaviour.vonage_delay * self.script.time_scale)
        final = behaviour.vonage_final
        if final == "delivered":
            self.delivered.setdefault(to, []).append(text)
        err = "0" if final == "delivered" else str(behaviour.vonage_err_code or 1)
        now = datetime.now(UTC)
        params = {
            "msisdn": to.lstrip("+"),
            "to": "otp-router",
            "network-code": _NETWORK,
            "messageId": message_id,
            "price": f"{price:.8f}",
            "status": final,
            "scts": now.strftime("%y%m%d%H%M"),
            "err-code": err,
            "api-key": self.api_key,
            "message-timestamp": now.strftime("%Y-%m-%d %H:%M:%S"),
        }
        if client_ref:
            params["client-ref"] = client_ref
        if self.signature_secret:
            params["timestamp"] = str(int(time.time()))
            params["sig"] = sign_params(params, self.signature_secret, self.signature_method)
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_CALLBACK_TIMEOUT)
        for attempt in range(3):
            try:
                async with self._session.post(url, data=params) as response:
                    if response.status < 500:
                        self.receipts_sent += 1
                        return
            except (aiohttp.ClientError, TimeoutError) as exc:
                _logger.info("vonage receipt failed: %s", type(exc).__name__)
            await asyncio.sleep(0.2 * 2**attempt * self.script.time_scale)

    async def _admin_script(self, request: web.Request) -> web.Response:
        try:
            self.script.update_from_json(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True})

    async def _admin_log(self, _request: web.Request) -> web.Response:
        return web.json_response({"sends": [entry.to_dict() for entry in self.log]})

    async def _admin_inbox(self, request: web.Request) -> web.Response:
        # The phone number rides in the query string: this is a local test tool only.
        return web.json_response({"messages": self.inbox(query_phone(request))})

    async def _admin_reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})
