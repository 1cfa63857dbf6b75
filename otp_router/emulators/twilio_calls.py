"""Calls for the Twilio emulator: ``Calls.create`` with inline TwiML, call statuses, signed callbacks.

Mounted on :class:`~otp_router.emulators.twilio.TwilioEmulator`'s application::

    POST /2010-04-01/Accounts/{AccountSid}/Calls.json        create → 201 + Call resource
    GET  /2010-04-01/Accounts/{AccountSid}/Calls/{Sid}.json  fetch  → 200 + Call resource

A call is ``queued``, ``ringing`` after half of ``voice_delay``, then final
(``completed``, ``busy``, ``no-answer`` or ``failed``, from the script). A
completed call "plays" its TwiML: the text of every ``<Say>`` is kept as what
the person (or their answering machine, with ``voice_machine``) heard, which
:meth:`CallsEmulator.heard` returns. ``price`` is null until the call is final,
then ``-price_per_minute`` per started minute for a completed call and
``0.00000`` otherwise (UNCONFIRMED: Twilio's exact rounding). With
``StatusCallback``, the ``completed`` event (and, when asked for in
``StatusCallbackEvent``, ``ringing`` and ``answered``) is POSTed form-encoded
and signed like message callbacks. Errors: 21211 ``To`` not a valid number,
21213 no ``From``, 21205 neither ``Twiml`` nor ``Url`` (codes from
twilio.com/docs/api/errors; the choice for each case is ours, UNCONFIRMED).
"""

from __future__ import annotations

import asyncio
import html
import re
import secrets
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web

from otp_router.emulators.script import Behaviour

if TYPE_CHECKING:
    from otp_router.emulators.twilio import TwilioEmulator

__all__ = ["CallsEmulator"]

_SAY = re.compile(r"<Say\b[^>]*>(.*?)</Say>", re.DOTALL)
_CALLBACK_TIMEOUT = aiohttp.ClientTimeout(total=5.0)


@dataclass(slots=True, eq=False)
class _Call:
    sid: str
    to: str
    from_: str
    twiml: str
    status: str
    created: float
    callback_url: str | None
    events: frozenset[str]
    machine_detection: str | None
    price: str | None = None
    duration: int | None = None
    answered_by: str | None = None
    timers: list[asyncio.TimerHandle] = field(default_factory=list)

    def resource(self, account_sid: str, api_version: str) -> dict[str, Any]:
        return {
            "account_sid": account_sid,
            "answered_by": self.answered_by,
            "api_version": api_version,
            "direction": "outbound-api",
            "duration": str(self.duration) if self.duration is not None else None,
            "from": self.from_,
            "price": self.price,
            "price_unit": "USD",
            "sid": self.sid,
            "status": self.status,
            "to": self.to,
            "uri": f"/{api_version}/Accounts/{account_sid}/Calls/{self.sid}.json",
        }


class CallsEmulator:
    """The Calls resource of one Twilio emulator (shares its account, script, auth and signing key).

    Args:
        parent: The Twilio emulator whose application gets the routes.
        price_per_minute: USD charged per started minute of a completed call.
    """

    def __init__(self, parent: TwilioEmulator, *, price_per_minute: Decimal = Decimal("0.0140")) -> None:
        from otp_router.emulators.twilio import API_VERSION

        self._parent = parent
        self._api = API_VERSION
        self.price_per_minute = price_per_minute
        self.calls: dict[str, _Call] = {}
        self._heard: dict[str, list[str]] = {}
        self._session: aiohttp.ClientSession | None = None
        prefix = f"/{API_VERSION}/Accounts/{{account}}/Calls"
        parent.app.router.add_post(f"{prefix}.json", self._create)
        parent.app.router.add_get(f"{prefix}/{{sid}}.json", self._fetch)
        parent.app.on_cleanup.append(self._close)

    def heard(self, phone: str) -> list[str]:
        """What was read on the completed calls to ``phone``, oldest first."""
        return list(self._heard.get(phone, ()))

    async def _close(self, _app: web.Application) -> None:
        for call in self.calls.values():
            for timer in call.timers:
                timer.cancel()
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    def _error(self, status: int, code: int, message: str) -> web.Response:
        body = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}"}
        return web.json_response({**body, "status": status}, status=status)

    async def _create(self, request: web.Request) -> web.Response:
        from otp_router.emulators.twilio import _region_of

        parent = self._parent
        if not parent._authorized(request) or request.match_info["account"] != parent.account_sid:
            return self._error(401, 20003, "Authenticate")
        form = await request.post()
        to = str(form.get("To", ""))
        if _region_of(to) is None:
            return self._error(400, 21211, "Invalid 'To' Phone Number")
        from_ = str(form.get("From", ""))
        if not from_:
            return self._error(400, 21213, "Caller phone number is required")
        twiml = str(form.get("Twiml", ""))
        if not twiml and not form.get("Url"):
            return self._error(400, 21205, "Url or Twiml parameter is required")
        behaviour = parent.script.behaviour(to)
        call = _Call(
            sid="CA" + secrets.token_hex(16),
            to=to,
            from_=from_,
            twiml=twiml,
            status="queued",
            created=time.time(),
            callback_url=str(form.get("StatusCallback", "")) or None,
            events=frozenset(str(v) for v in form.getall("StatusCallbackEvent", [])),
            machine_detection=str(form.get("MachineDetection", "")) or None,
        )
        self.calls[call.sid] = call
        loop = asyncio.get_running_loop()
        delay = max(0.0, behaviour.voice_delay * parent.script.time_scale)
        call.timers.append(loop.call_later(delay / 2, self._advance, call, "ringing", behaviour))
        call.timers.append(loop.call_later(delay, self._advance, call, behaviour.voice_final, behaviour))
        return web.json_response(call.resource(parent.account_sid, self._api), status=201)

    async def _fetch(self, request: web.Request) -> web.Response:
        parent = self._parent
        if not parent._authorized(request) or request.match_info["account"] != parent.account_sid:
            return self._error(401, 20003, "Authenticate")
        call = self.calls.get(request.match_info["sid"])
        if call is None:
            return self._error(404, 20404, "The requested resource was not found")
        return web.json_response(call.resource(parent.account_sid, self._api))

    def _advance(self, call: _Call, status: str, behaviour: Behaviour) -> None:
        call.status = status
        event = "ringing" if status == "ringing" else "completed"
        if status == "completed":
            # The call was answered: it plays its TwiML to whoever (or whatever) picked up.
            call.duration = 12
            call.price = f"{-self.price_per_minute.quantize(Decimal('0.00001')):f}"
            if call.machine_detection:
                call.answered_by = "machine_end_beep" if behaviour.voice_machine else "human"
            texts = [html.unescape(text) for text in _SAY.findall(call.twiml)]
            self._heard.setdefault(call.to, []).append(" ".join(texts))
            if "answered" in call.events and call.callback_url:
                self._parent._spawn(self._post(call, "in-progress"))
        elif status != "ringing":
            call.duration = 0
            call.price = "0.00000"
        if call.callback_url and (event == "completed" or event in call.events):
            self._parent._spawn(self._post(call, status))

    async def _post(self, call: _Call, status: str) -> None:
        from otp_router.emulators.twilio import API_VERSION

        url = call.callback_url
        assert url is not None
        params = {
            "AccountSid": self._parent.account_sid,
            "ApiVersion": API_VERSION,
            "CallSid": call.sid,
            "CallStatus": status,
            "Direction": "outbound-api",
            "From": call.from_,
            "To": call.to,
        }
        if status in ("completed", "busy", "no-answer", "failed"):
            params["CallDuration"] = str(call.duration or 0)
        if call.answered_by:
            params["AnsweredBy"] = call.answered_by
        headers = {"X-Twilio-Signature": self._parent._validator.compute_signature(url, params)}
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=_CALLBACK_TIMEOUT)
        for _attempt in range(3):
            try:
                async with self._session.post(url, data=params, headers=headers) as response:
                    if response.status < 500:
                        return
            except (aiohttp.ClientError, TimeoutError, OSError):
                pass
            await asyncio.sleep(0.2 * self._parent.script.time_scale)
