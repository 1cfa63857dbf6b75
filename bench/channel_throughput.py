"""Send throughput of the Telegram channel against its emulator, beside a bare-aiohttp baseline.

Run ``python bench/channel_throughput.py`` (about a minute on 2 cores). It
writes ``bench/results/channel_throughput.md`` and ``.json``.

The Telegram Gateway emulator runs in its own process (``otp-router emulate``)
so that the client's CPU and the server's CPU do not share one event loop.
Each round sends the same number of ``sendVerificationMessage`` calls with a
fixed number in flight, through one of these clients:

* ``channel``: ``TelegramChannel.send`` over ``create_http_client()`` (httpx
  over the aiohttp transport), the stack the router uses: request building,
  error mapping, the retry wrapper and the typed ``RequestStatus`` parsing.
* ``aiohttp``: a bare ``aiohttp.ClientSession`` POSTing the same JSON with the
  same Bearer header and reading the JSON envelope: the raw baseline.
* ``httpx_aiohttp``: the same bare POST and envelope check through
  ``create_http_client()``: splits the channel's overhead into what httpx
  over aiohttp adds and what the channel itself adds.
* ``httpx_default``: the same channel over an ``httpx.AsyncClient`` with its
  default transport (``--no-httpx-default`` skips it): why we use httpx-aiohttp.

Rounds alternate between the clients (the order rotates each round) and the
emulator is reset between rounds, so every client meets the same server
state. Reported: the median over rounds of requests per second and of client
CPU seconds per request (``time.process_time``), plus the emulator process's
CPU per request (from ``/proc``, Linux only), and ratios to the baseline.
Timings are noisy on a small machine: compare ratios within one run, not
absolute numbers across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx
from _results import DEFAULT_OUT, machine, median, publish, ratio, today
from _worker_harness import Emulator, emulator_process, process_cpu_seconds
from pydantic import SecretStr

from otp_router.config import HttpSettings, RetrySettings, TelegramSettings
from otp_router.harness import sample_numbers
from otp_router.http import create_http_client
from otp_router.providers.base import SendRequest
from otp_router.providers.telegram import TelegramChannel

NAME = "channel_throughput"
#: Client names in the order of the first round.
SIDES = ("channel", "aiohttp", "httpx_aiohttp", "httpx_default")
BASELINE = "aiohttp"
DESCRIPTIONS = {
    "channel": "TelegramChannel.send over create_http_client() (httpx + aiohttp transport)",
    "aiohttp": "bare aiohttp.ClientSession POST + JSON envelope (baseline)",
    "httpx_aiohttp": "bare create_http_client().post + JSON envelope (the transport without the channel)",
    "httpx_default": "TelegramChannel.send over httpx.AsyncClient (default transport)",
}

Send = Callable[[str, str], Awaitable[None]]


@dataclass(slots=True)
class Round:
    """One timed round of one client."""

    side: str
    index: int
    requests: int
    errors: int
    wall_s: float
    client_cpu_s: float
    server_cpu_s: float | None
    error_types: dict[str, int] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        """Completed calls per wall-clock second."""
        return self.requests / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the derived per-request figures."""
        data = asdict(self)
        data["wall_s"] = round(self.wall_s, 4)
        data["client_cpu_s"] = round(self.client_cpu_s, 4)
        data["server_cpu_s"] = None if self.server_cpu_s is None else round(self.server_cpu_s, 3)
        data["requests_per_s"] = round(self.requests_per_s, 1)
        data["client_cpu_ms_per_request"] = round(1000 * self.client_cpu_s / self.requests, 4)
        data["server_cpu_ms_per_request"] = (
            None if self.server_cpu_s is None else round(1000 * self.server_cpu_s / self.requests, 4)
        )
        return data


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    """An empty folder for the emulator to run in: no stray .env can change its settings."""
    with tempfile.TemporaryDirectory(prefix="otp-bench-") as folder:
        yield Path(folder)


# --------------------------------------------------------------------------- clients


@contextlib.asynccontextmanager
async def make_sender(side: str, emulator: Emulator, pool: int) -> AsyncIterator[Send]:
    """A ``send(phone, code)`` coroutine function for ``side``; its connections close on exit."""
    settings = TelegramSettings(token=SecretStr(emulator.token), base_url=emulator.telegram_url)
    if side == "aiohttp":
        url = f"{emulator.telegram_url}/sendVerificationMessage"
        headers = {"Authorization": f"Bearer {emulator.token}"}
        connector = aiohttp.TCPConnector(limit=pool)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def send_raw(phone: str, code: str) -> None:
                body = {"phone_number": phone, "code": code, "ttl": 30}
                async with session.post(url, json=body, headers=headers) as response:
                    envelope = await response.json()
                if not envelope.get("ok") or not envelope["result"].get("request_id"):
                    raise RuntimeError(f"emulator refused: {envelope.get('error')}")

            yield send_raw
        return

    if side in ("channel", "httpx_aiohttp"):
        client = create_http_client(HttpSettings(max_connections=pool))
    elif side == "httpx_default":
        limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool)
        client = httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(10.0), trust_env=False)
    else:
        raise ValueError(f"unknown side {side!r}")
    if side == "httpx_aiohttp":
        url = f"{emulator.telegram_url}/sendVerificationMessage"
        headers = {"Authorization": f"Bearer {emulator.token}"}
        try:

            async def send_httpx(phone: str, code: str) -> None:
                body = {"phone_number": phone, "code": code, "ttl": 30}
                envelope = (await client.post(url, json=body, headers=headers)).json()
                if not envelope.get("ok") or not envelope["result"].get("request_id"):
                    raise RuntimeError(f"emulator refused: {envelope.get('error')}")

            yield send_httpx
        finally:
            await client.aclose()
        return
    channel = TelegramChannel(settings, RetrySettings(), client)
    try:

        async def send_channel(phone: str, code: str) -> None:
            result = await channel.send(SendRequest(phone=phone, code=code, ttl=30))
            if not result.ref:
                raise RuntimeError("no request_id")

        yield send_channel
    finally:
        await channel.aclose()
        await client.aclose()


async def reset_emulator(session: aiohttp.ClientSession, emulator: Emulator) -> None:
    """Forget the emulator's requests, log and timers and restore its balance."""
    async with session.post(f"{emulator.telegram_url}/_emulator/reset") as response:
        response.raise_for_status()


async def timed_round(
    side: str, index: int, send: Send, phones: Sequence[str], requests: int, concurrency: int, pid: int
) -> Round:
    """Send ``requests`` calls with ``concurrency`` in flight; measure wall and CPU time."""
    numbers = iter(range(requests))
    errors: Counter[str] = Counter()

    async def worker() -> None:
        for i in numbers:
            try:
                await send(phones[i % len(phones)], f"{i % 1_000_000:06d}")
            except Exception as exc:  # counted and reported, never hidden: a failed call is no throughput
                errors[type(exc).__name__] += 1

    server_before = process_cpu_seconds(pid)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - wall_before, time.process_time() - cpu_before
    server_after = process_cpu_seconds(pid)
    server = None if server_before is None or server_after is None else server_after - server_before
    failed = sum(errors.values())
    return Round(side, index, requests - failed, failed, wall, cpu, server, dict(errors))


# --------------------------------------------------------------------------- run and report


async def run(
    *, requests: int, concurrency: int, rounds: int, warmup: int, sides: Sequence[str]
) -> list[Round]:
    """Run every round of every side against one emulator process."""
    phones = sample_numbers("GB", min(requests, 5000))
    results: list[Round] = []
    with workdir() as folder:
        async with emulator_process(folder) as emulator, aiohttp.ClientSession() as admin:
            pool = max(concurrency, 10)
            async with contextlib.AsyncExitStack() as stack:
                senders = {
                    side: await stack.enter_async_context(make_sender(side, emulator, pool)) for side in sides
                }
                # Warm-up: open connections and fill caches before anything is timed.
                for side in sides:
                    await reset_emulator(admin, emulator)
                    pid = emulator.process.pid
                    await timed_round(side, -1, senders[side], phones, warmup, concurrency, pid)
                for index in range(rounds):
                    order = [sides[(index + k) % len(sides)] for k in range(len(sides))]
                    for side in order:
                        await reset_emulator(admin, emulator)
                        result = await timed_round(
                            side, index, senders[side], phones, requests, concurrency, emulator.process.pid
                        )
                        results.append(result)
                        print(
                            f"  round {index + 1}/{rounds} {side:<14} {result.requests_per_s:8.0f} req/s  "
                            f"{1000 * result.client_cpu_s / requests:6.3f} ms CPU/req"
                            + (f"  errors {result.errors}" if result.errors else ""),
                            file=sys.stderr,
                        )
    return results


def summarize(results: Sequence[Round], sides: Sequence[str]) -> dict[str, Any]:
    """Medians per side and ratios to the baseline."""
    out: dict[str, Any] = {}
    for side in sides:
        rows = [r.to_dict() for r in results if r.side == side]
        out[side] = {
            "description": DESCRIPTIONS[side],
            "rounds": rows,
            "median": {
                key: median([row[key] for row in rows])
                for key in ("requests_per_s", "client_cpu_ms_per_request", "server_cpu_ms_per_request")
            },
        }
    ratios: dict[str, Any] = {}
    base = out.get(BASELINE, {}).get("median", {})
    for side in sides:
        if side == BASELINE:
            continue
        med = out[side]["median"]
        ratios[f"{side}/{BASELINE}"] = {
            key: ratio(med[key], base.get(key))
            for key in ("requests_per_s", "client_cpu_ms_per_request", "server_cpu_ms_per_request")
        }
    return {"sides": out, "ratios": ratios}


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def reading(data: dict[str, Any]) -> list[str]:
    """A few sentences that read this run's medians (empty when a client is missing)."""
    cpu = {side: info["median"]["client_cpu_ms_per_request"] for side, info in data["sides"].items()}
    base, channel, transport = cpu.get(BASELINE), cpu.get("channel"), cpu.get("httpx_aiohttp")
    if base is None or channel is None or transport is None:
        return []
    lines = [
        "",
        f"Reading: the channel costs {channel:.3f} ms of client CPU per send, {channel / base:.1f}× a bare "
        f"aiohttp call ({base:.3f} ms). Of the {channel - base:.3f} ms extra, httpx over the aiohttp "
        f"transport accounts for {transport - base:.3f} ms and the channel's own work (parameter "
        f"checks, the retry wrapper, typed parsing of the answer) for {channel - transport:.3f} ms.",
    ]
    default = cpu.get("httpx_default")
    if default is not None:
        lines[-1] += (
            f" The same channel over httpx's default transport costs {default:.3f} ms "
            f"({default / channel:.1f}× the channel on aiohttp): why the router uses httpx-aiohttp."
        )
    return lines


def render(data: dict[str, Any]) -> str:
    """The Markdown report the README quotes."""
    cfg, mach = data["config"], data["machine"]
    lines = [
        "# Telegram channel send throughput",
        "",
        f"Measured {data['date']} on {mach['nproc']} CPUs ({mach['cpu'] or 'unknown CPU'}), "
        f"{mach['implementation']} {mach['python']}, {mach['platform']}; "
        f"load average at start {mach['load_average_1min']}.",
        "",
        f"`sendVerificationMessage` to the Telegram Gateway emulator running in a separate process "
        f"over loopback: {cfg['requests']} calls per round, {cfg['concurrency']} in flight, "
        f"{cfg['rounds']} timed round(s) per client (after one warm-up round of {cfg['warmup']} calls), "
        "rounds alternating between clients, emulator reset between rounds. Medians over rounds.",
        "",
        "| client | req/s (median) | req/s range | client CPU ms/req | emulator CPU ms/req "
        "| req/s vs baseline | client CPU vs baseline |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for side, info in data["sides"].items():
        med = info["median"]
        rps = [r["requests_per_s"] for r in info["rounds"]]
        rng = f"{min(rps):.0f}–{max(rps):.0f}" if rps else "-"
        rat = data["ratios"].get(f"{side}/{BASELINE}", {})
        vs_rps = "1 (baseline)" if side == BASELINE else _fmt(rat.get("requests_per_s"), ".2f")
        vs_cpu = "1 (baseline)" if side == BASELINE else _fmt(rat.get("client_cpu_ms_per_request"), ".2f")
        lines.append(
            f"| `{side}` | {_fmt(med['requests_per_s'], '.0f')} | {rng} "
            f"| {_fmt(med['client_cpu_ms_per_request'], '.3f')} "
            f"| {_fmt(med['server_cpu_ms_per_request'], '.3f')} | {vs_rps} | {vs_cpu} |"
        )
    lines += ["", "Clients:", ""]
    lines += [f"- `{side}`: {info['description']}" for side, info in data["sides"].items()]
    lines += [
        "",
        "req/s is wall-clock throughput of the whole client + emulator system and is bounded by "
        "whichever side saturates its core first; client CPU ms/req (`time.process_time` of the "
        "client process divided by calls) is the cost our stack adds per call and the more "
        "stable figure. Ratios compare medians from the same run.",
        "",
        f"Failed calls: {data['errors']}.",
        *reading(data),
        "",
        "Rerun: `python bench/channel_throughput.py` (see `bench/README.md`).",
    ]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=2000, help="calls per round (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=50, help="calls in flight (default: %(default)s)")
    parser.add_argument(
        "--rounds", type=int, default=7, help="timed rounds per client (default: %(default)s)"
    )
    parser.add_argument(
        "--warmup", type=int, default=500, help="untimed calls per client first (default: %(default)s)"
    )
    parser.add_argument(
        "--no-httpx-default", action="store_true", help="skip the httpx default-transport client"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke mode: 40 calls, 1 round, 8 in flight (numbers meaningless)",
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default: bench/results)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds, args.concurrency, args.warmup = 40, 1, 8, 8
    if min(args.requests, args.concurrency, args.rounds, args.warmup) < 1:
        parser.error("--requests, --concurrency, --rounds and --warmup must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark and write the results; exit status 1 if any call failed."""
    args = parse_args(argv)
    sides = [s for s in SIDES if not (args.no_httpx_default and s == "httpx_default")]
    config = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "rounds": args.rounds,
        "warmup": args.warmup,
        "quick": args.quick,
        "sides": sides,
    }
    print(f"{NAME}: {config}", file=sys.stderr)
    results = asyncio.run(
        run(
            requests=args.requests,
            concurrency=args.concurrency,
            rounds=args.rounds,
            warmup=args.warmup,
            sides=sides,
        )
    )
    errors = sum(r.errors for r in results)
    data: dict[str, Any] = {
        "benchmark": NAME,
        "date": today(),
        "machine": machine(),
        "config": config,
        "errors": errors,
        **summarize(results, sides),
    }
    markdown = render(data)
    publish(args.out, NAME, data, markdown)
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
