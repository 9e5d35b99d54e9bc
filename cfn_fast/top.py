"""``cfn-fast top``: a live, full-screen view of the bus.

``render(frame, width, height)`` turns one snapshot into a rich renderable
that fits exactly ``width`` x ``height`` cells (no terminal needed: tests
call it at any size); ``run`` is the loop that takes a snapshot every
``interval`` seconds, draws it with ``rich.live.Live`` on the alternate
screen, and quits on ``q`` (or Ctrl-C), leaving the terminal as it found it.

What it shows: the rate-limit tier, batch size and retry wait in force;
backpressure waits, failed sends, deliveries and takes per second (the
shared counters' change since the last frame); how many inboxes there are,
full and above 80 %; one utilisation bar per inbox, fullest first, red at
100 % and amber above 80 %, as many as the screen holds (the rest are
counted, so 10,000 inboxes cost one sort, not 10,000 rows), each marked
[open] or [half] while its circuit breaker refuses sends or admits only probes
(read for the fullest CIRCUIT_ROWS, one call each), with the count in the
header; and the newest lines of ALERT_LOG_FILE. Needs the ``top`` extra (rich).
"""
from __future__ import annotations

import os
import select
import sys
import time
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Optional, TextIO

from cfn_fast.extras import require

require("rich", "top")

from rich.console import Console, Group, RenderableType  # noqa: E402
from rich.live import Live  # noqa: E402
from rich.text import Text  # noqa: E402

from cfn_fast import snapshot  # noqa: E402
from cfn_fast.errors import CfnError  # noqa: E402
from cfn_fast.snapshot import Alert, Inbox, Snapshot  # noqa: E402

if TYPE_CHECKING:
    from cfn_fast.bus import MessageBus

RED, AMBER, GREEN = "red", "orange1", "green"
SEVERITY_STYLES = {"critical": "bold red", "error": "red", "warning": AMBER}
RATE_COUNTERS = ("backpressure_wait", "backpressure_failure", "sent", "consumed")
MAX_ALERTS = 5
CIRCUIT_ROWS = 100  # the fullest inboxes whose circuit a frame reads: more than a screen shows
CIRCUIT_MARKS = {"open": (" [open]", RED), "half-open": (" [half]", AMBER)}


class Frame(NamedTuple):
    """Everything one screen shows."""
    snap: Snapshot
    rates: dict[str, Optional[float]]  # per second since the last frame; None on the first
    alerts: list[Alert]
    interval: float
    error: Optional[str] = None
    circuits: Optional[dict[str, str]] = None  # agent -> "open" / "half-open", of the fullest; closed ones absent


def fill_style(box: Inbox) -> str:
    """Red when full, amber above 80 %, green otherwise."""
    if box.full:
        return RED
    return AMBER if box.high else GREEN


def _rate(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:,.1f}"


def _clock(stamp: str) -> str:
    """An alert's ISO time stamp as local HH:MM:SS (as written when it does not parse)."""
    from datetime import datetime

    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).astimezone().strftime("%H:%M:%S")
    except ValueError:
        return stamp[:19]


def _pack(fields: list[Text], width: int) -> list[Text]:
    """Fields joined by ' · ' on as few lines as fit ``width``; a field wider
    than a line is cut with an ellipsis."""
    lines: list[Text] = []
    cur: Optional[Text] = None
    for f in fields:
        f = f.copy()
        f.truncate(width, overflow="ellipsis")
        if cur is not None and cur.cell_len + 3 + f.cell_len <= width:
            cur.append(" · ", style="dim")
            cur.append_text(f)
        else:
            if cur is not None:
                lines.append(cur)
            cur = f
    if cur is not None:
        lines.append(cur)
    return lines


def _field(label: str, value: str, style: str = "bold") -> Text:
    t = Text()
    if label:
        t.append(f"{label} ", style="dim")
    t.append(value, style=style)
    return t


def header(frame: Frame, width: int) -> list[Text]:
    s = frame.snap
    title = Text(" cfn-fast top ", style="bold reverse")
    title.append(f" {s.base_dir}  {time.strftime('%H:%M:%S', time.localtime(s.wall))}  "
                 f"every {frame.interval:g}s  q quits")
    title.truncate(width, overflow="ellipsis")
    rl = s.rate
    tier_style = {"high": RED, "medium": AMBER, "low": GREEN}.get(rl.tier, "bold")
    limit = [_field("rate limit", f"{rl.tier} tier", tier_style), _field("batch", str(rl.batch_size)),
             _field("wait", f"{rl.wait_ms} ms")]
    if rl.load_per_cpu is not None:
        limit.append(_field("load", f"{rl.load_per_cpu:.2f}/CPU"))
    r = frame.rates
    fails = r.get("backpressure_failure")
    flow = [_field("backpressure", f"{_rate(r.get('backpressure_wait'))} waits/s"),
            _field("failures", f"{_rate(fails)}/s", RED if fails else "bold"),
            _field("sent", f"{_rate(r.get('sent'))}/s"), _field("consumed", f"{_rate(r.get('consumed'))}/s")]
    states = list((frame.circuits or {}).values())
    if states:
        flow.append(_field("circuits", f"{states.count('open')} open", RED if "open" in states else "bold"))
        flow.append(_field("", f"{states.count('half-open')} half-open",
                           AMBER if "half-open" in states else "bold"))
    t = s.totals
    high = t.high - t.full
    fill = [_field("inboxes", f"{t.inboxes:,}"), _field("", f"{t.full:,} full", RED if t.full else "bold"),
            _field("", f"{high:,} above 80%", AMBER if high else "bold"),
            _field("queued", f"{t.messages:,}"),
            _field("senders waiting", f"{t.waiters:,}", AMBER if t.waiters else "bold")]
    lines = [title] + _pack(limit, width) + _pack(flow, width) + _pack(fill, width)
    if frame.error:
        err = Text(f"error: {frame.error}", style="bold red")
        err.truncate(width, overflow="ellipsis")
        lines.append(err)
    return lines


def inbox_rows(boxes: list[Inbox], total: int, width: int, rows: int, unicode: bool = True,
               circuits: Optional[dict[str, str]] = None) -> list[Text]:
    """A column header and one line per inbox (``boxes`` fullest first), in
    ``width`` cells; an inbox in ``circuits`` (open or half-open) carries its mark."""
    aw = min(max([5] + [len(b.agent) for b in boxes]), max(6, width * 2 // 5), 40)
    counts = [f"{b.size if b.counted else '?'}/{b.capacity}" for b in boxes]
    cw = max([8] + [len(c) for c in counts]) if width >= 50 else 0
    pw = 5
    bw = min(60, width - aw - 1 - pw - (cw + 1 if cw else 0) - 1)
    if bw < 4:
        bw = 0
    full_c, empty_c = ("█", "░") if unicode else ("#", "-")

    def line(agent: Text, bar: Text, count: str, pct: Text) -> Text:
        agent.truncate(aw, overflow="ellipsis", pad=True)
        t = Text()
        t.append_text(agent)
        if bw:
            t.append(" ")
            t.append_text(bar)
        if cw:
            t.append(" " + count.rjust(cw), style="" if count[:1].isdigit() else "dim")
        t.append(" ")
        pct.truncate(pw, pad=False)
        t.append_text(Text(" " * (pw - pct.cell_len)) + pct)
        t.truncate(width, overflow="ellipsis")
        return t

    head = line(Text("AGENT", style="dim"), Text("FILL".ljust(bw), style="dim"), "SIZE/CAP", Text("%", style="dim"))
    out = [head]
    for b, count in zip(boxes[:rows], counts):
        style = fill_style(b)
        n = min(bw, round(min(b.fill, 1.0) * bw)) if bw else 0
        if bw and b.size > 0 and n == 0:
            n = 1  # a message is there: show it
        bar = Text(full_c * n, style=style) + Text(empty_c * (bw - n), style="dim")
        name = Text(b.agent, style="bold" if b.full else "")
        mark = CIRCUIT_MARKS.get((circuits or {}).get(b.agent, ""))
        if mark:  # the name gives way, never the mark
            name.truncate(max(1, aw - len(mark[0])), overflow="ellipsis")
            name.append(mark[0], style=mark[1])
        out.append(line(name, bar, count, Text(f"{b.percent}%", style=style)))
    if total > len(boxes[:rows]):
        more = Text(f"showing {len(boxes[:rows]):,} of {total:,} inboxes, fullest first", style="dim")
        more.truncate(width, overflow="ellipsis")
        out.append(more)
    return out


def alert_lines(alerts: list[Alert], width: int) -> list[Text]:
    out = []
    for a in alerts:
        t = Text(f"{_clock(a.timestamp)} ", style="dim")
        t.append(f"{a.severity} ", style=SEVERITY_STYLES.get(a.severity, "blue"))
        t.append(f"{a.alert}: ", style="bold")
        t.append(a.message)
        t.truncate(width, overflow="ellipsis")
        out.append(t)
    return out


def render(frame: Frame, width: int, height: int, unicode: bool = True) -> RenderableType:
    """The whole screen for ``frame``: at most ``height`` lines of at most
    ``width`` cells. Inboxes get the room the header and the alerts leave
    (alerts take at most a third of it)."""
    width, height = max(width, 10), max(height, 3)
    top = header(frame, width)
    room = height - len(top)
    total = frame.snap.totals.inboxes
    alerts = frame.alerts[-MAX_ALERTS:]
    n_alerts = min(len(alerts), max(0, (room - 3) // 3))
    alert_block = (n_alerts + 1) if n_alerts else 0
    rows = room - 1 - alert_block  # the column header
    if rows < total:
        rows -= 1  # the "showing N of M" line
    rows = max(0, rows)
    shown = frame.snap.fullest(rows)
    lines = top + inbox_rows(shown, total, width, rows, unicode, frame.circuits)
    if not total:
        lines.append(Text("no inbox is tracked yet (cfn-fast bus init AGENT)", style="dim"))
    if n_alerts:
        lines.append(Text("recent alerts", style="bold underline"))
        lines += alert_lines(alerts[-n_alerts:], width)
    for t in lines:
        t.no_wrap = True
        t.overflow = "ellipsis"
    return Group(*lines[:height])


class Viewer:
    """Takes frames: one snapshot each, rates against the previous one."""

    def __init__(self, bus: "MessageBus", interval: float) -> None:
        self.bus = bus
        self.interval = interval
        self.prev: Optional[Snapshot] = None

    def frame(self) -> Frame:
        error = None
        try:
            snap = snapshot.take(self.bus, reuse=True)
        except (CfnError, OSError) as e:
            cfg = self.bus.config
            snap = snapshot.make(self.bus.base_dir, [], cfg.max_inbox_size, {},
                                 snapshot.RateLimit("configured", cfg.batch_size, cfg.backpressure_wait_ms, False,
                                                    None))
            error = str(e)
        try:
            alerts = snapshot.recent_alerts(self.bus.storage, MAX_ALERTS)
        except (CfnError, OSError) as e:
            alerts, error = [], error or f"ALERT_LOG_FILE: {e}"
        rates = snapshot.rates(self.prev, snap, RATE_COUNTERS) if not error else {}
        if not error:
            self.prev = snap
        return Frame(snap, rates, alerts, self.interval, error, self._circuits(snap) if not error else {})

    def _circuits(self, snap: Snapshot) -> dict[str, str]:
        """The circuits of the fullest CIRCUIT_ROWS inboxes that are not closed."""
        out = {}
        for box in snap.fullest(CIRCUIT_ROWS):
            try:
                state = self.bus.storage.circuit(box.agent).state
            except (CfnError, OSError):
                continue  # removed since the snapshot, or the backend is away: the frame says so elsewhere
            if state != "closed":
                out[box.agent] = state
        return out


def _keys(stream: TextIO) -> Any:
    """Puts a terminal stdin in cbreak mode (keys arrive unbuffered, not
    echoed; Ctrl-C still interrupts) for the life of the context."""
    import contextlib
    import termios
    import tty

    @contextlib.contextmanager
    def cm() -> Iterator[Optional[int]]:
        try:
            fd = stream.fileno()
            if not os.isatty(fd):
                raise OSError
            saved = termios.tcgetattr(fd)
        except (OSError, ValueError, termios.error):
            yield None  # not a terminal: no keys, Ctrl-C ends it
            return
        try:
            tty.setcbreak(fd, termios.TCSANOW)
            yield fd
        finally:
            termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    return cm()


def _wait_for_quit(fd: Optional[int], seconds: float) -> bool:
    """Sleeps ``seconds``; True as soon as q (or Q) is typed."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        if fd is None:
            time.sleep(left)
            return False
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            data = os.read(fd, 64)
            if not data or b"q" in data or b"Q" in data:
                return True


def run(bus: "MessageBus", interval: float, console: Optional[Console] = None) -> int:
    """The live view until q. When stdout is not a terminal, one frame is
    printed (no colour, the terminal's or COLUMNS' width) and it returns."""
    console = console or Console(highlight=False)
    viewer = Viewer(bus, interval)
    unicode = console.encoding.lower().startswith("utf")
    if not console.is_terminal:
        console.print(render(viewer.frame(), console.width, 10_000, unicode), crop=True)
        return 0

    def draw() -> RenderableType:
        w, h = console.size
        return render(viewer.frame(), w, h, unicode)

    try:
        with _keys(sys.stdin) as fd, Live(console=console, screen=True, auto_refresh=False,
                                          redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                live.update(draw(), refresh=True)
                if _wait_for_quit(fd, interval):
                    break
    except KeyboardInterrupt:
        pass  # Ctrl-C quits as q does; the context managers restored the terminal
    return 0


__all__ = ["Frame", "Viewer", "alert_lines", "fill_style", "header", "inbox_rows", "render", "run"]
