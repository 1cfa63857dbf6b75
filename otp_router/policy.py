"""Routing policy: an ordered workflow of channel steps, with per-country overrides.

The default workflow is ``telegram`` then ``sms``. Each step has two times:

* ``deliver_within``: the step deadline. With no delivery report by then,
  the router falls back to the next step.
* ``ttl``: the validity sent to the provider. For Telegram it is the refund
  window (30..3600 s): a message not delivered within its ttl is refunded.
  Default ``max(30, deliver_within)`` for Telegram, ``deliver_within`` for SMS.

**A deadline below the ttl can make a user pay twice.** When
``deliver_within < ttl``, the router falls back to SMS while the Telegram
message is still valid. If Telegram then delivers it (after the fallback but
within its ttl), Telegram charges for it *and* the SMS is charged: that user
cost both prices. With ``deliver_within >= ttl`` (the old default, 30 and 30)
nobody pays twice, but every user whose Telegram message is not delivered
waits the whole ttl before the SMS goes out. Either code the user receives
works (it is the same code).

TOML form (see ``config/policy.example.toml``)::

    resend_cooldown = 30
    max_resends = 2

    [[steps]]
    channel = "telegram"
    deliver_within = 10     # fall back after 10 s...
    ttl = 30                # ...but Telegram may still deliver (and charge) until 30 s

    [[steps]]
    channel = "sms"
    deliver_within = 120

    [countries.US]          # SMS is cheap in the US: skip Telegram
    order = ["sms"]

    [countries.NG]          # operator blocks SMS to this country
    skip = ["sms"]

    [countries.BR.telegram] # override one step's times for one country
    deliver_within = 20
    ttl = 60

    [countries.KP]
    blocked = true

A country's ``[countries.XX.<channel>]`` table takes the step keys
``deliver_within`` and ``ttl`` and replaces those of the workflow's step of
that channel for numbers of that country; a ``ttl`` not given is derived
again from the country's ``deliver_within``.

The loader refuses unknown keys anywhere (top level, steps, countries, a
country's step table) with the key's name and where it is, e.g.
``steps[0]: unknown key 'deliver_whitin'``: a misspelt key must not silently
fall back to a default.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otp_router.errors import ConfigError, UnsupportedCountry
from otp_router.providers.base import ChannelName

__all__ = ["CountryRule", "Policy", "Step"]

TELEGRAM_TTL_MIN = 30
TELEGRAM_TTL_MAX = 3600
#: Longest SMS validity period we ask for (Twilio's ``ValidityPeriod`` caps lower; its adapter clamps).
SMS_TTL_MAX = 36000


def default_ttl(channel: ChannelName, deliver_within: float) -> int:
    """The ttl a step gets when none is configured.

    Telegram: ``max(30, deliver_within)`` within 30..3600, so that by default
    an undelivered message is refunded no earlier than the fallback. SMS:
    ``deliver_within`` (at least 1 s).
    """
    seconds = max(1, round(deliver_within))
    if channel is ChannelName.TELEGRAM:
        return min(max(seconds, TELEGRAM_TTL_MIN), TELEGRAM_TTL_MAX)
    return min(seconds, SMS_TTL_MAX)


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the workflow.

    Attributes:
        channel: Channel to send through.
        deliver_within: Seconds to wait for a delivery report before falling back.
        probe: Ask the channel first whether the number can receive (Telegram's
            free-when-refused ``checkSendAbility``).
        ttl: Validity requested from the provider, seconds (Telegram's refund
            window). 0 when building means "the default", see :func:`default_ttl`;
            after construction it always holds the concrete value. A ttl above
            ``deliver_within`` can make a user pay twice (module docstring).
    """

    channel: ChannelName
    deliver_within: float
    probe: bool = False
    ttl: int = 0

    def __post_init__(self) -> None:
        if not self.ttl:
            # Frozen dataclass: fill in the derived default once, at construction.
            object.__setattr__(self, "ttl", default_ttl(self.channel, self.deliver_within))


@dataclass(frozen=True, slots=True)
class CountryRule:
    """Overrides for one ISO region.

    Attributes:
        order: Channels to use, in this order (a subset of the workflow's channels).
        skip: Channels never used for this country.
        blocked: No verification at all for numbers of this country.
        steps: Replacement steps by channel (``[countries.XX.<channel>]``):
            the workflow's step of that channel with this country's times.
    """

    order: tuple[ChannelName, ...] | None = None
    skip: frozenset[ChannelName] = frozenset()
    blocked: bool = False
    steps: Mapping[ChannelName, Step] = field(default_factory=dict)


def _default_steps() -> tuple[Step, ...]:
    return (
        Step(ChannelName.TELEGRAM, 30.0, probe=True),
        Step(ChannelName.SMS, 120.0),
    )


_TOP_KEYS = frozenset({"steps", "countries", "resend_cooldown", "max_resends"})
#: Keys a country may override for one of its steps.
_STEP_TIME_KEYS = frozenset({"deliver_within", "ttl"})
_STEP_KEYS = frozenset({"channel", "probe"}) | _STEP_TIME_KEYS
_COUNTRY_KEYS = frozenset({"order", "skip", "blocked"})
_CHANNELS = frozenset(c.value for c in ChannelName)


def _refuse_unknown(raw: Mapping[str, Any], known: frozenset[str], where: str) -> None:
    """Raise ValueError naming the first unknown key of ``raw`` and where it is."""
    for key in raw:
        if key not in known:
            prefix = f"{where}: " if where else ""
            raise ValueError(f"{prefix}unknown key {key!r}")


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be a table")
    return value


def _seconds(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number of seconds")
    seconds = float(value)
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{where} must be positive")
    return seconds


def _ttl(value: Any, channel: ChannelName, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}.ttl must be a whole number of seconds")
    low, high = (TELEGRAM_TTL_MIN, TELEGRAM_TTL_MAX) if channel is ChannelName.TELEGRAM else (1, SMS_TTL_MAX)
    if not low <= value <= high:
        raise ValueError(f"{where}.ttl must be {low}..{high} seconds for {channel.value}")
    return value


def _step(raw: Mapping[str, Any], where: str) -> Step:
    """Build one step from its TOML table (unknown keys already refused)."""
    if "channel" not in raw:
        raise ValueError(f"{where}: missing key 'channel'")
    channel = ChannelName(raw["channel"])
    deliver_within = _seconds(raw.get("deliver_within", 30.0), f"{where}.deliver_within")
    ttl = _ttl(raw["ttl"], channel, where) if "ttl" in raw else 0
    probe = raw.get("probe", channel is ChannelName.TELEGRAM)
    if not isinstance(probe, bool):
        raise ValueError(f"{where}.probe must be true or false")
    return Step(channel=channel, deliver_within=deliver_within, probe=probe, ttl=ttl)


def _country(
    region: str, raw: Mapping[str, Any], steps: Mapping[ChannelName, Mapping[str, Any]]
) -> CountryRule:
    """Build one ``[countries.XX]`` rule; ``steps`` are the workflow's raw step tables by channel."""
    where = f"countries.{region}"
    if len(region) != 2 or not region.isalpha() or not region.isupper():
        raise ValueError(f"country {region!r} is not an ISO 3166-1 alpha-2 code")
    _refuse_unknown(raw, _COUNTRY_KEYS | _CHANNELS, where)
    order = raw.get("order")
    overrides: dict[ChannelName, Step] = {}
    for name in _CHANNELS & set(raw):
        channel = ChannelName(name)
        table = _table(raw[name], f"{where}.{name}")
        _refuse_unknown(table, _STEP_TIME_KEYS, f"{where}.{name}")
        if channel not in steps:
            raise ValueError(f"{where}.{name}: the workflow has no {name} step to override")
        base = dict(steps[channel])
        if "deliver_within" in table:
            # A new deadline re-derives the default ttl unless the country gives one.
            base.pop("ttl", None)
        overrides[channel] = _step({**base, **table}, f"{where}.{name}")
    return CountryRule(
        order=tuple(ChannelName(c) for c in order) if order is not None else None,
        skip=frozenset(ChannelName(c) for c in raw.get("skip", [])),
        blocked=bool(raw.get("blocked", False)),
        steps=overrides,
    )


@dataclass(frozen=True, slots=True)
class Policy:
    """The routing workflow.

    Attributes:
        steps: Default ordered steps.
        countries: Per-region overrides.
        resend_cooldown: Seconds after a send before the user may ask for a resend.
        max_resends: User-requested resends per verification.
    """

    steps: tuple[Step, ...] = field(default_factory=_default_steps)
    countries: Mapping[str, CountryRule] = field(default_factory=dict)
    resend_cooldown: float = 30.0
    max_resends: int = 2

    def steps_for(self, region: str) -> tuple[Step, ...]:
        """The workflow for a number of ``region``.

        Raises:
            UnsupportedCountry: The region is blocked, or its overrides leave no channel.
        """
        rule = self.countries.get(region)
        if rule is None:
            return self.steps
        if rule.blocked:
            raise UnsupportedCountry(f"verifications to region {region} are blocked by policy")
        by_channel = {step.channel: rule.steps.get(step.channel, step) for step in self.steps}
        if rule.order is not None:
            steps = tuple(by_channel[c] for c in rule.order if c in by_channel)
        else:
            steps = tuple(rule.steps.get(s.channel, s) for s in self.steps)
        steps = tuple(s for s in steps if s.channel not in rule.skip)
        if not steps:
            raise UnsupportedCountry(f"no channel is allowed for region {region} by policy")
        return steps

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build from parsed TOML/JSON.

        Raises:
            ConfigError: Unknown channel, bad number, or unknown key (named, with where it is).
        """
        try:
            _refuse_unknown(data, _TOP_KEYS, "")
            raw_steps = [_table(raw, f"steps[{i}]") for i, raw in enumerate(data.get("steps", []))]
            for i, raw in enumerate(raw_steps):
                _refuse_unknown(raw, _STEP_KEYS, f"steps[{i}]")
            steps = tuple(_step(raw, f"steps[{i}]") for i, raw in enumerate(raw_steps)) or _default_steps()
            # Country step tables override the *first* step of their channel.
            by_channel: dict[ChannelName, Mapping[str, Any]] = {}
            for raw in raw_steps:
                by_channel.setdefault(ChannelName(raw["channel"]), raw)
            if not raw_steps:
                by_channel = {
                    s.channel: {"channel": s.channel.value, "deliver_within": s.deliver_within} for s in steps
                }
            countries = {
                region: _country(region, _table(raw, f"countries.{region}"), by_channel)
                for region, raw in _table(data.get("countries", {}), "countries").items()
            }
            return cls(
                steps=steps,
                countries=countries,
                resend_cooldown=float(data.get("resend_cooldown", 30.0)),
                max_resends=int(data.get("max_resends", 2)),
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid routing policy (OTP_ROUTER_POLICY_FILE): {exc}") from None

    @classmethod
    def load(cls, path: Path | None) -> Policy:
        """Load a TOML policy file, or the default policy when ``path`` is None."""
        if path is None:
            return cls()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read routing policy OTP_ROUTER_POLICY_FILE={path}: {exc}") from None
        return cls.from_dict(data)
