"""deploy/: the Grafana dashboard's queries parse as PromQL and use only metrics a live server
exports after traffic; the Prometheus alert rules pass `promtool check rules` and their unit
tests (`promtool test rules`)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from traffic import run_traffic

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana" / "lmcache-rs.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (./dev.sh setup)")

#: Grafana's variables, replaced by values PromQL accepts before parsing.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h", "$instance": ".+"}
#: Words of PromQL that are not metric names (functions are recognised by their parenthesis).
KEYWORDS = {
    "and",
    "or",
    "unless",
    "bool",
    "offset",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
}
KEYWORDS |= {"inf", "nan"}
#: Metrics Prometheus itself adds to every target.
SCRAPE_METRICS = {"up"}


def dashboard() -> dict:
    return json.loads(GRAFANA.read_text())


def queries() -> list[str]:
    """Every PromQL query of the dashboard's panels, with Grafana's variables filled in."""
    out = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            out.append(expr)
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once label matchers
    ({...}), grouping clauses, ranges, string literals and function names are gone."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", " ", expr)
    expr = re.sub(r"\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    names = set()
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        if m.group(2) is None and m.group(1) not in KEYWORDS:
            names.add(m.group(1))
    return names


def alert_exprs() -> list[str]:
    import yaml  # noqa: PLC0415

    doc = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for g in doc["groups"] for r in g["rules"]]


def test_metric_names_are_read_from_promql() -> None:
    q = (
        'histogram_quantile(0.99, sum by (op, le) (rate(a_bucket{x=~"$i", op="lookup"}[5m]))) '
        "> 0.05 and on (instance) sum(b_total offset 5m) / ignoring(x) c * 1e3 or vector(0)"
    )
    assert metric_names(q) == {"a_bucket", "b_total", "c"}


def test_dashboard_is_well_formed() -> None:
    d = dashboard()
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in d["templating"]["list"]} == {"datasource", "instance"}
    for p in d["panels"]:
        g = p["gridPos"]
        assert g["x"] >= 0, p["title"]
        assert g["x"] + g["w"] <= 24, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
    assert len(queries()) >= 20


@needs_promtool
def test_every_dashboard_query_parses(tmp_path) -> None:
    """promtool parses each query as the expression of a recording rule (it has no query
    parser of its own); a parse error names the rule, so the query."""
    rules = {"groups": [{"name": "dashboard", "rules": []}]}
    for i, expr in enumerate(queries()):
        rules["groups"][0]["rules"].append({"record": f"dashboard_query_{i}", "expr": expr})
    path = tmp_path / "queries.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    out = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    check = subprocess.run(
        [PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout
    test = subprocess.run(
        [PROMTOOL, "test", "rules", str(ALERT_TESTS)],
        capture_output=True,
        text=True,
        check=False,
        cwd=ALERT_TESTS.parent,
    )
    assert test.returncode == 0, test.stdout + test.stderr


def exported(text: str) -> set[str]:
    """Sample names in a Prometheus text exposition (with _total, _bucket, _count, _sum)."""
    return {line.split("{", 1)[0].split(" ", 1)[0] for line in text.splitlines() if line and line[0] != "#"}


def test_dashboard_and_alerts_use_only_exported_metrics(server_factory, tmp_path) -> None:
    l2 = json.dumps({"type": "fs", "base_path": str(tmp_path / "l2"), "max_capacity_gb": 0.02})
    server = server_factory(
        "--eviction-policy", "IsolatedLRU", "--quota", "alice=0.02", "--quota", "bob=0.01", "--l2-adapter", l2
    )
    used = {n for q in queries() for n in metric_names(q)}
    used |= {n for q in alert_exprs() for n in metric_names(q)}
    templating = [v["definition"] for v in dashboard()["templating"]["list"] if v["type"] == "query"]
    used |= {m.group(1) for d in templating if (m := re.match(r"label_values\((\w+),", d))}
    used -= SCRAPE_METRICS
    assert all(n.startswith(("lmcache_mp_", "lmcache_rs_")) for n in used), used
    assert run_traffic(server.url, rounds=100) == []
    # L2 evictions run on their own 1 s cycle, after the writes that fill the adapter.
    missing: set[str] = set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        missing = used - exported(httpx.get(server.http + "/metrics", timeout=30).text)
        if not missing:
            break
        time.sleep(0.5)
    assert not missing, f"queries use metrics the server does not export: {sorted(missing)}"
