"""The deployment files: Dockerfile, .dockerignore, compose.yaml and deploy/.

Docker is not available to the tests, so they check what can be checked
without it: compose.yaml parses, every file it mounts exists, the image runs
the same console script the tests run, the Prometheus configuration in the
stack scrapes the worker service and passes ``promtool check config``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "compose.yaml"
DOCKERFILE = ROOT / "Dockerfile"


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text(encoding="utf-8"))
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def exec_form(instruction: str) -> list[str]:
    [args] = [rest for word, rest in dockerfile_instructions() if word == instruction]
    value = json.loads(args)  # exec form only: no shell in between
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def volume_sources(service: dict[str, Any]) -> list[str]:
    """Host paths bind-mounted into a service (named volumes left out)."""
    sources = []
    for volume in service.get("volumes", []):
        source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
        if source.startswith((".", "/")):
            sources.append(source)
    return sources


def test_compose_has_the_stack_and_every_mounted_path_exists() -> None:
    """worker, redis, prometheus and grafana; every bind mount names a file or folder of the repository."""
    data = compose()
    assert set(data["services"]) >= {"worker", "redis", "prometheus", "grafana"}
    mounted = 0
    for name, service in data["services"].items():
        for source in volume_sources(service):
            assert (ROOT / source).exists(), f"{name}: {source} does not exist"
            mounted += 1
    assert mounted >= 5
    declared = set(data.get("volumes") or {})
    for service in data["services"].values():
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":", 1)[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"named volume {source} is not declared"
    assert data["services"]["worker"]["build"] == "."


def test_prometheus_and_grafana_get_the_shipped_rules_and_dashboards() -> None:
    """Prometheus loads alerts.yml from otp_router/assets; Grafana the dashboards folder."""
    services = compose()["services"]
    prometheus = dict(
        (v.split(":")[1], v.split(":")[0]) for v in services["prometheus"]["volumes"] if v.startswith(".")
    )
    assert prometheus["/etc/prometheus/alerts.yml"] == "./otp_router/assets/alerts.yml"
    config = yaml.safe_load((ROOT / prometheus["/etc/prometheus/prometheus.yml"]).read_text(encoding="utf-8"))
    assert config["rule_files"] == ["alerts.yml"]
    grafana = dict(
        (v.split(":")[1], v.split(":")[0]) for v in services["grafana"]["volumes"] if v.startswith(".")
    )
    provider = yaml.safe_load(
        (ROOT / grafana["/etc/grafana/provisioning/dashboards"] / "otp-router.yml").read_text(
            encoding="utf-8"
        )
    )
    dashboards_at = provider["providers"][0]["options"]["path"]
    assert grafana[dashboards_at] == "./otp_router/assets/dashboards"
    assert list((ROOT / grafana[dashboards_at]).glob("*.json"))
    [source] = yaml.safe_load(
        (ROOT / grafana["/etc/grafana/provisioning/datasources"] / "prometheus.yml").read_text(
            encoding="utf-8"
        )
    )["datasources"]
    assert source["url"] == "http://prometheus:9090"


def test_compose_prometheus_scrapes_the_worker_service() -> None:
    """The stack's Prometheus scrapes the worker service on the port the worker listens on."""
    data = compose()
    worker = data["services"]["worker"]
    port = str(worker["environment"]["OTP_ROUTER_HTTP_PORT"])
    assert worker["environment"]["OTP_ROUTER_HTTP_HOST"] == "0.0.0.0"
    assert worker["environment"]["OTP_ROUTER_STORE_URL"].startswith("redis://redis:")
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    targets = [t for job in config["scrape_configs"] for c in job["static_configs"] for t in c["targets"]]
    assert targets == [f"worker:{port}"]


def test_the_image_runs_the_console_script_the_tests_run() -> None:
    """ENTRYPOINT + CMD is ``otp-router worker``: the console script pyproject declares, which the
    worker tests start; the health check is ``otp-router worker --check``; the user is not root."""
    command = exec_form("ENTRYPOINT") + exec_form("CMD")
    assert command == ["otp-router", "worker"]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["otp-router"] == "otp_router.cli:main"
    installed = Path(sys.executable).with_name("otp-router")
    if installed.exists():  # the same entry point, run as the image runs it
        result = subprocess.run(
            [str(installed), "worker", "--help"], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0 and "--check" in result.stdout
    health = [rest for word, rest in dockerfile_instructions() if word == "HEALTHCHECK"]
    assert len(health) == 1 and health[0].endswith('CMD ["otp-router", "worker", "--check"]')
    users = [rest for word, rest in dockerfile_instructions() if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    installs = [rest for word, rest in dockerfile_instructions() if word == "RUN" and "pip install" in rest]
    assert any('".[all]"' in rest for rest in installs)


def test_dockerignore_keeps_the_context_small_and_secret_free() -> None:
    """The build context leaves out the virtualenv, caches, databases and .env."""
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    }
    assert {".venv", ".env", "*.db", ".git"} <= ignored
    copied = [rest for word, rest in dockerfile_instructions() if word == "COPY"]
    for rest in copied:
        for source in rest.split()[:-1]:
            assert (ROOT / source).exists(), source


def test_promtool_accepts_the_compose_prometheus_config(promtool: str, tmp_path: Path) -> None:
    """promtool checks the stack's prometheus.yml with the rule file laid out as compose mounts it."""
    shutil.copy(ROOT / "deploy" / "prometheus" / "prometheus.yml", tmp_path / "prometheus.yml")
    shutil.copy(ROOT / "otp_router" / "assets" / "alerts.yml", tmp_path / "alerts.yml")
    result = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 rule files found" in result.stdout
