"""A local Twilio Programmable Messaging server that speaks the real wire format.

What it serves (form-encoded requests, HTTP Basic auth ``AccountSid:AuthToken``,
JSON responses)::

    POST /2010-04-01/Accounts/{AccountSid}/Messages.json        create → 201 + Message resource
    GET  /2010-04-01/Accounts/{AccountSid}/Messages.json        list   → 200 + one page of messages
    GET  /2010-04-01/Accounts/{AccountSid}/Messages/{Sid}.json  fetch  → 200 + Message resource
    POST /_emulator/script   merge a JSON script ({"+1555…": {"sms_final": "undelivered"}})
    GET  /_emulator/log      every create attempt: to, sid, time, outcome
    POST /_emulator/reset    forget messages, log and counters (the script is kept)

A message is ``queued`` (``accepted`` with a Messaging Service) at creation,
``sent`` halfway through its scripted delay and final (``delivered``,
``undelivered`` or ``failed``) after ``sms_delay * time_scale`` seconds; a
``failed`` message never reaches ``sent``. ``price`` stays null until the
final status, then holds a negative string such as ``"-0.00830"``.

With ``StatusCallback`` set, the emulator POSTs the ``sent`` and final status
form-encoded and signed with ``X-Twilio-Signature`` (the SDK's
``RequestValidator`` over the exact URL and every parameter), in order. A
failing callback is retried a few times and then dropped; it never affects
the emulator.

Errors use Twilio's legacy body ``{"code", "message", "more_info", "status"}``.
Codes: 20003 bad credentials (401), 20404 unknown message (404), 21604 no
``To``, 21211 ``To`` not a valid E.164 number, 21603 neither ``From`` nor
``MessagingServiceSid``, 21602 no ``Body``, 21624 ``ValidityPeriod`` outside
1..36000 (codes from twilio.com/docs/api/errors; which check Twilio runs first
is unknown). Scripted 429s carry 20429; scripted 503s carry 20503 (UNCONFIRMED:
Twilio does not document the body of its 5xx answers). Both are answered before
the message is created; a scripted hang (``sms_hang``) creates the message and
never answers, the worst case of a timeout.

The list answers the envelope twilio-python's ``Page`` reads: ``messages``
plus ``first_page_uri``, ``next_page_uri``, ``previous_page_uri``, ``page``,
``page_size``, ``start``, ``end`` and ``uri``, newest message first. Filters:
``To``, ``From``, ``DateSent`` (that UTC day), ``DateSent<`` (on or before),
``DateSent>`` (on or after), each date either ``YYYY-MM-DD`` or
``YYYY-MM-DDTHH:MM:SSZ`` (what the SDK sends for a datetime). ``PageSize``
is 1..1000 (default 50); further pages are reached through ``next_page_uri``
(``Page`` plus an opaque ``PageToken``). UNCONFIRMED, chosen here: a message
not yet sent (``date_sent`` null) never matches a ``DateSent`` filter, and a
bad filter value is refused with 400 / 20001.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import functools
import hmac
import itertools
import json
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any
from urllib.parse import urlencode

import aiohttp
import phonenumbers
from aiohttp import web
from twilio.request_validator import RequestValidator

from otp_router.emulators.script import Behaviour, Script
from otp_router.emulators.serving import query_phone, serve_app
from otp_router.prices import SmsPrices, sms_segments

__all__ = ["SmsLogEntry", "TwilioEmulator"]

API_VERSION = "2010-04-01"
#: Sender the emulator assigns when only a Messaging Service SID was given.
SERVICE_SENDER = "+15005550006"
_logger = logging.getLogger("otp_router.emulators.twilio")

_TITLES = {
    20001: "Invalid parameter",
    20003: "Authenticate",
    20404: "The requested resource was not found",
    20429: "Too Many Requests",
    20503: "Service Unavailable",
    21211: "Invalid 'To' Phone Number",
    21408: "Permission to send an SMS has not been enabled for the region indicated by the 'To' number",
    21602: "Message body is required.",
    21603: "A 'From' or 'MessagingServiceSid' parameter is required to send a message.",
    21604: "A 'To' phone number is required.",
    21606: "The 'From' phone number provided is not a valid message-capable Twilio phone number.",
    21608: "The number is unverified. Trial accounts may only send messages to verified numbers.",
    21610: "Attempt to send to unsubscribed recipient",
    21612: "The 'To' phone number is not currently reachable using the 'From' phone number.",
    21614: "'To' number is not a valid mobile number",
    21624: "Invalid validity period value",
    21635: "'To' number cannot be a landline",
    30003: "Unreachable destination handset",
    30004: "Message blocked",
    30005: "Unknown destination handset",
    30006: "Landline or unreachable carrier",
    30007: "Message filtered",
    30008: "Unknown error",
    21656: "The ContentVariables Parameter is invalid.",
    63003: "Channel could not find To address",
}
#: UNCONFIRMED: what one WhatsApp authentication message costs (it varies by country).
WHATSAPP_PRICE = Decimal("0.0050")
#: The body an authentication template renders with the code as its variable.
WHATSAPP_TEMPLATE = "{code} is your verification code. For your security, do not share this code."
_DEFAULT_ERROR = {"undelivered": 30003, "failed": 30008}
_CALLBACK_TIMEOUT = aiohttp.ClientTimeout(total=5.0)
#: How long a scripted hang holds its answer back (clients time out long before).
_HANG_SECONDS = 3600.0
#: List filters, in the order they appear in page URIs.
_LIST_FILTERS = ("To", "From", "DateSent", "DateSent<", "DateSent>")
_DEFAULT_PAGE_SIZE, _MAX_PAGE_SIZE = 50, 1000


def _parse_day_or_time(value: str) -> tuple[float, bool] | None:
    """``YYYY-MM-DD`` → (midnight UTC, True); ``YYYY-MM-DDTHH:MM:SSZ`` → (that instant, False)."""
    for fmt, whole_day in (("%Y-%m-%d", True), ("%Y-%m-%dT%H:%M:%SZ", False)):
        try:
            parsed = datetime.strptime(value, fmt).replace(tzinfo=UTC)
        except ValueError:
            continue
        return parsed.timestamp(), whole_day
    return None


def _date_filter(name: str, value: str) -> Any:
    """A predicate on ``date_sent`` for one ``DateSent`` filter, or None if the value is bad."""
    parsed = _parse_day_or_time(value)
    if parsed is None:
        return None
    at, whole_day = parsed
    day_end = at + timedelta(days=1).total_seconds() if whole_day else at
    if name == "DateSent>":
        return lambda sent: sent >= at
    if name == "DateSent<":
        return lambda sent: sent < day_end if whole_day else sent <= at
    return lambda sent: at <= sent < day_end if whole_day else sent == at


@functools.lru_cache(maxsize=65536)
def _region_of(to: str) -> str | None:
    """Region of a valid E.164 number, or None (cached: phonenumbers is slow for a hot path)."""
    if not to.startswith("+"):
        return None
    try:
        parsed = phonenumbers.parse(to, None)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(parsed):
        return None
    return phonenumbers.region_code_for_number(parsed) or "ZZ"


def _rfc2822(ts: float | None) -> str | None:
    if ts is None:
        return None
    return email.utils.format_datetime(datetime.fromtimestamp(ts, UTC))


@dataclass(frozen=True, slots=True)
class SmsLogEntry:
    """One create attempt, as recorded by the emulator.

    Attributes:
        to: The ``To`` number as sent (may be empty or invalid).
        sid: Message SID when the message was created, else None.
        time: Unix time of the attempt.
        outcome: ``queued``/``accepted`` (created), ``error <code>`` or ``http <status>``.
        http_status: Status code of the response.
    """

    to: str
    sid: str | None
    time: float
    outcome: str
    http_status: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(slots=True, eq=False)
class _Message:
    sid: str
    to: str
    from_: str | None
    service_sid: str | None
    body: str
    region: str
    status: str
    created: float
    callback_url: str | None
    segments: int
    updated: float = 0.0
    whatsapp: bool = False
    sent: float | None = None
    price: str | None = None
    error_code: int | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)
    chain: asyncio.Task[None] | None = None

    def resource(self, account_sid: str) -> dict[str, Any]:
        uri = f"/{API_VERSION}/Accounts/{account_sid}/Messages/{self.sid}"
        # With a Messaging Service no sender is picked before sending, so no segment count either.
        picked = self.from_ is not None
        return {
            "account_sid": account_sid,
            "api_version": API_VERSION,
            "body": self.body,
            "date_created": _rfc2822(self.created),
            "date_sent": _rfc2822(self.sent),
            "date_updated": _rfc2822(self.updated),
            "direction": "outbound-api",
            "error_code": self.error_code,
            "error_message": _TITLES.get(self.error_code) if self.error_code else None,
            "from": self.from_,
            "messaging_service_sid": self.service_sid,
            "num_media": "0",
            "num_segments": str(self.segments) if picked else "0",
            "price": self.price,
            "price_unit": "USD",
            "sid": self.sid,
            "status": self.status,
            "subresource_uris": {"media": f"{uri}/Media.json"},
            "to": self.to,
            "uri": f"{uri}.json",
        }


def _error(status: int, code: int, message: str | None = None) -> web.Response:
    body = {
        "code": code,
        "message": message or _TITLES.get(code, "Error"),
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }
    headers = {"WWW-Authenticate": 'Basic realm="Twilio API"'} if status == 401 else None
    return web.json_response(body, status=status, headers=headers)


class TwilioEmulator:
    """The emulator: an ``aiohttp.web`` application plus its scripted state.

    Args:
        account_sid: The only account it serves (``AC…``).
        auth_token: Password for Basic auth and the key for callback signatures.
        script: Per-number behaviour, shared with the Telegram emulator.
        prices: Price table for the ``price`` of final messages (packaged table if None).
        callback_attempts: Tries per status callback before it is dropped.
        callback_backoff: Seconds before the first callback retry (doubles, scaled by ``time_scale``).
    """

    def __init__(
        self,
        account_sid: str,
        auth_token: str,
        script: Script,
        *,
        prices: SmsPrices | None = None,
        callback_attempts: int = 3,
        callback_backoff: float = 0.5,
    ) -> None:
        self.account_sid = account_sid
        self.script = script
        self.prices = prices if prices is not None else SmsPrices.load()
        self.callback_attempts = max(1, callback_attempts)
        self.callback_backoff = callback_backoff
        self.log: list[SmsLogEntry] = []
        self.messages: dict[str, _Message] = {}
        #: The same messages by ``To``, oldest first: an inbox read is not a scan of them all.
        self._to: dict[str, list[_Message]] = {}
        self._url: str | None = None
        self._token = auth_token
        self._validator = RequestValidator(auth_token)
        self._creates: dict[str, int] = {}
        self._lost_answers: dict[str, int] = {}  # creates answered 503 after taking effect
        self._lists: dict[str, int] = {}  # list requests per To filter
        #: Message-list requests received (any outcome).
        self.list_requests = 0
        self._unsettled = 0  # messages whose final status is still to come
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self.app = web.Application()
        prefix = f"/{API_VERSION}/Accounts/{{account}}/Messages"
        self.app.router.add_post(f"{prefix}.json", self._create)
        self.app.router.add_get(f"{prefix}.json", self._list)
        self.app.router.add_get(f"{prefix}/{{sid}}.json", self._fetch)
        self.app.router.add_post("/_emulator/script", self._admin_script)
        self.app.router.add_get("/_emulator/log", self._admin_log)
        self.app.router.add_post("/_emulator/reset", self._admin_reset)
        self.app.router.add_get("/_emulator/inbox", self._admin_inbox)
        # Background work stops when the server starts shutting down, and again on
        # cleanup in case the app was run by someone else's runner.
        self.app.on_shutdown.append(self._on_cleanup)
        self.app.on_cleanup.append(self._on_cleanup)
        from otp_router.emulators.twilio_calls import CallsEmulator

        #: The Calls resource (voice), served by the same application.
        self.calls = CallsEmulator(self)

    # ----------------------------------------------------------------- lifecycle

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve on ``host:port``.

        Args:
            host: Interface to bind.
            port: TCP port; 0 picks a free one.

        Returns:
            The bound port.
        """
        # A short shutdown timeout: requests held back by scripted latency are
        # cancelled on stop() instead of being waited for.
        self._runner = await serve_app(self.app, host, port, handle_signals=False, shutdown_timeout=0.25)
        bound = int(self._runner.addresses[0][1])
        url_host = f"[{host}]" if ":" in host else host
        self._url = f"http://{url_host}:{bound}"
        return bound

    @property
    def url(self) -> str:
        """Base URL once started, e.g. ``http://127.0.0.1:8802`` (for ``OTP_ROUTER_TWILIO__BASE_URL``).

        Raises:
            RuntimeError: :meth:`start` has not been called.
        """
        if self._url is None:
            raise RuntimeError("the Twilio emulator is not started")
        return self._url

    async def stop(self) -> None:
        """Stop serving, cancel pending transitions and callbacks, close the callback client."""
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()  # runs _on_cleanup
        else:
            await self._shutdown()

    async def _on_cleanup(self, _app: web.Application) -> None:
        await self._shutdown()

    async def _shutdown(self) -> None:
        tasks = self._cancel_all()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _cancel_all(self) -> list[asyncio.Task[None]]:
        """Cancel pending status changes and callbacks; return the tasks to await."""
        for message in self.messages.values():
            for timer in message.timers:
                timer.cancel()
        self._unsettled = 0  # cancelled timers will never deliver a final status
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        return tasks

    def reset(self) -> None:
        """Forget every message, the log and the scripted counters (the script is kept)."""
        self._cancel_all()
        self.messages.clear()
        self._to.clear()
        self.log.clear()
        self._creates.clear()
        self._lost_answers.clear()
        self._lists.clear()
        self.list_requests = 0

    async def settle(self, poll: float = 0.005) -> None:
        """Wait until every message has its final status and every callback is done.

        Useful in tests: after ``settle()`` the log, the messages and the
        callbacks received are complete. Never returns while the emulator
        keeps receiving new messages.

        Args:
            poll: Seconds between checks.
        """
        while self._unsettled or self._tasks:
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
            else:
                await asyncio.sleep(poll)

    def inbox(self, phone: str) -> list[str]:
        """Bodies of the messages delivered to ``phone``, oldest first: what the user sees."""
        return [m.body for m in self._to.get(phone, ()) if m.status in ("delivered", "read")]

    def whatsapp_inbox(self, phone: str) -> list[str]:
        """Bodies of the WhatsApp messages delivered to ``phone`` (E.164), oldest first."""
        return self.inbox(f"whatsapp:{phone}")

    async def _admin_inbox(self, request: web.Request) -> web.Response:
        # The phone number rides in the query string: this is a local test tool only.
        return web.json_response({"messages": self.inbox(query_phone(request))})

    def delivered_body(self, sid: str) -> str | None:
        """The body of message ``sid`` once it was delivered, else None."""
        message = self.messages.get(sid)
        return message.body if message is not None and message.status == "delivered" else None

    def messages_to(self, phone: str) -> list[str]:
        """SIDs of the messages created for ``phone``, oldest first."""
        return [entry.sid for entry in self.log if entry.to == phone and entry.sid is not None]

    # ------------------------------------------------------------------ helpers

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        if scheme.lower() != "basic":
            return False
        try:
            user, _, password = base64.b64decode(encoded, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return False
        same_user = hmac.compare_digest(user.encode(), self.account_sid.encode())
        same_pass = hmac.compare_digest(password.encode(), self._token.encode())
        return same_user and same_pass

    def _record(self, to: str, sid: str | None, outcome: str, status: int) -> None:
        self.log.append(SmsLogEntry(to=to, sid=sid, time=time.time(), outcome=outcome, http_status=status))

    def _spawn(self, coro: Any) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # ----------------------------------------------------------------- handlers

    async def _create(self, request: web.Request) -> web.Response:
        if not self._authorized(request) or request.match_info["account"] != self.account_sid:
            # Real Twilio answers 20003 for credentials that do not own the account in the path.
            return _error(401, 20003)
        form = await request.post()
        to = str(form.get("To", ""))
        whatsapp = to.startswith("whatsapp:")
        number = to.removeprefix("whatsapp:")
        behaviour = self.script.behaviour(number)
        if behaviour.sms_latency:
            await asyncio.sleep(behaviour.sms_latency * self.script.time_scale)
        refusal, hang = self._scripted_refusal(to, behaviour)
        if refusal is not None:
            return refusal
        if not to:
            return self._refuse(to, 400, 21604)
        region = _region_of(number)
        if region is None or behaviour.sms_invalid:
            return self._refuse(to, 400, 21211)
        from_ = str(form.get("From", "")) or None
        service = str(form.get("MessagingServiceSid", "")) or None
        if from_ is None and service is None:
            return self._refuse(to, 400, 21603)
        body = str(form.get("Body", ""))
        content_sid = str(form.get("ContentSid", ""))
        if content_sid:
            # Content API: the approved template's text with its variables filled in.
            try:
                variables = json.loads(str(form.get("ContentVariables", "{}")))
            except ValueError:
                return self._refuse(to, 400, 21656)
            code = variables.get("1", "") if isinstance(variables, dict) else ""
            body = WHATSAPP_TEMPLATE.format(code=code)
        if not body:
            return self._refuse(to, 400, 21602)
        validity = str(form.get("ValidityPeriod", "36000"))
        if not validity.isdigit() or not 1 <= int(validity) <= 36000:
            return self._refuse(to, 400, 21624)
        if behaviour.sms_error is not None:
            return self._refuse(to, 400, behaviour.sms_error)

        now = time.time()
        message = _Message(
            sid="SM" + secrets.token_hex(16),
            to=to,
            from_=from_,
            service_sid=service,
            body=body,
            region=region,
            status="accepted" if service else "queued",
            created=now,
            updated=now,
            callback_url=str(form.get("StatusCallback", "")) or None,
            segments=1 if whatsapp else sms_segments(body),
            whatsapp=whatsapp,
        )
        self.messages[message.sid] = message
        self._to.setdefault(message.to, []).append(message)
        self._unsettled += 1
        self._schedule(message, behaviour)
        lost = self._lost_answers.get(to, 0)
        if lost < behaviour.sms_5xx_after_create:
            # The message exists and will be delivered; only the answer is lost.
            self._lost_answers[to] = lost + 1
            self._record(to, message.sid, "http 503 after create", 503)
            return _error(503, 20503)
        self._record(to, message.sid, message.status, 201)
        if hang:
            # Created (it will be delivered and charged), but the answer never comes:
            # the client's timeout ends this handler, or the server's shutdown does.
            await asyncio.sleep(_HANG_SECONDS)
        elif behaviour.sms_latency_after_create:
            await asyncio.sleep(behaviour.sms_latency_after_create * self.script.time_scale)
        return web.json_response(message.resource(self.account_sid), status=201)

    def _scripted_refusal(self, to: str, behaviour: Behaviour) -> tuple[web.Response | None, bool]:
        """The first ``sms_429`` creates answer 429, the next ``sms_5xx`` answer 503,
        the next ``sms_hang`` are created but never answered (the second value says so)."""
        if not (behaviour.sms_429 or behaviour.sms_5xx or behaviour.sms_hang):
            return None, False
        seen = self._creates.get(to, 0)
        self._creates[to] = seen + 1
        if seen < behaviour.sms_429:
            return self._refuse(to, 429, 20429), False
        if seen < behaviour.sms_429 + behaviour.sms_5xx:
            return self._refuse(to, 503, 20503), False
        return None, seen < behaviour.sms_429 + behaviour.sms_5xx + behaviour.sms_hang

    def _refuse(self, to: str, status: int, code: int) -> web.Response:
        outcome = f"error {code}" if status < 429 else f"http {status}"
        self._record(to, None, outcome, status)
        return _error(status, code)

    async def _fetch(self, request: web.Request) -> web.Response:
        if not self._authorized(request) or request.match_info["account"] != self.account_sid:
            return _error(401, 20003)
        message = self.messages.get(request.match_info["sid"])
        if message is None:
            return _error(404, 20404, f"The requested resource {request.path} was not found")
        latency = self.script.behaviour(message.to).sms_latency
        if latency:
            await asyncio.sleep(latency * self.script.time_scale)
        return web.json_response(message.resource(self.account_sid))

    async def _list(self, request: web.Request) -> web.Response:
        """One page of the account's messages, newest first, filtered as the query says."""
        self.list_requests += 1
        if not self._authorized(request) or request.match_info["account"] != self.account_sid:
            return _error(401, 20003)
        query = request.query
        filters = {name: query[name] for name in _LIST_FILTERS if name in query}
        to = filters.get("To", "")
        behaviour = self.script.behaviour(to)
        if behaviour.sms_latency:
            await asyncio.sleep(behaviour.sms_latency * self.script.time_scale)
        if to:
            seen = self._lists.get(to, 0)
            self._lists[to] = seen + 1
            if seen < behaviour.sms_list_5xx:
                return _error(503, 20503)
        dates = []
        for name in ("DateSent", "DateSent<", "DateSent>"):
            if name in filters:
                predicate = _date_filter(name, filters[name])
                if predicate is None:
                    return _error(400, 20001, f"Invalid {name} value")
                dates.append(predicate)
        try:
            size = int(query.get("PageSize", _DEFAULT_PAGE_SIZE))
            number = int(query.get("Page", 0))
        except ValueError:
            return _error(400, 20001, "Invalid PageSize or Page")
        if not 1 <= size <= _MAX_PAGE_SIZE or number < 0:
            return _error(400, 20001, "Invalid PageSize or Page")

        now = time.time()
        chosen = [
            m
            for m in self.messages.values()
            if (not to or m.to == to)
            and ("From" not in filters or m.from_ == filters["From"])
            and all(m.sent is not None and keep(m.sent) for keep in dates)
            and m.created + self.script.behaviour(m.to).sms_list_lag * self.script.time_scale <= now
        ]
        chosen.sort(key=lambda m: (m.created, m.sid), reverse=True)
        token = query.get("PageToken", "")
        start = number * size
        if not token:
            page = chosen[start : start + size]
            more = start + size < len(chosen)
        else:
            anchor = self.messages.get(token[2:])
            if token[:2] not in ("PA", "PB") or anchor is None:
                return _error(400, 20001, "Invalid PageToken")
            key = (anchor.created, anchor.sid)
            if token.startswith("PA"):  # the page after the anchor (older messages)
                rest = [m for m in chosen if (m.created, m.sid) < key]
                page, more = rest[:size], len(rest) > size
            else:  # the page before it (newer messages); the anchor's page follows
                page, more = [m for m in chosen if (m.created, m.sid) > key][-size:], True

        path = request.path

        def uri(**extra: Any) -> str:
            return f"{path}?{urlencode({**filters, 'PageSize': size, **extra})}"

        body = {
            "end": start + max(len(page) - 1, 0),
            "first_page_uri": uri(Page=0),
            "messages": [m.resource(self.account_sid) for m in page],
            "next_page_uri": uri(Page=number + 1, PageToken="PA" + page[-1].sid) if more and page else None,
            "page": number,
            "page_size": size,
            "previous_page_uri": (
                uri(Page=number - 1, PageToken="PB" + page[0].sid) if number > 0 and page else None
            ),
            "start": start,
            "uri": uri(Page=number, **({"PageToken": token} if token else {})),
        }
        return web.json_response(body)

    async def _admin_script(self, request: web.Request) -> web.Response:
        try:
            self.script.update_from_json(await request.json())
        except (ValueError, TypeError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"ok": True, "numbers": len(self.script.numbers)})

    async def _admin_log(self, _request: web.Request) -> web.Response:
        return web.json_response([entry.to_dict() for entry in self.log])

    async def _admin_reset(self, _request: web.Request) -> web.Response:
        self.reset()
        return web.json_response({"ok": True})

    # ------------------------------------------------------- delivery emulation

    def _schedule(self, message: _Message, behaviour: Behaviour) -> None:
        loop = asyncio.get_running_loop()
        delay = max(0.0, behaviour.sms_delay * self.script.time_scale)
        final = behaviour.sms_final
        if message.whatsapp and not behaviour.whatsapp:
            final = "failed"  # 63003: no WhatsApp account behind the number
        if final != "failed":
            message.timers.append(loop.call_later(delay / 2, self._advance, message, "sent", behaviour))
        message.timers.append(loop.call_later(delay, self._advance, message, final, behaviour))

    def _advance(self, message: _Message, status: str, behaviour: Behaviour) -> None:
        if self.messages.get(message.sid) is not message:
            return  # forgotten by reset()
        now = time.time()
        message.status = status
        message.updated = now
        if status == "sent":
            message.sent = now
            if message.from_ is None:
                message.from_ = SERVICE_SENDER
        else:
            self._unsettled -= 1
            if message.from_ is None:
                message.from_ = SERVICE_SENDER
            message.error_code = (
                (behaviour.sms_error_code or _DEFAULT_ERROR[status]) if status in _DEFAULT_ERROR else None
            )
            if message.whatsapp and not behaviour.whatsapp:
                message.error_code = 63003
            if status == "failed":
                # A failed message never left Twilio and is not charged.
                message.price = "0.00000"
            else:
                cost = (
                    WHATSAPP_PRICE if message.whatsapp else self.prices.sms(message.region) * message.segments
                )
                message.price = f"{-cost.quantize(Decimal('0.00001')):f}"
        if message.callback_url:
            params = self._callback_params(message)
            message.chain = self._spawn(self._callback(message, params, message.chain))

    def _callback_params(self, message: _Message) -> dict[str, str]:
        params = {
            "AccountSid": self.account_sid,
            "ApiVersion": API_VERSION,
            "From": message.from_ or "",
            "MessageSid": message.sid,
            "MessageStatus": message.status,
            "SmsSid": message.sid,
            "SmsStatus": message.status,
            "To": message.to,
        }
        if message.service_sid:
            params["MessagingServiceSid"] = message.service_sid
        if message.error_code is not None:
            params["ErrorCode"] = str(message.error_code)
        if message.status in ("delivered", "undelivered"):
            params["RawDlrDoneDate"] = time.strftime("%y%m%d%H%M", time.gmtime(message.updated))
        return params

    async def _callback(
        self, message: _Message, params: dict[str, str], previous: asyncio.Task[None] | None
    ) -> None:
        if previous is not None and not previous.done():
            # Keep callbacks of one message in order, as they happened.
            await asyncio.wait({previous})
        url = message.callback_url
        assert url is not None
        headers = {
            "X-Twilio-Signature": self._validator.compute_signature(url, params),
            "User-Agent": "TwilioProxy/1.1",
        }
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_CALLBACK_TIMEOUT)
        delays = (self.callback_backoff * self.script.time_scale * 2**n for n in itertools.count())
        for attempt in range(1, self.callback_attempts + 1):
            try:
                async with self._session.post(url, data=params, headers=headers) as response:
                    if 200 <= response.status < 300:
                        return
                    reason = f"HTTP {response.status}"
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                reason = type(exc).__name__
            _logger.debug("status callback attempt %d failed: %s", attempt, reason)
            if attempt < self.callback_attempts:
                await asyncio.sleep(next(delays))
        # Twilio logs error 11200 and moves on; so do we.
        _logger.info("status callback dropped after %d attempts", self.callback_attempts)
