"""The blocking facade under a threaded server, after ``os.fork()``, and its error contract."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from otp_router import SyncOtpRouter
from otp_router.config import Settings
from otp_router.errors import CallTimeout, OtpRouterError, RouterClosed, UnexpectedError
from otp_router.metrics import Metrics
from otp_router.providers.base import ChannelName, DeliveryState, FakeChannel, ProbeResult, SendResult
from otp_router.router import OtpRouter
from otp_router.store.base import Record
from otp_router.store.sqlite import SqliteStore

#: Codes sent, by verification id (the send request's payload is the id).
Sent = dict[str, str]


class BrokenGet(SqliteStore):
    """A store whose reads of one id fail with an error from outside otp-router's tree."""

    async def get(self, record_id: str) -> Record | None:
        if record_id == BROKEN:
            raise RuntimeError("a bug somewhere below the router")
        return await super().get(record_id)


BROKEN = "v_broken_0000000000000000"


def factory_for(path: Path, sent: Sent, *, hang: threading.Event | None = None) -> Any:
    """A factory building a router on one SQLite file, recording sent codes in ``sent``."""

    async def telegram(method: str, arg: Any) -> Any:
        if method == "probe":
            return ProbeResult(True, ref=None)
        if method == "send":
            if hang is not None:
                await asyncio.to_thread(hang.wait)
            sent[arg.payload] = arg.code
            return SendResult(ref=f"r-{arg.payload}", state=DeliveryState.SENT)
        return None

    def factory() -> OtpRouter:
        return OtpRouter(
            store=BrokenGet(path),
            channels={ChannelName.TELEGRAM: FakeChannel(ChannelName.TELEGRAM, telegram, provider="telegram")},
            settings=Settings(code_secret="s"),
            metrics=Metrics(CollectorRegistry()),
            run_deadlines=False,
        )

    return factory


def test_many_threads_of_a_threaded_server_share_one_facade(tmp_path: Path) -> None:
    """A ThreadingHTTPServer (one thread per request) runs 24 logins at once through one facade."""
    sent: Sent = {}
    router = SyncOtpRouter(factory_for(tmp_path / "otp.db", sent))

    class Login(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            phone = self.path.rsplit("/", 1)[1]
            v = router.start(f"+{phone}")
            result = router.check(v.id, sent[v.id])
            body = json.dumps({"id": v.id, "valid": result.valid}).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Login)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/login/"

    def login(i: int) -> dict[str, Any]:
        request = urllib.request.Request(f"{url}4474001200{i:02d}", method="POST")
        with urllib.request.urlopen(request, timeout=30) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer

    try:
        with ThreadPoolExecutor(24) as pool:
            answers = list(pool.map(login, range(24)))
    finally:
        server.shutdown()
        server.server_close()
        router.close()
    assert [a["valid"] for a in answers] == [True] * 24
    assert len({a["id"] for a in answers}) == 24


def fork() -> int:
    # The warning about forking a multi-threaded process is the situation under test.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return os.fork()


def test_a_forked_child_gets_its_own_loop_and_the_parent_keeps_working(tmp_path: Path) -> None:
    """After ``os.fork()`` the child starts and checks through the inherited facade (its own loop
    thread and connections, the same store) and exits 0; the parent carries on unaffected."""
    sent: Sent = {}
    router = SyncOtpRouter(factory_for(tmp_path / "otp.db", sent), timeout=20)
    first = router.start("+447400120001")  # the loop thread and connections exist before the fork
    pid = fork()
    if pid == 0:  # pragma: no cover - the child's outcome is its exit status
        status = 1
        try:
            signal.alarm(30)  # a hang fails the test instead of blocking it
            v = router.start("+447400120002")
            mine = router.check(v.id, sent[v.id]).valid
            # The parent's verification is in the shared store, its code in the copied dict.
            theirs = router.check(first.id, sent[first.id]).valid
            router.close()
            status = 0 if (mine and theirs) else 2
        finally:
            os._exit(status)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's loop and connections were not disturbed by the child.
    v = router.start("+447400120003")
    assert router.check(v.id, sent[v.id]).valid
    assert router.get(first.id).status.value == "verified"  # checked by the child, seen by the parent
    router.close()


def test_every_failure_is_an_otp_router_error(tmp_path: Path) -> None:
    """A call past its timeout is CallTimeout; a foreign exception is wrapped; use after close is
    RouterClosed. All are OtpRouterError."""
    hang = threading.Event()
    sent: Sent = {}
    router = SyncOtpRouter(factory_for(tmp_path / "otp.db", sent, hang=hang), timeout=0.3)
    try:
        with pytest.raises(CallTimeout) as timed_out:
            router.start("+447400120001")
        assert isinstance(timed_out.value, OtpRouterError) and isinstance(timed_out.value, TimeoutError)
        hang.set()
        with pytest.raises(UnexpectedError) as unexpected:
            router.get(BROKEN)
        assert isinstance(unexpected.value, OtpRouterError) and unexpected.value.__cause__ is not None
    finally:
        hang.set()
        router.close()
    with pytest.raises(RouterClosed):
        router.get("v_x")
