"""``cfn-fast metrics plot``: inbox utilisation and backpressure over time,
charted from METRICS_FILE into a PNG.

Utilisation comes from the ``inbox.utilization`` lines the overflow monitor
writes each pass; backpressure from the ``backpressure.wait`` /
``backpressure.send.*`` lines the send loop writes. METRICS_FILE.1 (the
rotated half) is read first when it exists. Both files are opened under the
telemetry files' trust rule, through the storage. Only the lines named are
decoded, so a 64 MiB file takes a second or two.

matplotlib draws through its Agg canvas directly (no pyplot, so no global
backend is chosen for the caller). Needs the ``plot`` extra.
"""
from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import TYPE_CHECKING, NamedTuple, Optional

from cfn_fast.extras import require

require("matplotlib", "plot")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from cfn_fast.errors import CfnError, InvalidArgument  # noqa: E402
from cfn_fast.overflow import HIGH_UTILIZATION  # noqa: E402

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus
    from cfn_fast.storage import Storage

SIZE_IN = (10.0, 7.0)
DPI = 100  # 1000 x 700 pixels
_UTIL = b'"inbox.utilization"'
_BP = b'"backpressure.'


class NothingToPlot(CfnError, FileNotFoundError):
    """Neither METRICS_FILE nor METRICS_FILE.1 exists (exit 1)."""


class Series(NamedTuple):
    utilization: dict[str, list[tuple[float, float]]]  # agent -> (unix time, percent)
    waits: list[float]      # unix times of backpressure.wait lines
    failures: list[float]   # ... backpressure.send.failure
    successes: list[float]  # ... backpressure.send.success
    files: list[str]


def _when(stamp: object) -> Optional[float]:
    if not isinstance(stamp, str):
        return None
    try:
        dt = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def read_series(store: "Storage") -> Series:
    """The points to chart, from METRICS_FILE.1 then METRICS_FILE."""
    path = store.config.metrics_file
    util: dict[str, list[tuple[float, float]]] = {}
    waits: list[float] = []
    failures: list[float] = []
    successes: list[float] = []
    files = []
    for p in (path + ".1", path):
        fd = store.open_log_read(p)
        if fd is None:
            continue
        files.append(p)
        with os.fdopen(fd, "rb") as f:
            for raw in f:
                is_util = _UTIL in raw
                if not is_util and _BP not in raw:
                    continue
                try:
                    rec = json.loads(raw)
                    name = rec["metric"]
                except (ValueError, KeyError, TypeError):
                    continue
                t = _when(rec.get("timestamp"))
                if t is None:
                    continue
                if name == "inbox.utilization":
                    tags = rec.get("tags")
                    agent = tags.get("agent") if isinstance(tags, dict) else None
                    value = rec.get("value")
                    if isinstance(agent, str) and isinstance(value, (int, float)):
                        util.setdefault(agent, []).append((t, float(value)))
                elif name == "backpressure.wait":
                    waits.append(t)
                elif name == "backpressure.send.failure":
                    failures.append(t)
                elif name == "backpressure.send.success":
                    successes.append(t)
    if not files:
        raise NothingToPlot(f"no metrics to plot: METRICS_FILE {path} does not exist")
    return Series(util, waits, failures, successes, files)


def stamp(t: float) -> datetime:
    """A point's place on the time axis: local time."""
    return datetime.fromtimestamp(t)


def _per_second(times: list[float], start: float, width: float, bins: int) -> list[float]:
    counts = [0] * bins
    for t in times:
        i = int((t - start) / width)
        if 0 <= i < bins:
            counts[i] += 1
        elif i == bins:
            counts[-1] += 1
    return [c / width for c in counts]


def draw(series: Series, out: str, agents: int = 8, title: str = "") -> None:
    """Writes the two charts (utilisation of the ``agents`` fullest inboxes at
    their peak, and backpressure per second) to ``out`` as a PNG."""
    if isinstance(agents, bool) or not isinstance(agents, int) or agents < 1:
        raise InvalidArgument(f"agents must be a whole number >= 1, not {agents!r}")
    fig = Figure(figsize=SIZE_IN, dpi=DPI)
    FigureCanvasAgg(fig)
    ax_u, ax_b = fig.subplots(2, 1, sharex=True)
    everything = [t for pts in series.utilization.values() for t, _ in pts]
    everything += series.waits + series.failures + series.successes

    ranked = sorted(series.utilization.items(),
                    key=lambda kv: (-max(v for _, v in kv[1]), -sum(v for _, v in kv[1]) / len(kv[1]), kv[0]))
    for agent, pts in ranked[:agents]:
        ax_u.plot([stamp(t) for t, _ in pts], [v for _, v in pts], label=agent, linewidth=1.4)
    rest = ranked[agents:]
    if rest:
        peak: dict[float, float] = {}
        for _, pts in rest:
            for t, v in pts:
                peak[t] = max(peak.get(t, 0.0), v)
        ts = sorted(peak)
        ax_u.plot([stamp(t) for t in ts], [peak[t] for t in ts], color="grey", linestyle=":",
                  label=f"fullest of the other {len(rest)}")
    ax_u.axhline(100, color="red", linewidth=0.8, linestyle="--")
    ax_u.axhline(HIGH_UTILIZATION, color="orange", linewidth=0.8, linestyle="--")
    ax_u.set_ylabel("inbox utilisation (%)")
    ax_u.set_ylim(bottom=0, top=max([110.0] + [v * 1.05 for _, pts in ranked[:agents] for _, v in pts]))
    ax_u.grid(alpha=0.3)
    if ranked:
        ax_u.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax_u.text(0.5, 0.5, "no inbox.utilization lines: run cfn-fast monitor-overflow",
                  transform=ax_u.transAxes, ha="center", va="center", color="grey")
    ax_u.set_title(title or "inbox utilisation and backpressure")

    if everything:
        start, end = min(everything), max(everything)
        bins = 120
        width = max((end - start) / bins, 0.05)
        bins = max(1, min(bins, int((end - start) / width) + 1))
        xs = [stamp(start + (i + 0.5) * width) for i in range(bins)]
        for times, label, colour in ((series.waits, "waits/s", "tab:orange"),
                                     (series.failures, "failed sends/s", "tab:red"),
                                     (series.successes, "backpressure sends/s", "tab:green")):
            if times:
                ax_b.plot(xs, _per_second(times, start, width, bins), label=label, color=colour, linewidth=1.2)
    if series.waits or series.failures or series.successes:
        ax_b.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax_b.text(0.5, 0.5, "no backpressure lines", transform=ax_b.transAxes, ha="center", va="center",
                  color="grey")
    ax_b.set_ylabel("backpressure (per second)")
    ax_b.set_ylim(bottom=0)
    ax_b.set_xlabel("local time")
    ax_b.grid(alpha=0.3)
    # matplotlib.dates has no annotations on these constructors
    locator = AutoDateLocator()  # type: ignore[no-untyped-call]
    ax_b.xaxis.set_major_locator(locator)
    ax_b.xaxis.set_major_formatter(ConciseDateFormatter(locator))  # type: ignore[no-untyped-call]
    fig.tight_layout()
    fig.savefig(out, format="png")


def plot_metrics(bus: "MessageBus", out: str, agents: int = 8) -> Series:
    """Reads the bus's METRICS_FILE and writes the PNG; returns what was charted."""
    series = read_series(bus.storage)
    draw(series, out, agents, f"cfn-fast: {bus.base_dir}")
    return series


__all__ = ["NothingToPlot", "Series", "draw", "plot_metrics", "read_series"]
