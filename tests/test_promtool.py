"""promtool checks of the shipped prometheus.yml and alerts.yml (otp_router/assets/) and the alert tests.

promtool comes with Prometheus (Debian: ``apt-get install prometheus``). Without
it these tests skip locally, but fail when the CI environment variable is set,
so CI cannot pass by silently skipping them.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.prometheus

ROOT = Path(__file__).resolve().parent.parent
#: Stand-ins for Grafana variables, so that panel queries become plain PromQL.
GRAFANA_VARIABLES = {
    "__rate_interval": "1m",
    "__range": "1h",
    "window": "30m",
    "country": ".*",
    "channel": ".*",
}


def run(promtool: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run promtool from the repository root and capture its output."""
    return subprocess.run(
        [promtool, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )


def test_alert_rules_are_valid(promtool: str) -> None:
    """promtool accepts every alert and recording rule in otp_router/assets/alerts.yml."""
    result = run(promtool, "check", "rules", "otp_router/assets/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_prometheus_config_is_valid(promtool: str) -> None:
    """promtool accepts otp_router/assets/prometheus.yml, including the rule file it loads."""
    result = run(promtool, "check", "config", "otp_router/assets/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout


def test_alerts_fire_as_specified(promtool: str) -> None:
    """Each alert fires, or stays quiet, on the synthetic series in tests/promtool/alerts_test.yml."""
    result = run(promtool, "test", "rules", "tests/promtool/alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_queries_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    """Every panel query parses as PromQL: each becomes a recording rule that promtool checks."""
    rules = []
    for path in sorted((ROOT / "otp_router" / "assets" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text(encoding="utf-8"))["panels"]:
            for target in panel["targets"]:
                expr = re.sub(r"\$\{?(\w+)\}?", lambda m: GRAFANA_VARIABLES[m.group(1)], target["expr"])
                rules.append({"record": f"panel:{path.stem.replace('-', '_')}:{panel['id']}", "expr": expr})
    assert len(rules) > 50
    rule_file = tmp_path / "panels.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = run(promtool, "check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr
