"""Helpers shared by the benchmarks: machine description, medians, result files.

Not a public module: the benchmark scripts import it as a sibling
(``python bench/<name>.py`` puts ``bench/`` first on ``sys.path``).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_OUT", "machine", "median", "publish", "ratio", "today", "write_results"]

#: Where the committed results live (the README quotes them).
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def _cpu_model() -> str | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine() -> dict[str, Any]:
    """Describe the machine the numbers were measured on.

    Returns:
        ``nproc`` (CPUs usable by this process), Python version and
        implementation, OS, CPU model and 1-minute load average when known.
    """
    try:
        nproc = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        nproc = os.cpu_count() or 0
    return {
        "nproc": nproc,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(terse=True),
        "cpu": _cpu_model(),
        # Other work on the machine skews timings: say how busy it was when the run began.
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def today() -> str:
    """The UTC date and time of the run, ISO 8601 to the second."""
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def median(values: Sequence[float | None]) -> float | None:
    """Median of the known values; None when there are none."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """``numerator / denominator``, None when either is unknown or the denominator is 0."""
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def write_results(out: Path, name: str, data: dict[str, Any], markdown: str) -> tuple[Path, Path]:
    """Write ``<out>/<name>.json`` and ``<out>/<name>.md``.

    Args:
        out: Folder, created if missing.
        name: Benchmark name (file stem).
        data: JSON-ready results.
        markdown: The human-readable report.

    Returns:
        The JSON and Markdown paths.
    """
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    md_path = out / f"{name}.md"
    json_path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown.rstrip("\n") + "\n", encoding="utf-8")
    return json_path, md_path


def publish(out: Path, name: str, data: dict[str, Any], markdown: str) -> None:
    """Write the results files, print the report, and say where they went."""
    json_path, md_path = write_results(out, name, data, markdown)
    print(markdown)
    print(f"\nwrote {json_path} and {md_path}", file=sys.stderr)
