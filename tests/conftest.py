"""Shared fixtures: clean environment, settings, required programs, real Redis, HTTP client, loopback
servers, emulators."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from otp_router.config import RetrySettings, Settings
from otp_router.emulators import EmulatorPair, Script, serve_emulators
from otp_router.http import create_http_client


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    """Keep OTP_ROUTER_* and TWILIO_* variables and a stray .env out of every test."""
    for name in list(os.environ):
        if name.startswith(("OTP_ROUTER_", "TWILIO_")):
            monkeypatch.delenv(name)
    # pydantic-settings reads ./.env: run each test from an empty folder.
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture
def make_settings() -> Any:
    """Factory: Settings with backoff switched off, overridable per test."""

    def make(**overrides: Any) -> Settings:
        overrides.setdefault("retry", RetrySettings(backoff=False, attempts=3, timeout=10))
        overrides.setdefault("store_url", "memory://")
        return Settings(**overrides)

    return make


def required_binary(name: str, *, install: str) -> str:
    """Path of the program ``name``; skips the test when it is not installed, unless CI is
    set: then a missing program is a failure."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is required in CI but is not on PATH ({install})")
        pytest.skip(f"{name} not on PATH: {install} (set CI=1 to make this a failure)")
    return path


@pytest.fixture
def promtool() -> str:
    """Path of the promtool binary; skip (or fail in CI) when it is not installed."""
    return required_binary("promtool", install="apt-get install prometheus")


@pytest.fixture
def prometheus_binary() -> str:
    """Path of the prometheus server; skip (or fail in CI) when it is not installed."""
    return required_binary("prometheus", install="apt-get install prometheus")


@pytest.fixture
def redis_server_binary() -> str:
    """Path of redis-server (for a private server); skip (or fail in CI) when it is not installed."""
    return required_binary("redis-server", install="apt-get install redis-server")


def _redis_available() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture
async def redis_url() -> AsyncIterator[str]:
    """URL of the real Redis at 127.0.0.1:6379, with a unique key prefix cleaned afterwards.

    Skips with a clear reason when Redis is absent, unless CI is set: then a
    missing Redis is a failure.
    """
    if not _redis_available():
        if os.environ.get("CI"):
            pytest.fail("Redis is required in CI but 127.0.0.1:6379 is not reachable")
        pytest.skip("no Redis at 127.0.0.1:6379 (set CI=1 to make this a failure)")
    import redis.asyncio as aioredis

    prefix = f"otp-test-{uuid.uuid4().hex[:8]}"
    yield f"redis://127.0.0.1:6379/0?prefix={prefix}"
    client = aioredis.Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(scope="session")
def redis_cluster_ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    """Ports of a real three-master Redis Cluster started for this test session.

    Skips with a clear reason when ``redis-server`` or ``redis-cli`` is
    missing, unless CI is set: then that is a failure.
    """
    from redis_cluster import cluster_tools_missing, running_cluster

    missing = cluster_tools_missing()
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"a Redis Cluster is required in CI but {missing}")
        pytest.skip(f"no Redis Cluster: {missing} (set CI=1 to make this a failure)")
    with running_cluster(tmp_path_factory.mktemp("redis-cluster")) as ports:
        yield ports


@pytest.fixture
async def redis_cluster_url(redis_cluster_ports: list[int]) -> AsyncIterator[str]:
    """A ``cluster=1`` Redis URL for the test cluster, with a unique key prefix cleaned afterwards."""
    from redis.asyncio.cluster import RedisCluster

    prefix = f"otp-test-{uuid.uuid4().hex[:8]}"
    seed = f"redis://127.0.0.1:{redis_cluster_ports[0]}/0"
    yield f"{seed}?cluster=1&prefix={prefix}"
    client = RedisCluster.from_url(seed)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        for key in keys:
            await client.delete(key)
    finally:
        await client.aclose()


@pytest.fixture
async def http_client() -> AsyncIterator[httpx.AsyncClient]:
    """The shared HTTP client, as the router creates it."""
    client = create_http_client()
    yield client
    await client.aclose()


@pytest.fixture
async def serve_loopback() -> AsyncIterator[Callable[[web.Application], Awaitable[str]]]:
    """Factory: serve an aiohttp app on a free 127.0.0.1 port, return its base URL; all stopped afterwards."""
    runners: list[web.AppRunner] = []

    async def serve(app: web.Application) -> str:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return f"http://127.0.0.1:{runner.addresses[0][1]}"

    yield serve
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def make_emulators() -> AsyncIterator[Callable[[Script], Awaitable[EmulatorPair]]]:
    """Factory: both emulators on free loopback ports, sharing ``script``; all stopped afterwards."""
    started: list[EmulatorPair] = []

    async def make(script: Script) -> EmulatorPair:
        pair = await serve_emulators(
            Settings.model_construct(), host="127.0.0.1", telegram_port=0, twilio_port=0, script=script
        )
        started.append(pair)
        return pair

    yield make
    for pair in started:
        await pair.aclose()
