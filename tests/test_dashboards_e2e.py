"""End to end: every Grafana panel query returns data from a real Prometheus.

A seeded demo run (real router, Telegram and Twilio emulators, SQLite store,
signed webhooks) records into a private ``CollectorRegistry`` that is served
on a loopback port. A real ``prometheus`` binary, configured from
``otp_router/assets/prometheus.yml`` with ``otp_router/assets/alerts.yml`` loaded, scrapes it every
second. After the run, every target of every panel in ``otp_router/assets/dashboards/``
is sent to Prometheus' HTTP API with the template variables substituted as
Grafana substitutes them, and must return at least one series with a finite
value. The Cost dashboard's exact totals must equal the router's own ledger.

The worker's loop is not run here (it has its own tests). The metrics only
a worker records (heartbeat, queue depth and lag, in-flight count, queue
messages, dead letters) are fed by :func:`simulate_worker` through the same
:class:`~otp_router.metrics.Metrics` methods the worker calls, into the same
registry, so the panels that read them are checked against real series too.
The demo never has an SMS refused nor a start rate-limited, so
:func:`provoke_failures` adds one of each through a real router afterwards.

Needs the ``prometheus`` binary (Debian: ``apt-get install prometheus``):
skipped without it, a failure when the CI environment variable is set.
Select with ``pytest -m prometheus``.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client import CollectorRegistry, start_http_server

from otp_router.config import LimitSettings, RetrySettings, Settings
from otp_router.core import Status
from otp_router.demo import DemoSummary, make_population, run_demo
from otp_router.emulators import Behaviour, Script, serve_emulators
from otp_router.errors import AllProvidersFailed, RateLimited, UnsupportedNumberType
from otp_router.harness import emulated_settings, sample_numbers
from otp_router.metrics import Metrics
from otp_router.policy import Policy, Step
from otp_router.providers.base import ChannelName
from otp_router.router import OtpRouter

pytestmark = [pytest.mark.prometheus, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "otp_router" / "assets" / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
PROMETHEUS_CONFIG = ROOT / "otp_router" / "assets" / "prometheus.yml"
ALERTS = ROOT / "otp_router" / "assets" / "alerts.yml"

#: The scenario: enough users that every kind the demo draws (slow, absent,
#: 5xx, flood-waited, undelivered SMS, typos) occurs at least once.
USERS = 80
SEED = 12  # one of the seeds whose 80 users include every kind (checked in the test)

#: Grafana's built-in variables for a "Last 1 hour" dashboard. ``$__range`` is
#: the range in seconds; ``$__rate_interval`` is at least four scrape intervals
#: of the data source (Grafana's default 15 s).
GRAFANA_BUILTINS = {"__range": "3600s", "__range_s": "3600", "__rate_interval": "1m", "__interval": "15s"}

#: Maximum distance between a Cost total and the ledger (USD): float64 rounding of the counter sums.
TOLERANCE = 1e-6


@dataclass(frozen=True, slots=True)
class Target:
    """One panel query, ready to send to Prometheus."""

    dashboard: str
    panel: str
    ref_id: str
    expr: str
    instant: bool

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel} / {self.ref_id}: {self.expr}"


def dashboard_variables(dashboard: dict[str, Any]) -> dict[str, str]:
    """Values Grafana gives the dashboard's variables on first load.

    A multi-select variable left at *All* becomes its ``allValue`` (the
    dashboards use it as ``=~"$country"``); an interval variable its current
    value.
    """
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "datasource":
            continue
        current = variable["current"]["value"]
        if current in ("$__all", ["$__all"]):
            values[variable["name"]] = variable["allValue"]
        else:
            values[variable["name"]] = current[0] if isinstance(current, list) else current
    return values


def substitute(expr: str, values: dict[str, str]) -> str:
    """Replace ``$name`` and ``${name}``; an unknown variable raises KeyError, so none slips through."""
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], expr)


def dashboard_targets() -> list[Target]:
    """Every query of every panel (nested rows included) of the three dashboards."""
    targets: list[Target] = []

    def walk(name: str, panels: list[dict[str, Any]], values: dict[str, str]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                targets.append(
                    Target(
                        dashboard=name,
                        panel=panel["title"],
                        ref_id=target["refId"],
                        expr=substitute(target["expr"], values),
                        instant=bool(target.get("instant")) and not target.get("range"),
                    )
                )
            walk(name, panel.get("panels", []), values)

    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text(encoding="utf-8"))
        walk(path.stem, dashboard["panels"], dashboard_variables(dashboard))
    return targets


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    # Runs in the child before exec: if pytest dies without tearing down
    # (killed by a timeout), the kernel sends Prometheus SIGTERM.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


@pytest.fixture
def registry() -> CollectorRegistry:
    """The private registry the demo run records into."""
    return CollectorRegistry()


@pytest.fixture
def exporter(registry: CollectorRegistry) -> Iterator[str]:
    """Serve ``registry`` on a free loopback port for the whole test; yields ``host:port``."""
    server, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield f"127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@dataclass(frozen=True, slots=True)
class PrometheusServer:
    """The Prometheus process a test started, and where it writes its log."""

    url: str
    process: subprocess.Popen[bytes]
    log: Path

    def explain(self) -> str:
        """Whether the process still runs, with its log: for failure messages."""
        code = self.process.poll()
        state = "is running" if code is None else f"exited with {code}"
        return f"prometheus at {self.url} {state}; its log:\n{self.log.read_text(encoding='utf-8')}"


@pytest.fixture
def prometheus(prometheus_binary: str, exporter: str, tmp_path: Path) -> Iterator[PrometheusServer]:
    """A real Prometheus scraping ``exporter`` every second with our rules loaded.

    The scrape job is otp_router/assets/prometheus.yml's own (so its job name is the one
    the dashboards and alerts expect); only the intervals, the target and the
    rule file's path are changed. The process is terminated at teardown, and
    dies with pytest if pytest is killed.
    """
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(ALERTS)]
    (job,) = config["scrape_configs"]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [exporter]}]
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config), encoding="utf-8")
    address = f"127.0.0.1:{free_port()}"
    log_path = tmp_path / "prometheus.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                prometheus_binary,
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address={address}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    server = PrometheusServer(f"http://{address}", process, log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _wait_ready(server: PrometheusServer) -> None:
    """Poll ``/-/ready`` until Prometheus answers 200; fail with its log if it exits or hangs."""
    until = time.monotonic() + 30
    with httpx.Client(timeout=1) as client:
        while time.monotonic() < until:
            if server.process.poll() is not None:
                pytest.fail(server.explain())
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{server.url}/-/ready").status_code == 200:
                    return
            time.sleep(0.1)
    pytest.fail(f"not ready after 30 s: {server.explain()}")


class PrometheusApi:
    """Prometheus' HTTP API, failing the test with the server's state and log if it is gone."""

    def __init__(self, client: httpx.AsyncClient, server: PrometheusServer) -> None:
        self.client = client
        self.server = server

    async def get(self, path: str, **params: str | float) -> Any:
        """``data`` of a successful API answer."""
        try:
            response = await self.client.get(path, params=params)
        except httpx.TransportError as exc:
            # A SIGTERM in the log means something outside the test stopped it,
            # e.g. `pkill -x prometheus` in .ci/run while this test was running.
            pytest.fail(f"GET {path}: {exc!r}\n{self.server.explain()}")
        body = response.json()
        assert body["status"] == "success", f"GET {path} {params}: {body}"
        return body["data"]

    async def query(self, target: Target, start: float, end: float) -> list[dict[str, Any]]:
        """Run a panel query as Grafana would: instant at ``end``, or over ``start``..``end``."""
        if target.instant:
            data = await self.get("/api/v1/query", query=target.expr, time=end)
        else:
            data = await self.get("/api/v1/query_range", query=target.expr, start=start, end=end, step=1)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def value(self, expr: str) -> float:
        """The value now of an instant query that must return exactly one series."""
        result = (await self.get("/api/v1/query", query=expr))["result"]
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    async def wait_for_scrapes(self, count: int) -> None:
        """Wait until Prometheus has stored ``count`` more scrapes of the otp-router job."""
        expr = 'sum(count_over_time(up{job="otp-router"}[1h]))'

        async def scrapes() -> float:
            result = (await self.get("/api/v1/query", query=expr))["result"]
            return float(result[0]["value"][1]) if result else 0.0

        wanted = await scrapes() + count
        loop = asyncio.get_running_loop()
        until = loop.time() + 30
        while await scrapes() < wanted:
            assert loop.time() < until, f"Prometheus stopped scraping the exporter\n{self.server.explain()}"
            await asyncio.sleep(0.2)


async def simulate_worker(metrics: Metrics, stop: asyncio.Event) -> None:
    """Record what a worker loop records, every half second, until ``stop`` is set.

    A heartbeat, a queue that fills and drains, a few messages in flight, a
    processed message per beat, and (once) a message dead-lettered after too
    many deliveries, counted by outcome and by reason as the worker counts it.
    """
    metrics.queue_message("dead_letter")
    metrics.dead_letter("too_many_deliveries")
    beat = 0
    while not stop.is_set():
        metrics.worker_heartbeat()
        metrics.queue_depth(beat % 5)
        metrics.queue_lag(0.1 * (beat % 5))
        metrics.inflight(beat % 3)
        metrics.queue_message("processed")
        beat += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


def has_finite_value(series: list[dict[str, Any]]) -> bool:
    """True when some series has a finite sample (NaN from 0/0 is not data)."""
    for one in series:
        samples = one["values"] if "values" in one else [one["value"]]
        if any(math.isfinite(float(value)) for _, value in samples):
            return True
    return False


async def provoke_failures(metrics: Metrics) -> None:
    """Send two starts the demo never draws through a real router, recording into ``metrics``.

    The demo's providers never refuse an SMS and it sets no abuse limit, so
    the panels for SMS send failures and rate limits would stay empty. Here
    one number is not on Telegram and Twilio refuses it (error 21211): the
    SMS send is rejected. Starting it again trips a per-phone limit of one,
    another number of its prefix a per-prefix limit of one, and a premium-rate
    number the number-type policy (the toll-fraud panel). All go through the
    real router, emulators and instrumentation.
    """
    phone, neighbour = sample_numbers("GB", 2)
    script = Script({phone: Behaviour(telegram="absent", sms_invalid=True)})
    pair = await serve_emulators(
        Settings.model_construct(), host="127.0.0.1", telegram_port=0, twilio_port=0, script=script
    )
    try:
        settings = emulated_settings(
            pair,
            store_url="memory://",
            code_secret=secrets.token_hex(32),
            retry=RetrySettings(backoff=False),
            limits=LimitSettings(per_phone=1, per_prefix=1),
        )
        policy = Policy(steps=(Step(ChannelName.TELEGRAM, 30, probe=True), Step(ChannelName.SMS, 120)))
        async with OtpRouter.from_settings(settings, policy=policy, metrics=metrics) as router:
            with pytest.raises(AllProvidersFailed) as failed:
                await router.start(phone)
            assert failed.value.verification is not None
            assert failed.value.verification.status is Status.FAILED, failed.value.verification
            with pytest.raises(RateLimited):
                await router.start(phone)
            with pytest.raises(RateLimited, match="prefix"):
                await router.start(neighbour)
            with pytest.raises(UnsupportedNumberType):
                await router.start("+449012345678")
    finally:
        await pair.aclose()


async def test_every_panel_query_returns_data_and_cost_totals_match_the_ledger(
    prometheus: PrometheusServer, registry: CollectorRegistry, tmp_path: Path
) -> None:
    """Against a real Prometheus, every panel query has data and the Cost totals equal the ledger."""
    kinds = {user.kind for user in make_population(USERS, SEED).users}
    # The scenario must exercise fallbacks, refunds, retries and bad input, or
    # "every panel has data" would prove less than it says.
    assert kinds >= {"telegram", "absent", "slow", "never", "telegram_5xx", "flood", "bad_number"}, kinds

    metrics = Metrics(registry)
    workdir = tmp_path / "demo"
    workdir.mkdir()
    async with httpx.AsyncClient(base_url=prometheus.url, timeout=10) as client:
        api = PrometheusApi(client, prometheus)
        # Prometheus must hold a sample from before the run, so rate() and increase() see all of it.
        await api.wait_for_scrapes(1)
        began = time.time()
        stop = asyncio.Event()
        worker = asyncio.create_task(simulate_worker(metrics, stop))
        try:
            # A learned Telegram deadline (so the learned-deadline panels have data) of at most
            # 5 s under its 30 s ttl, so that users whose message lands in between pay twice and
            # the paid-twice panels have something to show too.
            policy = Policy.from_dict(
                {
                    "steps": [
                        {"channel": "telegram", "deliver_within": "auto", "deliver_within_max": 5, "ttl": 30},
                        {"channel": "sms", "deliver_within": 120},
                    ]
                }
            )
            summary = await run_demo(
                users=USERS, seed=SEED, workdir=workdir, metrics=metrics, progress=None, policy=policy
            )
        finally:
            stop.set()
            await worker
        assert summary.fallbacks and summary.cost_refunded < 0 and summary.refused_input > 0, summary
        assert summary.paid_twice > 0, summary
        # Two scrapes after the run: the last one certainly started after the final increments.
        await api.wait_for_scrapes(2)
        # Checked before provoke_failures(), whose start adds to the SMS-only total.
        await assert_cost_totals_match(api, summary)

        await provoke_failures(metrics)
        # Its counters are new: rate() and increase() need two samples of them in the window.
        await api.wait_for_scrapes(3)
        ended = time.time()
        empty = [
            str(t) for t in dashboard_targets() if not has_finite_value(await api.query(t, began, ended))
        ]
        assert not empty, "panel queries without data:\n" + "\n".join(empty)
        await assert_rules_evaluate(api)


async def assert_cost_totals_match(api: PrometheusApi, summary: DemoSummary) -> None:
    """The Cost dashboard's exact-total stats, as queried, equal the ledger's figures."""
    cost = json.loads((DASHBOARD_DIR / "cost.json").read_text(encoding="utf-8"))
    values = dashboard_variables(cost)
    stats = {
        panel["title"]: substitute(panel["targets"][0]["expr"], values)
        for panel in cost["panels"]
        if panel["type"] == "stat"
    }
    refunded = -summary.cost_refunded
    expected: dict[str, Decimal] = {
        "Net spend": summary.cost_router,
        "Charged": summary.cost_router + refunded,
        "Refunded": refunded,
        "SMS-only cost": summary.cost_sms_only,
        "Saved vs SMS-only": summary.cost_sms_only - summary.cost_router,
    }
    shown = {title: await api.value(stats[title]) for title in expected}
    assert shown == {title: pytest.approx(float(ledger), abs=TOLERANCE) for title, ledger in expected.items()}


async def assert_rules_evaluate(api: PrometheusApi) -> None:
    """Every recording and alert rule of the shipped alerts.yml is loaded and evaluates without error."""
    loop = asyncio.get_running_loop()
    until = loop.time() + 10
    # A rule stays "unknown" until its group's first evaluation.
    while True:
        groups = (await api.get("/api/v1/rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        if all(rule["health"] != "unknown" for rule in rules) or loop.time() > until:
            break
        await asyncio.sleep(0.2)
    wanted = {group["name"] for group in yaml.safe_load(ALERTS.read_text(encoding="utf-8"))["groups"]}
    assert {group["name"] for group in groups} == wanted
    broken = {
        rule["name"]: (rule["health"], rule.get("lastError")) for rule in rules if rule["health"] != "ok"
    }
    assert not broken
    assert await api.value("sum(otp_router:cost_net_usd:sum_by_channel_country)") > 0
