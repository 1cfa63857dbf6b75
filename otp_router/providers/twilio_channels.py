"""WhatsApp and voice calls through Twilio (official ``twilio`` SDK), beside Twilio SMS.

Both use the Twilio account of ``OTP_ROUTER_TWILIO__*`` (SID, token, base URL)
and the shared HTTP client, through the same SDK adapter as SMS.

**WhatsApp** (adapter ``twilio_whatsapp``): an approved authentication
template sent with the Content API fields of ``Messages.create``:
``ContentSid`` (``HX…``) and ``ContentVariables`` (JSON, the code under the
template's variable, ``"1"`` by default), ``To``/``From`` as
``whatsapp:+E164``. Status callbacks are the SMS ones (``sent``,
``delivered``, ``read``, ``failed``, ``undelivered``), so delivery is driven
exactly like SMS. A number without WhatsApp fails with error 63003 (in the
create answer or, usually, in the ``failed`` callback): the step falls back at
once. Sources: twilio.com/docs/content/send-templates-created-with-the-content-template-builder,
twilio.com/docs/api/errors/63003.

**Voice** (adapter ``twilio_voice``): ``Calls.create`` with inline ``Twiml``
that reads the code digit by digit, ``repeat`` times (default twice), with
``<Say language=…>`` chosen from the verification's locale where Twilio's
basic voices speak it (:func:`say_language`). Call statuses map to delivery
states (:func:`map_call_status`): ``completed`` is delivered (the call was
answered and the reading played), ``busy`` and ``no-answer`` undelivered,
``failed`` failed, ``canceled`` revoked. Answering machines: by default the
code is simply read twice (a machine that picks up records both readings);
``machine_detection = "DetectMessageEnd"`` makes Twilio start the reading
after the greeting's beep instead (billed extra). The call's price is read
from the call resource once it is final. Sources: twilio.com/docs/voice/api/call-resource,
twilio.com/docs/voice/twiml/say, twilio.com/docs/voice/answering-machine-detection.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import httpx
from twilio.rest import Client
from twilio.twiml.voice_response import VoiceResponse

from otp_router.config import (
    RetrySettings,
    Settings,
    TwilioSettings,
    TwilioVoiceSettings,
    TwilioWhatsAppSettings,
)
from otp_router.errors import ConfigError, ProviderResponseError, WebhookError
from otp_router.providers.base import (
    Capabilities,
    DeliveryState,
    ProbeResult,
    SendRequest,
    SendResult,
    StatusResult,
)
from otp_router.providers.twilio_receiver import RECEIVER
from otp_router.providers.twilio_sms import PROVIDER, HttpxTwilioClient, _call, _price, map_twilio_status
from otp_router.retry import CallKind, RetryHook, retrying

if TYPE_CHECKING:
    from otp_router.providers.registry import AdapterContext

__all__ = [
    "TwilioVoiceChannel",
    "TwilioWhatsAppChannel",
    "call_twiml",
    "map_call_status",
    "parse_call_callback",
    "say_language",
]

#: Languages Twilio's basic ``man``/``woman`` voices speak (twilio.com/docs/voice/twiml/say);
#: other voices (Polly, Google) speak more: set ``voice`` and extend ``languages`` to use them.
SAY_LANGUAGES = (
    "ca-ES", "da-DK", "de-DE", "en-AU", "en-CA", "en-GB", "en-IN", "en-US", "es-ES", "es-MX", "fi-FI",
    "fr-CA", "fr-FR", "it-IT", "ja-JP", "ko-KR", "nb-NO", "nl-NL", "pl-PL", "pt-BR", "pt-PT", "ru-RU",
    "sv-SE", "zh-CN", "zh-HK", "zh-TW",
)  # fmt: skip
#: "Your code is" in the languages we wrote it for; others hear the digits only.
_INTRO = {
    "en": "Your code is",
    "fr": "Votre code est",
    "de": "Ihr Code lautet",
    "es": "Su código es",
    "pt": "O seu código é",
    "it": "Il tuo codice è",
    "nl": "Uw code is",
}
_CALL_STATES: dict[str, DeliveryState] = {
    "queued": DeliveryState.PENDING,
    "initiated": DeliveryState.PENDING,
    "ringing": DeliveryState.PENDING,
    "in-progress": DeliveryState.SENT,  # answered, the reading is playing
    "completed": DeliveryState.DELIVERED,
    "busy": DeliveryState.UNDELIVERED,
    "no-answer": DeliveryState.UNDELIVERED,
    "failed": DeliveryState.FAILED,
    "canceled": DeliveryState.REVOKED,
}
_LOCALE = re.compile(r"([A-Za-z]{2,3})(?:[-_]([A-Za-z]{2}))?")


def map_call_status(status: str | None) -> DeliveryState:
    """A Twilio ``CallStatus`` as our :class:`DeliveryState` (unknown values: ``UNKNOWN``)."""
    return _CALL_STATES.get((status or "").lower(), DeliveryState.UNKNOWN)


def say_language(locale: str | None, languages: tuple[str, ...], default: str) -> str:
    """The ``<Say>`` language for a verification's locale.

    The exact locale when spoken (``en-GB``); else, for the same language, the
    default if it is one (``en`` → ``en-US``), the language's own country
    (``fr`` → ``fr-FR``) or the first listed; else ``default``.
    """
    match = _LOCALE.fullmatch(locale or "")
    if match is None:
        return default
    lang = match.group(1).lower()
    region = (match.group(2) or "").upper()
    if region and f"{lang}-{region}" in languages:
        return f"{lang}-{region}"
    same = [candidate for candidate in languages if candidate.split("-")[0] == lang]
    for preferred in (default, f"{lang}-{lang.upper()}"):
        if preferred in same:
            return preferred
    return same[0] if same else default


def call_twiml(code: str, language: str, *, repeat: int, voice: str | None = None) -> str:
    """TwiML that reads ``code`` digit by digit, ``repeat`` times, with a pause between readings."""
    response = VoiceResponse()
    intro = _INTRO.get(language.split("-")[0], "")
    # Commas make the text-to-speech read each digit on its own, never "one hundred twenty-three".
    digits = ", ".join(code)
    for _ in range(repeat):
        response.pause(length=1)
        text = f"{intro}: {digits}." if intro else f"{digits}."
        if voice:
            response.say(text, language=language, voice=voice)
        else:
            response.say(text, language=language)
    return str(response)


def parse_call_callback(form: Mapping[str, str]) -> StatusResult:
    """A call status callback (``CallSid``, ``CallStatus``, ``AnsweredBy``…) as a status report.

    Raises:
        WebhookError: No ``CallSid`` or ``CallStatus``.
    """
    sid = form.get("CallSid")
    status = form.get("CallStatus")
    if not sid or not status:
        raise WebhookError("twilio call status callback has no CallSid or CallStatus")
    return StatusResult(ref=sid, state=map_call_status(status), raw_status=status)


def _twilio_client(settings: TwilioSettings, client: httpx.AsyncClient) -> tuple[Client, HttpxTwilioClient]:
    """The SDK client over the shared HTTP client, hermetic like the SMS adapter's."""
    token = settings.auth_token.get_secret_value()
    if not settings.account_sid or not token:
        raise ConfigError("OTP_ROUTER_TWILIO__ACCOUNT_SID and OTP_ROUTER_TWILIO__AUTH_TOKEN must be set")
    http = HttpxTwilioClient(client, timeout=settings.timeout)
    sdk = Client(
        settings.account_sid,
        token,
        account_sid=settings.account_sid,
        http_client=http,
        environment={"OTP_ROUTER_HERMETIC": "1"},
    )
    sdk.edge = None
    sdk.region = None
    sdk.api.base_url = settings.base_url
    return sdk, http


class TwilioWhatsAppChannel:
    """WhatsApp authentication templates through Twilio (a :class:`~otp_router.providers.base.Channel`).

    Args:
        twilio: Account credentials and base URL.
        settings: Sender and template.
        retry: Retry limits (sends retry only when nothing can have been sent).
        client: The shared HTTP client (not closed by :meth:`aclose`).
        on_retry: Called before each retry.

    Raises:
        ConfigError: Missing credentials, sender or template.
    """

    name = "whatsapp"
    provider = PROVIDER
    capabilities = Capabilities(probe=False, ttl_min=1, ttl_max=36000, timeout_maybe_sent=True, lookup=False)
    methods = MappingProxyType({"send": "messages.create", "status": "messages.fetch"})
    report_receiver = RECEIVER

    def __init__(
        self,
        twilio: TwilioSettings,
        settings: TwilioWhatsAppSettings,
        retry: RetrySettings,
        client: httpx.AsyncClient,
        *,
        on_retry: RetryHook | None = None,
    ) -> None:
        if not settings.content_sid:
            raise ConfigError("OTP_ROUTER_TWILIO_WHATSAPP__CONTENT_SID must name an approved template (HX…)")
        if not settings.from_number and not settings.messaging_service_sid:
            raise ConfigError(
                "OTP_ROUTER_TWILIO_WHATSAPP__FROM_NUMBER or __MESSAGING_SERVICE_SID must be set for WhatsApp"
            )
        self._settings = settings
        self._retry = retry
        self._on_retry = on_retry
        self.client, self.http = _twilio_client(twilio, client)

    @classmethod
    def from_settings(cls, settings: Settings, context: AdapterContext) -> TwilioWhatsAppChannel | None:
        """The adapter for ``settings.twilio_whatsapp``, or None when it is disabled."""
        if not settings.twilio_whatsapp.enabled:
            return None
        return cls(
            settings.twilio,
            settings.twilio_whatsapp,
            settings.retry,
            context.client,
            on_retry=context.on_retry(PROVIDER),
        )

    @staticmethod
    def callback_url(base: str, payload: str) -> str:
        """Status callbacks are the SMS ones: the same receiver."""
        return f"{base}/webhooks/twilio?vid={payload}"

    async def probe(self, phone: str) -> ProbeResult:
        """No reachability check (a number without WhatsApp fails with 63003 instead)."""
        return ProbeResult(reachable=True)

    async def send(self, request: SendRequest) -> SendResult:
        """Send the template with the code as its variable.

        Raises:
            InvalidRecipient: Twilio refuses the number at create time.
            ProviderRejected: Account, sender or template problem.
            ProviderTransientError: Retries exhausted, or an outcome that may have sent.
        """
        kwargs: dict[str, Any] = {
            "to": f"whatsapp:{request.phone}",
            "content_sid": self._settings.content_sid,
            "content_variables": json.dumps({self._settings.code_variable: request.code}),
        }
        if self._settings.from_number:
            kwargs["from_"] = f"whatsapp:{self._settings.from_number}"
        if self._settings.messaging_service_sid:
            kwargs["messaging_service_sid"] = self._settings.messaging_service_sid
        if request.callback_url:
            kwargs["status_callback"] = request.callback_url
        async for attempt in retrying(self._retry, CallKind.SEND, on_retry=self._on_retry):
            with attempt:
                message = await _call(lambda: self.client.messages.create_async(**kwargs))
                sid = getattr(message, "sid", None)
                if not isinstance(sid, str) or not sid:
                    raise ProviderResponseError(
                        "twilio accepted the message but returned no sid",
                        provider=PROVIDER,
                        not_performed=False,
                    )
                return SendResult(ref=sid, state=map_twilio_status(message.status))
        raise AssertionError("unreachable: retrying() re-raises the last error")  # pragma: no cover

    async def status(self, ref: str) -> StatusResult:
        """Fetch the message (a read: retried on any transient error)."""
        async for attempt in retrying(self._retry, CallKind.READ, on_retry=self._on_retry):
            with attempt:
                message = await _call(lambda: self.client.messages(ref).fetch_async())
                state = map_twilio_status(message.status)
                cost = _price(message.price)
                error_code = message.error_code
                return StatusResult(
                    ref=ref,
                    state=state,
                    cost=cost,
                    cost_is_final=(state.is_delivered or state.is_failed) and cost is not None,
                    error_code=str(error_code) if error_code is not None else None,
                    raw_status=message.status,
                )
        raise AssertionError("unreachable: retrying() re-raises the last error")  # pragma: no cover

    async def revoke(self, ref: str) -> bool:
        """A sent WhatsApp message cannot be withdrawn."""
        return False

    async def report_code(self, ref: str, code: str) -> None:
        """Nothing to report."""

    async def aclose(self) -> None:
        """Nothing to release (the HTTP client is shared)."""


class TwilioVoiceChannel:
    """A phone call that reads the code, through Twilio (a :class:`~otp_router.providers.base.Channel`).

    Args:
        twilio: Account credentials and base URL.
        settings: Caller id, languages, repetitions, ring time, machine detection.
        retry: Retry limits.
        client: The shared HTTP client (not closed by :meth:`aclose`).
        on_retry: Called before each retry.

    Raises:
        ConfigError: Missing credentials or caller id.
    """

    name = "voice"
    provider = PROVIDER
    capabilities = Capabilities(probe=False, ttl_min=1, ttl_max=36000, timeout_maybe_sent=True, lookup=False)
    methods = MappingProxyType({"send": "calls.create", "status": "calls.fetch"})
    report_receiver = RECEIVER

    def __init__(
        self,
        twilio: TwilioSettings,
        settings: TwilioVoiceSettings,
        retry: RetrySettings,
        client: httpx.AsyncClient,
        *,
        on_retry: RetryHook | None = None,
    ) -> None:
        if not settings.from_number:
            raise ConfigError("OTP_ROUTER_TWILIO_VOICE__FROM_NUMBER must be set for voice calls")
        self._settings = settings
        self._retry = retry
        self._on_retry = on_retry
        self.client, self.http = _twilio_client(twilio, client)

    @classmethod
    def from_settings(cls, settings: Settings, context: AdapterContext) -> TwilioVoiceChannel | None:
        """The adapter for ``settings.twilio_voice``, or None when it is disabled."""
        if not settings.twilio_voice.enabled:
            return None
        return cls(
            settings.twilio,
            settings.twilio_voice,
            settings.retry,
            context.client,
            on_retry=context.on_retry(PROVIDER),
        )

    @staticmethod
    def callback_url(base: str, payload: str) -> str:
        """Call status callbacks go to the Twilio receiver, which reads ``CallSid``/``CallStatus`` too."""
        return f"{base}/webhooks/twilio?vid={payload}"

    async def probe(self, phone: str) -> ProbeResult:
        """No reachability check: any phone can be called."""
        return ProbeResult(reachable=True)

    async def send(self, request: SendRequest) -> SendResult:
        """Place the call.

        Raises:
            InvalidRecipient: Twilio refuses the number.
            ProviderRejected: Account or caller-id problem.
            ProviderTransientError: Retries exhausted, or an outcome that may have called.
        """
        settings = self._settings
        language = say_language(request.locale, settings.languages, settings.default_language)
        kwargs: dict[str, Any] = {
            "to": request.phone,
            "from_": settings.from_number,
            "twiml": call_twiml(request.code, language, repeat=settings.repeat, voice=settings.voice),
            "timeout": settings.ring_timeout,
        }
        if settings.machine_detection:
            kwargs["machine_detection"] = settings.machine_detection
        if request.callback_url:
            kwargs["status_callback"] = request.callback_url
            # The final event carries completed, busy, no-answer, failed or canceled.
            kwargs["status_callback_event"] = ["answered", "completed"]
        async for attempt in retrying(self._retry, CallKind.SEND, on_retry=self._on_retry):
            with attempt:
                call = await _call(lambda: self.client.calls.create_async(**kwargs))
                sid = getattr(call, "sid", None)
                if not isinstance(sid, str) or not sid:
                    raise ProviderResponseError(
                        "twilio accepted the call but returned no sid", provider=PROVIDER, not_performed=False
                    )
                return SendResult(ref=sid, state=map_call_status(call.status))
        raise AssertionError("unreachable: retrying() re-raises the last error")  # pragma: no cover

    async def status(self, ref: str) -> StatusResult:
        """Fetch the call: its status, and its price once final."""
        async for attempt in retrying(self._retry, CallKind.READ, on_retry=self._on_retry):
            with attempt:
                call = await _call(lambda: self.client.calls(ref).fetch_async())
                state = map_call_status(call.status)
                cost = _price(call.price)
                return StatusResult(
                    ref=ref,
                    state=state,
                    cost=cost,
                    cost_is_final=(state.is_delivered or state.is_failed) and cost is not None,
                    raw_status=call.status,
                    currency=(call.price_unit or "USD").upper(),
                )
        raise AssertionError("unreachable: retrying() re-raises the last error")  # pragma: no cover

    async def revoke(self, ref: str) -> bool:
        """Not done: a call already ringing is better left to finish."""
        return False

    async def report_code(self, ref: str, code: str) -> None:
        """Nothing to report."""

    async def aclose(self) -> None:
        """Nothing to release (the HTTP client is shared)."""
