"""Learned delivery latency and the priced step deadline (``deliver_within = "auto"``).

Pure: no I/O, no clock. The router adds one observation per delivery outcome
to the store and keeps an in-process :class:`LearnedDeadlines`, refreshed
from the store every so often, that turns ``auto`` steps into concrete ones.

**The estimate.** Per (channel, country): exponentially decayed counts of
delivery latencies (send accepted to delivered) over fixed log-spaced
buckets (:data:`EDGES`), plus a decayed count of messages that never arrived
(expired, undelivered, failed). An observation :data:`HALF_LIFE` seconds old
weighs half as much as a new one, so the estimate follows a change within
hours and forgets a country that has gone quiet.

Decay without read-modify-write ("forward decay"): an observation at time
``t`` adds ``2 ** ((t - era_start) / HALF_LIFE)`` to its cell, and a reader
at ``now`` multiplies every weight by ``2 ** -((now - era_start) /
HALF_LIFE)``. Adding is then commutative, so every process adds its
observations to the shared cells with one increment (no lock, no read), and
the cells of several processes simply sum. Eras (:data:`ERA`, 32 half-lives)
keep the numbers finite: a cell belongs to one era, a new era starts again
from weight 1, and cells two eras old weigh less than ``2 ** -32`` and are
dropped (:func:`stale_cells`).

**The rule.** For a Telegram step with refund window ``ttl``, a candidate
deadline ``d <= ttl``, the Telegram latency ``L`` (``L = inf`` for a message
never delivered within the ttl) with distribution ``F``::

    cost(d)  = Ct·F(ttl) + Cs·(1 - F(d))
    time(d)  = E[min(L, d + S)]
    score(d) = cost(d) + w·time(d)

``Ct`` and ``Cs`` are the Telegram price and the country's SMS price, ``S``
the SMS latency (learned, else the policy's ``sms_latency``) and ``w`` the
policy's ``wait_cost_per_second``. Telegram charges every message delivered
within its ttl whatever the deadline, so only the SMS term depends on ``d``:
every user not served by ``d`` gets an SMS, and ``F(ttl) - F(d)`` of them
also keep their Telegram charge (they paid twice). A user gets the first code
to arrive: Telegram's at ``L``, or the SMS at ``d + S``. The deadline is the
``d`` of least score within ``[deliver_within_min, deliver_within_max]``
(and the ttl). Its derivative, ``-Cs·f(d) + w·(1 - F(d + S))``, says: wait
one more second while the share of users whose code arrives in that second,
times the SMS price, exceeds the share still waiting for a code, times the
price of a second. A country with dear SMS therefore waits longer.

**Thin data.** With ``n`` effective (decayed) observations and
``auto_min_samples = m``, the deadline is ``d* + (1 - min(1, n/m))·(D - d*)``
where ``d*`` minimises the score and ``D`` is the configured default (the
step's ``deliver_within``, which for ``auto`` is ``deliver_within_max``): no
data gives ``D``, and as data decays the deadline widens back toward it.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

from otp_router.policy import AutoDeadline, Policy, Step
from otp_router.prices import SmsPrices
from otp_router.providers.base import ChannelName

__all__ = [
    "EDGES",
    "ERA",
    "HALF_LIFE",
    "LatencyDistribution",
    "LearnedDeadlines",
    "choose_deadline",
    "estimate_from_weights",
    "expected_score",
    "observation",
    "stale_cells",
]

#: Seconds after which an observation weighs half.
HALF_LIFE = 6 * 3600.0
#: Length of a weight era (module docstring), 8 days.
ERA = 32 * HALF_LIFE
#: Upper edges of the latency buckets, seconds: 1/64 s doubling every three
#: buckets up to 4096 s (each 26 % wider than the one before). The fine low
#: end keeps a time-scaled demo (deadlines of a fraction of a second) meaningful.
EDGES: tuple[float, ...] = tuple(2 ** (k / 3) / 64 for k in range(55))
#: Cell suffix of the never-delivered count.
NEVER = "never"
#: Candidate deadlines are this many even steps across the bounds (plus the bucket edges).
_GRID_STEPS = 240


def _bucket(seconds: float) -> int:
    """Index of the bucket holding ``seconds`` (latencies past the last edge go in the last)."""
    return min(bisect.bisect_left(EDGES, seconds), len(EDGES) - 1)


def observation(channel: str, region: str, latency: float | None, at: float) -> tuple[str, float]:
    """The store cell and weight to add for one delivery outcome.

    Args:
        channel: ``telegram`` or ``sms``.
        region: ISO region of the number.
        latency: Seconds from send accepted to delivered; None for a message
            that will never arrive (expired, undelivered, failed).
        at: Unix time of the observation.

    Returns:
        ``(cell, weight)`` for :meth:`~otp_router.store.base.Store.add_latency`.
    """
    era = math.floor(at / ERA)
    weight = 2 ** ((at - era * ERA) / HALF_LIFE)
    slot = NEVER if latency is None else str(_bucket(max(0.0, latency)))
    return f"{channel}|{region}|{era}|{slot}", weight


@dataclass(frozen=True, slots=True)
class LatencyDistribution:
    """A (decayed) latency histogram over :data:`EDGES`, plus the never-delivered weight.

    Latencies are taken as spread evenly within their bucket.

    Attributes:
        weights: Weight per bucket; bucket ``i`` covers ``(EDGES[i-1], EDGES[i]]``.
        never: Weight of messages that never arrived.
    """

    weights: tuple[float, ...] = (0.0,) * len(EDGES)
    never: float = 0.0

    @property
    def count(self) -> float:
        """Effective number of observations (decayed)."""
        return sum(self.weights) + self.never

    def merged(self, other: LatencyDistribution) -> LatencyDistribution:
        """The estimate from both sets of observations (weights add)."""
        return LatencyDistribution(
            tuple(a + b for a, b in zip(self.weights, other.weights, strict=True)), self.never + other.never
        )

    def cdf(self, seconds: float) -> float:
        """P(delivered within ``seconds``); never-delivered messages count in the denominator."""
        return _Curve(self).below(seconds)[0]

    def partial_mean(self, seconds: float) -> float:
        """E[L; L <= seconds]: the mean latency of deliveries within ``seconds`` times their share."""
        return _Curve(self).below(seconds)[1]

    def delivered_mean(self) -> float | None:
        """Mean latency of the delivered messages, or None without any."""
        delivered = sum(self.weights)
        if delivered <= 0:
            return None
        return _Curve(self).below(math.inf)[1] * self.count / delivered

    @classmethod
    def from_latencies(cls, latencies: Iterable[float | None]) -> LatencyDistribution:
        """Weight 1 per latency (None: never delivered), undecayed; for tests and simulations."""
        weights = [0.0] * len(EDGES)
        never = 0.0
        for latency in latencies:
            if latency is None:
                never += 1
            else:
                weights[_bucket(max(0.0, latency))] += 1
        return cls(tuple(weights), never)


class _Curve:
    """Cumulative share and partial mean of a distribution at each edge, for fast lookups."""

    __slots__ = ("mass", "moment")

    def __init__(self, dist: LatencyDistribution) -> None:
        total = dist.count
        self.mass = [0.0]
        self.moment = [0.0]
        low = 0.0
        for weight, high in zip(dist.weights, EDGES, strict=True):
            share = weight / total if total > 0 else 0.0
            self.mass.append(self.mass[-1] + share)
            self.moment.append(self.moment[-1] + share * (low + high) / 2)
            low = high

    def below(self, seconds: float) -> tuple[float, float]:
        """(P(L <= seconds), E[L; L <= seconds])."""
        if seconds <= 0:
            return 0.0, 0.0
        i = bisect.bisect_left(EDGES, seconds)
        if i >= len(EDGES):
            return self.mass[-1], self.moment[-1]
        low = EDGES[i - 1] if i else 0.0
        part = (seconds - low) / (EDGES[i] - low)
        share = (self.mass[i + 1] - self.mass[i]) * part
        return self.mass[i] + share, self.moment[i] + share * (low + seconds) / 2


def estimate_from_weights(
    cells: Mapping[str, float], now: float
) -> dict[tuple[str, str], LatencyDistribution]:
    """Read the store's cells into one decayed distribution per (channel, region) as of ``now``.

    Cell names that do not parse (written by another version) are ignored.
    """
    weights: dict[tuple[str, str], list[float]] = {}
    for cell, weight in cells.items():
        parts = cell.split("|")
        if len(parts) != 4:
            continue
        channel, region, era_text, slot = parts
        try:
            era = int(era_text)
            index = len(EDGES) if slot == NEVER else int(slot)
        except ValueError:
            continue
        if not 0 <= index <= len(EDGES):
            continue
        # Clamped: a cell from far in the past decays to (almost) nothing, never to an overflow.
        decayed = weight * 2 ** max(-(now - era * ERA) / HALF_LIFE, -1000.0)
        weights.setdefault((channel, region), [0.0] * (len(EDGES) + 1))[index] += decayed
    return {key: LatencyDistribution(tuple(w[:-1]), w[-1]) for key, w in weights.items()}


def stale_cells(cells: Iterable[str], now: float) -> list[str]:
    """Cells of eras before the previous one: they weigh under ``2 ** -32`` and can be dropped."""
    current = math.floor(now / ERA)
    stale = []
    for cell in cells:
        parts = cell.split("|")
        try:
            era = int(parts[2])
        except (IndexError, ValueError):
            continue
        if era < current - 1:
            stale.append(cell)
    return stale


def expected_score(
    telegram: LatencyDistribution,
    deadline: float,
    *,
    ttl: float,
    telegram_price: float,
    sms_price: float,
    sms_latency: float,
) -> tuple[float, float]:
    """Expected cost and time to code per sent Telegram message, for one deadline (module docstring).

    Args:
        telegram: The country's Telegram latency estimate.
        deadline: Seconds from send accepted to the SMS fallback.
        ttl: Telegram's refund window, seconds.
        telegram_price: Price of a delivered Telegram message.
        sms_price: The country's SMS price.
        sms_latency: Seconds an SMS takes to arrive.

    Returns:
        ``(cost, time)``: USD, and seconds from send accepted to the first code delivered.
    """
    return _score_parts(_Curve(telegram), deadline, ttl, telegram_price, sms_price, sms_latency)


def _score_parts(
    curve: _Curve, deadline: float, ttl: float, telegram_price: float, sms_price: float, sms_latency: float
) -> tuple[float, float]:
    within_deadline = curve.below(min(deadline, ttl))[0]
    within_ttl = curve.below(ttl)[0]
    cost = telegram_price * within_ttl + sms_price * (1 - within_deadline)
    sms_at = deadline + sms_latency
    first, mean = curve.below(min(ttl, sms_at))
    return cost, mean + (1 - first) * sms_at


def choose_deadline(
    telegram: LatencyDistribution | None,
    *,
    bounds: AutoDeadline,
    ttl: float,
    telegram_price: float,
    sms_price: float,
    sms_latency: float,
    wait_cost_per_second: float,
    min_samples: float,
    default: float | None = None,
) -> float:
    """The deadline of least expected cost plus priced waiting (module docstring).

    Args:
        telegram: The country's Telegram latency estimate; None when there is none.
        bounds: ``deliver_within_min`` / ``_max``; the ttl caps both.
        ttl: Telegram's refund window, seconds.
        telegram_price: Price of a delivered Telegram message.
        sms_price: The country's SMS price (same currency).
        sms_latency: Seconds an SMS takes to arrive.
        wait_cost_per_second: What one second of a user's wait is worth.
        min_samples: Effective observations needed to trust the estimate fully.
        default: Deadline without data (default: ``bounds.maximum``).

    Returns:
        Seconds, always within the bounds and at most ``ttl``.
    """
    low, high = min(bounds.minimum, ttl), min(bounds.maximum, ttl)
    fallback = min(max(high if default is None else default, low), high)
    count = 0.0 if telegram is None else telegram.count
    if telegram is None or count <= 0:
        return fallback
    curve = _Curve(telegram)
    step = (high - low) / _GRID_STEPS
    candidates = {low + i * step for i in range(_GRID_STEPS)} | {high}
    candidates |= {edge for edge in EDGES if low < edge < high}
    best, best_score = high, math.inf
    for deadline in sorted(candidates, reverse=True):
        cost, time = _score_parts(curve, deadline, ttl, telegram_price, sms_price, sms_latency)
        score = cost + wait_cost_per_second * time
        # Longest first, and only a strictly better score wins: a tie keeps the
        # longer deadline (fewer users paying twice).
        if score < best_score - 1e-12:
            best, best_score = deadline, score
    trust = 1.0 if min_samples <= 0 else min(1.0, count / min_samples)
    return min(max(best + (1 - trust) * (fallback - best), low), high)


class LearnedDeadlines:
    """The router's in-process copy of the shared estimate, and the deadlines resolved from it.

    :meth:`update` replaces the estimate (the router calls it every so often
    with the store's cells); :meth:`resolve` turns a workflow's ``auto`` steps
    into concrete ones from the cached estimate, without I/O.
    """

    def __init__(self) -> None:
        self._estimate: dict[tuple[str, str], LatencyDistribution] = {}
        self._memo: dict[tuple[str, Step, float, float, float], float] = {}

    def update(self, cells: Mapping[str, float], now: float) -> None:
        """Replace the estimate with the store's cells as of ``now``; forget resolved deadlines."""
        self._estimate = estimate_from_weights(cells, now)
        self._memo.clear()

    def distribution(self, channel: str, region: str) -> LatencyDistribution | None:
        """The cached estimate for one channel and region, if any."""
        return self._estimate.get((channel, region))

    def resolve(
        self, steps: tuple[Step, ...], region: str, policy: Policy, prices: SmsPrices
    ) -> tuple[Step, ...]:
        """``steps`` with every ``auto`` step replaced by a fixed one at the learned deadline for ``region``.

        The ttl is kept. A workflow without ``auto`` steps is returned as is.
        """
        if all(step.auto is None for step in steps):
            return steps
        return tuple(self._resolve_step(step, region, policy, prices) for step in steps)

    def _resolve_step(self, step: Step, region: str, policy: Policy, prices: SmsPrices) -> Step:
        if step.auto is None:
            return step
        key = (region, step, policy.wait_cost_per_second, policy.auto_min_samples, policy.sms_latency)
        seconds = self._memo.get(key)
        if seconds is None:
            sms = self._estimate.get((ChannelName.SMS.value, region))
            learned = (
                sms.delivered_mean() if sms is not None and sms.count >= policy.auto_min_samples else None
            )
            seconds = choose_deadline(
                self._estimate.get((str(step.channel), region)),
                bounds=step.auto,
                ttl=step.ttl,
                telegram_price=float(prices.telegram),
                sms_price=float(prices.sms(region)),
                sms_latency=policy.sms_latency if learned is None else learned,
                wait_cost_per_second=policy.wait_cost_per_second,
                min_samples=policy.auto_min_samples,
                default=step.deliver_within,
            )
            self._memo[key] = seconds
        return replace(step, deliver_within=seconds, auto=None)
