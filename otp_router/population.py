"""Seeded simulated users with a delivery model, shared by the demo and ``bench/cost.py``.

Each user has a phone number of some country, and a drawn future: whether
Telegram can reach the number, how many seconds after the send the Telegram
message is delivered (or never), how long the SMS takes and whether it is
delivered at all. The emulators are scripted to play that future
(:meth:`Population.script`), and the benchmark's oracle reads it directly.

The model, per valid number (about 4 % of numbers are malformed and never
reach a provider):

* **Reachable on Telegram** with probability ``on_telegram`` (the Gateway's
  ability check says yes); otherwise the check refuses the number (mostly
  ``PHONE_NUMBER_NOT_FOUND``, a few ``PHONE_NUMBER_NOT_AVAILABLE``) and the
  code goes by SMS at once.
* A reachable user is **online** (share ``online``): delivery latency is
  lognormal with median ``telegram_median`` seconds and shape
  ``telegram_sigma`` (with the defaults, 2.5 s median and about 8 s at the
  95th percentile). Or the user **comes online later** (share ``late``):
  delivery after a time log-uniform between ``late_range`` (15 s to 10 min:
  some within the 30 s ttl, most after it, when Telegram refunds the
  message). Or **never** (the rest): the message expires and is refunded.
* **SMS**: latency lognormal with median ``sms_median`` and shape
  ``sms_sigma``; a share ``sms_slow`` waits in a carrier queue for a time
  uniform in ``sms_slow_range``; a share ``sms_failure`` ends undelivered
  (Twilio error 30003).
* A few reachable online users meet a Telegram error first: an HTTP 502 on
  the ability check (the router does not retry that call, since it may have
  charged, and falls back to SMS at once: the message is never sent) or a
  flood wait of one second (retried; the wait is in real seconds, so a run
  with scaled provider time makes it longer in provider time). 8 % of users
  type a wrong code once.
* **Countries** are drawn from ``countries`` (weights); SMS prices come
  from the packaged table (``otp_router/data/sms-prices.toml``), which spans
  $0.0083 (US) to $0.40 (ID) and $0.52 (RU).

Where the shape comes from, and the parameters of both shapes:
``docs/population.md``. In short, these are assumptions, not measurements:
lognormal bodies because a delivery delay is a product of small delays,
log-uniform reconnection times because they have no natural scale.

Everything is drawn from one ``random.Random(seed)``: the same size, seed and
shape give the same users.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from otp_router.emulators import Script
from otp_router.harness import sample_numbers

__all__ = ["BAD_NUMBERS", "SHAPES", "Population", "Shape", "User", "make_population"]

#: Malformed input a login form receives; refused before any provider call.
BAD_NUMBERS = ("+44 12", "12345", "+1 999 000 0000", "call me", "+49 0000", "+33 1")

_MIXED = MappingProxyType(
    {"GB": 14, "DE": 11, "FR": 9, "US": 10, "IT": 5, "ES": 5, "IN": 14, "BR": 10, "ID": 9, "NG": 6}
    | {"TR": 4, "MX": 3}
)
_EMERGING = MappingProxyType(
    {"IN": 18, "ID": 14, "NG": 10, "BR": 10, "PK": 8, "BD": 7, "EG": 6, "PH": 6, "KE": 4, "VN": 5}
    | {"TR": 6, "MX": 6}
)


@dataclass(frozen=True, slots=True)
class Shape:
    """The parameters of a population (see the module docstring for the model).

    Attributes:
        name: Short label for reports.
        description: One line for reports.
        countries: ISO region -> weight.
        on_telegram: Share of valid numbers Telegram can reach.
        online: Share of reachable users who are online now.
        late: Share of reachable users who come online later (the rest: never).
        telegram_median: Median delivery latency of online users, seconds.
        telegram_sigma: Lognormal shape of that latency.
        late_range: Bounds (seconds) of the log-uniform latency of late users.
        sms_median: Median SMS latency, seconds.
        sms_sigma: Lognormal shape of the SMS latency.
        sms_slow: Share of SMS held in a carrier queue.
        sms_slow_range: Bounds (seconds) of that hold, uniform.
        sms_failure: Share of SMS never delivered.
        bad_numbers: Share of malformed numbers.
        unavailable: Share of unreachable numbers refused as NOT_AVAILABLE (not NOT_FOUND).
        telegram_errors: Share of online users whose first Telegram call fails (5xx or flood wait).
        typo: Share of users who type a wrong code once first.
    """

    name: str
    description: str
    countries: Mapping[str, float] = field(default_factory=lambda: _MIXED)
    on_telegram: float = 0.70
    online: float = 0.86
    late: float = 0.10
    telegram_median: float = 2.5
    telegram_sigma: float = 0.7
    late_range: tuple[float, float] = (15.0, 600.0)
    sms_median: float = 4.0
    sms_sigma: float = 0.6
    sms_slow: float = 0.03
    sms_slow_range: tuple[float, float] = (20.0, 120.0)
    sms_failure: float = 0.03
    bad_numbers: float = 0.04
    unavailable: float = 0.1
    telegram_errors: float = 0.03
    typo: float = 0.08

    def __post_init__(self) -> None:
        shares = (self.on_telegram, self.online, self.late, self.sms_slow, self.sms_failure)
        if not all(0 <= s <= 1 for s in (*shares, self.bad_numbers, self.unavailable, self.typo)):
            raise ValueError("population shares must be between 0 and 1")
        if self.online + self.late > 1:
            raise ValueError("online + late must not exceed 1")
        if not self.countries or min(self.countries.values()) <= 0:
            raise ValueError("countries need positive weights")


#: The benchmark's populations. ``mixed`` is the demo's default.
SHAPES: Mapping[str, Shape] = MappingProxyType(
    {
        "mixed": Shape(
            "mixed",
            "12 countries, SMS $0.008-0.40; 70 % reachable on Telegram; of those 86 % online "
            "(median 2.5 s), 10 % online later, 4 % never",
        ),
        "emerging": Shape(
            "emerging",
            "12 countries weighted to expensive SMS ($0.05-0.40); 55 % reachable on Telegram; of "
            "those 78 % online (median 3.5 s, wider spread), 15 % later, 7 % never; SMS slower "
            "(median 5 s, 4 % held 20-120 s), 6 % undelivered",
            countries=_EMERGING,
            on_telegram=0.55,
            online=0.78,
            late=0.15,
            telegram_median=3.5,
            telegram_sigma=0.9,
            sms_median=5.0,
            sms_sigma=0.7,
            sms_slow=0.04,
            sms_failure=0.06,
        ),
    }
)


@dataclass(frozen=True, slots=True)
class User:
    """One simulated person: a number, how the providers treat it, how they type.

    Attributes:
        phone: The number as typed (E.164 for valid ones).
        kind: ``telegram`` (online), ``slow`` (online later), ``never``,
            ``absent`` / ``unavailable`` (not reachable on Telegram),
            ``telegram_5xx`` / ``flood`` (online, after a Telegram error) or ``bad_number``.
        behaviour: The emulator script entry (:class:`~otp_router.emulators.Behaviour` fields).
        typo_first: Types a wrong code once before the right one.
        region: ISO region ("" for a malformed number).
        telegram_latency: Seconds from the Telegram send to delivery if the
            message were kept forever; None when never delivered, not reachable,
            or never sent (``telegram_5xx``: the router falls back at once).
        sms_latency: Seconds from the SMS send to its final status.
        sms_delivered: Whether that final status is delivered.
    """

    phone: str
    kind: str
    behaviour: dict[str, Any]
    typo_first: bool
    region: str = ""
    telegram_latency: float | None = None
    sms_latency: float = 0.0
    sms_delivered: bool = True

    @property
    def valid(self) -> bool:
        """False for a malformed number (refused before any provider call)."""
        return self.kind != "bad_number"

    def telegram_within(self, ttl: float) -> bool:
        """Whether Telegram delivers this user's message within ``ttl`` seconds of the send."""
        return self.telegram_latency is not None and self.telegram_latency <= ttl


@dataclass(frozen=True, slots=True)
class Population:
    """The seeded population."""

    users: tuple[User, ...]
    shape: Shape | None = None

    def script(self, time_scale: float) -> Script:
        """The emulator script that makes the providers treat each user as drawn."""
        script = Script(time_scale=time_scale)
        script.update_from_json({u.phone: u.behaviour for u in self.users if u.behaviour})
        return script


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(sigma * rng.gauss(0.0, 1.0))


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def make_population(size: int, seed: int, shape: Shape | str = "mixed") -> Population:
    """Draw ``size`` users reproducibly from ``seed``.

    Args:
        size: Number of users.
        seed: Makes the draw reproducible.
        shape: A :class:`Shape` or the name of one in :data:`SHAPES`.

    Raises:
        KeyError: Unknown shape name.
    """
    model = SHAPES[shape] if isinstance(shape, str) else shape
    rng = random.Random(seed)
    names = list(model.countries)
    regions = rng.choices(names, weights=[model.countries[n] for n in names], k=size)
    pools = {r: iter(sample_numbers(r, regions.count(r), offset=rng.randrange(5000))) for r in set(regions)}
    users: list[User] = []
    for region in regions:
        if rng.random() < model.bad_numbers:
            users.append(User(rng.choice(BAD_NUMBERS), "bad_number", {}, False))
            continue
        behaviour: dict[str, Any] = {}
        latency: float | None = None
        if rng.random() < model.on_telegram:
            state = rng.random()
            if state < model.online:
                latency = _lognormal(rng, model.telegram_median, model.telegram_sigma)
                kind = "telegram"
                error = rng.random()
                if error < model.telegram_errors * 2 / 3:
                    kind, behaviour["telegram_5xx"] = "telegram_5xx", 1
                elif error < model.telegram_errors:
                    kind, behaviour["telegram_flood_wait"] = "flood", 1
            elif state < model.online + model.late:
                latency = _log_uniform(rng, *model.late_range)
                kind = "slow"
            else:
                kind = "never"
                behaviour["telegram_never"] = True
            if latency is not None:
                behaviour["telegram_delay"] = round(latency, 3)
                latency = behaviour["telegram_delay"]
            if kind == "telegram_5xx":
                # The router does not retry a failed checkSendAbility (it may have charged), so it
                # falls back at once: this user's Telegram message is never sent, let alone delivered.
                latency = None
        elif rng.random() < model.unavailable:
            kind, behaviour["telegram"] = "unavailable", "unavailable"
        else:
            kind, behaviour["telegram"] = "absent", "absent"
        sms = _lognormal(rng, model.sms_median, model.sms_sigma)
        if rng.random() < model.sms_slow:
            sms += rng.uniform(*model.sms_slow_range)
        behaviour["sms_delay"] = round(sms, 3)
        delivered = rng.random() >= model.sms_failure
        if not delivered:
            behaviour["sms_final"] = "undelivered"
            behaviour["sms_error_code"] = 30003
        users.append(
            User(
                next(pools[region]),
                kind,
                behaviour,
                rng.random() < model.typo,
                region=region,
                telegram_latency=latency,
                sms_latency=behaviour["sms_delay"],
                sms_delivered=delivered,
            )
        )
    return Population(tuple(users), model)
