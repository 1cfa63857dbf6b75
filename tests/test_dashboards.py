"""Static checks of the Grafana dashboards, Prometheus rules and provisioning files.

The central check: every metric name used by a dashboard panel or a rule is
one that ``otp_router.metrics`` exports, spelled as it appears on the wire
(counters as ``<name>_total``, histograms as ``_bucket``/``_sum``/``_count``,
gauges bare), and every label matcher names a label that metric has.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from otp_router.metrics import METRIC_NAMES, METRICS

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD_DIR = ROOT / "otp_router" / "assets" / "dashboards"
DASHBOARDS = sorted(DASHBOARD_DIR.glob("*.json"))
ALERTS = ROOT / "otp_router" / "assets" / "alerts.yml"
PROMETHEUS = ROOT / "otp_router" / "assets" / "prometheus.yml"
DS = {"type": "prometheus", "uid": "${datasource}"}

#: Current Grafana panel types the dashboards may use (no graph, singlestat, table-old...).
ALLOWED_PANEL_TYPES = {"timeseries", "stat", "gauge", "table", "bargauge"}
#: Series Prometheus itself creates for every scrape target.
PROMETHEUS_SERIES = {"up": ("job", "instance")}
#: Labels Prometheus attaches at scrape time.
TARGET_LABELS = ("job", "instance")
GRAFANA_BUILTIN_VARS = {"__rate_interval", "__range", "__range_s", "__interval", "__interval_ms"}

#: Aggregation operators and functions (a name followed by "(").
PROMQL_FUNCTIONS = frozenset(
    {
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
        "limit_ratio",
    }
    | {
        "abs",
        "absent",
        "absent_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "days_in_month",
        "delta",
        "deriv",
        "exp",
        "floor",
        "histogram_quantile",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "irate",
        "label_join",
        "label_replace",
        "ln",
        "log2",
        "log10",
        "minute",
        "month",
        "predict_linear",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sort",
        "sort_desc",
        "sqrt",
        "time",
        "timestamp",
        "vector",
        "year",
        "avg_over_time",
        "min_over_time",
        "max_over_time",
        "sum_over_time",
        "count_over_time",
        "quantile_over_time",
        "stddev_over_time",
        "stdvar_over_time",
        "last_over_time",
        "present_over_time",
        "start",
        "end",
    }
)
PROMQL_KEYWORDS = frozenset(
    {
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "atan2",
        "inf",
        "nan",
    }
)

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"([A-Za-z_:][\w:]*)?\s*\{([^{}]*)\}")
_MATCHER_LABEL = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_TOKEN = re.compile(
    r"(?P<number>\d[\w.]*)|(?P<var>\$\{?\w+\}?)|(?P<name>[A-Za-z_:][\w:]*)(?P<call>\s*\()?|(?P<other>\S)"
)
_VARIABLE = re.compile(r"\$\{?(\w+)")


def _strip_strings(expr: str) -> str:
    # Strings first: a regex such as "[A-Z]{2}" must not be read as a selector.
    return _STRING.sub('""', expr)


def promql_metric_names(expr: str) -> set[str]:
    """Metric (or recording rule) names referenced by a PromQL expression.

    Raises:
        ValueError: An identifier is used as a function but is not a PromQL function.
    """
    text = _strip_strings(expr)
    text = _SELECTOR.sub(lambda m: f" {m.group(1) or ''} ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    names: set[str] = set()
    for token in _TOKEN.finditer(text):
        name = token.group("name")
        if name is None:
            continue
        if name.lower() in PROMQL_KEYWORDS:
            continue
        if token.group("call"):
            if name not in PROMQL_FUNCTIONS:
                raise ValueError(f"unknown PromQL function {name!r} in {expr!r}")
        else:
            names.add(name)
    return names


def promql_selectors(expr: str) -> list[tuple[str, set[str]]]:
    """``(metric name, label names matched)`` for every selector with matchers."""
    return [
        (m.group(1) or "", set(_MATCHER_LABEL.findall(m.group(2))))
        for m in _SELECTOR.finditer(_strip_strings(expr))
    ]


def exported_labels() -> dict[str, tuple[str, ...]]:
    """Every series name the package exports, with the labels it can carry."""
    series: dict[str, tuple[str, ...]] = dict(PROMETHEUS_SERIES)
    for spec in METRICS:
        for sample in spec.sample_names:
            extra = ("le",) if sample.endswith("_bucket") else ()
            series[sample] = spec.labels + TARGET_LABELS + extra
    return series


def load_dashboard(path: Path) -> dict[str, Any]:
    """Parse one dashboard JSON file."""
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def iter_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including panels nested in collapsed rows."""
    for panel in panels:
        yield panel
        yield from iter_panels(panel.get("panels", []))


def load_rules() -> list[dict[str, Any]]:
    """Every rule (alerting and recording) in otp_router/assets/alerts.yml."""
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def recording_names() -> set[str]:
    """Names of the recording rules defined in otp_router/assets/alerts.yml."""
    return {rule["record"] for rule in load_rules() if "record" in rule}


def all_expressions() -> list[tuple[str, str]]:
    """``(where, expr)`` for every dashboard target and every rule."""
    found = [
        (f"{path.name} panel {panel['id']} ({panel['title']}) {target['refId']}", target["expr"])
        for path in DASHBOARDS
        for panel in iter_panels(load_dashboard(path)["panels"])
        for target in panel.get("targets", [])
    ]
    found += [(f"alerts.yml {rule.get('alert') or rule['record']}", rule["expr"]) for rule in load_rules()]
    return found


EXPRESSIONS = [pytest.param(where, expr, id=where) for where, expr in all_expressions()]


# -- the tokenizer itself ---------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ('sum by (channel) (rate(otp_router_sends_total{country=~"GB|US"}[5m]))', {"otp_router_sends_total"}),
        (
            'histogram_quantile(0.95, sum by (le, channel) (rate(x_bucket{channel=~"$channel"}[$window])))',
            {"x_bucket"},
        ),
        ("a / on () group_left (channel) b offset 1d", {"a", "b"}),
        ('(sum(a{l="[A-Z]{2}"}) or vector(0)) - 3600 * max without (instance) (b)', {"a", "b"}),
        ("time() - otp_router:x:rate1h > bool 1e3", {"otp_router:x:rate1h"}),
        ('count_values("sum", rate) + {__name__="c"}', {"rate"}),
        ('absent(up{job="otp-router"}) and Inf > NaN', {"up"}),
        ("a or (b) unless on (x) c", {"a", "b", "c"}),
    ],
)
def test_tokenizer_finds_only_metric_names(expr: str, expected: set[str]) -> None:
    """Functions, keywords, labels, durations, numbers, strings and variables are not metric names."""
    assert promql_metric_names(expr) == expected


def test_tokenizer_rejects_unknown_functions() -> None:
    """A misspelled function is reported rather than silently ignored."""
    with pytest.raises(ValueError, match="rte"):
        promql_metric_names("rte(otp_router_sends_total[5m])")


def test_selector_labels_are_extracted() -> None:
    """Label names inside a selector are found, and values (even with braces) are not."""
    assert promql_selectors('rate(m{a="x{2}", b!~"y"}[5m]) / n') == [("m", {"a", "b"})]


# -- metric names and labels -------------------------------------------------------


def test_there_is_something_to_check() -> None:
    """The three dashboards and the rules exist, so the checks below cannot pass vacuously."""
    assert [p.name for p in DASHBOARDS] == ["cost.json", "deliverability.json", "provider-health.json"]
    assert len(all_expressions()) > 60


@pytest.mark.parametrize(("where", "expr"), EXPRESSIONS)
def test_every_referenced_metric_is_exported(where: str, expr: str) -> None:
    """Each name in a panel or rule is an exported series (with the right suffix) or a recording rule."""
    known = set(exported_labels()) | recording_names()
    unknown = promql_metric_names(expr) - known
    assert not unknown, f"{where}: not exported by otp_router.metrics: {sorted(unknown)}"


@pytest.mark.parametrize(("where", "expr"), EXPRESSIONS)
def test_every_label_matcher_names_a_real_label(where: str, expr: str) -> None:
    """A matcher like country=~"$country" is only used on metrics that have a country label."""
    labels = exported_labels()
    for name, matched in promql_selectors(expr):
        if name in recording_names():
            continue
        assert name in labels, f"{where}: selector without a known metric name"
        assert matched <= set(labels[name]), f"{where}: {name} has no label(s) {matched - set(labels[name])}"


def test_bare_counter_or_histogram_names_are_refused() -> None:
    """The check above would catch a counter without _total or a histogram used bare."""
    known = set(exported_labels())
    assert "otp_router_sends" not in known
    assert "otp_router_time_to_code_seconds" not in known
    assert "otp_router_queue_depth_total" not in known
    assert {
        "otp_router_sends_total",
        "otp_router_time_to_code_seconds_bucket",
        "otp_router_queue_depth",
    } <= known
    assert set(METRIC_NAMES) == {spec.name for spec in METRICS}


# -- dashboards --------------------------------------------------------------------


@pytest.fixture(params=DASHBOARDS, ids=lambda p: p.name)
def dashboard(request: pytest.FixtureRequest) -> dict[str, Any]:
    """Each dashboard, parsed."""
    path: Path = request.param
    return load_dashboard(path)


def test_dashboard_uids() -> None:
    """The dashboards have the documented, stable uids (links and the e2e test use them)."""
    uids = {path.name: load_dashboard(path)["uid"] for path in DASHBOARDS}
    assert uids == {
        "cost.json": "otp-router-cost",
        "deliverability.json": "otp-router-deliverability",
        "provider-health.json": "otp-router-provider-health",
    }


def test_schema_version_is_current(dashboard: dict[str, Any]) -> None:
    """The JSON targets schemaVersion 39 or later (Grafana 10.3+)."""
    assert dashboard["schemaVersion"] >= 39
    assert dashboard.get("id") is None  # provisioned and imported dashboards must not carry a db id


def test_panels_use_current_types_and_the_datasource_variable(dashboard: dict[str, Any]) -> None:
    """Every panel and target uses ${datasource}, and only current panel types appear."""
    panels = list(iter_panels(dashboard["panels"]))
    assert panels
    for panel in panels:
        assert panel["type"] in ALLOWED_PANEL_TYPES, panel["title"]
        assert panel["datasource"] == DS, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_panel_ids_are_unique_and_layout_fits(dashboard: dict[str, Any]) -> None:
    """Panel ids are unique, panels stay within the 24-column grid, and none overlap."""
    panels = list(iter_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    boxes = []
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["w"] > 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        boxes.append((pos["x"], pos["y"], pos["x"] + pos["w"], pos["y"] + pos["h"], panel["title"]))
    for i, a in enumerate(boxes):
        for b in boxes[i + 1 :]:
            overlap = a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]
            assert not overlap, f"{a[4]!r} overlaps {b[4]!r}"


def test_template_variables(dashboard: dict[str, Any]) -> None:
    """datasource (Prometheus), country and channel variables exist, the latter from label_values()."""
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("country", "channel"):
        var = variables[name]
        assert var["type"] == "query"
        assert var["datasource"] == DS
        assert var["definition"].startswith("label_values(") and var["definition"].endswith(f", {name})")
        metric = var["definition"][len("label_values(") :].split(",")[0]
        assert name in exported_labels()[metric]
        # What Grafana runs, and what its variable editor shows, must agree with the definition.
        assert var["query"]["query"] == var["definition"]
        assert (var["query"]["metric"], var["query"]["label"]) == (metric, name)
        assert var["includeAll"] and var["allValue"] == ".*"


def test_expressions_use_only_defined_variables(dashboard: dict[str, Any]) -> None:
    """Every $variable in a query is a dashboard variable or a Grafana built-in."""
    defined = {var["name"] for var in dashboard["templating"]["list"]} | GRAFANA_BUILTIN_VARS
    for panel in iter_panels(dashboard["panels"]):
        for target in panel["targets"]:
            assert set(_VARIABLE.findall(target["expr"])) <= defined, panel["title"]


def test_cost_totals_are_exact_counter_sums() -> None:
    """The total stats read the counters directly (instant, no increase()), so they match the ledger."""
    panels = {panel["title"]: panel for panel in load_dashboard(DASHBOARD_DIR / "cost.json")["panels"]}
    metric_of = {
        "Net spend": {"otp_router_cost_charged_usd_total", "otp_router_cost_refunded_usd_total"},
        "Charged": {"otp_router_cost_charged_usd_total"},
        "Refunded": {"otp_router_cost_refunded_usd_total"},
        "SMS-only cost": {"otp_router_cost_sms_only_usd_total"},
    }
    for title, metrics in metric_of.items():
        panel = panels[title]
        assert panel["type"] == "stat"
        (target,) = panel["targets"]
        assert target["instant"] is True and target["range"] is False
        assert promql_metric_names(target["expr"]) == metrics
        assert not re.search(r"\b(increase|rate|irate|delta)\s*\(", target["expr"]), title


# -- rules, scrape config, provisioning ----------------------------------------------


def test_every_alert_is_documented_and_debounced() -> None:
    """Each alert has a summary, a one-line runbook, a severity and a for: duration."""
    alerts = [rule for rule in load_rules() if "alert" in rule]
    assert len(alerts) >= 9
    for rule in alerts:
        annotations = rule["annotations"]
        assert annotations["summary"].strip(), rule["alert"]
        assert annotations["runbook"].strip() and "\n" not in annotations["runbook"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert re.fullmatch(r"\d+[smh]", rule["for"]), rule["alert"]


def test_alert_names_cover_the_required_conditions() -> None:
    """Alerts exist for balance, fallbacks, SMS failures, cost, conversion, worker, queue, dead letters."""
    names = {rule["alert"] for rule in load_rules() if "alert" in rule}
    assert {
        "OtpRouterTelegramBalanceLow",
        "OtpRouterFallbackRateSpike",
        "OtpRouterSmsFailureRateHigh",
        "OtpRouterCostBurnAboveBudget",
        "OtpRouterNoSuccessfulVerifications",
        "OtpRouterWorkerDown",
        "OtpRouterWorkerHeartbeatStale",
        "OtpRouterWorkerHeartbeatAbsent",
        "OtpRouterQueueLagHigh",
        "OtpRouterDeadLettersGrowing",
    } <= names


def test_recording_rules_follow_the_naming_convention() -> None:
    """Recording rules are named level:metric:operation under the otp_router: prefix."""
    for name in recording_names():
        assert re.fullmatch(r"otp_router:[a-z0-9_]+(:[a-z0-9_]+)?", name), name


def test_prometheus_scrapes_the_worker() -> None:
    """prometheus.yml scrapes 127.0.0.1:8080/metrics as job otp-router every 5 s and loads alerts.yml."""
    config = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    assert config["rule_files"] == ["alerts.yml"]
    (job,) = config["scrape_configs"]
    assert job["job_name"] == "otp-router"
    assert job["scrape_interval"] == "5s"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"] == ["127.0.0.1:8080"]


def test_grafana_provisioning() -> None:
    """The data source is a Prometheus one and the dashboard provider loads JSON files from a folder."""
    sources = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert [s["type"] for s in sources["datasources"]] == ["prometheus"]
    providers = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/otp-router.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"].startswith("/")
