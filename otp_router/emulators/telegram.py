"""A local Telegram Gateway that speaks the real wire format.

What it does, following the Telegram Gateway API's public documentation:

* All four methods at ``/{method}``, case-insensitive, with parameters from the
  query string, a form body or a JSON body, and the token from
  ``Authorization: Bearer`` or ``access_token``. Answers are the
  ``{"ok": true, "result": ...}`` / ``{"ok": false, "error": "..."}`` envelopes.
* Billing: ``checkSendAbility`` charges one message in advance when the number
  is reachable; a send with that ``request_id`` is free (once); a send without
  one charges. A message not delivered within ``ttl`` expires and is refunded;
  a revoked one is not.
* Delivery follows the :class:`~otp_router.emulators.script.Script`, and
  delivery reports (``delivered``, ``expired``, ``revoked``) are POSTed to
  ``callback_url``, signed like the real service and retried with growing
  delays up to ten times.
* Every API request is recorded in :attr:`TelegramEmulator.log` (also
  ``GET /_emulator/log``): the witness that proves, for example, that no number
  got two sends.

Choices the real service does not document (UNCONFIRMED, so configurable or
harmless): errors about the token answer HTTP 401 and other errors HTTP 400 (a
client must branch on ``ok`` anyway); the ``ACCESS_TOKEN_*`` check comes
before the method name check; after ``max_code_attempts`` wrong codes every
check answers ``code_max_attempts_exceeded``; an unparsable JSON body answers
``REQUEST_INVALID`` (an emulator-only string); callback retry delays start at
one second and double, capped at a minute (all multiplied by the script's
``time_scale``); plain ``http://`` callback URLs are accepted so tests need no TLS.

Scripted infrastructure failures count calls per number (of one method only
with ``telegram_fault_method``) since its behaviour was last scripted: the
first ``telegram_5xx`` calls answer HTTP 502 with an HTML body, the next
``telegram_flood_count`` answer ``FLOOD_WAIT_<N>`` (when
``telegram_flood_wait`` is set), then ``telegram_error`` (any string, such as
one the client has never seen), then ``telegram_garbage`` calls get a
truncated JSON body; all of these before the request takes effect. The next
``telegram_reset_after_write`` calls take effect and then lose their
connection, and the next ``telegram_hang`` take effect and are never answered.
``telegram_latency`` holds every answer for that number back *after* the
request took effect, as a slow network would.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import aiohttp
from aiohttp import web

from otp_router.emulators.script import Behaviour, Script
from otp_router.emulators.serving import query_phone, serve_app
from otp_router.emulators.telegram_wire import (
    CANONICAL_METHODS,
    ApiError,
    BadGateway,
    Garbage,
    LogEntry,
    RequestRecord,
    is_e164,
    parse_send_params,
    read_params,
    str_param,
)
from otp_router.providers.telegram import sign_report

__all__ = ["LogEntry", "TelegramEmulator"]

_HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body><h1>502 Bad Gateway</h1></body></html>"
#: A truncated JSON body: what a broken proxy or a cut-off answer looks like.
_GARBAGE = '{"ok": true, "result": {"request_id": "'
_AFTER_OUTCOMES = {"reset": "CONNECTION_RESET", "hang": "NO_ANSWER"}
_RECIPIENT_ERRORS = {
    "absent": "PHONE_NUMBER_NOT_FOUND",
    "unavailable": "PHONE_NUMBER_NOT_AVAILABLE",
    "invalid": "PHONE_NUMBER_INVALID",
}


@dataclass(slots=True)
class _Call:
    """What one API call touched, for its log entry."""

    method: str
    time: float
    phone: str | None = None
    request_id: str | None = None
    charged: Decimal | None = None
    latency: float = 0.0
    #: A fault striking after the request took effect: ``"reset"`` or ``"hang"``.
    after: str | None = None


class TelegramEmulator:
    """A Telegram Gateway emulator as an ``aiohttp.web`` application.

    Run it with :meth:`start`/:meth:`stop`, or mount :attr:`app` in your own
    runner (the app's shutdown hooks stop timers and callbacks either way).

    Args:
        token: The API token clients must present.
        script: Behaviour per number (shared with the Twilio emulator, if any).
        balance: Starting account balance, in credits.
        price: Price of one message.
        clock: Unix time source for ``updated_at``, report timestamps and the log.
        max_code_attempts: Wrong codes accepted before ``code_max_attempts_exceeded`` (UNCONFIRMED).
        auth_error_status: HTTP status of ``ACCESS_TOKEN_*`` errors (UNCONFIRMED).
        error_status: HTTP status of other errors (UNCONFIRMED).
        callback_attempts: Tries per delivery report (the real service: 1 + up to 10 retries).
        callback_backoff: First retry delay in seconds, doubled per try (scaled by ``time_scale``).
        callback_timeout: Seconds to wait for the receiver's answer.
    """

    def __init__(
        self,
        token: str,
        script: Script,
        *,
        balance: Decimal = Decimal("100"),
        price: Decimal = Decimal("0.01"),
        clock: Callable[[], float] = time.time,
        max_code_attempts: int = 5,
        auth_error_status: int = 401,
        error_status: int = 400,
        callback_attempts: int = 10,
        callback_backoff: float = 1.0,
        callback_timeout: float = 5.0,
    ) -> None:
        self.token = token
        self.script = script
        self.price = price
        self.clock = clock
        self.max_code_attempts = max_code_attempts
        self.auth_error_status = auth_error_status
        self.error_status = error_status
        self.callback_attempts = callback_attempts
        self.callback_backoff = callback_backoff
        self.callback_timeout = callback_timeout
        self._initial_balance = balance
        self._balance = balance
        self._log: list[LogEntry] = []
        self._requests: dict[str, RequestRecord] = {}
        #: The same records by phone number, oldest first: an inbox read is not a scan of them all.
        self._by_phone: dict[str, list[RequestRecord]] = {}
        self._calls: dict[str, tuple[Behaviour, int]] = {}
        self._reports: list[dict[str, Any]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._stopping = asyncio.Event()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._methods: dict[str, Callable[[dict[str, Any], _Call], Awaitable[Any]]] = {
            "checksendability": self._check_send_ability,
            "sendverificationmessage": self._send_verification_message,
            "checkverificationstatus": self._check_verification_status,
            "revokeverificationmessage": self._revoke_verification_message,
        }
        self.app = web.Application()
        self.app.router.add_post("/_emulator/script", self._admin_script)
        self.app.router.add_get("/_emulator/log", self._admin_log)
        self.app.router.add_get("/_emulator/state", self._admin_state)
        self.app.router.add_post("/_emulator/reset", self._admin_reset)
        self.app.router.add_get("/_emulator/inbox", self._admin_inbox)
        self.app.router.add_route("*", "/{method}", self._handle)
        self.app.on_shutdown.append(self._on_shutdown)
        self.app.on_cleanup.append(self._on_cleanup)

    # ------------------------------------------------------------------ lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on ``host:port``; ``port=0`` picks a free one.

        Returns:
            The bound port.
        """
        self._runner = await serve_app(self.app, host, port)
        return int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop serving; pending deliveries and delivery reports are cancelled."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def _on_shutdown(self, app: web.Application) -> None:
        self._stopping.set()
        await self._cancel_pending()

    async def _on_cleanup(self, app: web.Application) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def _cancel_pending(self) -> None:
        for request in self._requests.values():
            if request.timer is not None:
                request.timer.cancel()
                request.timer = None
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def reset(self, *, balance: Decimal | None = None) -> None:
        """Forget requests, the log, call counters and reports; restore the balance.

        The script is left alone: it may be shared with the Twilio emulator.

        Args:
            balance: New balance; default the one given to the constructor.
        """
        await self._cancel_pending()
        self._requests.clear()
        self._by_phone.clear()
        self._log.clear()
        self._calls.clear()
        self._reports.clear()
        self._balance = self._initial_balance if balance is None else balance

    # ------------------------------------------------------------------ Python inspection

    @property
    def log(self) -> list[LogEntry]:
        """Every API request received, oldest first (a copy)."""
        return list(self._log)

    @property
    def balance(self) -> Decimal:
        """Current account balance."""
        return self._balance

    @property
    def reports(self) -> list[dict[str, Any]]:
        """Delivery report outcomes: request_id, status, attempts, delivered."""
        return list(self._reports)

    def requests_for(self, phone: str) -> list[RequestRecord]:
        """Every request made for ``phone``, oldest first: one per charge (a reachable probe, or a
        send without a probe's ``request_id``), with ``sent`` and ``refunded`` (read-only)."""
        return [r for r in self._requests.values() if r.phone == phone]

    def code_for(self, request_id: str) -> str | None:
        """The code sent for ``request_id`` (ours or the one the emulator generated)."""
        request = self._requests.get(request_id)
        return request.code if request else None

    def delivered_code(self, request_id: str) -> str | None:
        """The code sent under ``request_id`` once it reached the phone (delivered or read), else None."""
        request = self._requests.get(request_id)
        if request is None or request.delivery not in ("delivered", "read"):
            return None
        return request.code

    def delivered_codes_for_payload(self, payload: str) -> list[str]:
        """Codes that reached the phone from sends carrying ``payload`` (the router's verification id),
        oldest first."""
        return [
            r.code
            for r in self._requests.values()
            if r.payload == payload and r.code is not None and r.delivery in ("delivered", "read")
        ]

    def sent_to(self, phone: str) -> list[str]:
        """Request ids under which a message was sent to ``phone``, delivered or not."""
        return [r.request_id for r in self._requests.values() if r.phone == phone and r.sent]

    def inbox(self, phone: str) -> list[str]:
        """Codes that reached ``phone`` (delivered or read), oldest first: what the user sees."""
        return [
            r.code
            for r in self._by_phone.get(phone, ())
            if r.code is not None and r.delivery in ("delivered", "read")
        ]

    async def _admin_inbox(self, request: web.Request) -> web.Response:
        # The phone number rides in the query string: this is a local test tool only.
        return web.json_response({"codes": self.inbox(query_phone(request))})

    def request_status(self, request_id: str) -> dict[str, Any] | None:
        """The current ``RequestStatus`` JSON of ``request_id``, or None."""
        request = self._requests.get(request_id)
        return request.status() if request else None

    # ------------------------------------------------------------------ API front door

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["method"]
        call = _Call(method=CANONICAL_METHODS.get(name.lower(), name), time=self.clock())
        response: web.StreamResponse
        try:
            params = await read_params(request)
            self._authorize(request, params)
            handler = self._methods.get(name.lower())
            if handler is None:
                raise ApiError("UNKNOWN_METHOD")
            result = await handler(params, call)
            response = web.json_response({"ok": True, "result": result})
            outcome = "ok"
        except ApiError as exc:
            status = self.auth_error_status if exc.error.startswith("ACCESS_TOKEN_") else self.error_status
            response = web.json_response({"ok": False, "error": exc.error}, status=status)
            outcome = exc.error
        except BadGateway:
            response = web.Response(status=502, text=_HTML_502, content_type="text/html")
            outcome = "HTTP_502"
        except Garbage:
            response = web.Response(status=200, text=_GARBAGE, content_type="application/json")
            outcome = "GARBAGE"
        if call.after is not None:
            outcome = _AFTER_OUTCOMES[call.after]
        self._log.append(
            LogEntry(
                seq=len(self._log) + 1,
                time=call.time,
                method=call.method,
                phone_number=call.phone,
                request_id=call.request_id,
                outcome=outcome,
                http_status=0 if call.after is not None else response.status,
                charged=None if call.charged is None else str(call.charged),
            )
        )
        if call.after == "reset":
            # The request took effect; the answer is lost with the connection.
            if request.transport is not None:
                request.transport.abort()
            return response  # written to a closed transport: nothing reaches the client
        if call.after == "hang":
            # Held until the client gives up (its disconnect cancels this handler) or the emulator stops.
            await self._stopping.wait()
        if call.latency > 0:
            # The request already took effect; only the answer is late (an ambiguous timeout).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), call.latency)
        return response

    def _authorize(self, request: web.Request, params: dict[str, Any]) -> None:
        header = request.headers.get("Authorization", "")
        token: Any = header[7:].strip() if header[:7].lower() == "bearer " else params.get("access_token")
        if not token:
            raise ApiError("ACCESS_TOKEN_REQUIRED")
        if not isinstance(token, str) or not hmac.compare_digest(
            token.encode("utf-8"), self.token.encode("utf-8")
        ):
            raise ApiError("ACCESS_TOKEN_INVALID")

    def _phone(self, params: dict[str, Any], call: _Call) -> str:
        phone = str_param(params, "phone_number", "PHONE_NUMBER_INVALID")
        if phone is None or not is_e164(phone):
            raise ApiError("PHONE_NUMBER_INVALID")
        call.phone = phone
        return phone

    def _lookup(self, params: dict[str, Any], call: _Call) -> RequestRecord:
        request_id = str_param(params, "request_id", "REQUEST_ID_INVALID")
        if request_id is None:
            raise ApiError("REQUEST_ID_REQUIRED")
        call.request_id = request_id
        record = self._requests.get(request_id)
        if record is None:
            raise ApiError("REQUEST_ID_INVALID")
        call.phone = record.phone
        return record

    def _infrastructure(self, phone: str, call: _Call) -> Behaviour:
        """Apply scripted latency and counted faults for ``phone``; return its behaviour.

        Faults that answer before the request takes effect raise here; the
        ones that strike after it took effect (reset, hang) are left in
        ``call.after`` for :meth:`_handle`.
        """
        behaviour = self.script.behaviour(phone)
        call.latency = behaviour.telegram_latency * self.script.time_scale
        only = behaviour.telegram_fault_method
        if behaviour.telegram_faulty and (only is None or only.lower() == call.method.lower()):
            seen, count = self._calls.get(phone, (behaviour, 0))
            # Counting restarts whenever the number is scripted again (a new Behaviour object).
            index = count if seen is behaviour else 0
            self._calls[phone] = (behaviour, index + 1)
            fault = behaviour.telegram_fault(index)
            if fault == "5xx":
                raise BadGateway
            if fault == "flood_wait":
                raise ApiError(f"FLOOD_WAIT_{behaviour.telegram_flood_wait}")
            if fault == "error" and behaviour.telegram_error:
                raise ApiError(behaviour.telegram_error)
            if fault == "garbage":
                raise Garbage
            if fault in ("reset", "hang"):
                call.after = fault
        return behaviour

    def _charge(self, call: _Call) -> None:
        if self._balance < self.price:
            raise ApiError("BALANCE_NOT_ENOUGH")
        self._balance -= self.price
        call.charged = self.price

    def _new_request(self, phone: str, call: _Call) -> RequestRecord:
        record = RequestRecord(request_id=secrets.token_hex(8), phone=phone, cost=self.price)
        self._requests[record.request_id] = record
        self._by_phone.setdefault(phone, []).append(record)
        call.request_id = record.request_id
        return record

    # ------------------------------------------------------------------ methods

    async def _check_send_ability(self, params: dict[str, Any], call: _Call) -> Any:
        phone = self._phone(params, call)
        _recipient(self._infrastructure(phone, call))
        self._charge(call)
        return self._new_request(phone, call).status(self._balance)

    async def _send_verification_message(self, params: dict[str, Any], call: _Call) -> Any:
        phone = self._phone(params, call)
        behaviour = self._infrastructure(phone, call)
        sp = parse_send_params(params)
        if sp.request_id is not None:
            call.request_id = sp.request_id
            record = self._requests.get(sp.request_id)
            if record is None:
                raise ApiError("REQUEST_ID_INVALID")
            if record.phone != phone:
                raise ApiError("PHONE_NUMBER_MISMATCH")
            if record.sent:
                raise ApiError("MESSAGE_ALREADY_SENT")
            _recipient(behaviour)
            balance = None  # paid at checkSendAbility: this send is free
        else:
            _recipient(behaviour)
            self._charge(call)
            record = self._new_request(phone, call)
            balance = self._balance
        now = int(self.clock())
        record.sent = True
        if sp.code is None:
            length = sp.code_length or 6
            record.code = f"{secrets.randbelow(10**length):0{length}d}"
        else:
            record.code = sp.code
        record.ttl, record.callback_url, record.payload = sp.ttl, sp.callback_url, sp.payload
        record.delivery, record.delivery_at = "sent", now
        self._schedule(record)
        return record.status(balance)

    async def _check_verification_status(self, params: dict[str, Any], call: _Call) -> Any:
        record = self._lookup(params, call)
        self._infrastructure(record.phone, call)
        code = str_param(params, "code", "CODE_INVALID")
        if code is not None:
            self._check_code(record, code)
        return record.status()

    async def _revoke_verification_message(self, params: dict[str, Any], call: _Call) -> Any:
        record = self._lookup(params, call)
        self._infrastructure(record.phone, call)
        # A message already delivered or read stays; revoked is never refunded.
        if record.delivery == "sent":
            self._cancel_timer(record)
            record.delivery, record.delivery_at = "revoked", int(self.clock())
            self._report(record)
        return True

    def _check_code(self, record: RequestRecord, code: str) -> None:
        record.code_entered = code
        record.verification_at = int(self.clock())
        if record.verification == "code_max_attempts_exceeded":
            return
        if record.delivery in ("expired", "revoked"):
            record.verification = "expired"
        elif record.sent and hmac.compare_digest(code.encode("utf-8"), (record.code or "").encode("utf-8")):
            record.verification = "code_valid"
        else:
            record.wrong_codes += 1
            exceeded = record.wrong_codes > self.max_code_attempts
            record.verification = "code_max_attempts_exceeded" if exceeded else "code_invalid"

    # ------------------------------------------------------------------ delivery

    def _schedule(self, record: RequestRecord) -> None:
        loop = asyncio.get_running_loop()
        delay = self.script.telegram_delay(record.phone)
        window = None if record.ttl is None else record.ttl * self.script.time_scale
        if delay is not None and (window is None or delay <= window):
            record.timer = loop.call_later(delay, self._finish, record, "delivered")
        elif window is not None:
            record.timer = loop.call_later(window, self._finish, record, "expired")
        # Neither: never delivered and no ttl, so it stays "sent" (no refund without ttl).

    def _finish(self, record: RequestRecord, outcome: str) -> None:
        record.timer = None
        if record.delivery != "sent":
            return
        record.delivery, record.delivery_at = outcome, int(self.clock())
        if outcome == "expired":
            record.refunded = True
            self._balance += record.cost
        self._report(record)

    @staticmethod
    def _cancel_timer(record: RequestRecord) -> None:
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None

    def _report(self, record: RequestRecord) -> None:
        if record.callback_url is None or self._stopping.is_set():
            return
        body = json.dumps(record.status(), separators=(",", ":")).encode("utf-8")
        task = asyncio.get_running_loop().create_task(
            self._post_report(record.callback_url, body, record.request_id, record.delivery or "")
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post_report(self, url: str, body: bytes, request_id: str, status: str) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.callback_timeout))
        session = self._session
        attempts = 0
        delivered = False
        for attempt in range(self.callback_attempts):
            if attempt:
                delay = min(self.callback_backoff * 2 ** (attempt - 1), 60.0) * self.script.time_scale
                await asyncio.sleep(delay)
            attempts += 1
            timestamp = str(int(self.clock()))
            headers = {
                "Content-Type": "application/json",
                "X-Request-Timestamp": timestamp,
                "X-Request-Signature": sign_report(self.token, timestamp, body),
            }
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    # Only 200 counts as received, as with the real service.
                    if response.status == 200:
                        delivered = True
                        break
            except (aiohttp.ClientError, TimeoutError):
                continue  # a failing receiver must never take the emulator down
        self._reports.append(
            {"request_id": request_id, "status": status, "attempts": attempts, "delivered": delivered}
        )

    # ------------------------------------------------------------------ admin

    async def _admin_script(self, request: web.Request) -> web.Response:
        try:
            self.script.update_from_json(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"ok": False, "error": "SCRIPT_INVALID", "detail": str(exc)}, status=400)
        return web.json_response({"ok": True, "result": {"numbers": len(self.script.numbers)}})

    async def _admin_log(self, request: web.Request) -> web.Response:
        return web.json_response([entry.to_dict() for entry in self._log])

    async def _admin_state(self, request: web.Request) -> web.Response:
        requests = []
        for record in self._requests.values():
            state = record.status()
            state["code"] = record.code
            state["ttl"] = record.ttl
            requests.append(state)
        return web.json_response(
            {
                "balance": str(self._balance),
                "price": str(self.price),
                "requests": requests,
                "reports": self._reports,
            }
        )

    async def _admin_reset(self, request: web.Request) -> web.Response:
        balance = None
        if request.can_read_body:
            try:
                data = await request.json()
                balance = (
                    Decimal(str(data["balance"])) if isinstance(data, dict) and "balance" in data else None
                )
            except (ValueError, ArithmeticError) as exc:
                return web.json_response(
                    {"ok": False, "error": "RESET_INVALID", "detail": str(exc)}, status=400
                )
        await self.reset(balance=balance)
        return web.json_response({"ok": True, "result": {"balance": str(self._balance)}})


def _recipient(behaviour: Behaviour) -> None:
    """Refuse a number scripted as not reachable on Telegram."""
    error = _RECIPIENT_ERRORS.get(behaviour.telegram)
    if error is not None:
        raise ApiError(error)
