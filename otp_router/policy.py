"""Routing policy: an ordered workflow of channel steps, with per-country overrides.

The default workflow is ``telegram(deliver_within=30s)`` then ``sms``. A
Telegram step is sent with ``ttl = deliver_within`` (clamped to Telegram's
30..3600 s), so a message that is not delivered by the step deadline is
refunded and falling back to SMS does not pay twice.

TOML form (see ``config/policy.example.toml``)::

    resend_cooldown = 30
    max_resends = 2

    [[steps]]
    channel = "telegram"
    deliver_within = 30

    [[steps]]
    channel = "sms"
    deliver_within = 120

    [countries.US]          # SMS is cheap in the US: skip Telegram
    order = ["sms"]

    [countries.NG]          # operator blocks SMS to this country
    skip = ["sms"]

    [countries.KP]
    blocked = true
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


@dataclass(frozen=True, slots=True)
class Step:
    """One step of the workflow.

    Attributes:
        channel: Channel to send through.
        deliver_within: Seconds to wait for a delivery report before falling back.
        probe: Ask the channel first whether the number can receive (Telegram's
            free-when-refused ``checkSendAbility``).
    """

    channel: ChannelName
    deliver_within: float
    probe: bool = False

    @property
    def ttl(self) -> int:
        """The provider-side validity to request: deliver_within, clamped for Telegram."""
        seconds = max(1, round(self.deliver_within))
        if self.channel is ChannelName.TELEGRAM:
            return min(max(seconds, TELEGRAM_TTL_MIN), TELEGRAM_TTL_MAX)
        return min(seconds, 36000)


@dataclass(frozen=True, slots=True)
class CountryRule:
    """Overrides for one ISO region.

    Attributes:
        order: Channels to use, in this order (a subset of the workflow's channels).
        skip: Channels never used for this country.
        blocked: No verification at all for numbers of this country.
    """

    order: tuple[ChannelName, ...] | None = None
    skip: frozenset[ChannelName] = frozenset()
    blocked: bool = False


def _default_steps() -> tuple[Step, ...]:
    return (
        Step(ChannelName.TELEGRAM, 30.0, probe=True),
        Step(ChannelName.SMS, 120.0),
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
        by_channel = {step.channel: step for step in self.steps}
        if rule.order is not None:
            steps = tuple(by_channel[c] for c in rule.order if c in by_channel)
        else:
            steps = self.steps
        steps = tuple(s for s in steps if s.channel not in rule.skip)
        if not steps:
            raise UnsupportedCountry(f"no channel is allowed for region {region} by policy")
        return steps

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Build from parsed TOML/JSON.

        Raises:
            ConfigError: Unknown channel, bad number, or unknown key.
        """
        try:
            known = {"steps", "countries", "resend_cooldown", "max_resends"}
            unknown = set(data) - known
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            steps = (
                tuple(
                    Step(
                        channel=ChannelName(raw["channel"]),
                        deliver_within=float(raw.get("deliver_within", 30.0)),
                        probe=bool(raw.get("probe", raw["channel"] == ChannelName.TELEGRAM)),
                    )
                    for raw in data.get("steps", [])
                )
                or _default_steps()
            )
            for step in steps:
                if step.deliver_within <= 0:
                    raise ValueError("deliver_within must be positive")
            countries: dict[str, CountryRule] = {}
            for region, raw in data.get("countries", {}).items():
                if len(region) != 2 or not region.isalpha() or not region.isupper():
                    raise ValueError(f"country {region!r} is not an ISO 3166-1 alpha-2 code")
                order = raw.get("order")
                countries[region] = CountryRule(
                    order=tuple(ChannelName(c) for c in order) if order is not None else None,
                    skip=frozenset(ChannelName(c) for c in raw.get("skip", [])),
                    blocked=bool(raw.get("blocked", False)),
                )
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
