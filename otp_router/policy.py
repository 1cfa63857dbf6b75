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

**A learned deadline: ``deliver_within = "auto"``** (Telegram steps only).
The router picks each country's deadline from the delivery latencies it has
seen and the country's SMS price, within ``deliver_within_min`` (default 3)
and ``deliver_within_max`` (default: the ttl, else 30) seconds; the rule is
in :mod:`otp_router.latency`. Until a country has enough observations
(``auto_min_samples``) its deadline stays at ``deliver_within_max``, the
bound toward the ttl. The top-level ``wait_cost_per_second`` prices one
second of a user's wait in USD (what the router trades against the SMS
price), and ``sms_latency`` is the SMS delivery time assumed until the SMS
latency of a country has been learned::

    wait_cost_per_second = 0.001

    [[steps]]
    channel = "telegram"
    deliver_within = "auto"
    deliver_within_min = 3
    deliver_within_max = 30
    ttl = 30

A learned deadline below the ttl can make a user pay twice, exactly as a
fixed one can: the rule counts that cost (it is the reason a country with
expensive SMS waits longer), it does not avoid it.

A country's ``[countries.XX.<channel>]`` table takes the step keys
``deliver_within`` (a number or ``"auto"``), ``deliver_within_min``,
``deliver_within_max`` and ``ttl`` and replaces those of the workflow's step
of that channel for numbers of that country; a ``ttl`` not given is derived
again from the country's deadline (``deliver_within``, or
``deliver_within_max`` when it is ``"auto"``).

The loader refuses unknown keys anywhere (top level, steps, countries, a
country's step table) with the key's name and where it is, e.g.
``steps[0]: unknown key 'deliver_whitin'``: a misspelt key must not silently
fall back to a default.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otp_router.errors import ConfigError, UnsupportedCountry
from otp_router.providers.base import Capabilities, ChannelName, route_name

__all__ = ["AutoDeadline", "CountryRule", "Policy", "Step"]

#: The ``deliver_within`` value that asks for a learned deadline.
AUTO = "auto"
#: Default bounds of a learned (``"auto"``) deadline, seconds.
AUTO_MIN = 3.0
AUTO_MAX = 30.0


def _default_binding(route: str) -> tuple[str, Capabilities]:
    """Provider and capabilities of the adapter the default configuration binds to ``route``."""
    from otp_router.providers.registry import route_binding

    return route_binding(route)


def default_ttl(caps: Capabilities, deliver_within: float) -> int:
    """The ttl a step gets when none is configured: ``deliver_within`` within the channel's range.

    For Telegram (30..3600 s) that is ``max(30, deliver_within)``, so that by
    default an undelivered message is refunded no earlier than the fallback.
    """
    return caps.clamp_ttl(max(1, round(deliver_within)))


@dataclass(frozen=True, slots=True)
class AutoDeadline:
    """Bounds of a learned deadline (``deliver_within = "auto"``).

    Attributes:
        minimum: Never fall back earlier than this, seconds.
        maximum: Never wait longer than this, seconds (at most the step's ttl).
            Also the deadline used while a country has too few observations.
    """

    minimum: float = AUTO_MIN
    maximum: float = AUTO_MAX

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.maximum < float("inf"):
            raise ValueError("deliver_within_min must be positive and at most deliver_within_max")


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the workflow.

    Attributes:
        channel: Route to send through (an open name bound to an adapter in configuration).
        deliver_within: Seconds to wait for a delivery report before falling
            back. For an ``auto`` step: the deadline used until one is learned.
        probe: Ask the channel first whether the number can receive (Telegram's
            free-when-refused ``checkSendAbility``).
        ttl: Validity requested from the provider, seconds (Telegram's refund
            window). 0 when building means "the default", see :func:`default_ttl`
            (of ``auto.maximum`` for an ``auto`` step); after construction it
            always holds the concrete value. A ttl above ``deliver_within`` can
            make a user pay twice (module docstring).
        auto: Bounds of a learned deadline (``deliver_within = "auto"``), or
            None for a fixed one. The router replaces an ``auto`` step by a
            fixed one (the learned deadline) when a verification starts, so a
            stored verification always holds concrete times.
        provider: Provider of the adapter bound to the route ("" when building:
            that of the default binding, see
            :func:`otp_router.providers.registry.route_binding`).
        caps: Capabilities of that adapter (None when building: those of the
            default binding). The router binds both to the channel configured
            for the route when a verification starts, and the stored
            verification keeps them: crash recovery of an attempt follows what
            the adapter that sent it can do, whatever the configuration says later.
    """

    channel: str
    deliver_within: float
    probe: bool = False
    ttl: int = 0
    auto: AutoDeadline | None = None
    provider: str = ""
    caps: Capabilities | None = None

    def __post_init__(self) -> None:
        # Frozen dataclass: fill in the derived defaults once, at construction.
        object.__setattr__(self, "channel", route_name(self.channel))
        if self.caps is None or not self.provider:
            provider, caps = _default_binding(self.channel)
            object.__setattr__(self, "provider", self.provider or provider)
            object.__setattr__(self, "caps", self.caps or caps)
        if not self.ttl:
            longest = (
                self.deliver_within if self.auto is None else max(self.deliver_within, self.auto.maximum)
            )
            object.__setattr__(self, "ttl", default_ttl(self.capabilities, longest))

    @property
    def capabilities(self) -> Capabilities:
        """The bound adapter's capabilities (always set after construction)."""
        assert self.caps is not None
        return self.caps


@dataclass(frozen=True, slots=True)
class CountryRule:
    """Overrides for one ISO region.

    Attributes:
        order: Routes to use, in this order (a subset of the workflow's routes).
        skip: Routes never used for this country.
        blocked: No verification at all for numbers of this country.
        steps: Replacement steps by channel (``[countries.XX.<channel>]``):
            the workflow's step of that channel with this country's times.
    """

    order: tuple[str, ...] | None = None
    skip: frozenset[str] = frozenset()
    blocked: bool = False
    steps: Mapping[str, Step] = field(default_factory=dict)


def _known_routes() -> set[str]:
    """Routes of the default configuration, and every registered adapter's name."""
    from otp_router.providers.registry import known_routes

    return known_routes()


def _default_steps() -> tuple[Step, ...]:
    # Telegram with a learned deadline between 3 s and its 30 s ttl (30 s until learned), then SMS.
    return (
        Step(ChannelName.TELEGRAM, AUTO_MAX, probe=True, auto=AutoDeadline()),
        Step(ChannelName.SMS, 120.0),
    )


def _raw_step(step: Step) -> dict[str, Any]:
    """A built step as the TOML table it could come from (for country overrides of defaults)."""
    raw: dict[str, Any] = {"channel": step.channel, "probe": step.probe, "ttl": step.ttl}
    if step.auto is None:
        raw["deliver_within"] = step.deliver_within
    else:
        raw |= {
            "deliver_within": AUTO,
            "deliver_within_min": step.auto.minimum,
            "deliver_within_max": step.auto.maximum,
        }
    return raw


_POLICY_NUMBERS = frozenset({"wait_cost_per_second", "auto_min_samples", "sms_latency"})
_TOP_KEYS = frozenset({"steps", "countries", "resend_cooldown", "max_resends"}) | _POLICY_NUMBERS
#: Keys a country may override for one of its steps.
_STEP_TIME_KEYS = frozenset({"deliver_within", "deliver_within_min", "deliver_within_max", "ttl"})
_STEP_KEYS = frozenset({"channel", "probe"}) | _STEP_TIME_KEYS
_COUNTRY_KEYS = frozenset({"order", "skip", "blocked"})


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


def _non_negative(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{where} must be a number")
    number = float(value)
    if not 0 <= number < float("inf"):
        raise ValueError(f"{where} must not be negative")
    return number


def _count(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{where} must be a whole number, 0 or more")
    return value


def _ttl(value: Any, channel: str, caps: Capabilities, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}.ttl must be a whole number of seconds")
    if not caps.ttl_min <= value <= caps.ttl_max:
        raise ValueError(f"{where}.ttl must be {caps.ttl_min}..{caps.ttl_max} seconds for {channel}")
    return value


def _step(raw: Mapping[str, Any], where: str) -> Step:
    """Build one step from its TOML table (unknown keys already refused)."""
    if "channel" not in raw:
        raise ValueError(f"{where}: missing key 'channel'")
    channel = route_name(raw["channel"])
    _, caps = _default_binding(channel)
    ttl = _ttl(raw["ttl"], channel, caps, where) if "ttl" in raw else 0
    probe = raw.get("probe", caps.probe)
    if not isinstance(probe, bool):
        raise ValueError(f"{where}.probe must be true or false")
    if raw.get("deliver_within") == AUTO:
        auto = _auto(raw, channel, caps, ttl, where)
        return Step(channel=channel, deliver_within=auto.maximum, probe=probe, ttl=ttl, auto=auto)
    for key in ("deliver_within_min", "deliver_within_max"):
        if key in raw:
            raise ValueError(f"{where}.{key} is only for deliver_within = {AUTO!r}")
    deliver_within = _seconds(raw.get("deliver_within", 30.0), f"{where}.deliver_within")
    return Step(channel=channel, deliver_within=deliver_within, probe=probe, ttl=ttl)


def _auto(raw: Mapping[str, Any], channel: str, caps: Capabilities, ttl: int, where: str) -> AutoDeadline:
    """The bounds of a learned deadline; ``ttl`` 0 means "not given"."""
    if not caps.refunds_undelivered:
        # The rule prices a refund window (a message not delivered within its ttl is refunded).
        raise ValueError(
            f"{where}.deliver_within = {AUTO!r} is only for routes that refund undelivered"
            f" messages, which {channel} does not"
        )
    minimum = _seconds(raw.get("deliver_within_min", AUTO_MIN), f"{where}.deliver_within_min")
    maximum = _seconds(raw.get("deliver_within_max", ttl or AUTO_MAX), f"{where}.deliver_within_max")
    if minimum > maximum:
        raise ValueError(f"{where}.deliver_within_min must not exceed deliver_within_max")
    if ttl and maximum > ttl:
        # Past the ttl Telegram has given up (and refunded): waiting longer only delays the SMS.
        raise ValueError(f"{where}.deliver_within_max must not exceed the ttl ({ttl} s)")
    return AutoDeadline(minimum, maximum)


def _country(region: str, raw: Mapping[str, Any], steps: Mapping[str, Mapping[str, Any]]) -> CountryRule:
    """Build one ``[countries.XX]`` rule; ``steps`` are the workflow's raw step tables by channel."""
    where = f"countries.{region}"
    if len(region) != 2 or not region.isalpha() or not region.isupper():
        raise ValueError(f"country {region!r} is not an ISO 3166-1 alpha-2 code")
    # Any other key is a route's step table (routes are open names); a scalar there is a typo.
    tables = {k for k, v in raw.items() if isinstance(v, Mapping) or k in steps}
    _refuse_unknown(raw, _COUNTRY_KEYS | tables, where)
    order = raw.get("order")
    overrides: dict[str, Step] = {}
    for name in sorted(set(raw) - _COUNTRY_KEYS):
        channel = route_name(name)
        table = _table(raw[name], f"{where}.{name}")
        _refuse_unknown(table, _STEP_TIME_KEYS, f"{where}.{name}")
        if channel not in steps:
            raise ValueError(f"{where}.{name}: the workflow has no {name} step to override")
        base = dict(steps[channel])
        if "deliver_within" in table or "deliver_within_max" in table:
            # A new deadline re-derives the default ttl unless the country gives one.
            base.pop("ttl", None)
        if "deliver_within" in table and table["deliver_within"] != AUTO:
            # A fixed deadline replaces the workflow's learned one with its bounds.
            base.pop("deliver_within_min", None)
            base.pop("deliver_within_max", None)
        overrides[channel] = _step({**base, **table}, f"{where}.{name}")
    return CountryRule(
        order=tuple(route_name(c) for c in order) if order is not None else None,
        skip=frozenset(route_name(c) for c in raw.get("skip", [])),
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
        wait_cost_per_second: USD one second of a user's wait is worth, traded
            against SMS prices by ``auto`` deadlines (:mod:`otp_router.latency`).
        auto_min_samples: Effective (decayed) observations a country needs
            before its learned deadline is fully trusted; below, the deadline
            leans toward ``deliver_within_max``.
        sms_latency: Seconds an SMS is assumed to take until the country's
            SMS latency has been learned.
    """

    steps: tuple[Step, ...] = field(default_factory=_default_steps)
    countries: Mapping[str, CountryRule] = field(default_factory=dict)
    resend_cooldown: float = 30.0
    max_resends: int = 2
    wait_cost_per_second: float = 0.001
    auto_min_samples: float = 50.0
    sms_latency: float = 5.0

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
    def from_dict(cls, data: Mapping[str, Any], *, routes: Collection[str] | None = None) -> Policy:
        """Build from parsed TOML/JSON.

        Args:
            data: The parsed policy.
            routes: The route names a step may use (those configured); default:
                the default configuration's routes and every registered adapter's name.

        Raises:
            ConfigError: Unknown route, bad number, or unknown key (named, with where it is).
        """
        known = set(routes) if routes is not None else _known_routes()
        try:
            _refuse_unknown(data, _TOP_KEYS, "")
            raw_steps = [_table(raw, f"steps[{i}]") for i, raw in enumerate(data.get("steps", []))]
            for i, raw in enumerate(raw_steps):
                _refuse_unknown(raw, _STEP_KEYS, f"steps[{i}]")
                if "channel" in raw and raw["channel"] not in known:
                    configured = ", ".join(sorted(known))
                    raise ValueError(
                        f"steps[{i}].channel: unknown route {raw['channel']!r}; configured: {configured}"
                    )
            steps = tuple(_step(raw, f"steps[{i}]") for i, raw in enumerate(raw_steps)) or _default_steps()
            # Country step tables override the *first* step of their channel.
            by_channel: dict[str, Mapping[str, Any]] = {}
            for raw in raw_steps:
                by_channel.setdefault(route_name(raw["channel"]), raw)
            if not raw_steps:
                by_channel = {s.channel: _raw_step(s) for s in steps}
            countries = {
                region: _country(region, _table(raw, f"countries.{region}"), by_channel)
                for region, raw in _table(data.get("countries", {}), "countries").items()
            }
            return cls(
                steps=steps,
                countries=countries,
                resend_cooldown=_non_negative(data.get("resend_cooldown", 30.0), "resend_cooldown"),
                max_resends=_count(data.get("max_resends", 2), "max_resends"),
                **{key: _non_negative(data[key], key) for key in _POLICY_NUMBERS & set(data)},
            )
        except (KeyError, ValueError, TypeError) as exc:
            raise ConfigError(f"invalid routing policy (OTP_ROUTER_POLICY_FILE): {exc}") from None

    @classmethod
    def load(cls, path: Path | None, *, routes: Collection[str] | None = None) -> Policy:
        """Load a TOML policy file, or the default policy when ``path`` is None.

        ``routes``: as for :meth:`from_dict`.
        """
        if path is None:
            return cls()
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read routing policy OTP_ROUTER_POLICY_FILE={path}: {exc}") from None
        except (UnicodeDecodeError, RecursionError):
            raise ConfigError(
                f"cannot read routing policy OTP_ROUTER_POLICY_FILE={path}: not UTF-8, or nested too deeply"
            ) from None
        return cls.from_dict(data, routes=routes)
