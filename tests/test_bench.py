"""Smoke tests for the benchmarks in ``bench/``: each runs in ``--quick`` mode and writes well-formed results.

They check the shape of the results, never timings, and write to a temporary
folder so the committed ``bench/results`` files stay untouched.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
COMMITTED = BENCH / "results"


def committed_snapshot() -> dict[str, bytes]:
    """Contents of the committed results files, to prove a smoke run left them alone."""
    if not COMMITTED.is_dir():
        return {}
    return {p.name: p.read_bytes() for p in sorted(COMMITTED.iterdir()) if p.is_file()}


def run_quick(name: str, out: Path) -> tuple[dict[str, Any], str]:
    """Run ``bench/<name>.py --quick --out OUT`` in a child process; return its JSON and Markdown."""
    before = committed_snapshot()
    proc = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=50,
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
    """The cost benchmark prices both scenarios three ways, and no router beats the oracle."""
    data, markdown = run_quick("cost", tmp_path)
    assert_common(data, "cost")
    assert set(data["scenarios"]) == {"default", "low_telegram"}
    assert len(data["runs"]) == 2
    for row in data["runs"]:
        assert row["started"] == row["oracle_started"] > 0
        assert row["verified"] > 0
        assert row["router_per_verified"] > 0 and row["sms_only_per_user"] > 0
        # The oracle pays the least anyone could: the router can match it, never undercut it.
        assert row["router_over_oracle"] >= 1 - 1e-9
        assert 0 <= row["paid_twice_share"] <= 1
        assert row["time_to_code_p95_s"] >= row["time_to_code_p50_s"] > 0
    for name, info in data["scenarios"].items():
        (run,) = (r for r in data["runs"] if r["scenario"] == name)
        # One seed: the median across seeds is that seed's figure.
        assert info["median"]["router_over_sms_only"] == pytest.approx(run["router_over_sms_only"])
    assert "| scenario | users |" in markdown
