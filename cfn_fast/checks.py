"""The original alerting.sh's threshold checks: each reads the last 60 lines
of the metrics file and raises its alert (through the shared cooldown) when
the metric it watches crossed its ALERT_* threshold."""
from __future__ import annotations

import os
from typing import Any, Callable, NamedTuple, Optional

from cfn_fast import alerts
from cfn_fast.config import Config
from cfn_fast.storage import Storage

WINDOW = 60  # lines of the metrics file each check reads, as the original's tail -n 60


class Check(NamedTuple):
    name: str                   # coordination-time, ...: the CLI's and the drop-in's name
    metric: str                 # the metric it reads
    alert: str                  # the alert it raises
    severity: str
    setting: str                # the Config attribute holding its threshold
    measure: Callable[[list[float]], float]  # values in file order -> the figure held against it
    above: bool                 # True: alert when the figure is above the threshold; False: below
    words: str                  # what the figure is, for the alert's message


def _growth_pct(v: list[float]) -> float:
    return (v[-1] - v[0]) * 100.0 / v[0] if v[0] else 0.0


CHECKS: tuple[Check, ...] = (
    Check("coordination-time", "coordination.time", "coordination_time_exceeded", "critical",
          "alert_coordination_time_ms", max, True, "coordination time (ms)"),
    Check("delivery-rate", "coordination.delivery_rate", "delivery_rate_low", "warning",
          "alert_delivery_rate_pct", min, False, "delivery rate (%)"),
    Check("memory-growth", "system.memory_mb", "memory_growth_high", "warning",
          "alert_memory_growth_pct", _growth_pct, True, "memory growth (%)"),
    Check("fd-growth", "system.open_fds", "fd_growth_high", "warning",
          "alert_fd_growth", lambda v: v[-1] - v[0], True, "open descriptors' growth"),
    Check("error-rate", "coordination.error_rate", "error_rate_high", "critical",
          "alert_error_rate_pct", max, True, "error rate (%)"),
    Check("queue-depth", "coordination.queue_depth", "queue_depth_high", "warning",
          "alert_queue_depth", max, True, "queue depth"),
)
BY_NAME = {c.name: c for c in CHECKS}


def _tail(path: str, store: Storage, lines: int) -> Optional[list[bytes]]:
    """The last ``lines`` lines of the file, or None when there is none."""
    fd = store.open_log_read(path)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        chunk = min(size, 4096)
        while True:
            f.seek(size - chunk)
            data = f.read(chunk)
            if data.count(b"\n") > lines or chunk == size:
                return data.splitlines()[-lines:]
            chunk = min(size, chunk * 4)


def _values(tail: list[bytes], metric: str) -> list[float]:
    import json

    out = []
    for raw in tail:
        try:
            rec = json.loads(raw)
            if rec.get("metric") == metric and isinstance(rec.get("value"), (int, float)):
                out.append(float(rec["value"]))
        except (ValueError, AttributeError):
            continue
    return out


def run(store: Storage, names: Optional[list[str]] = None, path: Optional[str] = None) -> list[dict[str, Any]]:
    """Runs the named checks (all when None) over the last 60 lines of ``path``
    (METRICS_FILE when None); returns one record per check that found its
    metric: its figure, threshold, and whether it alerted (False when
    inside its cooldown or under the threshold). A missing file is an empty
    result (the caller warns)."""
    cfg: Config = store.config
    tail = _tail(path or cfg.metrics_file, store, WINDOW)
    if tail is None:
        return []
    out = []
    for c in CHECKS if names is None else [BY_NAME[n] for n in names]:
        values = _values(tail, c.metric)
        if not values:
            continue
        figure = c.measure(values)
        threshold = float(getattr(cfg, c.setting))
        crossed = figure > threshold if c.above else figure < threshold
        sent = crossed and alerts.emit(
            store, c.alert, f"{c.words} {figure:g} is {'above' if c.above else 'below'} the threshold {threshold:g}",
            c.severity, {"value": figure, "threshold": threshold, "metric": c.metric})
        out.append({"check": c.name, "metric": c.metric, "value": figure, "threshold": threshold,
                    "crossed": crossed, "alerted": bool(sent)})
    return out


def clear_old_alerts(store: Storage, hours: float) -> tuple[int, int]:
    """Keeps only the alert lines of the last ``hours``: the file is rewritten
    aside and renamed over the old one (an alert written during the rewrite
    may be lost; alerts are written open-append-close, so that window is the
    rewrite's). Returns (kept, removed)."""
    import json
    import time
    from datetime import datetime, timezone

    path = store.config.alert_log_file
    fd = store.open_log_read(path)
    if fd is None:
        return 0, 0
    since = time.time() - hours * 3600
    kept: list[bytes] = []
    removed = 0
    with os.fdopen(fd, "rb") as f:
        for raw in f:
            try:
                ts = str(json.loads(raw)["timestamp"]).replace("Z", "+00:00")
                dt = datetime.fromisoformat(ts)
                when = (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
            except (ValueError, KeyError, TypeError):
                when = since  # a line we cannot date is kept
            if when >= since:
                kept.append(raw if raw.endswith(b"\n") else raw + b"\n")
            else:
                removed += 1
    if removed:
        tmp = f"{path}.{os.getpid()}.tmp"
        out = store.open_log(tmp)
        try:
            os.ftruncate(out, 0)
            view = memoryview(b"".join(kept))
            while view:
                view = view[os.write(out, view):]
        finally:
            os.close(out)
        os.rename(tmp, path)
    return len(kept), removed


__all__ = ["BY_NAME", "CHECKS", "Check", "clear_old_alerts", "run"]
