"""Smoke tests for the benchmarks in ``bench/``: each runs in ``--quick`` mode and writes well-formed results.

They check the shape of the results, never timings, and write to a temporary
folder so the committed ``bench/results`` files stay untouched.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from otp_router.population import SHAPES

BENCH = Path(__file__).resolve().parent.parent / "bench"
COMMITTED = BENCH / "results"


def committed_snapshot() -> dict[str, bytes]:
    """Contents of the committed results files, to prove a smoke run left them alone."""
    if not COMMITTED.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(COMMITTED.iterdir()) if p.is_file()}


def run_quick(name: str, out: Path, *, within: float = 50) -> tuple[dict[str, Any], str]:
    """Run ``bench/<name>.py --quick --out OUT`` in a child process; return its JSON and Markdown."""
    before = committed_snapshot()
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=within,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert committed_snapshot() == before
    data = json.loads((out / f"{name}.json").read_text(encoding="utf-8"))
    markdown = (out / f"{name}.md").read_text(encoding="utf-8")
    return data, markdown


def assert_common(data: dict[str, Any], name: str) -> None:
    """Every result file says what ran, where and when."""
    assert data["benchmark"] == name
    assert data["config"]["quick"] is True
    assert data["machine"]["nproc"] >= 1
    assert data["machine"]["python"].count(".") == 2
    assert data["date"][:2] == "20" and "T" in data["date"]


def test_channel_throughput_quick(tmp_path: Path) -> None:
    """The throughput benchmark measures every client against the baseline with no failed call."""
    data, markdown = run_quick("channel_throughput", tmp_path)
    assert_common(data, "channel_throughput")
    assert data["errors"] == 0
    assert set(data["sides"]) == {"channel", "aiohttp", "httpx_aiohttp", "httpx_default"}
    for side, info in data["sides"].items():
        rounds = info["rounds"]
        assert len(rounds) == data["config"]["rounds"], side
        assert all(r["requests"] == data["config"]["requests"] and r["errors"] == 0 for r in rounds)
        assert info["median"]["requests_per_s"] > 0
        assert info["median"]["client_cpu_ms_per_request"] > 0
    assert set(data["ratios"]) == {"channel/aiohttp", "httpx_aiohttp/aiohttp", "httpx_default/aiohttp"}
    assert all(r["requests_per_s"] > 0 for r in data["ratios"].values())
    assert "| `channel` |" in markdown and "| `aiohttp` |" in markdown


def test_cost_quick(tmp_path: Path) -> None:
    """The cost benchmark runs each policy on both shapes, never beats the oracle, and draws the frontier."""
    data, markdown = run_quick("cost", tmp_path)
    assert_common(data, "cost")
    assert set(data["shapes"]) == {"mixed", "emerging"}
    policies = data["config"]["policies"]
    assert {"5 s", "30 s", "auto"} <= set(policies)
    runs = [r for r in data["runs"] if r["policy"] != "oracle"]
    assert len(runs) == 2 * len(policies)
    for row in runs:
        assert row["started"] == row["oracle_started"] > 0
        assert row["verified"] > 0
        # The oracle pays the least anyone could: the router can match it, never undercut it.
        assert row["cost_over_oracle"] >= 1 - 1e-9
        assert 0 <= row["paid_twice_share"] <= 1
        assert row["time_to_code_p95_s"] >= row["time_to_code_p50_s"] > 0
        if row["policy"] == "30 s":
            # Deadline == ttl: a message not delivered by the deadline is refunded, so nobody pays twice.
            assert row["paid_twice"] == 0
    for row in (r for r in runs if r["policy"] == "auto"):
        # The router's rule picked a deadline per country of the shape, within the default bounds.
        learned = row["learned_deadlines_s"]
        assert set(learned) == set(SHAPES[row["shape"]].countries)
        assert all(3 <= d <= 30 for d in learned.values())
    oracles = [r for r in data["runs"] if r["policy"] == "oracle"]
    assert len(oracles) == 2 and all(r["cost_over_oracle"] == 1.0 for r in oracles)
    for name, info in data["shapes"].items():
        (run,) = (r for r in runs if r["shape"] == name and r["policy"] == "5 s")
        # One seed: the median across seeds is that seed's figure.
        assert info["policies"]["5 s"]["cost_over_oracle"] == pytest.approx(run["cost_over_oracle"])
        # The arithmetic: nobody pays twice when the deadline is the ttl, and a shorter one cannot do better.
        by_deadline = {m["deadline_s"]: m for m in info["arithmetic"]}
        assert by_deadline[30.0]["paid_twice_share"] == 0
        assert by_deadline[30.0]["cost_over_oracle"] == pytest.approx(1.0)
        assert by_deadline[5.0]["paid_twice_share"] >= by_deadline[15.0]["paid_twice_share"]
        # The exact search keeps the cost budget (up to a cent per country) and, being exact, finds no
        # more slow users than the longest single deadline that fits the budget.
        best = info["best_per_country"]
        assert best["cost_over_oracle"] <= 1.02 + best["cost_slack"] + 1e-9
        fitting = [m for m in info["arithmetic"] if m["cost_over_oracle"] <= 1.02]
        assert best["slower_than_target_lower_bound"] <= min(m["slower_than_target_share"] for m in fitting)
        assert best["slower_than_target_any_policy"] <= best["slower_than_target_lower_bound"]
        # A higher price of waiting never makes auto's rule wait longer: p95 falls (or stays).
        sweep = [m["time_to_code_p95_s"] for m in info["auto_sweep"]]
        assert sweep == sorted(sweep, reverse=True)
    assert "| policy | cost ÷ oracle |" in markdown
    assert (tmp_path / "cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # The report rebuilt from the saved runs alone is the same report.
    again = tmp_path / "again"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "cost.py"),
            "--report-only",
            str(tmp_path / "cost.json"),
            "--out",
            str(again),
        ],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (again / "cost.md").read_text(encoding="utf-8") == markdown
    assert json.loads((again / "cost.json").read_text(encoding="utf-8"))["runs"] == data["runs"]


def redis_up() -> bool:
    """Whether the Redis the worker benchmarks need answers on 127.0.0.1:6379."""
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 6379), timeout=0.5):
            return True
    except OSError:
        return False


needs_redis = pytest.mark.skipif(
    not redis_up() and not os.environ.get("CI"), reason="no Redis at 127.0.0.1:6379 (CI makes this a failure)"
)


@needs_redis
@pytest.mark.timeout(170)
def test_worker_throughput_quick(tmp_path: Path) -> None:
    """The worker benchmark drains every queued verification and compares it with both baselines."""
    # Five sides, two of them starting several processes (two workers; a three-node cluster).
    data, markdown = run_quick("worker_throughput", tmp_path, within=150)
    assert_common(data, "worker_throughput")
    assert data["errors"] == 0
    cfg = data["config"]
    # The cluster side runs where redis-server and redis-cli are installed (always in CI).
    assert {"worker", "worker_2p", "httpx_aiohttp", "aiohttp"} <= set(data["sides"])
    if "worker_cluster" in data["sides"]:
        nodes = data["sides"]["worker_cluster"]["rounds"][0]["redis_node_cpu_ms_per_verification"]
        assert len(nodes) == 3 and "## On a three-master Redis Cluster" in markdown
    for side, info in data["sides"].items():
        rounds = info["rounds"]
        assert len(rounds) == cfg["rounds"], side
        assert all(r["verifications"] == cfg["verifications"] and r["errors"] == 0 for r in rounds)
        assert info["median"]["verifications_per_s"] > 0
        assert info["median"]["cpu_ms_per_verification"] > 0
    assert set(data["ratios"]) == {"worker/httpx_aiohttp", "worker/aiohttp"}
    # Two processes: compared with one, and with the ceiling computed from the measured CPU per verification.
    scaling = data["scaling"]
    assert scaling["speedup"] > 0 and scaling["ceiling_vps"] > 0 and scaling["of_ceiling"] > 0
    assert (
        scaling["all_cpu_ms_per_verification"]
        >= data["sides"]["worker_2p"]["median"]["cpu_ms_per_verification"]
    )
    assert "## Two processes" in markdown
    # Every verification writes to the store through Lua scripts (its start, then its
    # compare-and-set writes) and acknowledges its message.
    commands = data["sides"]["worker"]["redis_commands_per_verification"]
    assert commands["evalsha"] >= 2 and commands["xack"] >= 1
    parts = data["breakdown"]
    assert parts["redis_round_trips"] >= commands["evalsha"] and parts["redis_round_trip_cpu_ms"] > 0
    # By default the profile is taken exactly when the worker falls short of the target.
    assert (data["profile"] is None) == data["target_met"]
    if data["profile"] is not None:
        assert data["profile"]["top_self"] and "## Profile" in markdown
        assert sum(row["share"] for row in data["profile"]["by_area"]) <= 1 + 1e-6
    assert "| `worker` |" in markdown and "| `httpx_aiohttp` |" in markdown


@needs_redis
@pytest.mark.timeout(130)
def test_deadline_lag_quick(tmp_path: Path) -> None:
    """The deadline benchmark sends every fallback SMS once, never before its deadline, on both stores."""
    data, markdown = run_quick("deadline_lag", tmp_path, within=110)
    assert_common(data, "deadline_lag")
    assert data["errors"] == 0
    n = data["config"]["verifications"]
    assert [(run["store"], run["processes"]) for run in data["runs"]] == [
        ("redis", 1),
        ("redis", 2),
        ("sqlite", 1),
    ]
    for run in data["runs"]:
        assert run["deadlines_checked"] == run["sms_sent"] == run["status_polls"] == n
        assert run["sms_missing"] == run["sms_duplicates"] == run["sms_before_deadline"] == 0
        lag = run["lag_ms"]
        assert 0 <= lag["p50"] <= lag["p99"] <= lag["max"]
        assert run["worker_peak_rss_mib"] >= run["worker_rss_ready_mib"] > 0
        assert run["worker_exit"] == 0
        assert run["cores_needed"] > 0 and run["all_cpu_ms_per_deadline"] >= run["worker_cpu_ms_per_deadline"]
    assert "| redis | 2 |" in markdown and "| sqlite | 1 |" in markdown


@pytest.mark.timeout(330)
async def test_soak_quick_loses_nothing_and_sends_nothing_twice(tmp_path: Path, redis_url: str) -> None:
    """The soak's small version: 500 verifications with scripted faults through two workers, one of them
    SIGKILLed mid-run and restarted; every user ends verified, no number got two messages on a channel."""
    before = committed_snapshot()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(BENCH / "soak.py"),
        "--quick",
        "--out",
        str(tmp_path),
        "--redis-url",
        redis_url,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), timeout=300)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode in (0, 1), err.decode(errors="replace")[-3000:]
    assert committed_snapshot() == before
    data = json.loads((tmp_path / "soak.json").read_text(encoding="utf-8"))
    markdown = (tmp_path / "soak.md").read_text(encoding="utf-8")
    assert_common(data, "soak")
    assert data["passed"] is (proc.returncode == 0)
    counts, n = data["counts"], data["config"]["verifications"]
    assert counts["enqueued"] == n == counts["verified"] + counts["lost"]
    assert counts["duplicated_telegram_sends"] == counts["duplicated_sms"] == 0
    assert counts["users_who_saw_two_codes"] == counts["sends_to_unknown_numbers"] == 0
    # The kill really happened (SIGKILL, not a clean exit), and both workers ended cleanly afterwards.
    assert counts["kills"] == 1 and counts["victim_exit_statuses"] == {"-9": 1}
    assert counts["final_exit_statuses"] == {"steady": 0, "victim": 0}
    assert counts["dead_letters"] == {} and counts["queue_drained"] is True
    # Every fault kind was exercised, and each verified user got the code through one channel.
    per_kind = data["per_kind"]
    assert set(per_kind) == set(data["config"]["faults"])
    for kind, k in per_kind.items():
        assert k["verifications"] > 0, kind
        assert k.get("via_telegram", 0) + k.get("via_sms", 0) == k["verified"], kind
    # Numbers that are not on Telegram can only have been reached by SMS, once each.
    not_on_telegram = ("telegram_absent", "sms_5xx_nothing_created", "sms_5xx_after_create")
    for kind in (*not_on_telegram, "sms_hang_after_create", "sms_lookup_5xx"):
        assert per_kind[kind].get("via_telegram", 0) == 0
        assert per_kind[kind].get("via_sms", 0) == per_kind[kind]["verified"] <= per_kind[kind]["sms_created"]
    rss = data["rss"]
    assert rss["flat"] is None and rss["steady"]["max_kib"] >= rss["steady"]["end_kib"] > 0
    assert len(rss["victim_lives"]) == 2
    assert f"| **lost** (not verified) | **{counts['lost']}** |" in markdown
    # No loss of any kind: an open circuit breaker delays a login, it never drops it.
    assert counts["lost"] == 0, counts.get("lost_fallback_reasons")
    assert counts["final_status"] == {"verified": n}
    assert counts["check_outcome"] == {"valid": n}
    assert counts["telegram_sends"] + counts["sms_created"] >= n
