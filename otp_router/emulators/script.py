"""Scripted behaviour per phone number, shared by both emulators.

An unscripted number is on Telegram, its Telegram message is delivered after
``default_delivery`` seconds (about one), and its SMS is delivered too.

A script can be given in Python, as a JSON file (``otp-router emulate --script
FILE``) or at run time with ``POST /_emulator/script`` on either emulator. The
JSON form is ``{"+15550001": {"telegram": "absent"}, ...}`` using the field
names of :class:`Behaviour`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from otp_router.inputs import decode_json

__all__ = ["Behaviour", "Script", "TelegramFault"]

TelegramMode = Literal["ok", "absent", "unavailable", "invalid"]
SmsFinal = Literal["delivered", "undelivered", "failed"]
VonageFinal = Literal["delivered", "failed", "expired", "rejected"]
CallFinal = Literal["completed", "busy", "no-answer", "failed"]
TelegramFault = Literal["5xx", "flood_wait", "error", "garbage", "reset", "hang"]

#: Largest script file read (a script of a million numbers is still well under it).
_SCRIPT_MAX_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Behaviour:
    """How the emulators treat one phone number.

    Attributes:
        telegram: ``ok``; ``absent`` (``PHONE_NUMBER_NOT_FOUND``: not on Telegram);
            ``unavailable`` (``PHONE_NUMBER_NOT_AVAILABLE``); ``invalid`` (``PHONE_NUMBER_INVALID``).
        telegram_delay: Seconds from send to ``delivered``; None: never delivered
            (``expired`` and refunded at ttl). None here means "use the default".
        telegram_never: True: never delivered, whatever the delay says.
        telegram_5xx: The first N Telegram calls for this number answer HTTP 502.
        telegram_flood_wait: The first ``telegram_flood_count`` calls answer ``FLOOD_WAIT_<N>``.
        telegram_flood_count: How many calls get the flood wait.
        telegram_error: An error string (e.g. ``"SOME_NEW_ERROR"``) the next
            ``telegram_error_count`` calls answer, HTTP 400, before taking effect.
        telegram_error_count: How many calls get ``telegram_error``.
        telegram_garbage: The next N calls answer HTTP 200 with a body that is not
            JSON, before taking effect (a broken proxy in front of the service).
        telegram_reset_after_write: The next N calls take effect, then the connection
            is dropped without an answer.
        telegram_hang: The next N calls take effect and are never answered (until the
            client gives up or the emulator stops).
        telegram_fault_method: Only calls of this method (e.g. ``"sendVerificationMessage"``)
            count towards and receive the faults above; None: every call.
        telegram_latency: Seconds every Telegram response for this number is held back.
        sms_invalid: Twilio refuses the number at create time (21211).
        sms_error: Twilio create error code to return instead (e.g. 21614, 21610, 21408).
        sms_final: Final SMS status.
        sms_error_code: ``ErrorCode`` reported with ``undelivered``/``failed`` (default 30003/30008).
        sms_delay: Seconds from create to the final status.
        sms_5xx: The first N Twilio creates for this number answer HTTP 503 (nothing created).
        sms_5xx_after_create: The first N creates that pass every check create the
            message (it is delivered) and then answer HTTP 503: the answer is lost.
        sms_429: The first N Twilio creates for this number answer HTTP 429 / 20429.
        sms_hang: After those, the next N creates create the message and are never answered.
        sms_latency: Seconds every Twilio response for this number is held back.
        sms_latency_after_create: Seconds a successful create is held back *after*
            the message was created (a client timeout then leaves it created).
        sms_list_5xx: The first N message-list requests filtered on this ``To`` answer HTTP 503.
        sms_list_lag: Seconds a new message takes to appear in message lists.
        vonage_status: Vonage answers every send for this number with this non-zero
            ``status`` (e.g. 7 "Number Barred", 9 "Partner Quota Violation").
        vonage_5xx: The first N Vonage sends for this number answer HTTP 500 (nothing sent).
        vonage_final: Final receipt status of a Vonage SMS.
        vonage_err_code: ``err-code`` of a receipt that is not ``delivered`` (default 1).
        vonage_delay: Seconds from send to the final receipt.
        whatsapp: The number has WhatsApp; False: a WhatsApp message to it fails with 63003.
        voice_final: Final status of a Twilio call to the number (``completed`` = answered).
        voice_delay: Seconds from the call's creation to its final status.
        voice_machine: An answering machine picks up (``AnsweredBy`` says so with detection on).

    Counted Telegram faults come in the order 5xx, flood wait, error, garbage,
    reset, hang: with ``telegram_5xx=1, telegram_hang=1`` the first call answers
    502 and the second hangs.
    """

    telegram: TelegramMode = "ok"
    telegram_delay: float | None = None
    telegram_never: bool = False
    telegram_5xx: int = 0
    telegram_flood_wait: int = 0
    telegram_flood_count: int = 1
    telegram_error: str | None = None
    telegram_error_count: int = 1
    telegram_garbage: int = 0
    telegram_reset_after_write: int = 0
    telegram_hang: int = 0
    telegram_fault_method: str | None = None
    telegram_latency: float = 0.0
    sms_invalid: bool = False
    sms_error: int | None = None
    sms_final: SmsFinal = "delivered"
    sms_error_code: int | None = None
    sms_delay: float = 0.5
    sms_5xx: int = 0
    sms_429: int = 0
    sms_hang: int = 0
    sms_latency: float = 0.0
    sms_5xx_after_create: int = 0
    sms_latency_after_create: float = 0.0
    sms_list_5xx: int = 0
    sms_list_lag: float = 0.0
    vonage_status: int | None = None
    vonage_5xx: int = 0
    vonage_final: VonageFinal = "delivered"
    vonage_err_code: int | None = None
    vonage_delay: float = 0.5
    whatsapp: bool = True
    voice_final: CallFinal = "completed"
    voice_delay: float = 0.5
    voice_machine: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Behaviour:
        """Build from JSON, refusing unknown fields so typos are not silently ignored."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown behaviour fields: {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)

    def _telegram_plan(self) -> tuple[tuple[TelegramFault, int], ...]:
        return (
            ("5xx", self.telegram_5xx),
            ("flood_wait", self.telegram_flood_count if self.telegram_flood_wait else 0),
            ("error", self.telegram_error_count if self.telegram_error else 0),
            ("garbage", self.telegram_garbage),
            ("reset", self.telegram_reset_after_write),
            ("hang", self.telegram_hang),
        )

    @property
    def telegram_faulty(self) -> bool:
        """Whether any counted Telegram fault is scripted."""
        return any(n > 0 for _, n in self._telegram_plan())

    def telegram_fault(self, index: int) -> TelegramFault | None:
        """The fault for the ``index``-th counted call (0-based), or None once they are used up."""
        for fault, count in self._telegram_plan():
            if index < count:
                return fault
            index -= max(0, count)
        return None


class Script:
    """Mutable mapping of E.164 number → :class:`Behaviour`, plus the defaults.

    Args:
        numbers: Initial behaviours.
        default_delivery: Telegram delivery delay for numbers with no delay set.
        time_scale: Multiplies every emulated delay and ttl (0.1 makes a 30 s ttl
            expire after 3 s) so tests and the demo need not wait real minutes.
    """

    def __init__(
        self,
        numbers: dict[str, Behaviour] | None = None,
        *,
        default_delivery: float = 1.0,
        time_scale: float = 1.0,
    ) -> None:
        self.numbers: dict[str, Behaviour] = dict(numbers or {})
        self.default_delivery = default_delivery
        self.time_scale = time_scale

    def behaviour(self, phone: str) -> Behaviour:
        """The behaviour for ``phone`` (default when unscripted)."""
        return self.numbers.get(phone) or Behaviour()

    def set(self, phone: str, **changes: Any) -> Behaviour:
        """Script one number, keeping its other fields."""
        new = replace(self.behaviour(phone), **changes)
        self.numbers[phone] = new
        return new

    def telegram_delay(self, phone: str) -> float | None:
        """Seconds (already scaled) until delivery, or None for never."""
        b = self.behaviour(phone)
        if b.telegram_never:
            return None
        delay = self.default_delivery if b.telegram_delay is None else b.telegram_delay
        return delay * self.time_scale

    def update_from_json(self, data: dict[str, Any]) -> None:
        """Merge ``{"+1555…": {field: value}}`` into the script."""
        if not isinstance(data, dict):
            raise ValueError("the script must be a JSON object")
        for phone, spec in data.items():
            if not isinstance(spec, dict):
                raise ValueError(f"behaviour for a number must be an object, got {type(spec).__name__}")
            self.numbers[phone] = Behaviour.from_dict(spec)

    @classmethod
    def from_file(cls, path: Path, **kwargs: Any) -> Script:
        """Load a JSON script file."""
        script = cls(**kwargs)
        # The strict decoder: a repeated number is an error (not "last one wins"), and
        # absurd nesting or bytes that are not UTF-8 are a ValueError, not a traceback.
        script.update_from_json(decode_json(path.read_bytes(), max_bytes=_SCRIPT_MAX_BYTES))
        return script
