"""What a ``pip install`` and a published sdist contain, and the CLI that prints the shipped assets.

The sdist and the wheel are built with the build backend's own API (hatchling,
from the dev extra) from a copy of the source tree into which caches and a
virtualenv have been planted, so the exclusion is proven rather than assumed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path, PurePosixPath

import pytest
import yaml

import otp_router
from otp_router import assets
from otp_router.cli import main

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "otp_router" / "assets"

#: Directory names that must never reach an sdist or a wheel.
FORBIDDEN_DIRS = {
    "__pycache__",
    ".venv",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    ".git",
}
#: Trees the copy leaves out (large or irrelevant); the planted junk stands in for them.
COPY_IGNORE = shutil.ignore_patterns(*FORBIDDEN_DIRS, "*.pyc", "dist", "build", "*.db", "*.db-*", ".prof")


def _build(source: Path, target: str, out: Path) -> Path:
    """Build ``target`` ("sdist" or "wheel") of the project at ``source`` into ``out``."""
    script = f"import sys; from hatchling.build import build_{target}; print(build_{target}(sys.argv[1]))"
    result = subprocess.run(
        [sys.executable, "-c", script, str(out)],
        cwd=source,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return out / result.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def dirty_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the project with the caches a developer's checkout accumulates."""
    tree = tmp_path_factory.mktemp("tree") / "otp-router"
    shutil.copytree(ROOT, tree, ignore=COPY_IGNORE)
    junk = [
        ".venv/pyvenv.cfg",
        ".venv/lib/python3.11/site-packages/x.py",
        "otp_router/__pycache__/router.cpython-311.pyc",
        "tests/__pycache__/conftest.cpython-311-pytest-8.pyc",
        "otp_router/stray.pyc",
        ".pytest_cache/v/cache/nodeids",
        ".mypy_cache/3.11/otp_router.meta.json",
        ".ruff_cache/CACHEDIR.TAG",
        ".hypothesis/examples/x",
        "otp-router.db",
    ]
    for name in junk:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_bytes(b"junk")
    return tree


@pytest.fixture(scope="module")
def sdist_names(dirty_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    path = _build(dirty_tree, "sdist", tmp_path_factory.mktemp("sdist"))
    with tarfile.open(path) as archive:
        return archive.getnames()


@pytest.fixture(scope="module")
def wheel(dirty_tree: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(dirty_tree, "wheel", tmp_path_factory.mktemp("wheel"))


def _parts(names: list[str]) -> set[str]:
    return {part for name in names for part in PurePosixPath(name).parts}


def test_sdist_has_no_caches_or_virtualenvs(sdist_names: list[str]) -> None:
    assert not _parts(sdist_names) & FORBIDDEN_DIRS
    assert not [n for n in sdist_names if n.endswith((".pyc", ".pyo", ".db"))]


def test_sdist_has_the_project(sdist_names: list[str]) -> None:
    (top,) = {PurePosixPath(n).parts[0] for n in sdist_names}
    assert top == f"otp_router-{otp_router.__version__}"
    inside = {str(PurePosixPath(*PurePosixPath(n).parts[1:])) for n in sdist_names}
    for name in (
        "LICENSE",
        "CHANGELOG.md",
        "README.md",
        "pyproject.toml",
        "PKG-INFO",
        "otp_router/assets/alerts.yml",
        "otp_router/assets/dashboards/deliverability.json",
        "tests/test_packaging.py",
    ):
        assert name in inside, name


def test_wheel_ships_the_assets_and_one_version(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = f"otp_router-{otp_router.__version__}.dist-info"
        metadata = Parser().parsestr(archive.read(f"{info}/METADATA").decode())
        for name in assets.dashboard_names():
            shipped = archive.read(f"otp_router/assets/dashboards/{name}.json").decode()
            assert shipped == assets.dashboard(name)
        assert archive.read("otp_router/assets/alerts.yml").decode() == assets.alerts()
        assert archive.read("otp_router/assets/prometheus.yml").decode() == assets.prometheus_config()
    assert not _parts(names) & FORBIDDEN_DIRS
    assert "otp_router/py.typed" in names
    assert f"{info}/licenses/LICENSE" in names
    assert metadata["Version"] == otp_router.__version__
    assert metadata["License-Expression"] == "MIT"
    assert metadata.get_all("Author-email")
    assert "Typing :: Typed" in metadata.get_all("Classifier")
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "otp-router = otp_router.cli:main" in entry_points


def test_installed_wheel_prints_its_assets(wheel: Path, tmp_path: Path) -> None:
    """The CLI of the unpacked wheel (not of this checkout) finds the files it ships."""
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    script = (
        "import sys; sys.path.insert(0, sys.argv[1]); import otp_router;"
        "assert otp_router.__file__.startswith(sys.argv[1]), otp_router.__file__;"
        "from otp_router.cli import main; sys.exit(main(sys.argv[2:]))"
    )
    for args, expected in (
        (["assets", "dashboard", "cost"], assets.dashboard("cost")),
        (["assets", "alerts"], assets.alerts()),
        (["--version"], f"otp-router {otp_router.__version__}\n"),
    ):
        result = subprocess.run(
            [sys.executable, "-c", script, str(site), *args],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout == expected


# -- the CLI ----------------------------------------------------------------------


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out == f"otp-router {otp_router.__version__}\n"


def test_version_matches_the_declared_metadata() -> None:
    """The installed distribution's version is the one __init__ defines (one source)."""
    from importlib.metadata import version

    assert version("otp-router") == otp_router.__version__


def test_assets_list_names_every_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["assets", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    on_disk = sorted(p.stem for p in (ASSETS / "dashboards").glob("*.json"))
    assert on_disk == ["cost", "deliverability", "provider-health"]
    assert lines == [f"dashboard {name}" for name in on_disk] + ["alerts", "prometheus"]


@pytest.mark.parametrize("name", ["cost", "deliverability", "provider-health"])
def test_assets_dashboard_prints_the_file(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["assets", "dashboard", name]) == 0
    out = capsys.readouterr().out
    assert out == (ASSETS / "dashboards" / f"{name}.json").read_text(encoding="utf-8")
    assert json.loads(out)["uid"]


def test_assets_alerts_and_prometheus_print_the_files(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["assets", "alerts"]) == 0
    rules = capsys.readouterr().out
    assert rules == (ASSETS / "alerts.yml").read_text(encoding="utf-8")
    assert yaml.safe_load(rules)["groups"]
    assert main(["assets", "prometheus"]) == 0
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["rule_files"] == ["alerts.yml"]


def test_unknown_dashboard_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["assets", "dashboard", "nope"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "deliverability" in err
    assert "Traceback" not in err
