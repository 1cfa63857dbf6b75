"""The Twilio status-callback receiver, shared by the SMS, WhatsApp and voice adapters.

All three report to one URL per verification, ``{public_url}/webhooks/twilio?vid={id}``:
message callbacks carry ``MessageSid``/``MessageStatus``, call callbacks
``CallSid``/``CallStatus`` (read by :func:`~otp_router.providers.twilio_sms.parse_status_callback`).
The signature (``X-Twilio-Signature``) covers the URL Twilio called, which
the web app rebuilds from the public URL, never from ``Host``; without a
public URL no callback can be checked and every one is refused.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

from otp_router.errors import InvalidSignature
from otp_router.providers.base import InboundReport, Receive, ReceivedReport, ReceiverSpec

if TYPE_CHECKING:
    from otp_router.config import Settings

__all__ = ["RECEIVER"]

#: More form fields than this cannot be a Twilio status callback.
_MAX_FORM_FIELDS = 200


class _FormParams(dict[str, str]):
    """Form fields for twilio's ``RequestValidator`` that keep every value of a repeated name.

    The validator asks for ``getlist`` and signs each distinct value of a
    repeated name; a plain dict would keep only one and reject a genuine callback.
    """

    def __init__(self, pairs: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        self._all: defaultdict[str, list[str]] = defaultdict(list)
        for name, value in pairs:
            self.setdefault(name, value)
            self._all[name].append(value)

    def getlist(self, name: str) -> list[str]:
        """Every value received for ``name``, in order."""
        return list(self._all.get(name, ()))

    @property
    def has_repeats(self) -> bool:
        """True when some name was received more than once."""
        return any(len(values) > 1 for values in self._all.values())


def _receiver(settings: Settings) -> Receive:
    """The status-callback checker for the Twilio account of ``settings``."""
    # Imported here: the adapters import this module to declare their receiver.
    from twilio.request_validator import RequestValidator

    from otp_router.providers.twilio_sms import parse_status_callback, verify_status_callback

    token = settings.twilio.auth_token.get_secret_value()

    def receive(inbound: InboundReport, now: float) -> ReceivedReport:
        if not token:
            raise InvalidSignature("OTP_ROUTER_TWILIO__AUTH_TOKEN is not set")
        if inbound.url is None:
            raise InvalidSignature("OTP_ROUTER_PUBLIC_URL is not set: cannot check Twilio signatures")
        try:
            pairs = parse_qsl(
                inbound.body.decode("utf-8"), keep_blank_values=True, max_num_fields=_MAX_FORM_FIELDS
            )
        except ValueError:  # includes UnicodeDecodeError
            raise InvalidSignature("twilio status callback body is not a form") from None
        params = _FormParams(pairs)
        signature = inbound.headers.get("x-twilio-signature", "")
        if params.has_repeats:
            # verify_status_callback takes a plain mapping; keep every repeated value.
            if not signature or not RequestValidator(token).validate(inbound.url, params, signature):
                raise InvalidSignature("twilio status callback signature does not match")
        else:
            verify_status_callback(token, inbound.url, dict(params), signature)
        report = parse_status_callback(params)
        return ReceivedReport(dict(parse_qsl(inbound.query)).get("vid"), report)

    return receive


#: Message (SMS, WhatsApp) and call status callbacks of the account.
RECEIVER = ReceiverSpec(
    provider="twilio",
    path="/webhooks/twilio",
    build=_receiver,
    operation_id="twilioStatusCallback",
    summary="Twilio status callback, signed with X-Twilio-Signature over the public URL.",
    bad_request="bad_request: signed, but no MessageSid/MessageStatus (or CallSid/CallStatus).",
    openapi_extra={
        "parameters": [
            {
                "name": "vid",
                "in": "query",
                "required": True,
                "description": "Verification id (part of the signed URL).",
                "schema": {"type": "string"},
            },
            {
                "name": "X-Twilio-Signature",
                "in": "header",
                "required": True,
                "description": "Base64 HMAC-SHA1 of the public URL and the sorted form.",
                "schema": {"type": "string"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {"application/x-www-form-urlencoded": {"schema": {"type": "object"}}},
        },
    },
)
