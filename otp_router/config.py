"""Settings, read from ``OTP_ROUTER_*`` environment variables and ``.env``.

Nested settings use ``__``: ``OTP_ROUTER_TELEGRAM__TOKEN`` sets
``Settings().telegram.token``. Secrets are :class:`pydantic.SecretStr`, so
they print as ``**********`` in reprs and logs.

Reading the environment happens only when :meth:`Settings.load` (or
``Settings()``) is called, never at import time.

Every value is checked before anything uses it: numbers must be finite
(``inf`` and ``nan`` are refused, so a duration can never be endless) and at
most a year of seconds, text
must be valid UTF-8 without control characters (a byte that is not UTF-8 in
the environment would otherwise surface in an HTTP header or a form at the
first send), URLs must parse and have a scheme and a host. :meth:`Settings.load`
reports every problem at once, on one line naming each variable; with
``require_providers=True`` missing provider credentials are among them.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict, SettingsError

from otp_router.errors import ConfigError
from otp_router.inputs import is_text
from otp_router.phone import NUMBER_TYPES
from otp_router.providers.base import route_name
from otp_router.providers.registry import DEFAULT_ROUTES

__all__ = [
    "CircuitSettings",
    "FraudSettings",
    "HttpSettings",
    "LimitSettings",
    "RetrySettings",
    "Settings",
    "SmsLookupSettings",
    "TelegramSettings",
    "TwilioSettings",
    "TwilioVoiceSettings",
    "TwilioWhatsAppSettings",
    "VonageSettings",
]

ENV_PREFIX = "OTP_ROUTER_"
TELEGRAM_BASE_URL = "https://gatewayapi.telegram.org"
TWILIO_BASE_URL = "https://api.twilio.com"
VONAGE_BASE_URL = "https://rest.nexmo.com"


#: Settings whose text may hold line breaks and tabs (an SMS body can have several lines).
_MULTILINE = frozenset({"message_template"})


#: Largest number any setting accepts: a year, in seconds. Every float setting is a
#: duration (or a fraction); a larger one is a typo, and one near the float limit
#: would overflow in the timer and socket calls it ends up in.
_MAX_SECONDS = 366 * 86400.0


def _checked(value: Any, info: ValidationInfo) -> Any:
    """Every setting: numbers at most a year; text valid UTF-8 (no lone surrogate)
    and without control characters."""
    if isinstance(value, float) and value > _MAX_SECONDS:
        raise ValueError(f"must be at most {_MAX_SECONDS:.0f} (a year of seconds)")
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if isinstance(text, str):
        if info.field_name in _MULTILINE:
            text = text.replace("\n", "").replace("\r", "").replace("\t", "")
        if not is_text(text):
            # Never repeat the value: it may be a secret.
            raise ValueError("must be valid UTF-8 text without control characters")
    return value


def _url(value: str, schemes: tuple[str, ...], *, host: bool = True) -> str:
    """Check that ``value`` parses as a URL with one of ``schemes`` (and a host)."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError:
        raise ValueError("is not a valid URL") from None
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"must start with {' or '.join(s + '://' for s in schemes)}")
    if host and not parts.hostname:
        raise ValueError("has no host")
    return value


def _with_code(value: str) -> str:
    """A message template must have a ``{code}`` for the code."""
    if "{code}" not in value:
        raise ValueError("must contain {code}")
    return value


def _http_url(value: str) -> str:
    return _url(value, ("http", "https")).rstrip("/")


class _Section(BaseModel):
    """Base of the nested settings: finite numbers, printable text (see the module docs)."""

    model_config = ConfigDict(allow_inf_nan=False)

    _checked = field_validator("*")(_checked)


class TelegramSettings(_Section):
    """Telegram Gateway API access."""

    token: SecretStr = SecretStr("")
    base_url: str = TELEGRAM_BASE_URL
    sender_username: str | None = None
    #: Delivery reports older or newer than this many seconds are refused (replay protection).
    callback_max_age: float = Field(default=300.0, gt=0)
    timeout: float = Field(default=10.0, gt=0)
    enabled: bool = True

    _norm = field_validator("base_url")(_http_url)


class TwilioSettings(_Section):
    """Twilio Programmable Messaging access."""

    account_sid: str = ""
    auth_token: SecretStr = SecretStr("")
    from_number: str | None = None
    messaging_service_sid: str | None = None
    base_url: str = TWILIO_BASE_URL
    timeout: float = Field(default=10.0, gt=0)
    #: ``{code}`` is replaced with the code. Keep it short: one GSM-7 segment.
    message_template: str = "Your login code is {code}"
    enabled: bool = True
    #: Message lookups (after an ambiguous send) accept messages created this many seconds
    #: before the send began: clock skew between us and Twilio, and Twilio's whole-second dates.
    lookup_skew: float = Field(default=2.0, ge=0, le=300)
    #: ``PageSize`` of the message list read by a lookup (Twilio allows 1..1000).
    lookup_page_size: int = Field(default=50, ge=1, le=1000)
    #: Pages a lookup reads at most; a longer list leaves the answer unknown.
    lookup_max_pages: int = Field(default=3, ge=1, le=20)
    #: Also filter the list with ``DateSent>=`` (the day of the send). Off by default: Twilio's
    #: ``date_sent`` is empty until the message leaves, and whether such messages match the
    #: filter is not documented (see docs/providers.md).
    lookup_date_filter: bool = False

    _norm = field_validator("base_url")(_http_url)

    _template = field_validator("message_template")(_with_code)


class TwilioWhatsAppSettings(_Section):
    """WhatsApp through Twilio (credentials from ``OTP_ROUTER_TWILIO__*``); off unless enabled."""

    enabled: bool = False
    #: WhatsApp sender in E.164 (sent as ``whatsapp:+…``), or a Messaging Service below.
    from_number: str = ""
    messaging_service_sid: str | None = None
    #: Content SID (``HX…``) of the approved authentication template that carries the code.
    content_sid: str = ""
    #: The template's variable that receives the code.
    code_variable: str = "1"


class TwilioVoiceSettings(_Section):
    """Voice calls that read the code, through Twilio (credentials from ``OTP_ROUTER_TWILIO__*``)."""

    enabled: bool = False
    #: Caller id: a Twilio number in E.164.
    from_number: str = ""
    #: ``<Say>`` language when the verification's locale is not spoken (or not given).
    default_language: str = "en-US"
    #: Languages the chosen voice speaks (default: Twilio's basic voices, see docs/providers.md).
    languages: tuple[str, ...] = (
        "ca-ES", "da-DK", "de-DE", "en-AU", "en-CA", "en-GB", "en-IN", "en-US", "es-ES", "es-MX", "fi-FI",
        "fr-CA", "fr-FR", "it-IT", "ja-JP", "ko-KR", "nb-NO", "nl-NL", "pl-PL", "pt-BR", "pt-PT", "ru-RU",
        "sv-SE", "zh-CN", "zh-HK", "zh-TW",
    )  # fmt: skip
    #: ``<Say voice=…>`` (e.g. ``Polly.Amy``); unset: Twilio's default voice.
    voice: str | None = None
    #: How many times the code is read (a machine that answers records every reading).
    repeat: int = Field(default=2, ge=1, le=5)
    #: Seconds the phone rings before ``no-answer`` (Twilio's ``Timeout``).
    ring_timeout: int = Field(default=30, ge=5, le=600)
    #: Twilio answering machine detection: ``""`` (off), ``Enable`` or ``DetectMessageEnd``
    #: (read the code after the greeting's beep; billed extra).
    machine_detection: str = ""

    @field_validator("machine_detection")
    @classmethod
    def _known_detection(cls, value: str) -> str:
        if value not in ("", "Enable", "DetectMessageEnd"):
            raise ValueError("must be empty, Enable or DetectMessageEnd")
        return value


class VonageSettings(_Section):
    """Vonage SMS API access (a second SMS carrier; off unless enabled and routed to).

    Bind it to a route with ``OTP_ROUTER_ROUTES`` (e.g. ``"sms_backup": "vonage_sms"``).
    """

    enabled: bool = False
    api_key: str = ""
    api_secret: SecretStr = SecretStr("")
    #: Signature secret: checks signed delivery receipts (and signs sends when set).
    signature_secret: SecretStr = SecretStr("")
    #: HMAC digest the account's signatures use (the dashboard setting; see docs/providers.md).
    signature_method: str = "sha256"
    #: Sender: a number in E.164 without the ``+``, or an alphanumeric sender id.
    from_number: str = ""
    base_url: str = VONAGE_BASE_URL
    #: Whole seconds per request (the SDK takes an integer).
    timeout: int = Field(default=10, ge=1, le=300)
    message_template: str = "Your login code is {code}"
    #: Vonage reports prices in the account's currency (UNCONFIRMED which one): multiply by this
    #: to book USD.
    price_to_usd: float = Field(default=1.0, gt=0)
    #: Seconds a signed delivery receipt's ``timestamp`` may be off our clock (replay).
    callback_max_age: float = Field(default=300.0, gt=0)

    _norm = field_validator("base_url")(_http_url)

    _template = field_validator("message_template")(_with_code)

    @field_validator("signature_method")
    @classmethod
    def _known_method(cls, value: str) -> str:
        if value not in ("md5", "sha1", "sha256", "sha512"):
            raise ValueError("must be md5, sha1, sha256 or sha512 (HMAC digests)")
        return value


class SmsLookupSettings(_Section):
    """Resolving an ambiguous SMS send by looking the message up (see ``otp_router.core``)."""

    #: Seconds after the send began at which to look the message up; empty turns lookups off.
    #: In the environment: ``OTP_ROUTER_SMS_LOOKUP__DELAYS=2,10,30``.
    delays: Annotated[tuple[float, ...], NoDecode] = (2.0, 10.0, 30.0)
    #: A lookup that lists nothing proves "never created" only this many seconds after the send
    #: began (the provider's list may lag behind a create).
    grace: float = Field(default=30.0, ge=0, le=3600)

    @field_validator("delays", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("delays")
    @classmethod
    def _sane(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        if len(value) > 10:
            raise ValueError("at most 10 lookups")
        if any(not math.isfinite(v) or v < 0 or v > 3600 for v in value):
            raise ValueError("each delay must be a number of seconds in 0..3600")
        if list(value) != sorted(value):
            raise ValueError("delays must be in increasing order")
        return value


class RetrySettings(_Section):
    """Bounded retry policy for provider calls (see ``otp_router.retry``)."""

    attempts: int = Field(default=4, ge=1, le=10)
    #: Total time budget across all attempts of one call, in seconds.
    timeout: float = Field(default=20.0, gt=0)
    initial_backoff: float = Field(default=0.2, ge=0)
    max_backoff: float = Field(default=5.0, ge=0)
    jitter: float = Field(default=0.5, ge=0)
    #: False turns exponential backoff off (tests). A provider's Retry-After/FLOOD_WAIT still applies.
    backoff: bool = True
    #: A provider asking us to wait longer than this is treated as a failure (fall back) instead.
    max_retry_after: float = Field(default=10.0, ge=0)


class LimitSettings(_Section):
    """Abuse limits on ``start()``. A value of 0 disables that limit."""

    per_phone: int = Field(default=5, ge=0)
    per_phone_window: float = Field(default=3600.0, gt=0)
    #: Starts per number prefix (``FraudSettings.prefix_digits`` digits after the calling code).
    per_prefix: int = Field(default=100, ge=0)
    per_prefix_window: float = Field(default=600.0, gt=0)
    per_country: int = Field(default=1000, ge=0)
    per_country_window: float = Field(default=60.0, gt=0)


#: Number types sent to when a channel has no entry in ``FraudSettings.allowed_number_types``.
DEFAULT_NUMBER_TYPES: tuple[str, ...] = ("mobile", "fixed_line_or_mobile")


def _default_allowed_types() -> dict[str, tuple[str, ...]]:
    return {"telegram": DEFAULT_NUMBER_TYPES, "sms": DEFAULT_NUMBER_TYPES}


class FraudSettings(_Section):
    """Toll-fraud and SMS-pumping defences on ``start()`` (see the README).

    The conversion guard counts, per number prefix and per country, the
    verifications started and verified over ``conversion_window`` seconds.
    Once at least ``prefix_min_started`` (``country_min_started``) were started
    and the verifications number fewer than ``min_conversion`` times the starts
    older than ``conversion_grace`` seconds, new starts for that prefix
    (country) are refused for ``block_cooldown`` seconds. A 0 disables.

    The grace keeps a burst of real users in a new prefix from being judged
    before any of them could have typed a code: starts younger than it are
    not yet evidence (verifications count whenever they come). A pumping
    attack still gets no more than the grace's worth of starts, because its
    first starts come of age with no verification behind them.
    """

    #: Number types (``phonenumbers`` names, any case) each channel may send to, e.g.
    #: ``{"sms": ["mobile", "fixed_line_or_mobile"]}``. A channel left out gets mobile and
    #: fixed_line_or_mobile.
    allowed_number_types: dict[str, tuple[str, ...]] = Field(default_factory=_default_allowed_types)
    #: Digits of the national number, after the calling code, that make a prefix.
    prefix_digits: int = Field(default=5, ge=1, le=6)
    conversion_window: float = Field(default=3600.0, gt=0)
    prefix_min_started: int = Field(default=30, ge=0)
    country_min_started: int = Field(default=300, ge=0)
    #: Verified ÷ started below this blocks the prefix or country (0 turns the guard off).
    min_conversion: float = Field(default=0.2, ge=0, le=1)
    block_cooldown: float = Field(default=3600.0, gt=0)
    #: Seconds a start must be old before its (lack of) verification is judged: most users
    #: who verify do so within a minute or two. Shorter than ``conversion_window``; 0: judge at once.
    conversion_grace: float = Field(default=120.0, ge=0)

    @field_validator("conversion_grace")
    @classmethod
    def _grace_inside_window(cls, value: float, info: ValidationInfo) -> float:
        window = info.data.get("conversion_window")
        if isinstance(window, float) and value >= window:
            raise ValueError("must be shorter than conversion_window")
        return value

    @field_validator("allowed_number_types")
    @classmethod
    def _known_types(cls, value: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
        out: dict[str, tuple[str, ...]] = {}
        for channel, types in value.items():
            # Routes are open names: any well-formed one (a route not configured is never used).
            route_name(channel.strip().lower())
            names = tuple(dict.fromkeys(t.strip().lower() for t in types))
            unknown = sorted(set(names) - NUMBER_TYPES)
            if unknown:
                raise ValueError(
                    f"{channel}: unknown number type(s) {unknown}; known: {', '.join(sorted(NUMBER_TYPES))}"
                )
            out[channel.strip().lower()] = names
        return out

    def number_types_for(self, channel: str) -> tuple[str, ...]:
        """The number types ``channel`` may send to."""
        return self.allowed_number_types.get(channel, DEFAULT_NUMBER_TYPES)


class CircuitSettings(_Section):
    """Per-channel circuit breaker (see ``otp_router.circuit``).

    Counted as failures: 5xx answers, timeouts, refused or dropped
    connections and unreadable answers. Not counted: 4xx answers (refusals,
    invalid numbers, rate limits), which prove the provider is up.
    """

    failures: int = Field(default=5, ge=1)
    cooldown: float = Field(default=30.0, gt=0)
    #: Seconds a step with no other channel to go to waits, in all, for an open circuit
    #: to let it through (never past the code's expiry). 0: do not wait, end the step at once.
    max_wait: float = Field(default=600.0, ge=0)


class HttpSettings(_Section):
    """The shared outgoing HTTP client."""

    max_connections: int = Field(default=100, ge=1)
    connect_timeout: float = Field(default=5.0, gt=0)


class Settings(BaseSettings):
    """All of otp-router's settings.

    Use :meth:`load` in applications: it turns a validation failure into a
    :class:`~otp_router.errors.ConfigError` that names the environment variable.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        allow_inf_nan=False,
    )

    #: Route name -> adapter (a built-in or registered name, or ``"package.module:Class"``), e.g.
    #: ``{"telegram": "telegram", "sms": "twilio_sms", "push": "myapp.push:PushChannel"}``. A route
    #: whose adapter's section is disabled is left out. See ``otp_router.providers.registry``.
    routes: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ROUTES))
    telegram: TelegramSettings = TelegramSettings()
    twilio: TwilioSettings = TwilioSettings()
    vonage: VonageSettings = VonageSettings()
    twilio_whatsapp: TwilioWhatsAppSettings = TwilioWhatsAppSettings()
    twilio_voice: TwilioVoiceSettings = TwilioVoiceSettings()
    retry: RetrySettings = RetrySettings()
    limits: LimitSettings = LimitSettings()
    fraud: FraudSettings = FraudSettings()
    http: HttpSettings = HttpSettings()
    circuit: CircuitSettings = CircuitSettings()
    sms_lookup: SmsLookupSettings = SmsLookupSettings()

    #: ``memory://``, ``sqlite:///path/to/file.db`` or ``redis://host:port/db``.
    store_url: str = "sqlite:///otp-router.db"
    #: ``redis://…`` (Redis Streams) or ``sqlite:///…`` (embedded). Defaults to the store's backend.
    queue_url: str | None = None
    #: Public base URL of the webhook endpoints; without it delivery is polled at deadlines.
    public_url: str | None = None
    #: HMAC key for code digests. Unset: a random one is created once and kept in the store.
    code_secret: SecretStr | None = None
    code_length: int = Field(default=6, ge=4, le=8)
    #: Seconds a code stays valid.
    code_ttl: float = Field(default=600.0, ge=30)
    max_attempts: int = Field(default=5, ge=1, le=20)
    #: Seconds after a verification ends (or leaves a channel) before asking the provider for the
    #: final cost (refund, SMS price); doubled on each of up to 5 tries.
    settle_delay: float = Field(default=15.0, gt=0)
    #: Seconds between reloads of the shared delivery-latency estimate behind
    #: ``deliver_within = "auto"`` (one store read per process per interval).
    latency_refresh: float = Field(default=60.0, gt=0)
    #: TOML routing policy; unset means the built-in default (telegram with a deadline learned
    #: between 3 and 30 s, then sms).
    policy_file: Path | None = None
    #: Per-country SMS price table (TOML), laid over the packaged ``otp_router/data/sms-prices.toml``.
    prices_file: Path | None = None
    #: Bearer token for the HTTP verification API. Unset: the API is disabled.
    api_token: SecretStr | None = None
    http_host: str = "127.0.0.1"
    http_port: int = Field(default=8080, ge=0, le=65535)
    #: Bearer token ``/metrics`` and ``/healthz`` want (``Authorization: Bearer …``). Unset: open.
    ops_token: SecretStr | None = None
    #: Serve ``/metrics`` and ``/healthz`` on this port only (not on ``http_port``). Unset: on ``http_port``.
    ops_port: int | None = Field(default=None, ge=0, le=65535)
    #: Address of the ``ops_port`` listener. Unset: ``http_host``.
    ops_host: str | None = None
    #: Worker: messages processed concurrently.
    concurrency: int = Field(default=50, ge=1)
    #: Worker: seconds SIGTERM waits for in-flight work.
    shutdown_grace: float = Field(default=20.0, ge=0)
    #: Worker: seconds a read queue message may stay unacknowledged before another worker reclaims it.
    queue_visibility_timeout: float = Field(default=30.0, gt=0)
    #: Worker: deliveries of one queue message before it is dead-lettered (``too_many_deliveries``).
    queue_max_deliveries: int = Field(default=10, ge=1)
    #: Longest one provider call made by deadline or webhook follow-up work (status and settle
    #: polls, fallback sends) may take before the router stops waiting for it: a hanging provider
    #: then delays that one verification this long, never the others. At most 25 s, so a send and
    #: its same-id repeat both end inside the 60 s I/O lease.
    deadline_call_timeout: float = Field(default=15.0, gt=0, le=25)
    #: Most deadlines (fallbacks, expiries, settle polls) and delivery-report follow-ups
    #: handled at once by one process.
    deadline_concurrency: int = Field(default=100, ge=1)
    log_level: str = "INFO"
    #: ``text`` (``time level logger event=… key=value``), ``json`` (one object per line) or
    #: ``logfmt``: one event name and its fields per line (see ``otp_router.logs``).
    log_format: str = "text"

    _checked = field_validator("*")(_checked)

    @field_validator("routes")
    @classmethod
    def _route_names(cls, value: dict[str, str]) -> dict[str, str]:
        return {route_name(route): adapter for route, adapter in value.items()}

    @field_validator("fraud")
    @classmethod
    def _fraud_routes(cls, value: FraudSettings, info: ValidationInfo) -> FraudSettings:
        # A misspelt route must not silently leave a channel on its defaults. The
        # default routes are always known (their entries are the defaults).
        routes = {*info.data.get("routes", {}), *DEFAULT_ROUTES}
        unknown = sorted(set(value.allowed_number_types) - routes)
        if unknown:
            raise ValueError(
                f"{ENV_PREFIX}FRAUD__ALLOWED_NUMBER_TYPES: unknown route {unknown[0]!r};"
                f" configured: {', '.join(sorted(routes))}"
            )
        return value

    @field_validator("public_url")
    @classmethod
    def _norm_public_url(cls, value: str | None) -> str | None:
        # Twilio must be able to call it back: a scheme and a host, nothing less.
        return _http_url(value) if value else value

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if not value.startswith(("memory://", "sqlite://", "redis://", "rediss://", "unix://")):
            raise ValueError("must start with memory://, sqlite:/// or redis://")
        return _url(value, ("memory", "sqlite", "redis", "rediss", "unix"), host=False)

    @field_validator("queue_url")
    @classmethod
    def _known_queue(cls, value: str | None) -> str | None:
        return _url(value, ("redis", "rediss", "unix", "sqlite"), host=False) if value else value

    @field_validator("ops_port")
    @classmethod
    def _own_port(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value and value == info.data.get("http_port"):
            raise ValueError("must differ from OTP_ROUTER_HTTP_PORT (leave it unset to share that port)")
        return value

    @field_validator("log_format")
    @classmethod
    def _known_format(cls, value: str) -> str:
        if value.lower() not in ("text", "json", "logfmt"):
            raise ValueError("must be text, json or logfmt")
        return value.lower()

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        if value.upper() not in logging.getLevelNamesMapping():
            raise ValueError("must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return value

    def router_problems(self) -> list[str]:
        """What stops these settings from building a router that can send, one ``VARIABLE: why`` each.

        Missing provider credentials of every enabled channel, no channel
        enabled at all, and a policy or price file that does not exist. Empty
        when nothing is wrong. :meth:`load` with ``require_providers=True`` and
        :meth:`OtpRouter.from_settings` report them all in one error.
        """
        problems = provider_problems(self.telegram, self.twilio, self.routes, self.vonage)
        for name, path in (("POLICY_FILE", self.policy_file), ("PRICES_FILE", self.prices_file)):
            if path is not None and not path.is_file():
                problems.append(f"{ENV_PREFIX}{name}: no such file")
        return problems

    @classmethod
    def load(cls, *, require_providers: bool = False, **overrides: Any) -> Settings:
        """Read the environment (and ``.env``) and validate, reporting every problem at once.

        Args:
            require_providers: Also require what a router needs to send
                (:meth:`router_problems`): provider credentials, files. Their
                problems are reported together with the invalid values, even
                when other variables are invalid too.
            **overrides: Values that win over the environment.

        Raises:
            ConfigError: Naming every invalid or missing variable, as in the environment.
        """
        problems: list[str] = []
        settings: Settings | None = None
        try:
            settings = cls(**overrides)
        except ValidationError as exc:
            problems += _validation_problems(exc)
        except SettingsError as exc:
            # A nested section given as one variable (OTP_ROUTER_TELEGRAM='{...}') that is not JSON.
            match = re.search(r'field "([^"]+)"', str(exc))
            name = ENV_PREFIX + (match.group(1).upper() if match else "*")
            problems.append(f"{name}: cannot be parsed")
        except UnicodeDecodeError:
            raise ConfigError("invalid settings: .env is not valid UTF-8") from None
        if require_providers:
            if settings is not None:
                problems += settings.router_problems()
            else:
                problems += _provider_problems_alone(overrides)
        if problems:
            raise ConfigError("invalid settings: " + "; ".join(dict.fromkeys(problems)))
        assert settings is not None
        return settings


def _validation_problems(exc: ValidationError) -> list[str]:
    problems = []
    for err in exc.errors():
        name = ENV_PREFIX + "__".join(str(part) for part in err["loc"]).upper()
        problems.append(f"{name}: {err['msg']}")
    return problems


def provider_problems(
    telegram: TelegramSettings,
    twilio: TwilioSettings,
    routes: Mapping[str, str] | None = None,
    vonage: VonageSettings | None = None,
) -> list[str]:
    """Missing credentials of the enabled built-in adapters that ``routes`` use, one ``VARIABLE: why`` each.

    Args:
        telegram: The Telegram section.
        twilio: The Twilio section.
        routes: Route name -> adapter name (default: :data:`DEFAULT_ROUTES`). An
            adapter no route uses needs no credentials; adapters of your own
            check their settings themselves.
    """
    adapters = set((routes if routes is not None else DEFAULT_ROUTES).values())
    problems = []
    uses_telegram, uses_twilio = "telegram" in adapters, "twilio_sms" in adapters
    if uses_telegram and telegram.enabled and not telegram.token.get_secret_value():
        problems.append(
            f"{ENV_PREFIX}TELEGRAM__TOKEN: missing (or {ENV_PREFIX}TELEGRAM__ENABLED=false for SMS only)"
        )
    if uses_twilio and twilio.enabled:
        sms_only = f"or {ENV_PREFIX}TWILIO__ENABLED=false for Telegram only"
        if not twilio.account_sid:
            problems.append(f"{ENV_PREFIX}TWILIO__ACCOUNT_SID: missing ({sms_only})")
        if not twilio.auth_token.get_secret_value():
            problems.append(f"{ENV_PREFIX}TWILIO__AUTH_TOKEN: missing ({sms_only})")
        if not twilio.from_number and not twilio.messaging_service_sid:
            problems.append(
                f"{ENV_PREFIX}TWILIO__FROM_NUMBER: missing (or {ENV_PREFIX}TWILIO__MESSAGING_SERVICE_SID)"
            )
    uses_vonage = vonage is not None and "vonage_sms" in adapters
    if vonage is not None and uses_vonage and vonage.enabled:
        for name, value in (
            ("API_KEY", vonage.api_key),
            ("API_SECRET", vonage.api_secret.get_secret_value()),
            ("FROM_NUMBER", vonage.from_number),
        ):
            if not value:
                problems.append(f"{ENV_PREFIX}VONAGE__{name}: missing (or {ENV_PREFIX}VONAGE__ENABLED=false)")
    others = adapters - {"telegram", "twilio_sms", "vonage_sms"}
    enabled = (
        (uses_telegram and telegram.enabled)
        or (uses_twilio and twilio.enabled)
        or (vonage is not None and uses_vonage and vonage.enabled)
        or bool(others)
    )
    if not enabled:
        problems.append(f"{ENV_PREFIX}TELEGRAM__ENABLED, {ENV_PREFIX}TWILIO__ENABLED: no channel is enabled")
    return problems


class _Providers(BaseSettings):
    """Only the provider sections, read like :class:`Settings` reads them.

    When some other variable is invalid, :class:`Settings` cannot be built,
    but missing credentials can still be told in the same message.
    """

    model_config = Settings.model_config

    routes: dict[str, str] = Field(default_factory=lambda: dict(DEFAULT_ROUTES))
    telegram: TelegramSettings = TelegramSettings()
    twilio: TwilioSettings = TwilioSettings()
    vonage: VonageSettings = VonageSettings()


def _provider_problems_alone(overrides: dict[str, Any]) -> list[str]:
    try:
        wanted = ("routes", "telegram", "twilio", "vonage")
        sections = _Providers(**{k: v for k, v in overrides.items() if k in wanted})
    except (ValidationError, SettingsError, UnicodeDecodeError):
        return []  # the sections' own errors are reported already
    return provider_problems(sections.telegram, sections.twilio, sections.routes, sections.vonage)
