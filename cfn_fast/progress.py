"""Progress bars for the long commands (``bus send-batch`` fed from a file,
``bus recover`` over every inbox; ``demo`` has its own): drawn on stderr
when it is a terminal, nothing at all when it is not, so a pipe or a log
file never receives a bar. click draws them (imported only for a bar).
"""
from __future__ import annotations

import contextlib
import os
import stat
import sys
from typing import Any, Callable, Iterator, Optional

Advance = Callable[[int], None]
Step = Callable[[int, int], None]


def on_terminal(stream: Any = None) -> bool:
    """Whether ``stream`` (stderr by default) is a terminal."""
    s = sys.stderr if stream is None else stream
    try:
        return bool(s.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def stdin_length() -> Optional[int]:
    """Bytes left to read on stdin when it is a regular file (``< file``);
    None for a pipe, a terminal or nothing."""
    try:
        fd = sys.stdin.fileno()
        st = os.fstat(fd)
    except (AttributeError, ValueError, OSError):
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    try:
        pos = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        pos = 0
    return max(0, st.st_size - pos)


def _click_bar(total: int, label: str, show_pos: bool) -> Any:
    import click

    # at most ~200 redraws, whatever the total (a redraw per line of a big file costs)
    return click.progressbar(length=total, label=label, file=sys.stderr, show_pos=show_pos, show_percent=True,
                             show_eta=True, width=30, update_min_steps=max(1, total // 200))


@contextlib.contextmanager
def bar(total: Optional[int], label: str, show_pos: bool = True,
        enabled: Optional[bool] = None) -> Iterator[Advance]:
    """Yields ``advance(n)``. A bar of ``total`` steps when ``enabled`` (by
    default: stderr is a terminal) and the total is known; else a no-op."""
    on = on_terminal() if enabled is None else enabled
    if not on or not total:
        yield lambda n: None
        return
    with _click_bar(total, label, show_pos) as b:
        yield b.update


@contextlib.contextmanager
def steps(label: str, enabled: Optional[bool] = None) -> Iterator[Step]:
    """Yields ``step(done, total)`` for a loop that learns its total as it
    starts: the bar appears at the first call (when stderr is a terminal)."""
    on = on_terminal() if enabled is None else enabled
    state: dict[str, Any] = {}

    def step(done: int, total: int) -> None:
        if not on or total <= 0:
            return
        b = state.get("bar")
        if b is None:
            b = state["bar"] = _click_bar(total, label, True)
            b.__enter__()
        b.update(done - b.pos)

    try:
        yield step
    finally:
        b = state.get("bar")
        if b is not None:
            b.__exit__(None, None, None)


__all__ = ["bar", "on_terminal", "stdin_length", "steps"]
