"""The Grafana dashboard (dashboards/cfn-fast.json): the bash original's
seven panels, each charting only metrics the exporter serves."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("prometheus_client", reason="the 'prom' extra is not installed")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from cfn_fast import exporter, monitors  # noqa: E402

DASHBOARD = Path(__file__).resolve().parent.parent / "dashboards" / "cfn-fast.json"
PANELS = ("Inbox Utilization by Agent", "Inbox Message Count", "Backpressure Events Rate", "Message Send Failures",
          "Inbox Overflow Events", "Alert Summary", "Top Utilized Agents")
METRIC = re.compile(r"\b(cfn_[a-z0-9_]+)\b")
LABEL_MATCH = re.compile(r"\{([^}]*)\}")


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def served(bus: Any) -> tuple[set[str], dict[str, set[str]]]:
    """The sample names the exporter serves on a bus where everything has
    happened once, and the label names of each."""
    bus.send_message("alice", "bob", "task", 1)
    monitors.apply_dynamic_rate_limit(bus=bus, load_per_cpu=0.1)
    names: set[str] = set()
    labels: dict[str, set[str]] = {}
    for fam in text_string_to_metric_families(exporter.exposition(bus).decode()):
        for s in fam.samples:
            names.add(s.name)
            labels.setdefault(s.name, set()).update(s.labels)
    return names, labels


def test_the_dashboard_has_the_originals_seven_panels(dashboard):
    assert dashboard["title"] == "CFN Rate Limiting & Backpressure Monitoring"
    assert [p["title"] for p in dashboard["panels"]] == list(PANELS)
    assert len({p["id"] for p in dashboard["panels"]}) == len(PANELS)
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for p in dashboard["panels"]:
        assert p["datasource"]["uid"] == "${datasource}"
        assert {"h", "w", "x", "y"} <= set(p["gridPos"])
        assert p["targets"], p["title"]


def test_every_query_names_only_metrics_the_exporter_serves(dashboard, bus):
    names, labels = served(bus)
    for panel in dashboard["panels"]:
        for t in panel["targets"]:
            expr = t["expr"]
            used = METRIC.findall(expr)
            assert used, f"{panel['title']}: {expr} names no cfn metric"
            for m in used:
                assert m in names, f"{panel['title']}: {m} is not served"
            for matcher in LABEL_MATCH.findall(expr):  # label names used in selectors exist too
                for part in filter(None, (x.strip() for x in matcher.split(","))):
                    label = re.split(r"[!=~]", part, 1)[0]
                    assert any(label in labels[m] for m in used), f"{panel['title']}: no label {label}"
            for legend in re.findall(r"\{\{(\w+)\}\}", t.get("legendFormat", "")):
                assert any(legend in labels[m] for m in used), f"{panel['title']}: legend {{{{{legend}}}}}"
