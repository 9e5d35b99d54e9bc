"""`cfn-fast metrics plot` and `cfn-fast demo --plot`: PNGs of utilisation
and backpressure over time, from METRICS_FILE (and METRICS_FILE.1)."""
from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

pytest.importorskip("matplotlib", reason="the 'plot' extra is not installed")

from cfn_fast import MessageBus, plot  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def line(t: datetime, metric: str, value: float, unit: str, tags: dict[str, object]) -> str:
    stamp = t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z"
    return json.dumps({"timestamp": stamp, "metric": metric, "value": value, "unit": unit, "tags": tags},
                      separators=(",", ":")) + "\n"


def write_metrics(path: Path, start: datetime, seconds: int, agents: int = 3) -> int:
    """A monitor's lines every second, and backpressure lines while inboxes fill; returns the lines written."""
    out = []
    for s in range(seconds):
        t = start + timedelta(seconds=s)
        for a in range(agents):
            util = min(100, s * (a + 1) * 100 // seconds)
            out.append(line(t, "inbox.size", util * 10, "count", {"agent": f"agent-{a}"}))
            out.append(line(t, "inbox.utilization", util, "percent", {"agent": f"agent-{a}"}))
        for k in range(s % 7):
            out.append(line(t + timedelta(milliseconds=100 * k), "backpressure.wait", 1, "count",
                            {"from": "s", "to": "agent-2", "retry": k + 1}))
        out.append(line(t, "backpressure.send.success", 1, "count", {"from": "s", "to": "agent-2", "retries": 0}))
        if s % 10 == 9:
            out.append(line(t, "backpressure.send.failure", 1, "count",
                            {"from": "s", "to": "agent-2", "retries": 50}))
        out.append('{"not json\n')  # a torn or foreign line is skipped
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "w") as f:
        f.writelines(out)
    return len(out)


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cfn_fast", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_metrics_plot_writes_a_png_of_utilisation_and_backpressure(workdir, tmp_path):
    metrics = Path(os.environ["METRICS_FILE"])
    start = datetime(2026, 11, 30, 9, 0, tzinfo=timezone.utc)
    write_metrics(Path(str(metrics) + ".1"), start, 60)          # the rotated, older half
    write_metrics(metrics, start + timedelta(seconds=60), 60)
    out = tmp_path / "chart.png"
    r = cli("metrics", "plot", "--out", str(out), "--agents", "2")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(out)
    assert png_size(out) == (1000, 700)
    assert out.stat().st_size > 20_000  # lines and text, not an empty canvas

    with MessageBus() as bus:
        series = plot.read_series(bus.storage)
    assert series.files == [str(metrics) + ".1", str(metrics)]
    assert set(series.utilization) == {"agent-0", "agent-1", "agent-2"}
    assert len(series.utilization["agent-0"]) == 120
    times = [t for t, _ in series.utilization["agent-0"]]
    assert times == sorted(times)  # .1 first: oldest first
    assert len(series.failures) == 12 and len(series.successes) == 120


def test_a_file_without_utilisation_lines_still_charts_and_no_file_is_one_line(tmp_path):
    r = cli("metrics", "plot", "--out", str(tmp_path / "none.png"))
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "does not exist" in r.stderr and not (tmp_path / "none.png").exists()

    metrics = Path(os.environ["METRICS_FILE"])
    fd = os.open(metrics, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, line(datetime.now(timezone.utc), "backpressure.wait", 1, "count", {}).encode())
    os.close(fd)
    out = tmp_path / "sparse.png"
    r = cli("metrics", "plot", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert png_size(out) == (1000, 700)


def test_the_demo_can_chart_its_run(tmp_path):
    out = tmp_path / "demo.png"
    r = cli("demo", "--senders", "2", "--messages", "150", "--capacity", "10", "--quiet", "--plot", str(out))
    assert r.returncode == 0, r.stderr
    assert re.search(r"^\s*lost\s+0\s", r.stdout, re.M), r.stdout
    assert str(out) in r.stderr
    assert png_size(out) == (1000, 700)
    assert out.stat().st_size > 20_000
