"""Monitoring files shipped inside the package.

``dashboards/*.json`` are the Grafana dashboards, ``alerts.yml`` the Prometheus
alert and recording rules and ``prometheus.yml`` a scrape configuration that
loads them from the same folder. They live in the package (not beside it) so
that a ``pip install`` has them too; ``otp-router assets`` prints them::

    otp-router assets dashboard deliverability > deliverability.json
    otp-router assets alerts > alerts.yml
    otp-router assets prometheus > prometheus.yml

The files are read with :mod:`importlib.resources`, so this works from a
wheel, an editable install and a zip import alike.
"""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

__all__ = ["alerts", "dashboard", "dashboard_names", "prometheus_config"]

_ROOT: Traversable = files(__name__)
_DASHBOARDS: Traversable = _ROOT / "dashboards"


def dashboard_names() -> list[str]:
    """Names of the shipped dashboards (file names without ``.json``), sorted."""
    return sorted(
        entry.name.removesuffix(".json")
        for entry in _DASHBOARDS.iterdir()
        if entry.is_file() and entry.name.endswith(".json")
    )


def dashboard(name: str) -> str:
    """The Grafana dashboard ``name`` as JSON text, exactly as shipped.

    Raises:
        KeyError: No dashboard of that name; the message lists the names there are.
    """
    if name not in dashboard_names():
        raise KeyError(f"no dashboard {name!r}; there are: {', '.join(dashboard_names())}")
    return (_DASHBOARDS / f"{name}.json").read_text(encoding="utf-8")


def alerts() -> str:
    """The Prometheus alert and recording rules (``alerts.yml``)."""
    return (_ROOT / "alerts.yml").read_text(encoding="utf-8")


def prometheus_config() -> str:
    """A Prometheus configuration scraping one worker and loading ``alerts.yml`` beside it."""
    return (_ROOT / "prometheus.yml").read_text(encoding="utf-8")
