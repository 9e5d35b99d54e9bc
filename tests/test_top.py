"""`cfn-fast top`: the view function at any size, and the live view in a
real terminal (tmux: send-keys to type, capture-pane to read the screen)."""
from __future__ import annotations

import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest

pytest.importorskip("rich", reason="the 'top' extra is not installed")

from rich.cells import cell_len  # noqa: E402
from rich.console import Console  # noqa: E402

import cfn_fast  # noqa: E402
from cfn_fast import snapshot, telemetry, top  # noqa: E402
from cfn_fast.snapshot import Inbox, RateLimit, SlotInfo  # noqa: E402

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
RED = "\x1b[31m"
AMBER = "\x1b[38;5;214m"  # orange1 in 256 colours


def draw(frame: top.Frame, width: int, height: int) -> list[str]:
    """The frame as a 256-colour terminal would receive it, one string per line."""
    buf = io.StringIO()
    console = Console(file=buf, width=width, height=height, force_terminal=True, color_system="256",
                      legacy_windows=False, _environ={})
    console.print(top.render(frame, width, height), crop=True)
    return buf.getvalue().rstrip("\n").split("\n")


def plain(lines: list[str]) -> list[str]:
    return [ANSI.sub("", line) for line in lines]


@pytest.fixture
def swarm(make_bus) -> Any:
    """A full inbox (10/10), one at 90 % (9/10), one at 80 % exactly, 20 quiet ones, and alerts."""
    bus = make_bus()
    small = make_bus(max_inbox_size=10)
    for agent, n in (("full-agent", 10), ("busy-agent", 9), ("eighty", 8)):
        small.init_message_bus(agent)
        for i in range(n):
            small.send_message("x", agent, "t", i)
    for i in range(20):
        bus.init_message_bus(f"quiet-{i:02d}")
        bus.get_inbox_size(f"quiet-{i:02d}")
    telemetry.emit_alert("inbox_overflow", "Inbox of full-agent is full: 10/10 messages (100%)", "critical",
                         {"agent": "full-agent"}, bus=bus)
    telemetry.emit_alert("inbox_high_utilization", "Inbox of busy-agent is at 90% of capacity", "warning",
                         {"agent": "busy-agent"}, bus=bus)
    return bus


def rows_after_header(lines: list[str]) -> list[str]:
    i = next(i for i, line in enumerate(lines) if line.startswith("AGENT"))
    return lines[i + 1:]


@pytest.mark.parametrize("width", [40, 200])
def test_the_view_fits_the_screen_and_puts_the_full_inbox_first(swarm, width):
    viewer = top.Viewer(swarm, 1.0)
    viewer.frame()
    frame = viewer.frame()  # the second has rates
    height = 30
    lines = draw(frame, width, height)
    text = plain(lines)
    assert len(lines) <= height
    assert all(cell_len(t) <= width for t in text), text
    rows = rows_after_header(text)
    assert rows[0].startswith("full-agent") and rows[0].rstrip().endswith("100%"), rows
    assert rows[1].startswith("busy-agent") and rows[1].rstrip().endswith("90%")
    assert rows[2].startswith("eighty") and rows[2].rstrip().endswith("80%")
    colored = lines[len(text) - len(rows):]
    assert RED in colored[0]          # full: red
    assert AMBER in colored[1]        # above 80 %: amber
    assert RED not in colored[2] and AMBER not in colored[2]  # 80 % exactly is not above it
    joined = "\n".join(text)
    for word in ("configured tier", "batch 10", "wait 100 ms", "waits/s", "failures", "inbox_overflow"):
        assert word in joined, (word, joined)
    if width == 200:
        assert "10/10" in rows[0] and "9/10" in rows[1]
        assert "Inbox of full-agent is full" in joined


@pytest.mark.parametrize("width", [40, 200])
def test_an_open_circuit_is_marked_on_its_row_and_counted_in_the_header(make_bus, width):
    """full-agent's circuit tripped (its sends failed), in another handle, as
    another process would: the frame reads it, the row says [open] in red,
    and the header counts it; closed circuits are not marked."""
    flaky = make_bus(max_inbox_size=1, backpressure_wait_ms=1, backpressure_max_retries=2, breaker_failures=3)
    flaky.init_message_bus("full-agent-with-a-long-name")
    flaky.send_message("x", "full-agent-with-a-long-name", "t", 0)
    for _ in range(3):
        with pytest.raises(cfn_fast.BackpressureTimeout):
            flaky.send_with_backpressure("x", "full-agent-with-a-long-name", "t", 1)
    quiet = make_bus()
    quiet.init_message_bus("quiet")
    quiet.get_inbox_size("quiet")
    frame = top.Viewer(quiet, 1.0).frame()
    assert frame.circuits == {"full-agent-with-a-long-name": "open"}
    lines = draw(frame, width, 20)
    text = plain(lines)
    assert all(cell_len(t) <= width for t in text), text
    rows = rows_after_header(text)
    assert "[open]" in rows[0] and "[" not in rows[1], rows  # the mark survives a cut name
    assert RED in lines[len(text) - len(rows)]
    assert "circuits 1 open" in "\n".join(text)
    half = frame._replace(circuits={"full-agent-with-a-long-name": "half-open"})
    text = plain(draw(half, width, 20))
    assert "[half]" in rows_after_header(text)[0] and "0 open" in "\n".join(text)


def test_ten_thousand_inboxes_show_the_fullest_that_fit(make_bus):
    slots = [SlotInfo(f"agent-{i:05d}", i % 997, 1000, 0, 0) for i in range(10_000)]
    slots.append(SlotInfo("the-full-one", 1000, 0, 3, 0))  # capacity 0: the slot records none, 1000 holds
    snap = snapshot.make("/dev/shm/x", slots, 1000, {}, RateLimit("high", 5, 200, True, 0.93))
    frame = top.Frame(snap, {"backpressure_wait": 12.5, "backpressure_failure": 0.0}, [], 1.0)
    t0 = time.perf_counter()
    lines = plain(draw(frame, 80, 24))
    elapsed = time.perf_counter() - t0
    assert len(lines) <= 24
    rows = rows_after_header(lines)
    assert rows[0].startswith("the-full-one") and "100%" in rows[0]
    assert "showing" in lines[-1] and "10,001" in lines[-1]
    assert "high tier" in lines[1] and "load 0.93/CPU" in "\n".join(lines)
    joined = "\n".join(lines)
    assert "1 full" in joined and "senders waiting 3" in joined and "10,001" in joined
    assert elapsed < 10  # sanity only; bench/bench_ops.py measures it


@pytest.mark.parametrize("size", [(10, 3), (20, 5), (41, 8), (300, 80)])
def test_any_terminal_size_is_drawn_within_bounds(swarm, size):
    width, height = size
    lines = plain(draw(top.Viewer(swarm, 0.5).frame(), width, height))
    assert len(lines) <= height and all(cell_len(t) <= max(width, 10) for t in lines)


def test_fill_style_thresholds():
    assert top.fill_style(Inbox("a", 80, 100, 0)) == top.GREEN
    assert top.fill_style(Inbox("a", 81, 100, 0)) == top.AMBER
    assert top.fill_style(Inbox("a", 99, 100, 0)) == top.AMBER
    assert top.fill_style(Inbox("a", 100, 100, 0)) == top.RED
    assert top.fill_style(Inbox("a", 101, 100, 0)) == top.RED


def test_on_a_pipe_top_prints_one_plain_frame(swarm):
    env = dict(os.environ, COLUMNS="100")
    r = subprocess.run([sys.executable, "-m", "cfn_fast", "top"], capture_output=True, text=True, timeout=60,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert "\x1b" not in r.stdout
    rows = rows_after_header(r.stdout.splitlines())
    assert rows[0].startswith("full-agent") and "10/10" in rows[0]


# -- the live view, in a real terminal ---------------------------------------------------------

def _tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("tmux is missing: .ci/run installs it")
        pytest.skip("tmux is not installed")
    return path


class Tmux:
    def __init__(self, socket: Path, width: int, height: int, script: Path) -> None:
        self.base = [_tmux(), "-S", str(socket), "-f", "/dev/null"]
        subprocess.run(self.base + ["new-session", "-d", "-x", str(width), "-y", str(height), "-c",
                                    str(script.parent), f"bash {shlex.quote(str(script))}"], check=True, timeout=30)

    def screen(self) -> list[str]:
        r = subprocess.run(self.base + ["capture-pane", "-p", "-t", "0"], capture_output=True, text=True,
                           timeout=30)
        return r.stdout.splitlines()

    def keys(self, *keys: str) -> None:
        subprocess.run(self.base + ["send-keys", "-t", "0", *keys], check=True, timeout=30)

    def wait(self, what: str, ok: Callable[[list[str]], bool], timeout: float = 30) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            lines = self.screen()
            if ok(lines):
                return lines
            if time.monotonic() > deadline:
                pytest.fail(f"the screen never showed {what}:\n" + "\n".join(lines))
            time.sleep(0.1)

    def close(self) -> None:
        subprocess.run(self.base + ["kill-server"], capture_output=True, timeout=30)


def _row(lines: list[str], agent: str) -> str:
    return next((line for line in lines if line.startswith(agent + " ")), "")


def test_top_in_a_real_terminal_updates_and_quits_on_q(swarm, workdir):
    env = {k: v for k, v in os.environ.items() if k.startswith(("MESSAGE_", "METRICS_", "ALERT_", "MAX_"))}
    script = workdir / "top.sh"
    script.write_text("".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items()) +
                      "export LANG=C.UTF-8\n"
                      "echo BEFORE-TOP\n"
                      f"{shlex.quote(sys.executable)} -m cfn_fast top --interval 0.2\n"
                      "echo EXIT=$?\n"
                      "stty -a | grep -o -w -- '-\\?echo' | head -1\n"
                      "stty -a | grep -o -w -- '-\\?icanon'\n"
                      "sleep 60\n")
    tmux = Tmux(workdir / "tmux.sock", 100, 30, script)
    try:
        lines = tmux.wait("the full inbox in the top row",
                          lambda s: any(x.startswith("AGENT") for x in s) and
                          rows_after_header(s)[0].startswith("full-agent"))
        first = rows_after_header(lines)[0]
        assert "10/10" in first and first.rstrip().endswith("100%"), lines
        assert any("cfn-fast top" in x for x in lines)
        assert "BEFORE-TOP" not in "\n".join(lines)  # full screen: the shell's lines are hidden

        assert "0/1000" in _row(lines, "quiet-07")
        r = subprocess.run([sys.executable, "-m", "cfn_fast", "bus", "send", "x", "quiet-07", "t", "1"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        tmux.wait("the send from another process", lambda s: "1/1000" in _row(s, "quiet-07"))

        tmux.keys("q")
        after = tmux.wait("the shell again", lambda s: any(x in ("icanon", "-icanon") for x in s))
        text = "\n".join(after)
        assert "EXIT=0" in text
        assert "BEFORE-TOP" in text  # the alternate screen is gone: the shell's own screen is back
        assert "AGENT" not in text
        assert re.search(r"^echo$", text, re.M) and re.search(r"^icanon$", text, re.M), text  # modes restored
    finally:
        tmux.close()
