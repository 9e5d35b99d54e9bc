"""Metrics and alerts, as the public API has them: each function takes an
optional ``bus=`` (default: the bus the environment describes). The work is
in metrics.py and alerts.py, below the bus; the shared counters are the
storage's (``storage.COUNTERS``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Optional, Union

from cfn_fast import alerts, metrics
from cfn_fast.alerts import SEVERITIES
from cfn_fast.defaults import resolve
from cfn_fast.fields import Number, Tags, now_iso
from cfn_fast.metrics import LineTemplate, format_metric
from cfn_fast.storage import COUNTERS

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus


def count(bus: "MessageBus", name: str, delta: int = 1) -> None:
    """Adds to one of the shared counters (no-op when the base folder does not exist)."""
    bus.storage.counter_add(name, delta)


def counters(bus: Optional["MessageBus"] = None) -> dict[str, int]:
    """Every shared counter by name (zeros when the base folder does not exist)."""
    return resolve(bus).storage.counters()


def write_metric_lines(bus: "MessageBus", data: bytes, nlines: int) -> bool:
    """Appends already formatted metric lines; False when metrics are off."""
    return metrics.write_lines(bus.storage, data, nlines)


def emit_metric(name: str, value: Number, unit: str = "count", tags: Tags = None, *,
                bus: Optional["MessageBus"] = None) -> bool:
    """Appends one metric line to METRICS_FILE; returns False when metrics are
    off (CFN_METRICS=0). Raises InvalidArgument for a bad name, value or tags,
    UnsafePath when METRICS_FILE is refused, CfnOSError when it cannot be written."""
    return metrics.emit(resolve(bus).storage, name, value, unit, tags)


def emit_alert(alert_type: str, message: str, severity: str = "info",
               metadata: Union[Mapping[str, Any], str, None] = None, *,
               bus: Optional["MessageBus"] = None) -> bool:
    """Appends one alert line to ALERT_LOG_FILE and prints a (coloured) line on
    stderr, unless the same alert type for the same subject (metadata's
    "agent", else "to") was emitted within ALERT_COOLDOWN_SECONDS by any
    process on the base folder. Returns True when emitted, False when suppressed."""
    return alerts.emit(resolve(bus).storage, alert_type, message, severity, metadata)


def alert_backpressure_failure(bus: Optional["MessageBus"], from_agent: str, to_agent: str,
                               retries: Optional[int] = None) -> bool:
    """The inbox_overflow alert of a failed backpressure send; never raises."""
    return alerts.backpressure_failure(resolve(bus).storage, from_agent, to_agent, retries)


def alerts_summary(minutes: Optional[float] = None, *, bus: Optional["MessageBus"] = None) -> dict[str, Any]:
    """Alerts in ALERT_LOG_FILE (those of the last ``minutes`` when given),
    counted by severity, by type, and by severity then type."""
    return alerts.summary(resolve(bus).storage, minutes)


def metrics_stats(*, bus: Optional["MessageBus"] = None) -> dict[str, Any]:
    """METRICS_FILE's size and line count, and the shared totals."""
    return metrics.stats(resolve(bus).storage)


def clear_metrics(*, bus: Optional["MessageBus"] = None) -> None:
    """Empties METRICS_FILE in place; the shared totals are cumulative and stay."""
    metrics.clear(resolve(bus).storage)


__all__ = [
    "COUNTERS",
    "SEVERITIES",
    "LineTemplate",
    "alert_backpressure_failure",
    "alerts_summary",
    "clear_metrics",
    "count",
    "counters",
    "emit_alert",
    "emit_metric",
    "format_metric",
    "metrics_stats",
    "now_iso",
    "write_metric_lines",
]
